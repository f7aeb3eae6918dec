"""The run-end log line: one structured line per finished run, a stable schema for metrics.

Cloud Logging turns each JSON line the function writes into a log entry; the log-based
metrics, alert policies and dashboard in ``infra/monitoring.tf`` read *only* the fields
built here, so this module is a public interface (documented in ``docs/run-end-log.md``):

* the line is recognised by ``jsonPayload.cepsync_event = "run_end.v1"`` (:data:`RUN_END_EVENT`);
* its fields live under ``jsonPayload.run`` (:func:`run_end_fields`);
* a new field may be added within ``v1``; renaming, removing or retyping a field means a new
  event name (``run_end.v2``), emitted beside the old one until the Terraform follows.

Failed runs are written at severity ERROR in the shape Error Reporting recognises in a log
entry (``@type`` ReportedErrorEvent, ``serviceContext``, ``context.reportLocation``), so
failures are grouped per status there without a stack trace.

The line is emitted at the edges (``cepsync run`` and the Cloud Function's invocation end),
never by the engine: a plan or a test run of the engine writes no metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TypedDict

from sync import __version__
from sync.logs import Logger, get_logger
from sync.record import RunStatus

RUN_END_EVENT = "run_end.v1"
SCHEMA_VERSION = 1
SERVICE = "cepsync"
# Error Reporting reads a log entry whose jsonPayload carries this @type as one error event
# (cloud.google.com/error-reporting/docs/formatting-error-messages).
ERROR_EVENT_TYPE = "type.googleapis.com/google.devtools.clouderrorreporting.v1beta1.ReportedErrorEvent"

# Outcome of a run, for alerts: a success, a failure someone must look at, or neither
# (nothing to do, another run holds the lease, a continuation will finish the pass).
SUCCESS_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.SUCCEEDED_WITH_REJECTIONS})
ERROR_STATUSES = frozenset(
    {
        RunStatus.FAILED,
        RunStatus.FAILED_PERMANENTLY,
        RunStatus.AUTH_ERROR,
        RunStatus.CONFIG_ERROR,
        RunStatus.PARTIAL,
    }
)
# Stopped on purpose or from outside: not an error of the sync, but it did not sync.
STOPPED_STATUSES = frozenset({RunStatus.ABORTED_BY_GUARD, RunStatus.INTERRUPTED, RunStatus.ABANDONED})
WARNING_STATUSES = STOPPED_STATUSES | {RunStatus.SKIPPED_LEASE_HELD, RunStatus.INCOMPLETE}

PROFILE_COUNTS = (
    "rows",
    "new",
    "changed",
    "unchanged",
    "removed",
    "rejected",
    "rejected_by_batch",
    "sent",
    "acknowledged",
    "failed",
)
# What Batch's per-item errors came to (docs/batch-api.md, "Per-item errors"): in the run record and
# `cepsync history --format csv`, not (yet) in the run-end line, whose fields are an API.
ITEM_ERROR_COUNTS = (
    "refused_unchanged",
    "failed_by_item_error",
    "item_errors_retried",
    "persistent",
    "persistent_unchanged",
)
# The engine's timings.stages keys (sync.record.StageTimings), in pipeline order.
KNOWN_STAGES = ("read", "hash_and_diff", "map", "send", "batch_wait", "rate_limit_wait", "commit")
_MAX_ERROR = 500


def outcome(status: str) -> str:
    """``success``, ``failure`` or ``other`` (alerts count the first two)."""
    known = RunStatus.of(status)
    if known in SUCCESS_STATUSES:
        return "success"
    if known in ERROR_STATUSES or known in STOPPED_STATUSES:
        return "failure"
    return "other"


def severity(status: str) -> str:
    """The log severity of a run's end: ERROR for failures, WARNING when it did not sync."""
    known = RunStatus.of(status)
    if known in ERROR_STATUSES:
        return "error"
    if known in WARNING_STATUSES:
        return "warning"
    return "info"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _part(record: Mapping[str, object], key: str) -> Mapping[str, object]:
    """One object-valued part of a record (``counts``, ``timings``...); empty when absent or odd."""
    value = record.get(key)
    return value if isinstance(value, Mapping) else {}


def count_of(counts: Mapping[str, object], key: str) -> int:
    """One count of a record: 0 when absent or not an integer (a record of another version)."""
    return _int(counts.get(key))


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return round(float(value), 3)
    return None


