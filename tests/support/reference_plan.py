"""The row-at-a-time reference planner: what the engine decided before it worked in columns.

Kept in the tests only, as the model the columnar pipeline (sync.diff + sync.plan) must
agree with: tests/test_plan.py runs both on generated segments and compares decisions.
It maps every row one by one and keeps one Python object per custom_id.

Outcomes of one row:

* ``new``        — valid, no stored fingerprint: send (and, in mirror mode, record an intent first);
* ``changed``    — valid, payload fingerprint differs from the acknowledged one: send;
* ``unchanged``  — payload equals what Batch acknowledged: not sent (FULL ONLY and forced
                   full runs send it anyway);
* ``rejected``   — invalid value, bad or duplicate custom_id: never sent, state untouched,
                   and the person still counts as *in the segment* (never removed for it);
* ``removed``    — mirror mode only: an id this activation synced (fingerprint or intent)
                   that is no longer in the segment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa

from sync.config import RunType, SyncMode
from sync.fingerprint import canonical_json, payload_fingerprint_of
from sync.model import Fingerprint, JournalEntry, Reason, RowIssue
from tests.support.reference_mapping import MappedRow, map_row

if TYPE_CHECKING:
    from sync.mapping import ProfileMapper

# How many rejected rows a run record keeps verbatim (counts by reason are always complete).
REJECTED_SAMPLE_SIZE = 50
GUARD_NAMES = ("empty_segment", "removed_percent", "changed_percent")
COUNT_KEYS = (
    "rows",
    "new",
    "changed",
    "unchanged",
    "skipped_unmapped",
    "removed",
    "rejected",
    "duplicates",
    "refreshed",
)


class PayloadSpool:
    """Append-only temporary file of canonical payload JSON, addressed by (offset, length)."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="cepsync-spool-")  # noqa: SIM115 - closed by close()
        self._end = 0

    def append(self, data: bytes) -> tuple[int, int]:
        offset = self._end
        self._file.write(data)
        self._end += len(data)
        return offset, len(data)

    def read(self, offset: int, length: int) -> dict[str, Any]:
        self._file.seek(offset)
        payload: dict[str, Any] = json.loads(self._file.read(length))
        self._file.seek(self._end)
        return payload

    def close(self) -> None:
        self._file.close()


class _Row:
    """Planner bookkeeping for one custom_id (slots: a million of these stay small)."""

    __slots__ = ("copies", "fingerprint", "first_row", "kind", "length", "offset")

    def __init__(self, kind: str, first_row: int, fingerprint: Fingerprint | None, offset: int, length: int) -> None:
        self.kind = kind
        self.first_row = first_row
        self.fingerprint = fingerprint
        self.offset = offset
        self.length = length
        self.copies = 1


# One shared record for every row skipped without mapping (most rows of a delta run):
# a million skipped rows cost a dict entry each, not a million objects.
_SKIPPED = _Row("unchanged", 0, None, -1, 0)


@dataclass(frozen=True, slots=True)
class RejectedRow:
    row_number: int | None  # None: refused by Batch, after planning
    custom_id: str | None
    issues: tuple[RowIssue, ...]

    def as_record(self) -> dict[str, Any]:
        return {
            "row": self.row_number,
            "custom_id": self.custom_id,
            "issues": [{"field": i.field, "reason": i.reason.value, "detail": i.detail} for i in self.issues],
        }


@dataclass(frozen=True, slots=True)
class PlannedSend:
    """One profile to send: where its payload is in the spool and what to store once acknowledged."""

    custom_id: str
    kind: str  # new | changed | unchanged (FULL ONLY / forced full)
    fingerprint: Fingerprint
    offset: int
    length: int


@dataclass
class Plan:
    sends: list[PlannedSend]
    removals: list[str]
    refreshes: list[JournalEntry]
    counts: Counter[str]
    rejected_by_reason: Counter[str]
    rejected_samples: list[RejectedRow]
    dropped_by_reason: Counter[str]
    synced_before: int
    full: bool
    spool: PayloadSpool
    new_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {key: self.counts.get(key, 0) for key in COUNT_KEYS}


