"""The run record: what one run did, as a typed structure, and the status vocabulary.

Every entry point reads the same record: the CLI prints it and picks its exit code, the
function answers its HTTP status, ``history`` and the report read it back from the state
store. :meth:`RunRecord.to_dict` is the stored JSON shape (stable keys, documented in
``docs/run-record.md``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

from sync.errors import BatchAuthError, ConfigError, ConflictError, GuardTripped, SyncError, TransientError


class RunStatus(enum.StrEnum):
    """How a run ended, and what the function answered: the one status vocabulary.

    Each status carries the CLI's exit code (README "Exit codes") and the HTTP status the
    function answers with it (docs/function.md). A status read back from a stored record is
    looked up with :meth:`of`, which knows no status a newer version may have written.
    """

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SUCCEEDED_WITH_REJECTIONS = "succeeded_with_rejections"
    PLANNED = "planned"
    DUPLICATE_TRIGGER = "duplicate_trigger"
    FAILED = "failed"
    CONFIG_ERROR = "config_error"
    ABORTED_BY_GUARD = "aborted_by_guard"
    AUTH_ERROR = "auth_error"
    SKIPPED_LEASE_HELD = "skipped_lease_held"
    PARTIAL = "partial"
    INCOMPLETE = "incomplete"
    INTERRUPTED = "interrupted"
    ABANDONED = "abandoned"
    # The function's last allowed Pub/Sub delivery failed too: acknowledged, not retried.
    FAILED_PERMANENTLY = "failed_permanently"
    # Answered by the function without a run: a continuation of a pass that already ended,
    # and a message or request that is not {"activation": NAME, ...}.
    CONTINUATION_STALE = "continuation_stale"
    BAD_REQUEST = "bad_request"

    @classmethod
    def of(cls, value: object) -> RunStatus | None:
        """The status a record names, or None for one this version does not know."""
        try:
            return cls(str(value))
        except ValueError:
            return None

    @property
    def exit_code(self) -> int:
        """The CLI's exit code (README "Exit codes")."""
        return _CODES[self][0]

    @property
    def http_status(self) -> int:
        """The HTTP status of the function's answer (a failure marked retryable answers 503 instead)."""
        return _CODES[self][1]


# Status -> (CLI exit code, HTTP status of the function's answer). Pub/Sub ignores the HTTP
# status: only a raise makes it redeliver. The CLI never ends with the last two statuses.
_CODES: dict[RunStatus, tuple[int, int]] = {
    RunStatus.SUCCEEDED: (0, 200),
    RunStatus.SUCCEEDED_WITH_REJECTIONS: (0, 200),
    RunStatus.PLANNED: (0, 200),
    RunStatus.DUPLICATE_TRIGGER: (0, 200),
    RunStatus.CONTINUATION_STALE: (0, 200),
    RunStatus.FAILED: (1, 500),
    # Acknowledged on purpose: the message's delivery attempts are exhausted (Pub/Sub only).
    RunStatus.FAILED_PERMANENTLY: (1, 200),
    RunStatus.RUNNING: (1, 500),
    RunStatus.ABANDONED: (1, 500),
    RunStatus.CONFIG_ERROR: (2, 422),
    RunStatus.BAD_REQUEST: (2, 400),
    RunStatus.ABORTED_BY_GUARD: (3, 412),
    # Batch refused our REST API key or failed some profiles: an upstream problem, not the
    # caller's (a 401 here would read as "your OIDC token was refused").
    RunStatus.AUTH_ERROR: (4, 502),
    RunStatus.SKIPPED_LEASE_HELD: (5, 409),
    RunStatus.PARTIAL: (6, 502),
    # Accepted: the pass goes on in a continuation invocation.
    RunStatus.INCOMPLETE: (7, 202),
    RunStatus.INTERRUPTED: (130, 500),
}
# A status this version does not know (a newer record): a failure as far as we can tell.
UNKNOWN_STATUS_EXIT_CODE = 1
UNKNOWN_STATUS_HTTP_STATUS = 500
# The function's answer to a failure the engine marked retryable: Pub/Sub redelivers it.
RETRY_HTTP_STATUS = 503


def exit_code_of(status: object) -> int:
    """The exit code of a status as a record holds it (text), unknown ones included."""
    known = RunStatus.of(status)
    return known.exit_code if known is not None else UNKNOWN_STATUS_EXIT_CODE


