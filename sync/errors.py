"""One error root, three families (after the Singer SDK and dlt).

* :class:`FatalError` stops the run (bad config, bad credentials, a broken contract);
  retrying cannot help.
* :class:`TransientError` may succeed if tried again (429, 5xx, timeouts, resets).
* :class:`ConflictError`: another run is already doing this work, so this one does
  nothing; nothing is wrong and nothing needs a retry.
* Row-level problems are *not* exceptions: they become :class:`sync.model.RowIssue`
  values, so one bad row can never stop a run.

Errors carry no exit code or HTTP status: the edges (the CLI, the Cloud Function) map an
error's family to a :class:`sync.record.RunStatus` with :func:`sync.record.status_of_error`,
and the status carries the exit code and the HTTP status.

Every message names the activation (and, where there is one, the file and field)
and never contains a secret.
"""

from __future__ import annotations


class SyncError(Exception):
    """Root of every error this package raises on purpose."""


class FatalError(SyncError):
    """Stop the run now; retrying cannot help."""


class TransientError(SyncError):
    """Retrying later may succeed."""


class ConflictError(SyncError):
    """Another run is doing this work: this one stops without doing anything, and that is fine."""


class ConfigError(FatalError):
    """An activation file (or runtime setting) is invalid. Raised before anything is read or sent."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        self.message = message  # without the source and field (a caller may re-attribute it)
        where = ", ".join(p for p in (source, f"field '{field}'" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class BatchUnreachable(TransientError):
    """Batch's host cannot be connected to, or connects and never answers: the run stops (retryable)."""


class BatchAuthError(FatalError):
    """Batch answered 401: the REST API key is not valid for this project key."""


class BatchContractError(FatalError):
    """Batch answered 400 to a whole request: our client broke the contract."""


class GuardTripped(FatalError):
    """A safety guard refused the plan before anything was sent."""


class LeaseHeld(ConflictError):
    """Another run of the same activation holds the lease; this one exits cleanly."""


class LeaseLost(FatalError):
    """Our lease expired and another run took it: nothing more may be committed."""


class RetryableRunError(TransientError):
    """The Cloud Function raises it to the framework so that Pub/Sub redelivers the event (with its backoff)."""