class Planner:
    """Feeds rows one at a time; ``finish()`` returns the plan.

    Args:
        run_type / sync_mode: from the activation.
        full: send every valid row (FULL ONLY, a first run, or ``--full``).
        stored: acknowledged fingerprints by custom_id.
        intents: ids recorded as possibly synced (mirror).
        on_reject: called with every rejected row (the run record keeps only a sample).
    """

    def __init__(
        self,
        *,
        run_type: RunType,
        sync_mode: SyncMode,
        full: bool,
        stored: Mapping[str, Fingerprint],
        intents: Iterable[str] = (),
        on_reject: Callable[[RejectedRow], None] | None = None,
    ) -> None:
        self._full = full or run_type is RunType.FULL_ONLY
        self._mirror = sync_mode is SyncMode.MIRROR
        self._stored = stored
        self._intents = set(intents)
        self._rows: dict[str, _Row] = {}
        self._counts: Counter[str] = Counter()
        self._rejected_by_reason: Counter[str] = Counter()
        self._dropped_by_reason: Counter[str] = Counter()
        self._samples: list[RejectedRow] = []
        self._spool = PayloadSpool()
        self._row_number = 0
        self._on_reject = on_reject

    @property
    def full(self) -> bool:
        return self._full

    # -- hot path ------------------------------------------------------------------------
    def try_skip(self, custom_id_value: Any, raw: int, row_number: int | None = None) -> bool:
        """Account for a row without mapping it, if its source values are unchanged.

        True when the row's custom_id has a stored fingerprint whose raw hash equals
        ``raw``: the values, and the mapping version, are those Batch acknowledged, so
        the payload is unchanged too. Never in a full run (every row must be sent).
        """
        if self._full:
            return False
        if isinstance(custom_id_value, int) and not isinstance(custom_id_value, bool):
            custom_id_value = str(custom_id_value)
        elif isinstance(custom_id_value, Decimal) and custom_id_value == custom_id_value.to_integral_value():
            custom_id_value = str(int(custom_id_value))  # NUMERIC ids, as the mapper writes them
        if not isinstance(custom_id_value, str):
            return False
        stored = self._stored.get(custom_id_value)
        if stored is None or stored.raw != raw:
            return False
        self._row_number = self._row_number + 1 if row_number is None else row_number
        self._counts["rows"] += 1
        self._counts["skipped_unmapped"] += 1
        existing = self._rows.get(custom_id_value)
        if existing is _SKIPPED:
            # A second copy: only now does this id need its own bookkeeping.
            existing = self._rows[custom_id_value] = _Row("unchanged", self._row_number, None, -1, 0)
        if existing is not None:
            existing.copies += 1
            return True
        self._rows[custom_id_value] = _SKIPPED
        return True

    def add(self, mapped: MappedRow, raw: int, row_number: int | None = None) -> None:
        """Account for one mapped row (``row_number`` counts from 1 in segment order)."""
        self._row_number = self._row_number + 1 if row_number is None else row_number
        self._counts["rows"] += 1
        for issue in mapped.issues if not mapped.rejected else ():
            self._dropped_by_reason[issue.reason.value] += 1
        custom_id = mapped.custom_id
        if custom_id is not None:
            existing = self._rows.get(custom_id)
            if existing is _SKIPPED:
                existing = self._rows[custom_id] = _Row("unchanged", self._row_number, None, -1, 0)
            if existing is not None:
                existing.copies += 1
                if mapped.rejected:
                    self._reject_reasons(mapped.issues)
                return
        if mapped.attributes is None:
            self._reject(custom_id, tuple(mapped.issues))
            if custom_id is not None:
                # Present in the segment: a rejected row is never a removal.
                self._rows[custom_id] = _Row("rejected", self._row_number, None, -1, 0)
            return
        assert custom_id is not None
        data = canonical_json(mapped.attributes)
        fingerprint = Fingerprint(raw=raw, payload=payload_fingerprint_of(data))
        stored = self._stored.get(custom_id)
        if stored is None:
            kind = "new"
        elif stored.payload != fingerprint.payload:
            kind = "changed"
        else:
            kind = "unchanged"
        if kind == "unchanged" and not self._full:
            # Same payload as acknowledged (a cosmetic source change or a mapping change
            # that does not touch this profile): nothing to send, but remember the new raw
            # hash so the next run can skip mapping this row.
            kind = "refresh" if stored is not None and stored.raw != raw else "unchanged"
            self._rows[custom_id] = _Row(kind, self._row_number, fingerprint, -1, 0)
            return
        offset, length = self._spool.append(data)
        self._rows[custom_id] = _Row(kind, self._row_number, fingerprint, offset, length)

    # -- bookkeeping -----------------------------------------------------------------------
    def _reject_reasons(self, issues: Iterable[RowIssue]) -> None:
        for reason in {issue.reason.value for issue in issues}:
            self._rejected_by_reason[reason] += 1

    def _reject(self, custom_id: str | None, issues: tuple[RowIssue, ...]) -> None:
        self._counts["rejected"] += 1
        self._reject_reasons(issues)
        self._keep(RejectedRow(self._row_number, custom_id, issues))

    def _keep(self, rejected: RejectedRow) -> None:
        if self._on_reject is not None:
            self._on_reject(rejected)
        if len(self._samples) < REJECTED_SAMPLE_SIZE:
            self._samples.append(rejected)

    def finish(self) -> Plan:
        sends: list[PlannedSend] = []
        refreshes: list[JournalEntry] = []
        new_ids: list[str] = []
        counts = self._counts
        for custom_id, row in self._rows.items():
            if row.copies > 1:
                # Census-style: every copy of a duplicated id is rejected; Batch keeps
                # what it holds for that person (present, so never removed).
                counts["duplicates"] += row.copies
                counts["rejected"] += row.copies - (1 if row.kind == "rejected" else 0)
                self._rejected_by_reason[Reason.DUPLICATE_CUSTOM_ID.value] += row.copies
                issue = RowIssue("custom_id", Reason.DUPLICATE_CUSTOM_ID, f"appears {row.copies} times in the segment")
                self._keep(RejectedRow(row.first_row, custom_id, (issue,)))
                continue
            if row.kind == "rejected":
                continue
            counts[row.kind if row.kind != "refresh" else "unchanged"] += 1
            if row.offset < 0:  # not to be sent
                if row.kind == "refresh" and row.fingerprint is not None:
                    counts["refreshed"] += 1
                    refreshes.append(JournalEntry(custom_id, row.fingerprint))
                continue
            assert row.fingerprint is not None
            if row.kind == "new":
                new_ids.append(custom_id)
            sends.append(PlannedSend(custom_id, row.kind, row.fingerprint, row.offset, row.length))
        removals: list[str] = []
        synced = set(self._stored) | self._intents
        if self._mirror:
            removals = sorted(custom_id for custom_id in synced if custom_id not in self._rows)
            counts["removed"] = len(removals)
        # A stable order makes the send checkpoint (a custom_id watermark) meaningful.
        sends.sort(key=lambda send: send.custom_id)
        for key in COUNT_KEYS:
            counts.setdefault(key, 0)
        return Plan(
            sends=sends,
            removals=removals,
            refreshes=refreshes,
            counts=counts,
            rejected_by_reason=self._rejected_by_reason,
            rejected_samples=sorted(self._samples, key=lambda sample: sample.row_number or 0),
            dropped_by_reason=self._dropped_by_reason,
            synced_before=len(synced),
            full=self._full,
            spool=self._spool,
            new_ids=new_ids,
        )


