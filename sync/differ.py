"""The differ's contract: what a differ hands the core, and the tables the state keeps for it.

Two differs exist: the embedded one compares the segment with the stored fingerprints in
DuckDB, in this process (:mod:`sync.diff`); the warehouse one does it in BigQuery SQL, so
only the changes leave the warehouse (:mod:`sync.warehouse.diff`). The engine, the planner
and the state stores depend on this module, never on either differ, so that a differ is an
edge that ``sync.runtime`` picks and injects (``docs/how-a-run-works.md``, "The rooms").

This module imports nothing of the project but :mod:`sync.model`: it is the floor the core
and the edges both stand on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Final, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from sync.model import Fingerprint, JournalEntry, Lease

if TYPE_CHECKING:
    import duckdb

# Columns a differ adds to the mapped ones (names no warehouse column is likely to use).
KEY: Final = "__cepsync_key"  # the Custom ID as the mapper writes it (sync.raw_hash.key_sql)
RAW: Final = "__cepsync_raw"  # the raw-values hash of the row
ROW: Final = "__cepsync_row"  # the row's number in the segment (NULL from BigQuery)
DUPLICATE: Final = "__cepsync_duplicate"  # the id appears more than once in the segment
STORED_RAW: Final = "__cepsync_stored_raw"  # the acknowledged fingerprint's raw hash, or NULL
STORED_PAYLOAD: Final = "__cepsync_stored_payload"  # ... and its payload fingerprint
STORED_ATTRIBUTES: Final = "__cepsync_stored_attributes"  # ... and its attribute hashes, or NULL

# The acknowledged fingerprints of an activation, as every state store hands them over.
# ``attributes`` is kept only for an activation with ``send: changed_attributes``: the sorted
# 32-bit hashes of the acknowledged payload's attributes, 4 little-endian bytes each
# (sync.attributes); NULL where not kept (the next changed payload is then sent whole).
FINGERPRINT_SCHEMA: Final = pa.schema(
    [("custom_id", pa.string()), ("raw", pa.uint64()), ("payload", pa.uint64()), ("attributes", pa.binary())]
)
# The columns of a fingerprint, in order (a state blob written before ``attributes`` lacks it).
FINGERPRINT_COLUMNS: Final = tuple(FINGERPRINT_SCHEMA.names)
# A journal of acknowledged changes: ``put`` false is a mirror removal (raw and payload 0).
JOURNAL_SCHEMA: Final = FINGERPRINT_SCHEMA.append(pa.field("put", pa.bool_()))


# Bytes of one attribute hash in a stored attribute set (sync.attributes).
HASH_BYTES: Final = 4


def set_problem(sets: pa.Array | pa.ChunkedArray) -> str | None:
    """Why a column of attribute sets is not one (a length not a whole number of hashes), or None."""
    lengths = pc.binary_length(sets)
    if pc.any(pc.not_equal(pc.bit_wise_and(lengths, HASH_BYTES - 1), 0)).as_py():
        return f"an attribute set's length is not a multiple of {HASH_BYTES} bytes"
    return None


def with_attributes(table: pa.Table) -> pa.Table:
    """A fingerprint or journal table with its ``attributes`` column (all null if it had none).

    Blobs written before attribute sets existed hold ``custom_id, raw, payload`` [``, put``].
    """
    if "attributes" in table.column_names:
        return table
    index = table.column_names.index("payload") + 1
    return table.add_column(index, pa.field("attributes", pa.binary()), pa.nulls(table.num_rows, pa.binary()))


def for_the_differ(stored: pa.Table, unconfirmed: Sequence[str]) -> pa.Table:
    """The stored fingerprints as a differ holds them while a run diffs: the ``unconfirmed`` distrusted.

    An activation without ``send: changed_attributes`` keeps no attribute set, and its
    ``attributes`` column, all null, still costs its offsets: 4 bytes a profile, 40 MB at 10
    million, held from the pass to the last request. It is dropped, and
    :func:`register_stored` gives SQL the column back as NULLs, for nothing.
    """
    stored = distrusted(with_attributes(stored), unconfirmed)
    if stored.column("attributes").null_count == stored.num_rows:
        stored = stored.drop_columns(["attributes"])
    return stored


def register_stored(con: duckdb.DuckDBPyConnection, stored: pa.Table) -> None:
    """``stored`` (:func:`for_the_differ`) as the table ``stored`` of ``con``, with all four fingerprint columns."""
    if "attributes" in stored.column_names:
        con.register("stored", stored)
        return
    con.register("stored_fingerprints", stored)
    con.execute(
        "CREATE OR REPLACE TEMP VIEW stored AS "
        "SELECT custom_id, raw, payload, CAST(NULL AS BLOB) AS attributes FROM stored_fingerprints"
    )


def distrusted(stored: pa.Table, unconfirmed: Sequence[str]) -> pa.Table:
    """``stored`` with zero fingerprints and no attribute sets for the ``unconfirmed`` ids.

    So they never look unchanged, and one that changed is sent whole: Batch may hold values
    of the unacknowledged send that the stored attribute set does not say.
    """
    if not unconfirmed:
        return stored
    doubtful = pc.fill_null(
        pc.is_in(stored.column("custom_id"), value_set=pa.array(sorted(set(unconfirmed)), pa.string())), False
    )
    if not pc.any(doubtful).as_py():
        return stored
    zero = pa.scalar(0, pa.uint64())
    for name in ("raw", "payload"):
        stored = stored.set_column(
            stored.schema.get_field_index(name), name, pc.if_else(doubtful, zero, stored.column(name))
        )
    unknown = pa.scalar(None, pa.binary())
    index = stored.schema.get_field_index("attributes")
    return stored.set_column(index, "attributes", pc.if_else(doubtful, unknown, stored.column(index)))


@dataclass
class IdScan:
    """What one read of the Custom ID column says about the segment."""

    rows: int
    null_ids: int
    # key -> copies, for every id that appears more than once.
    duplicates: dict[str, int]
    # Distinct non-duplicated ids that already have a stored fingerprint.
    matched: int
    # Distinct non-duplicated ids without one (profiles a run will create).
    new_ids: int
    # Synced ids (stored or intents) no longer in the segment, sorted.
    removed: list[str] = field(default_factory=list)
    # Profiles the activation had synced before this run (stored fingerprints or intents).
    synced: int = 0
    # Rows whose id is at or below a continued full pass's watermark (left out of its stream).
    below_watermark: int = 0
    # Stored ids whose raw hash moved, when the differ's pass counted them (None: unknown
    # until the moved rows are read). A hint (Scan.may_send), not a finding: not compared.
    moved: int | None = field(default=None, compare=False)

    @property
    def duplicate_rows(self) -> int:
        return sum(self.duplicates.values())


@dataclass(frozen=True)
class DiffRequest:
    """What one run asks of its differ.

    Attributes:
        columns: The mapped columns, Custom ID first (``ProfileMapper.columns``).
        schema: The segment's Arrow schema (``Source.schema()``).
        mapping_version: ``sync.config.mapping_version`` of the activation (salts the raw hash).
        intents: Ids recorded as possibly synced (mirror mode only), for the removals.
        unconfirmed: Ids an earlier run sent without a committed acknowledgement: read as
            if their stored fingerprint were zero, so they are mapped and sent again.
        after: A continued full pass's watermark: rows at or below it may be left out.
        on_rows: Told how many segment rows have been read so far (a progress bar): each row
            once, by the first read that reads every mapped column.
    """

    columns: Sequence[str]
    schema: pa.Schema
    mapping_version: str
    intents: Sequence[str] = ()
    unconfirmed: Sequence[str] = ()
    after: str | None = None
    on_rows: Callable[[int], None] | None = None


class Differ(Protocol):
    """One run's comparison of the segment with the acknowledged fingerprints.

    Every batch a differ yields has the mapped columns plus :data:`KEY`, :data:`RAW`,
    :data:`ROW`, :data:`DUPLICATE`, :data:`STORED_RAW`, :data:`STORED_PAYLOAD` and
    :data:`STORED_ATTRIBUTES` (NULL for an unconfirmed id, like its zeroed fingerprint).
    """

    # Seconds spent reading rows ("read") and hashing and joining them ("hash_and_diff").
    seconds: dict[str, float]
    # True when an id-ordered full pass costs nothing here (BigQuery sorts on its side; the
    # embedded differ sorts in this process's memory, so it sorts only when a run may hand over).
    orders_for_free: bool

    def scan_ids(self) -> IdScan:
        """Counts, duplicates, removals. Called first.

        A differ may read the whole segment here, once, and serve the two calls below from
        what it kept (a delta then reads the segment once: ``docs/how-a-run-works.md``).
        """

    def moved_rows(self) -> Iterator[pa.RecordBatch]:
        """Rows with a stored fingerprint whose raw hash moved (mapped before the first send)."""

    def rows_to_send(self, *, full: bool, ordered: bool = False) -> Iterator[pa.RecordBatch]:
        """New rows and rows with a bad or duplicated id; in a full pass, every row (by id if ``ordered``)."""

    def close(self) -> None:
        """Free what the differ holds (its database, its temporary tables). Idempotent."""


class FingerprintStore(Protocol):
    """Where the acknowledged fingerprints live: the one state role a differ reads and a journal writes.

    Every write is fenced by the lease (:class:`sync.model.Lease`): a run that lost its
    lease writes nothing (``LeaseLost``).
    """

    def load_fingerprint_table(self, activation: str) -> pa.Table:
        """Every acknowledged fingerprint (:data:`FINGERPRINT_SCHEMA`), the journal applied."""

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        """The same as a dict (small states, admin commands and tests)."""

    def commit(self, lease: Lease, entries: Sequence[JournalEntry] | pa.Table, now: datetime) -> None:
        """Append acknowledged entries (a :data:`JOURNAL_SCHEMA` table or entries), all or none."""

    def compact(self, lease: Lease, now: datetime, *, when_due: bool = False) -> None:
        """Fold the journal into the fingerprints (a crashed run's too); checks the lease.

        ``when_due``: only if the journal has grown enough for folding to be worth its cost
        (:func:`sync.state.fold.fold_due`; a store may always fold). A journal left is
        applied by every load, so what a load returns is the same either way.
        """


class DifferFactory(Protocol):
    """An activation's differ and the store it reads, as ``sync.runtime`` builds them."""

    @property
    def fingerprints(self) -> FingerprintStore:
        """Where this differ's fingerprints are committed (the run's journal writes there)."""

    def open(self, activation: str, request: DiffRequest) -> Differ:
        """The differ of one run (its stored fingerprints loaded, or queried, as it needs)."""

    def record(self) -> Mapping[str, object]:
        """What the differ adds to the run record (the warehouse's jobs and costs), or nothing."""

    def close(self) -> None:
        """Close the clients the factory opened (not the state store it was given)."""
