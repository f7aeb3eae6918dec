"""What an entry point hands a run and gets back, and the rules a run applies to earlier records.

The CLI, the deployed function and the benchmarks build a :class:`RunOptions` and read a
:class:`RunResult`; the engine (:mod:`sync.engine`) reads and writes nothing else of
theirs. The two rules over earlier run records (a redelivered trigger, a run that never
finished) are here too: they need the records (:class:`sync.state.base.RunStore`) and the
run's options, and nothing of the pipeline.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from sync.record import RunRecord, RunStatus, exit_code_of

if TYPE_CHECKING:  # the state stores (and pyarrow) load with a run, not with the options of one
    from sync.state.base import RunStore

__all__ = [
    "Clock",
    "PlanPreview",
    "Progress",
    "RunOptions",
    "RunResult",
    "close_abandoned_runs",
    "default_owner",
    "duplicate_trigger",
    "new_run_id",
]


class Clock:
    """Wall time for records and leases, monotonic time for budgets. Replaceable in tests."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Progress(Protocol):
    """What the engine tells a UI (the CLI draws progress bars; the function logs)."""

    def rows_read(self, rows: int) -> None: ...
    def planned(self, counts: dict[str, int]) -> None: ...
    def sending(self, total: int, endpoint: str) -> None: ...
    def sent(self, acknowledged: int, rejected: int, failed: int) -> None: ...


class NoProgress:
    """A UI that shows nothing (the default)."""

    def rows_read(self, rows: int) -> None:
        pass

    def planned(self, counts: dict[str, int]) -> None:
        pass

    def sending(self, total: int, endpoint: str) -> None:
        pass

    def sent(self, acknowledged: int, rejected: int, failed: int) -> None:
        pass


def new_run_id(clock: Clock) -> str:
    """Sortable run id: UTC timestamp then random suffix (``20261129T020304Z-3f9a1c``)."""
    return clock.now().strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class RunOptions:
    """Per-run switches, built by the entry point (CLI, Pub/Sub, HTTP)."""

    trigger: str = "cli"
    trigger_id: str | None = None
    full: bool = False
    allow_guards: tuple[str, ...] = ()
    lease_ttl_seconds: float = 300.0
    time_budget_seconds: float | None = None
    # Stop launching requests this long before the budget ends, to flush and hand over.
    budget_margin_seconds: float = 30.0
    owner: str = field(default_factory=default_owner)
    continuation_of: str | None = None
    # HTTP triggers: a request sent again with the same key runs again unless the run it
    # started succeeded (docs/function.md, "Idempotency"). Pub/Sub redeliveries keep the rule
    # of _duplicate_trigger: any ended run that is not a retryable failure is a duplicate.
    rerun_unless_succeeded: bool = False
    # Worker processes that map batches (sync.workers). None: as many as the machine spares
    # for large runs (none on two cores or fewer); 0: map in the pipeline's own thread.
    map_workers: int | None = None
    # The run's id when the entry point made it (``cepsync run`` names it in its first line,
    # before the engine loads); None: the run makes one (:func:`new_run_id`).
    run_id: str | None = None


@dataclass
class RunResult:
    """A run's outcome: its typed record (:class:`sync.record.RunRecord`) as it ended."""

    run: RunRecord

    @property
    def record(self) -> dict[str, object]:
        """The record's JSON form, as stored and printed (``--json``)."""
        return self.run.to_dict()

    @property
    def status(self) -> str:
        return self.run.status.value

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.status)

    @property
    def needs_continuation(self) -> bool:
        return self.status == RunStatus.INCOMPLETE.value


@dataclass
class PlanPreview:
    """A dry run's outcome: the record plus a sample of what would be sent and cleared."""

    record: dict[str, object]
    sample_changes: list[dict[str, object]]
    sample_removals: list[str]


def duplicate_trigger(runs: RunStore, activation: str, options: RunOptions) -> str | None:
    """The run a redelivered trigger already started, if it must not run again."""
    if not options.trigger_id:
        return None
    previous = runs.find_run_by_trigger(activation, options.trigger_id)
    if previous is not None and options.rerun_unless_succeeded:
        succeeded = (RunStatus.SUCCEEDED, RunStatus.SUCCEEDED_WITH_REJECTIONS)
        return str(previous["run_id"]) if RunStatus.of(previous.get("status")) in succeeded else None
    # A redelivery after a retryable failure must run again: that is why the function raised.
    if (
        previous is not None
        and previous.get("status") not in (RunStatus.RUNNING, RunStatus.SKIPPED_LEASE_HELD, RunStatus.ABANDONED)
        and not previous.get("retryable")
    ):
        return str(previous["run_id"])
    return None


def close_abandoned_runs(runs: RunStore, activation: str, run_id: str) -> None:
    """Runs still marked running once we hold the lease were killed or timed out: say so."""
    for record in runs.list_runs(activation, 20):
        if record.get("status") == RunStatus.RUNNING.value and record["run_id"] != run_id:
            record["status"] = RunStatus.ABANDONED.value
            record["error"] = (
                "the run stopped without finishing (process killed or timed out); what it committed up to "
                "its last checkpoint is kept, the rest was planned again by the next run"
            )
            record["abandoned_noticed_by"] = run_id
            runs.save_run(record)
