"""The results tables' schema, and how a run record and its rejected rows become their rows.

Two tables, the same in BigQuery and DuckDB (``docs/results.md`` documents every column):

* ``cepsync_runs``: one row per run, the run record's fields typed (counts as ``n_*``
  columns, maps and lists as JSON text, the whole record as JSON in ``record``);
* ``cepsync_rejections``: one row per issue of a rejected or refused profile (a row rejected
  for two reasons is two rows), with the run's id and start time.

Rejected rows can be many (a run may reject 100,000), so :class:`RejectionSpool` streams
them into a Parquet file on disk, a row group every :data:`SPOOL_GROUP_ROWS` rows: memory
holds one row group at most, and the file is what the load job (BigQuery) or the insert
(DuckDB) reads.

A rejected value can be personal data. An issue's detail quotes the offending value
(``sync/convert.py``); unless the activation sets ``results.include_values``, the value is
cut out of the detail and the ``value`` column stays empty (:func:`split_detail`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from sync.scratch import scratch_prefix

RUNS_TABLE: Final = "cepsync_runs"
REJECTIONS_TABLE: Final = "cepsync_rejections"
# Rows held in memory before the spool writes them to its file as one Parquet row group.
SPOOL_GROUP_ROWS: Final = 10_000

_TIMESTAMP = pa.timestamp("us", tz="UTC")

# The run record's counts (docs/run-record.md, "Counts"), each an INT64 column ``n_<key>``.
COUNT_COLUMNS: Final = (
    "rows",
    "new",
    "changed",
    "unchanged",
    "skipped_unmapped",
    "refreshed",
    "removed",
    "rejected",
    "duplicates",
    "refused_unchanged",
    "persistent_unchanged",
    "sent",
    "acknowledged",
    "rejected_by_batch",
    "failed",
    "failed_by_item_error",
    "persistent",
    "item_errors_retried",
    "skipped_by_checkpoint",
    "unconfirmed",
)

# (name, Arrow type, required). BigQuery and DuckDB types follow from the Arrow type.
RUNS_COLUMNS: Final[tuple[tuple[str, pa.DataType, bool], ...]] = (
    ("run_id", pa.string(), True),
    ("activation", pa.string(), True),
    ("started_at", _TIMESTAMP, True),
    ("ended_at", _TIMESTAMP, False),
    ("status", pa.string(), True),
    ("run_type", pa.string(), False),
    ("sync_mode", pa.string(), False),
    ("trigger_kind", pa.string(), False),
    ("trigger_id", pa.string(), False),
    ("continuation_of", pa.string(), False),
    ("full_pass", pa.bool_(), False),
    ("endpoint", pa.string(), False),
    ("mapping_version", pa.string(), False),
    ("mapping_previous", pa.string(), False),
    ("mapping_changed", pa.bool_(), False),
    *((f"n_{key}", pa.int64(), False) for key in COUNT_COLUMNS),
    ("rejected_by_reason", pa.string(), False),
    ("dropped_attributes_by_reason", pa.string(), False),
    ("guards", pa.string(), False),
    ("guard_tripped", pa.bool_(), False),
    ("warnings", pa.string(), False),
    ("total_seconds", pa.float64(), False),
    ("first_request_seconds", pa.float64(), False),
    ("send_seconds", pa.float64(), False),
    ("source_bytes_processed", pa.int64(), False),
    ("source_job_id", pa.string(), False),
    ("lease_token", pa.int64(), False),
    ("error", pa.string(), False),
    ("retryable", pa.bool_(), False),
    ("rejections_written", pa.int64(), False),
    ("rejections_not_written", pa.int64(), False),
    ("record", pa.string(), False),
    ("written_at", _TIMESTAMP, True),
)

REJECTIONS_COLUMNS: Final[tuple[tuple[str, pa.DataType, bool], ...]] = (
    ("run_id", pa.string(), True),
    ("activation", pa.string(), True),
    ("started_at", _TIMESTAMP, True),
    ("segment_row", pa.int64(), False),
    ("custom_id", pa.string(), False),
    ("reason", pa.string(), True),
    ("field", pa.string(), False),
    ("detail", pa.string(), False),
    ("batch_reason", pa.string(), False),
    ("value", pa.string(), False),
    ("from_batch", pa.bool_(), True),
    ("attribute_dropped", pa.bool_(), True),
    ("row_sent", pa.bool_(), False),
)


def arrow_schema(columns: tuple[tuple[str, pa.DataType, bool], ...]) -> pa.Schema:
    return pa.schema([pa.field(name, kind, nullable=not required) for name, kind, required in columns])


RUNS_SCHEMA: Final = arrow_schema(RUNS_COLUMNS)
REJECTIONS_SCHEMA: Final = arrow_schema(REJECTIONS_COLUMNS)

# Reason codes that are Batch's answers, not checks of ours (sync/model.py, Reason.from_batch).
BATCH_REASONS: Final = frozenset({"batch_rejected", "batch_item_error", "batch_persistent_error"})

# How a detail quotes its value (sync/convert.py: _wrong_type, then _fail). No message of
# ours holds ": " or ", got ", so the first of them ends the message.
_WRONG_TYPE = re.compile(r"^(expected [^:]*?, got [A-Za-z_][A-Za-z0-9_]*) (.*)$", re.DOTALL)
# Batch's reason inside the details the engine and the planner write (sync/engine.py, sync/plan.py).
_BATCH_DETAILS: Final = (
    re.compile(r"^Batch: (.*), for this payload \d+ runs in a row: persistent, .*$", re.DOTALL),
    re.compile(r"^Batch: (.*) \(not about the value; .*$", re.DOTALL),
    re.compile(
        r"^Batch (?:answered this payload with an error not about its value \d+ runs in a row|refused this "
        r"payload before) \((.*)\); not sent again until it changes.*$",
        re.DOTALL,
    ),
    re.compile(r"^Batch: (.*)$", re.DOTALL),
)


def split_detail(reason: str, detail: str | None) -> tuple[str | None, str | None]:
    """An issue's detail as (message without the value, the value as quoted), for our reasons.

    Batch's reasons and details that quote no value (``custom_id is null``, a duplicate id's
    count) come back whole, with no value.
    """
    if detail is None or reason in BATCH_REASONS:
        return detail, None
    match = _WRONG_TYPE.match(detail)
    if match is not None:
        return match.group(1), match.group(2)
    message, separator, value = detail.partition(": ")
    if separator:
        return message, value
    return detail, None


def batch_reason(reason: str, detail: str | None) -> str | None:
    """Batch's own reason, out of the detail of one of Batch's answers; None for ours."""
    if detail is None or reason not in BATCH_REASONS:
        return None
    for pattern in _BATCH_DETAILS:
        match = pattern.match(detail)
        if match is not None:
            return match.group(1)
    return detail


# A run record is JSON (the engine's, or one of an older version): a part is looked at as what
# it is, and a part missing or not of its shape reads as empty. The rest goes on unread, as
# JSON text or a column's value.


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[object]:
    return value if isinstance(value, list | tuple) else ()


def _text(value: object) -> str | None:
    """A detail as text (a detail that is not a string, from another version, is written as its text)."""
    return None if value is None else str(value)


def _timestamp(value: object) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _json(value: object) -> str | None:
    if value is None or value == {} or value == []:
        return None
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SpoolTally:
    """What the spool holds: rows written to its file, and rows over the cap left out."""

    written: int
    not_written: int


def run_row(record: Mapping[str, object], *, tally: SpoolTally, include_values: bool, written_at: datetime) -> pa.Table:
    """The run record as the one row of ``cepsync_runs``."""
    counts = _mapping(record.get("counts"))
    mapping = _mapping(record.get("mapping_version"))
    trigger = _mapping(record.get("trigger"))
    timings = _mapping(record.get("timings"))
    source = _mapping(record.get("source"))
    guards = record.get("guards") or []
    kept = dict(record)
    if not include_values:
        # Samples quote rejected values (docs/run-record.md); the rejections table has every
        # row without them.
        kept.pop("rejected_samples", None)
    row: dict[str, object] = {
        "run_id": record["run_id"],
        "activation": record["activation"],
        "started_at": _timestamp(record["started_at"]),
        "ended_at": _timestamp(record.get("ended_at")),
        "status": str(record.get("status")),
        "run_type": record.get("run_type"),
        "sync_mode": record.get("sync_mode"),
        "trigger_kind": trigger.get("kind"),
        "trigger_id": record.get("trigger_id"),
        "continuation_of": record.get("continuation_of"),
        "full_pass": bool(record.get("full")),
        "endpoint": record.get("endpoint"),
        "mapping_version": mapping.get("current"),
        "mapping_previous": mapping.get("previous"),
        "mapping_changed": mapping.get("changed") if mapping else None,
        **{f"n_{key}": _int(counts.get(key)) for key in COUNT_COLUMNS},
        "rejected_by_reason": _json(record.get("rejected_by_reason")),
        "dropped_attributes_by_reason": _json(record.get("dropped_attributes_by_reason")),
        "guards": _json(guards),
        "guard_tripped": any(
            g.get("tripped") and not g.get("overridden") for g in _sequence(guards) if isinstance(g, Mapping)
        ),
        "warnings": _json(record.get("warnings")),
        "total_seconds": _float(timings.get("total_seconds")),
        "first_request_seconds": _float(timings.get("first_request_seconds")),
        "send_seconds": _float(timings.get("send_seconds")),
        "source_bytes_processed": _int(source.get("bytes_processed")),
        "source_job_id": source.get("job_id"),
        "lease_token": _int(record.get("lease_token")),
        "error": record.get("error"),
        "retryable": record.get("retryable"),
        "rejections_written": tally.written,
        "rejections_not_written": tally.not_written,
        "record": json.dumps(kept, sort_keys=True, ensure_ascii=False, default=str),
        "written_at": written_at,
    }
    return pa.Table.from_pylist([row], schema=RUNS_SCHEMA)


class RejectionSpool:
    """Every rejected row of one run, streamed into a Parquet file (see the module docstring).

    :meth:`add` takes the records ``cepsync run --rejects`` writes (``{run_id, activation,
    row, custom_id, issues: [{field, reason, detail}], attribute_dropped?, row_sent?}``).
    Rows past ``max_rows`` are counted, not written.
    """

    def __init__(self, *, started_at: str, include_values: bool, max_rows: int) -> None:
        self._started_at = _timestamp(started_at)
        self._include_values = include_values
        self._max_rows = max_rows
        self._directory = Path(tempfile.mkdtemp(prefix=scratch_prefix("results")))
        # Removed at the latest when the spool is collected (an interrupted run never finishes it).
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        self.path = self._directory / "rejections.parquet"
        self._writer: pq.ParquetWriter | None = None
        self._buffer: dict[str, list[object]] = {name: [] for name, _, _ in REJECTIONS_COLUMNS}
        self._buffered = 0
        self.written = 0
        self.not_written = 0

    def add(self, rejected: Mapping[str, object]) -> None:
        dropped = bool(rejected.get("attribute_dropped"))
        for issue in _sequence(rejected.get("issues")):
            if not isinstance(issue, Mapping):
                continue  # not an issue (a record of another shape): nothing to write
            if self.written + self._buffered >= self._max_rows:
                self.not_written += 1
                continue
            reason = str(issue.get("reason"))
            detail = _text(issue.get("detail"))
            message, value = split_detail(reason, detail)
            columns = self._buffer
            columns["run_id"].append(rejected.get("run_id"))
            columns["activation"].append(rejected.get("activation"))
            columns["started_at"].append(self._started_at)
            columns["segment_row"].append(rejected.get("row"))
            columns["custom_id"].append(rejected.get("custom_id"))
            columns["reason"].append(reason)
            columns["field"].append(issue.get("field"))
            columns["detail"].append(detail if self._include_values else message)
            columns["batch_reason"].append(batch_reason(reason, detail))
            columns["value"].append(value if self._include_values else None)
            columns["from_batch"].append(reason in BATCH_REASONS)
            columns["attribute_dropped"].append(dropped)
            columns["row_sent"].append(rejected.get("row_sent") if dropped else None)
            self._buffered += 1
        if self._buffered >= SPOOL_GROUP_ROWS:
            self._flush()

    def finish(self) -> SpoolTally:
        """Write what is buffered and close the file (it stays until :meth:`close`)."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return SpoolTally(self.written, self.not_written)

    @property
    def has_rows(self) -> bool:
        return self.written > 0

    def close(self) -> None:
        """Remove the file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._cleanup()

    def _flush(self) -> None:
        if not self._buffered:
            return
        table = pa.Table.from_pydict(self._buffer, schema=REJECTIONS_SCHEMA)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, REJECTIONS_SCHEMA, compression="zstd")
        self._writer.write_table(table)
        self.written += self._buffered
        self._buffer = {name: [] for name in self._buffer}
        self._buffered = 0