def http_status_of(status: object) -> int:
    """The HTTP status of a status as a record holds it (text), unknown ones included."""
    known = RunStatus.of(status)
    return known.http_status if known is not None else UNKNOWN_STATUS_HTTP_STATUS


# Status value -> exit code, for callers that hold a status as text (a stored record).
EXIT_CODES: dict[str, int] = {status.value: status.exit_code for status in RunStatus}


def status_of_error(error: BaseException) -> RunStatus:
    """The status an error ends a run or a command with, by its family (sync.errors).

    The most specific kind first; any other error, ours or not, is a plain failure.
    """
    for kind, status in _STATUS_OF_ERROR:
        if isinstance(error, kind):
            return status
    return RunStatus.FAILED


def is_retryable(error: BaseException) -> bool:
    """Whether trying again may help: a :class:`TransientError`, or an error we did not foresee.

    Every other :class:`SyncError` (a :class:`FatalError`, a :class:`ConflictError`) is an
    answer that a retry would only repeat.
    """
    return isinstance(error, TransientError) or not isinstance(error, SyncError)


_STATUS_OF_ERROR: tuple[tuple[type[BaseException], RunStatus], ...] = (
    (ConfigError, RunStatus.CONFIG_ERROR),
    (GuardTripped, RunStatus.ABORTED_BY_GUARD),
    (BatchAuthError, RunStatus.AUTH_ERROR),
    (ConflictError, RunStatus.SKIPPED_LEASE_HELD),
)


@dataclass
class StageTimings:
    """Seconds per stage of a run (``timings.stages`` in the stored record).

    ``read``: pulling the segment from the source. ``hash_and_diff``: DuckDB hashing raw
    values and joining them with the stored fingerprints (one vectorised pass, so the two
    are not separable). ``map``: mapping, validating and fingerprinting the rows that moved.
    ``send``: the first request to the last one (overlaps reading and mapping: the pipeline
    streams). ``batch_wait``: time requests spent in flight at Batch, summed over requests.
    ``commit``: writing acknowledged fingerprints to the state store.
    """

    read: float = 0.0
    hash_and_diff: float = 0.0
    map: float = 0.0
    send: float = 0.0
    batch_wait: float = 0.0
    rate_limit_wait: float = 0.0
    commit: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 3) for key, value in asdict(self).items()}


@dataclass
class RunRecord:
    """One run, as stored. Built by the engine; every field has one writer."""

    run_id: str
    activation: str
    started_at: str
    run_type: str | None
    sync_mode: str | None
    trigger: dict[str, str | None] = field(default_factory=dict)
    trigger_id: str | None = None
    continuation_of: str | None = None
    ended_at: str | None = None
    status: RunStatus = RunStatus.RUNNING
    full: bool = False
    endpoint: str | None = None
    mapping_version: dict[str, object] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    dropped_attributes_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_samples: list[dict[str, object]] = field(default_factory=list)
    guards: list[dict[str, object]] = field(default_factory=list)
    # Guards approved for this run only (CLI --allow, or the function message's "allow").
    allow: list[str] = field(default_factory=list)
    timings: dict[str, object] = field(default_factory=dict)
    checkpoint: dict[str, object] | None = None
    source: dict[str, object] = field(default_factory=dict)
    lease_token: int | None = None
    error: str | None = None
    retryable: bool | None = None
    journal: dict[str, int] | None = None
    # What the run asked of its state store (Firestore: reads, writes, deletes, transactions,
    # contention retries), from sync.state.base.operations_between.
    state_ops: dict[str, str | int] | None = None
    duplicate_of: str | None = None
    # The run's Batch audience: membership changes, calls, indexing tokens (sync.audience).
    audience: dict[str, object] | None = None
    # Things that did not stop the run but deserve a look (an empty first segment).
    warnings: list[str] = field(default_factory=list)
    # The activation's config as it ran, without secrets (sync.runconfig).
    config: dict[str, object] = field(default_factory=dict)
    # Fields written by the edges after the run (the function's hand-over), kept verbatim.
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The stored JSON shape (a plain dict; ``extra`` keys at the top level)."""
        data = {key: value for key, value in asdict(self).items() if key != "extra"}
        data["status"] = self.status.value
        for optional in ("retryable", "journal", "state_ops", "duplicate_of", "warnings", "allow", "audience"):
            if not data[optional] and data[optional] is not False:
                del data[optional]
        data.update(self.extra)
        return data
