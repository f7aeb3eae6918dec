"""One error root, three families (after the Singer SDK and dlt).

* :class:`FatalError` stops the run (bad config, bad credentials, a broken contract).
* :class:`TransientError` may succeed if tried again (429, 5xx, timeouts, resets).
* Row-level problems are *not* exceptions: they become :class:`sync.model.RowIssue`
  values, so one bad row can never stop a run.

Every message names the activation (and, where there is one, the file and field)
and never contains a secret.
"""

from __future__ import annotations


class SyncError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = 1


class FatalError(SyncError):
    """Stop the run now; retrying cannot help."""


class TransientError(SyncError):
    """Retrying later may succeed."""


class ConfigError(FatalError):
    """An activation file (or runtime setting) is invalid. Raised before anything is read or sent."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        where = ", ".join(p for p in (source, f"field '{field}'" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class BatchUnreachable(TransientError):
    """Several attempts in a row could not connect to Batch's host: the run stops (retryable)."""


class BatchAuthError(FatalError):
    """Batch answered 401: the REST API key is not valid for this project key."""

    exit_code = 4


class BatchContractError(FatalError):
    """Batch answered 400 to a whole request: our client broke the contract."""


class GuardTripped(FatalError):
    """A safety guard refused the plan before anything was sent."""

    exit_code = 3


class LeaseHeld(SyncError):
    """Another run of the same activation holds the lease; this one exits cleanly."""

    exit_code = 5


class LeaseLost(FatalError):
    """Our lease expired and another run took it: nothing more may be committed."""
