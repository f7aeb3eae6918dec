"""The run record: what one run did, as a typed structure, and the status vocabulary.

Every entry point reads the same record: the CLI prints it and picks its exit code, the
function answers its HTTP status, ``history`` and the report read it back from the state
store. :meth:`RunRecord.to_dict` is the stored JSON shape (stable keys, documented in
``docs/run-record.md``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class RunStatus(enum.StrEnum):
    """How a run ended. Each status knows its CLI exit code and the function's HTTP status."""

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

    @property
    def exit_code(self) -> int:
        """The CLI's exit code (README "Exit codes")."""
        return _EXIT_CODES.get(self, 1)


_EXIT_CODES: dict[RunStatus, int] = {
    RunStatus.SUCCEEDED: 0,
    RunStatus.SUCCEEDED_WITH_REJECTIONS: 0,
    RunStatus.PLANNED: 0,
    RunStatus.DUPLICATE_TRIGGER: 0,
    RunStatus.FAILED: 1,
    RunStatus.FAILED_PERMANENTLY: 1,
    RunStatus.CONFIG_ERROR: 2,
    RunStatus.ABORTED_BY_GUARD: 3,
    RunStatus.AUTH_ERROR: 4,
    RunStatus.SKIPPED_LEASE_HELD: 5,
    RunStatus.PARTIAL: 6,
    RunStatus.INCOMPLETE: 7,
    RunStatus.INTERRUPTED: 130,
}

# Status value -> exit code, for callers that hold a status as text (a stored record).
EXIT_CODES: dict[str, int] = {status.value: code for status, code in _EXIT_CODES.items()}


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
    run_type: str
    sync_mode: str
    trigger: dict[str, Any] = field(default_factory=dict)
    trigger_id: str | None = None
    continuation_of: str | None = None
    ended_at: str | None = None
    status: RunStatus = RunStatus.RUNNING
    full: bool = False
    endpoint: str | None = None
    mapping_version: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    dropped_attributes_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_samples: list[dict[str, Any]] = field(default_factory=list)
    guards: list[dict[str, Any]] = field(default_factory=list)
    # Guards approved for this run only (CLI --allow, or the function message's "allow").
    allow: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    lease_token: int | None = None
    error: str | None = None
    retryable: bool | None = None
    journal: dict[str, int] | None = None
    duplicate_of: str | None = None
    # Things that did not stop the run but deserve a look (an empty first segment).
    warnings: list[str] = field(default_factory=list)
    # The activation's config as it ran, without secrets (sync.runconfig).
    config: dict[str, Any] = field(default_factory=dict)
    # Fields written by the edges after the run (the function's hand-over), kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON shape (a plain dict; ``extra`` keys at the top level)."""
        data = {key: value for key, value in asdict(self).items() if key != "extra"}
        data["status"] = self.status.value
        for optional in ("retryable", "journal", "duplicate_of", "warnings", "allow"):
            if not data[optional] and data[optional] is not False:
                del data[optional]
        data.update(self.extra)
        return data
