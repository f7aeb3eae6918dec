"""A delta's single pass over the segment: ids, raw hashes and the stored comparison in one read.

The embedded differ (:mod:`sync.diff`) reads the segment once when the activation has
stored fingerprints (``docs/how-a-run-works.md``, "One pass over the segment"). That read
feeds a DuckDB query which computes each row's key and raw hash and drops every row whose
(id hash, raw hash) pair is a stored one: the rows that did not move never leave DuckDB.
What comes out is *kept*, as Arrow, up to :data:`KEPT_BUDGET_BYTES`: the rows with a null
id, a new id or a moved raw hash. Meanwhile the same batches' Custom ID column is written
to an Arrow IPC file in the differ's spill directory (:class:`IdTee`), from which the id
scan's counts, duplicates and removals are computed once the pass has ended.

Matching on the id's 8-byte hash instead of the id keeps the pass's hash table at 16 bytes
a stored id. It may drop a row it should keep only when two ids share a hash, so before the
kept rows are used the differ proves that no segment id shares its hash with a stored id
but itself (:func:`hash_pairs_sql`); otherwise it falls back to the exact reads.

This module holds the pass's SQL and its bookkeeping; the differ runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pyarrow as pa

from sync.differ import DUPLICATE, KEY, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW
from sync.duckdb_sql import quote_identifier, quote_literal

__all__ = [
    "KEPT_BUDGET_BYTES",
    "KNOWN",
    "STORED_HIT",
    "IdTee",
    "KeptRows",
    "duplicated_rows_sql",
    "hash_pairs_sql",
    "kept_moved_sql",
    "kept_table_sql",
    "kept_to_send_sql",
    "pass_sql",
    "stored_sql",
]

# The most the pass holds of the rows it carries on (Arrow bytes). A delta's moved and new
# rows fit many times over (10,000 rows of the benchmark's 17 columns take ~4 MB). Past it,
# the new rows are let go first: a first sync's continuation finds most ids new, and the
# stream reads them again (two reads, as a first sync takes), while the moved rows stay
# kept. Past it with the moved rows alone (a mapping change moves every row), those go too,
# and the moved rows and the stream read the segment again, as many changes cost their
# sending anyway: never the segment held in memory or in a spill file.
KEPT_BUDGET_BYTES: Final = 32 * 1024 * 1024
# The kept table's flag: the row's id has a stored fingerprint (exact join on the id).
STORED_HIT: Final = "__cepsync_stored_hit"
# The pass's flag: the row's id hash is a stored id's (moved, not new, once hashes are exact).
KNOWN: Final = "__cepsync_known"
# The stored fingerprint's columns a differ's batches carry: (stored column, output column, type).
STORED_COLUMNS: Final = (
    ("raw", STORED_RAW, "UBIGINT"),
    ("payload", STORED_PAYLOAD, "UBIGINT"),
    ("attributes", STORED_ATTRIBUTES, "BLOB"),
)


def stored_sql(alias: str | None) -> str:
    """The stored columns of ``alias`` (a join on the stored fingerprints), or typed NULLs without one."""
    if alias is None:
        return ", ".join(f"CAST(NULL AS {kind}) AS {output}" for _, output, kind in STORED_COLUMNS)
    return ", ".join(f"{alias}.{name} AS {output}" for name, output, _ in STORED_COLUMNS)


def pass_sql(selected: str) -> str:
    """The rows of ``selected`` (mapped columns, row, key, raw) whose (id hash, raw) pair is not stored.

    Each comes with :data:`KNOWN`: its id's hash is a stored id's (a moved row, not a new
    one, once the hashes are proven exact; until then, a row may come out twice, and the
    rows are not used). A null id has a null hash, which matches nothing: such a row is
    always kept, and not known.
    """
    return (
        f"SELECT s.* EXCLUDE (__cepsync_h), sh.h IS NOT NULL AS {KNOWN} FROM ("
        f"SELECT *, CASE WHEN {KEY} IS NOT NULL THEN hash({KEY}) END AS __cepsync_h FROM ({selected})"
        f") s LEFT JOIN (SELECT hash(custom_id) AS h, raw FROM stored) sh ON sh.h = s.__cepsync_h "
        f"WHERE sh.h IS NULL OR sh.raw <> s.{RAW}"
    )


def hash_pairs_sql() -> str:
    """How many (distinct segment id, stored id) pairs have equal 8-byte hashes.

    Each stored segment id pairs with itself; any other pair is two ids sharing a hash.
    Non-duplicated ids are taken as rows (each appears once), duplicated ones from the
    small table of duplicates; the join is built on the stored ids' hashes, 8 bytes each.
    """
    return (
        "SELECT count(*) FROM ("
        "SELECT k FROM (SELECT k FROM seen WHERE k IS NOT NULL) s0 ANTI JOIN duplicates d ON d.k = s0.k "
        "UNION ALL SELECT k FROM duplicates"
        ") s JOIN (SELECT hash(custom_id) AS h FROM stored) sh ON sh.h = hash(s.k)"
    )


def kept_table_sql(columns: list[str], kept: str) -> str:
    """The kept rows with their stored fingerprint, if any (the join built on the few kept rows)."""
    selected = ", ".join(f"c.{quote_identifier(c)}" for c in columns)
    return (
        f"SELECT {selected}, c.{ROW}, c.{KEY}, c.{RAW}, st.custom_id IS NOT NULL AS {STORED_HIT}, "
        f"{stored_sql('st')} FROM stored st RIGHT JOIN {kept} c ON st.custom_id = c.{KEY}"
    )


def _kept_columns(columns: list[str]) -> str:
    return ", ".join([*(f"c.{quote_identifier(c)}" for c in columns), f"c.{ROW}", f"c.{KEY}", f"c.{RAW}"])


def _kept_stored() -> str:
    return ", ".join(f"c.{output}" for _, output, _ in STORED_COLUMNS)


def kept_moved_sql(columns: list[str]) -> str:
    """Kept rows whose id is stored (exactly) and not duplicated, and whose raw hash moved."""
    return (
        f"SELECT {_kept_columns(columns)}, FALSE AS {DUPLICATE}, {_kept_stored()} "
        f"FROM kept c ANTI JOIN duplicates d ON d.k = c.{KEY} "
        f"WHERE c.{STORED_HIT} AND c.{STORED_RAW} <> c.{RAW}"
    )


def kept_to_send_sql(columns: list[str], *, duplicates: bool, after: str | None) -> str:
    """Kept rows to send: null and new ids, and the duplicated ids' rows when ``duplicates``.

    Without ``duplicates`` the duplicated ids' rows are left out: they come from a read of
    their own (:func:`duplicated_rows_sql`), which has every copy.
    """
    wanted = f"c.{KEY} IS NULL OR NOT c.{STORED_HIT}"
    wanted = f"({wanted} OR d.k IS NOT NULL)" if duplicates else f"({wanted}) AND d.k IS NULL"
    if after is not None:
        wanted += f" AND (c.{KEY} IS NULL OR c.{KEY} > {quote_literal(after)})"
    return (
        f"SELECT {_kept_columns(columns)}, d.k IS NOT NULL AS {DUPLICATE}, {_kept_stored()} "
        f"FROM kept c LEFT JOIN duplicates d ON d.k = c.{KEY} WHERE {wanted}"
    )


def duplicated_rows_sql(selected: str) -> str:
    """Every row of ``selected`` whose id is duplicated, with the id's stored fingerprint if any.

    Both joins are built on the few duplicated ids.
    """
    return (
        f"SELECT s.*, TRUE AS {DUPLICATE}, {stored_sql('sd')} FROM ({selected}) s "
        f"SEMI JOIN duplicates d ON d.k = s.{KEY} "
        f"LEFT JOIN (SELECT * FROM stored SEMI JOIN duplicates ON duplicates.k = stored.custom_id) sd "
        f"ON sd.custom_id = s.{KEY}"
    )


class IdTee:
    """The Custom ID column of every batch a pass reads, appended to an Arrow IPC stream file.

    Dictionary-encoded ids are written decoded (a stream may not change its dictionaries).
    """

    def __init__(self, path: Path, field: pa.Field) -> None:
        value_type = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        self.path = path
        self.schema = pa.schema([pa.field(field.name, value_type)])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer: pa.ipc.RecordBatchStreamWriter | None = pa.ipc.new_stream(self._sink, self.schema)

    def __call__(self, batch: pa.RecordBatch) -> None:
        assert self._writer is not None, "the id file was closed"
        column = batch.column(self.schema.field(0).name)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        self._writer.write_batch(pa.record_batch([column], schema=self.schema))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def reader(self) -> pa.RecordBatchReader:
        """The ids written, streamed back from the file (memory-mapped, read once)."""
        self.close()
        return pa.ipc.open_stream(pa.memory_map(str(self.path)))

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class KeptRows:
    """The rows a pass carries on, as Arrow batches, up to a byte budget.

    Past the budget the new rows are let go (``moved_only``: only :data:`KNOWN` rows are
    kept from then on, and the stream reads the new ones again). Past it with the moved
    rows alone, every batch is let go (``overflowed``): the differ then reads the segment
    again for the moved rows and the stream, as it would without the pass.
    """

    def __init__(self, budget: int = KEPT_BUDGET_BYTES) -> None:
        self.budget = budget
        self.schema: pa.Schema | None = None  # the pass's output schema, set before the first batch
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self.nbytes = 0
        self.moved_only = False
        self.overflowed = False

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        if self.overflowed:
            return
        if self.moved_only:
            batch = _known(batch)
        if batch.num_rows:
            self.batches.append(batch)
            self.nbytes += batch.nbytes
        if self.nbytes <= self.budget:
            return
        if not self.moved_only:
            self.moved_only = True
            self.batches = [known for known in map(_known, self.batches) if known.num_rows]
            self.nbytes = sum(known.nbytes for known in self.batches)
            if self.nbytes <= self.budget:
                return
        self.overflowed = True
        self.batches.clear()

    def table(self) -> pa.Table:
        assert self.schema is not None, "the pass has not started"
        return pa.Table.from_batches(self.batches, schema=self.schema)


def _known(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The rows of a pass's batch whose id hash is stored (the moved ones)."""
    return batch.filter(batch.column(KNOWN))
