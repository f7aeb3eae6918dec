"""What every state store decides the same way, whatever it keeps its state in.

The lease rules (who may write, the three ways a lease is lost), the checks on what a
caller hands in (fingerprint values, custom ids, times, run records, meta), the journal
of one commit as an Arrow table, and Arrow IPC blobs. A backend reads and writes its own
rows or documents; this module owns the decisions and the error messages, so that the
SQLite and Firestore stores cannot drift apart in them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import HASH_BYTES, JOURNAL_SCHEMA, set_problem, with_attributes
from sync.errors import FatalError, LeaseHeld, LeaseLost
from sync.model import ActivationMeta, Fingerprint, JournalEntry, Lease

# Fingerprints are unsigned 64-bit ints.
U64_LIMIT: Final = 1 << 64

# -- leases -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """An activation's lease as a store holds it. ``expires_at`` None: released."""

    owner: str | None
    token: int
    expires_at: datetime | None


def check_lease(lease: Lease, current: LeaseRecord | None) -> None:
    """Raise LeaseLost unless ``lease`` is still the activation's current lease.

    The token is what fences: an expired lease whose token is still current has not
    been taken over, so nobody else can have written, and its writes are safe. A
    released lease is no longer ours, even if nobody took it since.
    """
    who = f"activation {lease.activation!r}: lease token {lease.token} of owner {lease.owner!r}"
    if current is None:
        raise LeaseLost(
            f"activation {lease.activation!r}: no lease on record (token {lease.token} of owner "
            f"{lease.owner!r} is not current); nothing was written"
        )
    if current.token != lease.token or current.owner != lease.owner:
        raise LeaseLost(
            f"{who} was superseded by token {current.token} of owner {current.owner!r}; nothing was written"
        )
    if current.expires_at is None:
        raise LeaseLost(f"{who} was released; nothing was written")


def refuse_if_held(activation: str, current: LeaseRecord | None, now: datetime, *, taker: str | None) -> None:
    """Raise LeaseHeld if someone other than ``taker`` holds an unexpired lease at ``now``.

    ``taker`` None: nobody may hold it (a reset, which refuses even the lease's own owner).
    A lease is held while ``now < expires_at``.
    """
    if current is None or current.expires_at is None or not now < current.expires_at:
        return
    until = f"until {current.expires_at.isoformat()} (token {current.token})"
    if taker is None:
        raise LeaseHeld(
            f"activation {activation!r}: cannot reset while owner {current.owner!r} holds the lease {until}"
        )
    if current.owner != taker:
        raise LeaseHeld(f"activation {activation!r}: lease held by owner {current.owner!r} {until}")


def lease_expiry(activation: str, ttl_seconds: float, now: datetime) -> datetime:
    """When a lease taken or renewed at ``now`` for ``ttl_seconds`` expires (both checked)."""
    if not ttl_seconds > 0:
        raise ValueError(f"activation {activation!r}: lease ttl_seconds must be > 0, got {ttl_seconds!r}")
    return require_aware(now, "now") + timedelta(seconds=ttl_seconds)