def duration_seconds(record: Mapping[str, object]) -> float | None:
    """The run's wall time: ``timings.total_seconds``, else ended_at - started_at, else None."""
    timings = _part(record, "timings")
    total = _seconds(timings.get("total_seconds"))
    if total is not None:
        return total
    try:
        started = datetime.fromisoformat(str(record["started_at"]))
        ended = datetime.fromisoformat(str(record["ended_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    return _seconds((ended - started).total_seconds())


def stage_seconds(record: Mapping[str, object]) -> dict[str, float]:
    """Seconds per pipeline stage, known stages first in pipeline order, then any others.

    Records written before the engine timed each stage have none: an empty dict.
    """
    stages = _part(_part(record, "timings"), "stages")
    ordered = [name for name in KNOWN_STAGES if name in stages]
    ordered += sorted(str(name) for name in stages if name not in KNOWN_STAGES)
    result = {}
    for name in ordered:
        seconds = _seconds(stages.get(name))
        if seconds is not None:
            result[name] = seconds
    return result


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def rejected_total(counts: Mapping[str, object]) -> int:
    """Rows not synced because of their content: refused by us before sending, or by Batch."""
    return _int(counts.get("rejected")) + _int(counts.get("rejected_by_batch"))


class RunEndFields(TypedDict):
    """The ``jsonPayload.run`` object: the run-end line's public schema (``docs/run-end-log.md``)."""

    schema_version: int
    activation: str
    run_id: str
    status: str
    outcome: str
    trigger: object
    trigger_id: object
    continuation_of: object
    started_at: object
    ended_at: object
    duration_seconds: float
    run_type: object
    sync_mode: object
    full: bool
    endpoint: object
    mapping_changed: bool
    profiles: dict[str, int]
    rejected_share: float
    stages_seconds: dict[str, float]
    guards_tripped: list[str]
    error: str | None


def run_end_fields(record: Mapping[str, object]) -> RunEndFields:
    """The ``jsonPayload.run`` object of the run-end line, from a run record.

    Every field is always present (0, false, null or empty when the run did not get that
    far), so a metric's value extractor never meets a missing field.
    """
    status = str(record.get("status") or "unknown")
    counts = _part(record, "counts")
    profiles = {key: _int(counts.get(key)) for key in PROFILE_COUNTS}
    rows = profiles["rows"]
    rejected = rejected_total(counts)
    trigger = record.get("trigger")
    mapping = _part(record, "mapping_version")
    error = record.get("error")
    return {
        "schema_version": SCHEMA_VERSION,
        "activation": str(record.get("activation") or ""),
        "run_id": str(record.get("run_id") or ""),
        "status": status,
        "outcome": outcome(status),
        "trigger": trigger.get("kind") if isinstance(trigger, Mapping) else trigger,
        "trigger_id": record.get("trigger_id"),
        "continuation_of": record.get("continuation_of"),
        "started_at": record.get("started_at"),
        "ended_at": record.get("ended_at"),
        "duration_seconds": duration_seconds(record) or 0.0,
        "run_type": record.get("run_type"),
        "sync_mode": record.get("sync_mode"),
        "full": bool(record.get("full")),
        "endpoint": record.get("endpoint"),
        "mapping_changed": bool(mapping.get("changed")),
        "profiles": profiles,
        "rejected_share": round(rejected / rows, 4) if rows else 0.0,
        "stages_seconds": stage_seconds(record),
        "guards_tripped": sorted(
            str(guard.get("guard"))
            for guard in _list(record.get("guards"))
            if isinstance(guard, Mapping) and guard.get("tripped") and not guard.get("overridden")
        ),
        "error": str(error)[:_MAX_ERROR] if error else None,
    }


def run_end_entry(record: Mapping[str, object]) -> dict[str, object]:
    """Every key of the run-end line except ``severity`` and ``message`` (set by the logger).

    ``activation`` and ``run_id`` sit at the top level too: :mod:`sync.logs` makes them
    Cloud Logging labels, which is how the Logs Explorer filters one activation.
    """
    fields = run_end_fields(record)
    entry: dict[str, object] = {
        "cepsync_event": RUN_END_EVENT,
        "activation": fields["activation"],
        "run_id": fields["run_id"],
        "run": fields,
    }
    if severity(fields["status"]) == "error":
        entry["@type"] = ERROR_EVENT_TYPE
        entry["serviceContext"] = {"service": SERVICE, "version": __version__}
        # Without a stack trace, Error Reporting needs a report location; one per status
        # makes one error group per kind of failure, not one per run.
        entry["context"] = {
            "reportLocation": {"filePath": "sync/runlog.py", "lineNumber": 1, "functionName": f"run.{fields['status']}"}
        }
    return entry


def run_end_message(record: Mapping[str, object]) -> str:
    """The line's human message (and Error Reporting's error text for failures)."""
    fields = run_end_fields(record)
    text = f"cepsync run {fields['status']}: activation {fields['activation']}"
    if fields["error"] and severity(fields["status"]) != "info":
        text += f": {fields['error']}"
    return text


def log_run_end(record: Mapping[str, object], logger: Logger | None = None) -> None:
    """Write the run-end line at the run's severity (:mod:`sync.logs`).

    A record without a run id (a stale continuation answered without running) is not a
    run: nothing is written.
    """
    if not record.get("run_id"):
        return
    bound = logger if logger is not None else get_logger("cepsync.run")
    status = str(record.get("status") or "unknown")
    getattr(bound, severity(status))(run_end_message(record), **run_end_entry(record))


__all__ = [
    "KNOWN_STAGES",
    "RUN_END_EVENT",
    "SCHEMA_VERSION",
    "duration_seconds",
    "log_run_end",
    "outcome",
    "rejected_total",
    "run_end_entry",
    "run_end_fields",
    "severity",
    "stage_seconds",
]
