"""The journal fold: acknowledged changes applied to stored fingerprints, in Arrow and DuckDB columns.

Every state store keeps a base of fingerprints and a journal of commits, and folds one into
the other the same way (the SQLite and Firestore stores, at compaction and when a run loads
its state). Its own room, apart from the protocols of :mod:`sync.state.base`, because it is
an algorithm with a memory budget (``docs/how-a-run-works.md``, "Memory"), not a contract.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import FINGERPRINT_COLUMNS, FINGERPRINT_SCHEMA, JOURNAL_SCHEMA, with_attributes
from sync.memory import release_free_memory
from sync.scratch import scratch_directory

if TYPE_CHECKING:
    import duckdb


def fold_journal(base: list[pa.Table], journal: Sequence[pa.Table]) -> pa.Table:
    """Apply journal tables (``custom_id, raw, payload, attributes, put: bool``, oldest first) to base tables.

    The base tables hold each id at most once between them; in the journal the last entry of
    an id wins, and ``put = false`` deletes it. Done in columns, so a large journal (a run
    that crashed mid full load) never becomes Python objects, and with bounded memory:
    only what the fold returns is held whole (``docs/how-a-run-works.md``, "Memory").

    ``base`` is consumed: its tables are let go one at a time as they are folded, so a
    journal left unfolded between runs (:func:`fold_due`) costs a load one base table more,
    never a second copy of the state.
    """
    if not journal:
        return _concat_base(base)
    journal = [with_attributes(table) for table in journal]
    entries = pa.concat_tables(journal)
    if entries.num_rows <= FOLD_DUE_ROWS:
        # The usual journal: a delta, or a few left between runs. Each id's last entry,
        # then each base table without the ids the journal names, then the ids it puts.
        latest = latest_entries_table(journal)
        return _concat_base(_without_ids(base, latest.column("custom_id")), tail=_puts(latest))
    repeats = has_repeats(entries.column("custom_id"))
    base_table = _concat_base(base)
    if not repeats:
        appended = _appended_only(base_table, entries)
        if appended is not None:
            return appended

    with _fold_database() as con:
        con.register("base", base_table)
        latest = _latest_in(con, journal) if repeats else entries
        con.register("latest", latest)
        folded: pa.Table = con.sql(
            "SELECT custom_id, raw, payload, attributes FROM base ANTI JOIN latest USING (custom_id) "
            "UNION ALL SELECT custom_id, raw, payload, attributes FROM latest WHERE put"
        ).to_arrow_table()
    return folded.cast(FINGERPRINT_SCHEMA)


def _concat_base(base: list[pa.Table] | Iterator[pa.Table], *, tail: pa.Table | None = None) -> pa.Table:
    tables = [with_attributes(table).cast(FINGERPRINT_SCHEMA) for table in _consumed(base)]
    if tail is not None:
        tables.append(tail)
    return pa.concat_tables(tables) if tables else FINGERPRINT_SCHEMA.empty_table()


def _consumed(tables: list[pa.Table] | Iterator[pa.Table]) -> Iterator[pa.Table]:
    """The tables of a list, oldest first, each dropped from the list as it is handed out."""
    if not isinstance(tables, list):
        yield from tables
        return
    tables.reverse()
    while tables:
        yield tables.pop()


def without_ids(table: pa.Table, touched: pa.Array) -> pa.Table | None:
    """``table`` without the rows whose ``custom_id`` is in ``touched``; None when it holds none (nothing copied).

    The one way a stored table meets a journal's ids, a table at a time: when a load applies
    a journal, and when the SQLite store folds a small one into its chunks.
    """
    if not len(touched):
        return None
    hit = pc.is_in(table.column("custom_id"), value_set=touched)
    return table.filter(pc.invert(hit)) if pc.any(hit).as_py() else None


def _without_ids(base: list[pa.Table], ids: pa.ChunkedArray) -> Iterator[pa.Table]:
    """Each base table without the rows whose id is in ``ids`` (a table untouched is not copied).

    Looking every stored id up in the journal's (~0.1 µs an id, ~1 s at 10M) is done by
    Arrow without the GIL, so :data:`FOLD_THREADS` tables are looked up at once, in order;
    no more are ever held than those and the one handed out.
    """
    touched = ids.combine_chunks()
    tables = _consumed(base)
    with ThreadPoolExecutor(FOLD_THREADS, thread_name_prefix="cepsync-fold") as pool:
        pending: deque[tuple[pa.Table, Future[pa.Table | None]]] = deque()
        for table in itertools.islice(tables, FOLD_THREADS):
            pending.append((table, pool.submit(without_ids, table, touched)))
        while pending:
            table, future = pending.popleft()
            remaining = future.result()
            if remaining is not None:
                # The table it replaces is gone: hand its memory back before the next one
                # (the allocator would keep it, and a load would hold the state twice).
                table = remaining
                del remaining
                release_free_memory()
            for following in itertools.islice(tables, 1):
                pending.append((following, pool.submit(without_ids, following, touched)))
            yield table


def _puts(latest: pa.Table) -> pa.Table:
    """The entries of ``latest`` that put a fingerprint, as stored fingerprints."""
    return latest.filter(latest.column("put")).select(list(FINGERPRINT_COLUMNS)).cast(FINGERPRINT_SCHEMA)


# A journal is folded into the stored fingerprints once it holds this share of them (or
# FOLD_DUE_DOCUMENTS blobs, or anything when nothing is stored yet). Below that, folding is
# left to a later run and every load applies the journal (above): a 1 % delta at 10M
# profiles touches every stored chunk, and folding it at once rewrote them all (~14 s), for
# a journal a load applies in a fraction of a second. A daily 1 % delta then folds about
# every fifth run (docs/how-state-is-kept.md, "When the journal is folded").
FOLD_DUE_SHARE: Final = 0.05
FOLD_DUE_DOCUMENTS: Final = 256
# ... and always past this many entries: a load applies a journal of up to this many by
# looking its ids up in a hash set (~140 bytes an id while it is built), one base table at
# a time; a larger one (a crash in a first sync) takes the general fold below.
FOLD_DUE_ROWS: Final = 250_000
# Base tables looked up at once when a load applies a journal (at most two: this project's
# machines have two cores, and each table in flight is one more table's copy held).
FOLD_THREADS: Final = max(1, min(2, os.cpu_count() or 1))


def fold_due(*, journal_rows: int, journal_documents: int, stored_rows: int) -> bool:
    """Whether a journal of ``journal_rows`` entries in ``journal_documents`` blobs is worth folding now.

    ``stored_rows``: the fingerprints it would be folded into (a Firestore store, which
    does not count them, passes a bound of the same kind). A journal past
    :data:`FOLD_DUE_ROWS` is always due, so that a load applies a small journal only.
    """
    if journal_rows == 0 and journal_documents == 0:
        return False
    return (
        stored_rows == 0
        or journal_documents > FOLD_DUE_DOCUMENTS
        or journal_rows > FOLD_DUE_ROWS
        or journal_rows >= FOLD_DUE_SHARE * stored_rows
    )


def latest_entries_table(journal: Sequence[pa.Table]) -> pa.Table:
    """Each id of journal tables (oldest first) once, as its last entry left it (``put`` kept)."""
    if not journal:
        return JOURNAL_SCHEMA.empty_table()
    entries = pa.concat_tables([with_attributes(table) for table in journal]).select(JOURNAL_SCHEMA.names)
    if not has_repeats(entries.column("custom_id")):
        return entries
    with _fold_database() as con:
        return _latest_in(con, journal)


@contextlib.contextmanager
def _fold_database() -> Iterator[duckdb.DuckDBPyConnection]:
    import duckdb

    from sync.duckdb_sql import bound_memory

    with duckdb.connect(":memory:") as con, scratch_directory("fold") as spill:
        # A journal of millions of entries meets a base of millions: the join spills to
        # disk past FOLD_MEMORY_LIMIT instead of building its whole hash table in memory.
        bound_memory(con, memory_limit=FOLD_MEMORY_LIMIT, spill_directory=spill)
        con.execute("SET threads = 1")
        con.execute("SET preserve_insertion_order = false")
        yield con


def _latest_in(con: duckdb.DuckDBPyConnection, journal: Sequence[pa.Table]) -> pa.Table:
    """The last entry of every id of ``journal`` (oldest table first), computed in ``con``."""
    sequenced = pa.concat_tables(
        [
            with_attributes(table)
            .select(JOURNAL_SCHEMA.names)
            .append_column("seq", pa.repeat(pa.scalar(index, pa.int64()), table.num_rows))
            for index, table in enumerate(journal)
        ]
    )
    con.register("entries", sequenced)
    latest: pa.Table = con.sql(
        "SELECT custom_id, raw, payload, attributes, put FROM ("
        "  SELECT custom_id, raw, payload, attributes, put,"
        "         row_number() OVER (PARTITION BY custom_id ORDER BY seq DESC, pos DESC) AS r"
        "  FROM (SELECT *, row_number() OVER () AS pos FROM entries)"
        ") WHERE r = 1"
    ).to_arrow_table()
    con.unregister("entries")
    return latest


# What the general fold's DuckDB may hold before it spills to a temporary directory.
FOLD_MEMORY_LIMIT: Final = "256MB"


class SpillingFold:
    """The general fold of :func:`fold_journal` for a store that writes its result back a part at a time.

    :func:`fold_journal` returns the folded state whole, as a load needs it, and on its way
    holds the stored tables and the result at once: at 10 million profiles a compaction of
    a large journal peaked over 1 GB that way. Here the stored tables and the journal are
    copied, one table at a time, into a DuckDB database capped at :data:`FOLD_MEMORY_LIMIT`
    (it spills the rest to a temporary directory of its own), and the result is read back
    ``rows`` at a time. The caller may therefore read its stored tables, delete them, and
    then write the result, holding one table of it at a time
    (``docs/how-a-run-works.md``, "Memory").

    Use as a context manager: :meth:`add_base` and :meth:`add_journal` (journal tables
    oldest first, as committed), then :meth:`folded` once.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._journal_rows = 0

    def __enter__(self) -> SpillingFold:
        con = self._stack.enter_context(_fold_database())
        con.execute("CREATE TABLE base (custom_id VARCHAR, raw UBIGINT, payload UBIGINT, attributes BLOB)")
        con.execute(
            "CREATE TABLE journal (custom_id VARCHAR, raw UBIGINT, payload UBIGINT, attributes BLOB, put BOOLEAN,"
            " ordinal BIGINT)"
        )
        self._con = con
        return self

    def __exit__(self, *exc: object) -> None:
        self._con = None
        self._stack.close()

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise RuntimeError("SpillingFold is used outside its with block")
        return self._con

    def add_base(self, tables: Iterable[pa.Table]) -> None:
        """Copy stored tables (each id in one of them at most) into the fold, one at a time."""
        con = self._connection()
        for table in tables:
            part = with_attributes(table).select(list(FINGERPRINT_COLUMNS)).cast(FINGERPRINT_SCHEMA)
            del table
            con.register("part", part)
            con.execute("INSERT INTO base SELECT custom_id, raw, payload, attributes FROM part")
            con.unregister("part")
            del part

    def add_journal(self, tables: Iterable[pa.Table]) -> None:
        """Copy journal tables (oldest first; within one, later rows are later entries) into the fold."""
        con = self._connection()
        for table in tables:
            rows = table.num_rows
            if not rows:
                continue
            # Each entry's place in the whole journal: the last one of an id wins.
            ordinal = pc.add(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), rows)), self._journal_rows)
            part = with_attributes(table).select(JOURNAL_SCHEMA.names).append_column("ordinal", ordinal)
            del table
            con.register("part", part)
            con.execute("INSERT INTO journal SELECT custom_id, raw, payload, attributes, put, ordinal FROM part")
            con.unregister("part")
            del part
            self._journal_rows += rows

    def folded(self, rows: int) -> Iterator[pa.Table]:
        """The folded fingerprints (:data:`FINGERPRINT_SCHEMA`), at most ``rows`` a table, in no set order."""
        con = self._connection()
        con.execute(
            "CREATE TABLE latest AS SELECT custom_id, raw, payload, attributes, put FROM journal"
            " QUALIFY row_number() OVER (PARTITION BY custom_id ORDER BY ordinal DESC) = 1"
        )
        con.execute("DROP TABLE journal")
        reader: pa.RecordBatchReader = con.sql(
            "SELECT custom_id, raw, payload, attributes FROM base ANTI JOIN latest USING (custom_id)"
            " UNION ALL SELECT custom_id, raw, payload, attributes FROM latest WHERE put"
        ).to_arrow_reader(rows)
        for batch in reader:
            yield pa.Table.from_batches([batch]).cast(FINGERPRINT_SCHEMA)