def require_aware(moment: datetime, what: str) -> datetime:
    """``moment`` itself, if it is timezone-aware (a naive time has no place in state)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {moment.isoformat()}")
    return moment


# -- values handed in ---------------------------------------------------------------------


def check_u64(value: int, activation: str, custom_id: str, field: str) -> int:
    """``value`` itself, if it is an unsigned 64-bit int (what a fingerprint is)."""
    # bool is an int subclass; a bool here is a caller bug, not a hash.
    if type(value) is not int or not 0 <= value < U64_LIMIT:
        raise ValueError(
            f"activation {activation!r}, custom_id {custom_id!r}: fingerprint {field} must be an "
            f"unsigned 64-bit int (0 … 2**64-1), got {value!r}"
        )
    return value


def unique_ids(activation: str, custom_ids: Iterable[str]) -> list[str]:
    """The ids once each, in first-seen order; every one a str that encodes as UTF-8."""
    ids = list(dict.fromkeys(custom_ids))
    for custom_id in ids:
        if not isinstance(custom_id, str):
            raise ValueError(f"activation {activation!r}: custom_id must be a str, got {custom_id!r}")
        try:
            custom_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"activation {activation!r}: custom_id {custom_id!r} is not valid UTF-8") from exc
    return ids


def id_array(activation: str, custom_ids: Iterable[str]) -> pa.Array | pa.ChunkedArray:
    """The ids as one Arrow string array, checked in columns; repeats are kept.

    What :func:`unique_ids` checks (every id a str that encodes as UTF-8), without a Python
    object per id: Arrow infers the array's type from the values, so anything but str
    (bytes, a number, None) shows as a type other than string or as a null. Only then are
    the ids checked one by one, for :func:`unique_ids`'s message naming the bad one.
    """
    ids = custom_ids if isinstance(custom_ids, list | tuple) else list(custom_ids)
    try:
        array = pa.array(ids)
    except (pa.ArrowException, UnicodeEncodeError):
        unique_ids(activation, ids)  # raises, naming the id
        raise
    if not len(array):
        return pa.array([], pa.string())
    if array.type != pa.string() or array.null_count:
        unique_ids(activation, ids)  # raises, naming the id
        raise ValueError(f"activation {activation!r}: custom_ids must be str, got Arrow type {array.type}")
    return array


def latest_entries(entries: Iterable[JournalEntry]) -> dict[str, Fingerprint | None]:
    """One outcome per id: where an id appears more than once, its last entry wins."""
    latest: dict[str, Fingerprint | None] = {}
    for custom_id, fingerprint in entries:
        latest[custom_id] = fingerprint
    return latest


def journal_table(activation: str, entries: Iterable[JournalEntry] | pa.Table) -> pa.Table:
    """A commit's entries as one :data:`JOURNAL_SCHEMA` table, the last entry of an id winning.

    ``entries`` may already be a :data:`JOURNAL_SCHEMA` table (the sender's columns): it is
    kept as it is when its ids are distinct, with no Python object per row.

    Raises:
        ValueError: A fingerprint is not an unsigned 64-bit int, an attribute set is not a
            whole number of hashes, or a custom_id is not valid text.
    """
    if isinstance(entries, pa.Table):
        table = with_attributes(entries).select(JOURNAL_SCHEMA.names).cast(JOURNAL_SCHEMA)
        ids = table.column("custom_id")
        if ids.null_count:
            raise ValueError(f"activation {activation!r}: custom_id must be a str, got None")
        problem = set_problem(table.column("attributes"))
        if problem is not None:
            raise ValueError(f"activation {activation!r}: {problem}")
        if pc.count_distinct(ids).as_py() == table.num_rows:
            return table.combine_chunks()
        entries = [
            JournalEntry(custom_id, Fingerprint(raw, payload, attributes) if put else None)
            for custom_id, raw, payload, attributes, put in zip(
                *(column.to_pylist() for column in table.columns), strict=True
            )
        ]
    latest = latest_entries(entries)
    ids_list = unique_ids(activation, latest)
    raws = [0 if fp is None else check_u64(fp.raw, activation, i, "raw") for i, fp in latest.items()]
    payloads = [0 if fp is None else check_u64(fp.payload, activation, i, "payload") for i, fp in latest.items()]
    sets = [None if fp is None else check_set(fp.attributes, activation, i) for i, fp in latest.items()]
    puts = [fp is not None for fp in latest.values()]
    columns = [pa.array(ids_list, pa.string()), pa.array(raws, pa.uint64()), pa.array(payloads, pa.uint64())]
    columns.append(pa.array(sets, pa.binary()))
    return pa.table([*columns, pa.array(puts, pa.bool_())], schema=JOURNAL_SCHEMA)


def check_set(value: bytes | None, activation: str, custom_id: str) -> bytes | None:
    """``value`` itself, if it is None or an attribute set (bytes, a whole number of 4-byte hashes)."""
    if value is None:
        return None
    if type(value) is not bytes or len(value) % HASH_BYTES:
        raise ValueError(
            f"activation {activation!r}, custom_id {custom_id!r}: an attribute set must be bytes holding "
            f"{HASH_BYTES}-byte hashes, got {value!r:.80}"
        )
    return value


def fingerprints_of(table: pa.Table) -> dict[str, Fingerprint]:
    """A :data:`~sync.differ.FINGERPRINT_SCHEMA` table as ``{custom_id: Fingerprint}``."""
    table = with_attributes(table)
    raws, payloads = table.column("raw").to_pylist(), table.column("payload").to_pylist()
    sets = table.column("attributes").to_pylist()
    return dict(zip(table.column("custom_id").to_pylist(), map(Fingerprint, raws, payloads, sets), strict=True))


def meta_json(activation: str, meta: ActivationMeta) -> str:
    """The meta as the JSON a store keeps.

    Raises:
        TypeError: ``meta.continuation`` is not JSON-serialisable.
    """
    try:
        return meta.to_json()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"activation {activation!r}: meta is not JSON-serialisable: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run record as a store keeps it: its keys, and the whole record as JSON."""

    run_id: str
    activation: str
    started_at: str  # "" when the record has none
    trigger_id: str | None
    body: str


# What one stored run record may weigh as JSON. A Firestore document holds 1 MiB with its
# other fields; SQLite has no limit, but a record that size would already say nothing more.
# The engine keeps records far smaller (bounded samples, a bounded config copy); this is the
# backstop that keeps any record storable.
MAX_RUN_RECORD_BYTES: Final = 900_000
# The parts of a record that may grow with the data, cut in this order until it fits.
_TRIMMABLE: Final = ("rejected_samples", "config", "warnings", "guards")


def _record_json(record: dict[str, Any], run_id: str) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"run record {run_id!r} is not JSON-serialisable: {exc}") from exc