def hashable_columns(batch: pa.RecordBatch, columns: Sequence[str]) -> list[list[Any]]:
    """The batch's mapped columns as plain Python lists that ``json`` encodes without callbacks.

    Timestamps become their integer count of the column's unit since the epoch (UTC),
    dates their day or millisecond count, decimals their text: converting column by
    column is several times cheaper than building a dict per row, and the raw salt
    carries the column types, so an integer and a timestamp with equal numbers differ.
    """
    lists: list[list[Any]] = []
    for name in columns:
        column = batch.column(name)
        kind = column.type
        if pa.types.is_timestamp(kind) or pa.types.is_date64(kind) or pa.types.is_time64(kind):
            column = column.cast(pa.int64())
        elif pa.types.is_date32(kind) or pa.types.is_time32(kind):
            column = column.cast(pa.int32())
        elif pa.types.is_decimal(kind):
            column = column.cast(pa.string())
        lists.append(column.to_pylist())
    return lists


def raw_salt(mapping_version: str, schema: pa.Schema, columns: Sequence[str]) -> str:
    """Mapping version plus the Arrow types of the mapped columns (see ``hashable_columns``)."""
    types = ";".join(f"{name}:{schema.field(name).type}" for name in columns)
    return f"{mapping_version}/{hashlib.blake2b(types.encode(), digest_size=8).hexdigest()}"


def plan_batch(
    planner: Planner,
    mapper: ProfileMapper,
    batch: pa.RecordBatch,
    *,
    columns: Sequence[str],
    id_column: str,
    mapping_version: str,
    first_row_number: int,
) -> None:
    """Plan one record batch: hash every row's source values, map only rows that moved.

    Rows whose raw fingerprint matches the acknowledged one are accounted for without a
    row dict ever being built; the others are taken from the batch and mapped, in order.
    """
    salt = raw_salt(mapping_version, batch.schema, columns)
    ids = batch.column(id_column).to_pylist()
    try_skip = planner.try_skip
    to_map: list[tuple[int, int]] = []
    for index, values in enumerate(zip(*hashable_columns(batch, columns), strict=True)):
        raw = raw_fingerprint(values, salt)
        if not try_skip(ids[index], raw, first_row_number + index):
            to_map.append((index, raw))
    if not to_map:
        return
    rows = batch.take(pa.array([index for index, _ in to_map], type=pa.int64())).to_pylist()
    add = planner.add
    for (index, raw), row in zip(to_map, rows, strict=True):
        add(map_row(mapper, row), raw, first_row_number + index)


# The previous raw-values recipe (blake2b over JSON of the row's values), kept with the
# reference planner it belongs to.
_RAW_SALT = b"cepsync/raw/1\0"


def _tag(value: Any) -> Any:
    # Called by json.dumps only for values it cannot encode itself.
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return {"$t": "datetime", "v": value.isoformat()}
    if isinstance(value, date):
        return {"$t": "date", "v": value.isoformat()}
    if isinstance(value, time):
        return {"$t": "time", "v": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$t": "decimal", "v": str(value.normalize())}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$t": "bytes", "v": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, set | frozenset):
        return {"$t": "set", "v": sorted(map(repr, value))}
    return {"$t": type(value).__name__, "v": repr(value)}


def raw_fingerprint(values: Sequence[Any], mapping_version: str) -> int:
    """Hash of one row's source values (in mapping column order) under a mapping version."""
    # NaN and Infinity are written as bare tokens (allow_nan), which is fine for a hash.
    encoded = json.dumps(values, separators=(",", ":"), ensure_ascii=False, default=_tag)
    digest = hashlib.blake2b(
        _RAW_SALT + mapping_version.encode() + b"\0" + encoded.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")