def _appended_only(base: pa.Table, entries: pa.Table) -> pa.Table | None:
    """The fold when the journal only adds new ids, each once (a first full load): a concatenation.

    ``entries`` repeat no id (the caller checked). Checked in columns; None when an entry
    deletes or touches an id of ``base``, so the general fold runs. Saves sorting millions of entries at the end of a
    large first sync.
    """
    if not pc.all(entries.column("put")).as_py():
        return None
    if base.num_rows and not no_common_ids(base.column("custom_id"), entries.column("custom_id")):
        return None
    added = entries.select(list(FINGERPRINT_COLUMNS)).cast(FINGERPRINT_SCHEMA)
    return pa.concat_tables([base.cast(FINGERPRINT_SCHEMA), added])


def no_common_ids(stored: pa.ChunkedArray | pa.Array, ids: pa.ChunkedArray | pa.Array) -> bool:
    """Whether the two id columns share no id; False when that is too costly to check here.

    Memory decides how: a hash set of five million ids (what ``count_distinct`` or
    ``is_in`` build) costs ~700 MB, so only the smaller side goes in a set, and not at all
    past :data:`_MAX_OVERLAP_SET` ids (the caller then folds in DuckDB, which spills).
    """
    if len(stored) == 0 or len(ids) == 0:
        return True
    small, large = (ids, stored) if len(ids) <= len(stored) else (stored, ids)
    if len(small) > _MAX_OVERLAP_SET:
        return False
    if isinstance(small, pa.ChunkedArray):
        small = small.combine_chunks()
    return not pc.any(pc.is_in(large, value_set=small)).as_py()


# Most ids an overlap check puts in a hash set (~140 bytes an id while it is built).
_MAX_OVERLAP_SET = 1_000_000


def has_repeats(ids: pa.ChunkedArray) -> bool:
    """Whether an id appears twice: equal neighbours once the ids are sorted.

    A journal of puts whose ids do not repeat, and which :func:`no_common_ids` finds
    nowhere in the stored fingerprints, can be appended to them as it is.

    Their order costs 8 bytes an id (a hash set of them ~140); the sorted ids are then
    compared a slice at a time rather than copied whole.
    """
    if len(ids) < 2:
        return False
    order = pc.sort_indices(ids)
    for start in range(0, len(order) - 1, _REPEAT_SLICE):
        ordered = ids.take(order.slice(start, _REPEAT_SLICE + 1))
        if pc.any(pc.equal(ordered[1:], ordered[:-1])).as_py():
            return True
    return False


# Sorted ids compared at a time by has_repeats.
_REPEAT_SLICE: Final = 250_000