def _trimmed(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its growable parts, from the first, until it fits; it says what was cut."""
    trimmed = dict(record)
    cut: list[str] = []
    for key in _TRIMMABLE:
        if len(json.dumps(trimmed, ensure_ascii=False, default=str).encode("utf-8")) <= MAX_RUN_RECORD_BYTES:
            break
        if key in trimmed:
            trimmed[key] = [] if isinstance(trimmed[key], list) else {}
            cut.append(key)
    if len(json.dumps(trimmed, ensure_ascii=False, default=str).encode("utf-8")) > MAX_RUN_RECORD_BYTES:
        for key, value in list(trimmed.items()):
            if isinstance(value, str) and len(value) > 1_000:
                trimmed[key] = value[:1_000] + "… [cut]"
                cut.append(key)
    trimmed["trimmed"] = cut
    return trimmed


def run_row(record: dict[str, Any], *, check_run_id: Callable[[str], None] | None = None) -> RunRow:
    """Validate a run record and take out what a store indexes it by.

    ``check_run_id``: the store's own rule for ids (a Firestore document id), applied
    before the record is serialised.

    Raises:
        ValueError: ``run_id`` or ``activation`` is missing or not a non-empty string.
        TypeError: The record is not JSON-serialisable.
    """
    run_id = record.get("run_id")
    activation = record.get("activation")
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run record needs a non-empty string 'run_id', got {run_id!r}")
    if not isinstance(activation, str) or not activation:
        raise ValueError(f"run record {run_id!r} needs a non-empty string 'activation', got {activation!r}")
    if check_run_id is not None:
        check_run_id(run_id)
    body = _record_json(record, run_id)
    if len(body.encode("utf-8")) > MAX_RUN_RECORD_BYTES:
        body = _record_json(_trimmed(record), run_id)
    started_at, trigger_id = record.get("started_at"), record.get("trigger_id")
    return RunRow(
        run_id=run_id,
        activation=activation,
        started_at="" if started_at is None else str(started_at),
        trigger_id=None if trigger_id is None else str(trigger_id),
        body=body,
    )


def run_record(body: str) -> dict[str, Any]:
    """The run record a :attr:`RunRow.body` holds."""
    return dict(json.loads(body))


def check_limit(activation: str, limit: int) -> None:
    if limit < 0:
        raise ValueError(f"activation {activation!r}: list_runs limit must be >= 0, got {limit}")


# -- Arrow IPC blobs ----------------------------------------------------------------------

# A state blob is encoded and decoded on the calling thread, not on pyarrow's CPU pool: a
# blob is a few megabytes in a handful of buffers, and a function instance has one or two
# vCPUs (docs/how-state-is-kept.md, "Encoding a blob", with the figures).
IPC_READ_OPTIONS: Final = pa.ipc.IpcReadOptions(use_threads=False)


def ipc_write_options(compression: str | None = None) -> pa.ipc.IpcWriteOptions:
    """How a store encodes its blobs: ``compression`` (lz4, zstd or none), on the calling thread."""
    return pa.ipc.IpcWriteOptions(compression=compression, use_threads=False)


def pack_table(table: pa.Table, options: pa.ipc.IpcWriteOptions) -> pa.Buffer:
    """A table as one Arrow IPC stream (what a state blob holds)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue()


def unpack_table(blob: bytes, schema: pa.Schema, where: str, error: type[FatalError]) -> pa.Table:
    """The table an IPC blob holds, which must have ``schema``; else ``error``, naming ``where``."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(blob), options=IPC_READ_OPTIONS).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise error(f"{where}: a state blob cannot be read ({exc})") from exc
    if not table.schema.equals(schema) and "attributes" in schema.names and "attributes" not in table.column_names:
        table = with_attributes(table)  # written before attribute sets were kept
    if not table.schema.equals(schema):
        raise error(f"{where}: a state blob has columns {table.schema.names}, expected {schema.names}")
    return table
