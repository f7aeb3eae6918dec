"""The embedded differ's queries in a local segment's database: one cursor, the pass's survivors on it.

:class:`sync.diff.SegmentDiff` hands its reads here when the segment is a DuckDB query
(``docs/how-a-run-works.md``, "A local segment"): the delta's pass and id scan
(:func:`sync.local_pass.run_pass`), the moved rows, and the stream. One cursor serves them
all, so the stream and the moved rows use the pass's survivors; each query runs under the
differ's settings (:meth:`LocalDiff.connection`). The differ keeps the streamed fallbacks,
for a mapped column that would hash otherwise here and for the database out of memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

import duckdb
import pyarrow as pa

from sync.differ import KEY, RAW, ROW, register_stored
from sync.duckdb_sql import quote_identifier, quote_literal
from sync.local_pass import (
    NEW_IDS_SQL,
    WIDE_ROWS,
    LocalPass,
    local_memory_limit,
    memory_mib,
    moved_sql,
    narrowed_sql,
    numbered_sql,
    out_of_memory,
    part_condition,
    piece_bounds,
    piece_sql,
    roundtrip_problem,
    run_pass,
    segment_counts,
    stream_parts,
    stream_size_sql,
    streamed_condition,
    streamed_ids_sql,
)
from sync.local_rows import SPARSE_ROWS, drop_sparse_rows, sparse_rows
from sync.sources.base import LocalSegment
from sync.stream_sql import send_sql

__all__ = ["Fetch", "LocalDiff"]

# How the differ runs a query on a cursor and hands over its batches (its time accounted).
Fetch = Callable[[str, duckdb.DuckDBPyConnection], Iterator[pa.RecordBatch]]


class LocalDiff:
    """A :class:`sync.diff.SegmentDiff`'s queries in ``segment``'s own database.

    Args:
        segment: The local segment.
        columns: The mapped columns, Custom ID first.
        schema: The segment's Arrow schema (as streamed).
        key: SQL of a row's Custom ID key; ``raw``: of its raw hash (the streamed differ's).
        stored: The fingerprints to compare with; ``intents``: the mirror intents.
        after: A continued full pass's watermark.
        memory: The cap of the queries (default :func:`sync.local_pass.local_memory_limit`).
    """

    def __init__(
        self,
        segment: LocalSegment,
        *,
        columns: Sequence[str],
        schema: pa.Schema,
        key: str,
        raw: str,
        stored: pa.Table,
        intents: pa.Table,
        after: str | None,
        memory: str | None,
    ) -> None:
        self._segment = segment
        self._columns = list(columns)
        self._schema = schema
        self._key = key
        self._raw = raw
        self._stored = stored
        self._stored_rows = stored.num_rows
        self._intents = intents
        self._after = after
        self._memory = memory
        self._con: duckdb.DuckDBPyConnection | None = None  # the cursor, once open
        # Why the differ does not query here (a column's type, or out of memory), or None.
        self.problem: str | None = None
        self.survivors = False  # the cursor holds the pass's table of survivors
        self.moved = 0  # ... of which this many moved
        self._stored_duplicates = True  # ... and whether a stored id comes more than once
        self._counts: tuple[int, int, int] | None = None  # the segment's, for the pass (something stored)
        self._wide = False  # more than WIDE_ROWS rows to hand over: the larger cap

    def segment_sql(self, columns: list[str]) -> str:
        return self._segment.segment_sql(columns)

    def connection(self, stack: ExitStack, *, sorts: bool = False) -> duckdb.DuckDBPyConnection | None:
        """The cursor, the differ's settings held by ``stack``; None if a mapped column would hash otherwise here.

        ``sorts``: the query sorts the segment's rows (a larger cap, one thread).
        """
        if self.problem is not None:
            return None
        con = self._con
        if con is None:
            con = self._segment.differ_cursor()
            segment = self._segment.segment_sql(self._columns)
            self.problem = roundtrip_problem(con, segment, self._schema, self._columns)
            if self.problem is not None:
                con.close()
                return None
            register_stored(con, self._stored)
            con.register("intents", self._intents)
            con.execute("CREATE OR REPLACE TEMP TABLE duplicates (k VARCHAR, copies BIGINT)")
            self._con = con
        limit = self._memory or local_memory_limit(self._stored_rows, sorts=sorts, wide=self._wide)
        stack.enter_context(self._segment.differ_settings(con, limit, sorts=sorts))
        if self._stored_rows and self._counts is None:
            # The pass's counts come first: a segment with many more rows than stored ids
            # (a first sync's later leg) has as many survivors (sync.local_pass.WIDE_ROWS),
            # and its queries get the larger cap from now on.
            self._counts = segment_counts(con, self._segment.segment_sql(self._columns), self._key, after=self._after)
            if self._counts[0] - self._stored_rows > WIDE_ROWS:
                self._wide = True
                wider = self._memory or local_memory_limit(self._stored_rows, sorts=sorts, wide=True)
                if wider != limit:
                    stack.enter_context(self._segment.differ_settings(con, wider, sorts=sorts))
        return con

    def run_pass(self, con: duckdb.DuckDBPyConnection) -> LocalPass:
        """The delta's pass and id scan (:func:`sync.local_pass.run_pass`); the survivors stay on the cursor."""
        assert self._counts is not None, "the cursor counts the segment when it opens, before the pass"
        found = run_pass(
            con,
            self._segment.segment_sql(self._columns),
            self._key,
            self._raw,
            stored_rows=self._stored_rows,
            intents=self._intents.num_rows,
            after=self._after,
            counts=self._counts,
        )
        self.moved, self.survivors = found.moved, True
        scan = found.scan
        self._wide = self._wide or found.moved + scan.null_ids + scan.new_ids + scan.duplicate_rows > WIDE_ROWS
        self._stored_duplicates = found.stored_duplicates
        return found

    def moved_rows(self, fetch: Fetch) -> Iterator[pa.RecordBatch]:
        """The pass's moved ids' rows (:func:`sync.local_pass.moved_sql`); few, without numbering every row."""
        segment = self._segment.segment_sql(self._columns)
        selected = None
        if self.moved <= SPARSE_ROWS:
            with ExitStack() as stack:
                con = self.connection(stack)
                assert con is not None
                ids = "SELECT k FROM survivors WHERE known AND NOT gone"
                selected = sparse_rows(con, segment, self._columns, self._key, self._raw, ids=ids, nulls=False)
            # Leaving the differ's settings let go of the segment's blocks the reads cached (up
            # to the cap: 128 MB at 10M rows), before the rows are mapped and held; the few
            # rows stay, in their temporary tables.
        with ExitStack() as stack:
            con = self.connection(stack)
            assert con is not None
            try:
                yield from fetch(moved_sql(segment, self._columns, self._key, self._raw, selected), con)
            finally:
                drop_sparse_rows(con)

    def stream(
        self, con: duckdb.DuckDBPyConnection, fetch: Fetch, *, full: bool, ordered: bool, rows: int
    ) -> Iterator[pa.RecordBatch]:
        """Rows to map and send (:func:`sync.stream_sql.send_sql`); ``rows``: the segment's above ``after``."""
        if self.survivors and not full:
            yield from self._delta_stream(con, fetch, ordered=ordered, rows=rows)
            return
        segment = self._segment.segment_sql(self._columns)
        selected = self._select(f"({numbered_sql(segment, self._columns)}) AS numbered")
        yield from self._pieces(con, fetch, selected, full=full, ordered=ordered, rows=rows)

    def _delta_stream(
        self, con: duckdb.DuckDBPyConnection, fetch: Fetch, *, ordered: bool, rows: int
    ) -> Iterator[pa.RecordBatch]:
        """After a pass, a delta's null, new and duplicated ids: none (no query), few, or the numbered segment's."""
        ((nulls, keyed),) = con.execute(stream_size_sql(self._after)).fetchall()
        if not nulls and not keyed:
            return  # nothing to stream: the segment is not queried
        segment = self._segment.segment_sql(self._columns)
        if int(nulls) + int(keyed) <= SPARSE_ROWS:
            ids = streamed_ids_sql(self._after)
            few = sparse_rows(con, segment, self._columns, self._key, self._raw, ids=ids, nulls=bool(nulls))
            if few is not None:
                # Every row is new or has no id, but a stored id's copies: only they may be stored.
                try:
                    sql = send_sql(
                        few,
                        stored=True,
                        full=False,
                        new=NEW_IDS_SQL,
                        ordered=ordered,
                        stored_duplicates=self._stored_duplicates,
                    )
                    yield from fetch(sql if ordered else f"{sql} ORDER BY {ROW}", con)
                finally:
                    drop_sparse_rows(con)
                return
        if ordered:
            selected = narrowed_sql(segment, self._columns, self._key, self._raw, streamed_condition(self._after))
            yield from self._pieces(con, fetch, selected, full=False, ordered=True, rows=rows)
            return
        yield from self._stream_in_parts(con, fetch, segment, keyed=int(keyed))

    def _stream_in_parts(
        self, con: duckdb.DuckDBPyConnection, fetch: Fetch, segment: str, *, keyed: int
    ) -> Iterator[pa.RecordBatch]:
        """A delta's large stream (``keyed``: its keyed rows, at most), in parts by id hash, each test within the cap.

        Telling a new id is a hash table of ids: the new ones', or the stored ones' when
        fewer (a first sync's second leg). Past the cap DuckDB spills the segment's rows too
        (:data:`sync.local_pass.STREAM_IDS_PER_MIB`), so the ids are cut by their hash into
        parts that fit (:func:`sync.local_pass.stream_parts`), each a read of the segment.
        The narrowed rows are exactly the stream's: ``send_sql`` tests nothing again.
        """
        by_stored = self._stored_rows < keyed
        parts = stream_parts(self._stored_rows if by_stored else keyed, cap_mib=memory_mib(con))
        for part in range(parts):
            condition = part_condition(self._after, part, parts, by_stored=by_stored)
            selected = narrowed_sql(segment, self._columns, self._key, self._raw, condition)
            yield from fetch(
                send_sql(
                    selected,
                    stored=True,
                    full=False,
                    new="TRUE",
                    ordered=False,
                    stored_duplicates=self._stored_duplicates,
                ),
                con,
            )

    def _pieces(
        self, con: duckdb.DuckDBPyConnection, fetch: Fetch, selected: str, *, full: bool, ordered: bool, rows: int
    ) -> Iterator[pa.RecordBatch]:
        """``selected``'s rows to send; in id order, in pieces of consecutive ids (sync.local_pass.SORT_PIECE_ROWS)."""
        ids_sql = self._segment.segment_sql([self._columns[0]])
        bounds = piece_bounds(con, ids_sql, self._key, after=self._after, rows=rows) if ordered else []
        pieces = [piece_sql(selected, lower, upper) for lower, upper in itertools.pairwise([None, *bounds, None])]
        stored = bool(self._stored_rows)
        new = NEW_IDS_SQL if self.survivors else None  # the pass's new ids, exact: no join with every stored id
        for piece in pieces if bounds else [selected]:
            yield from fetch(send_sql(piece, stored=stored, full=full, new=new, ordered=ordered), con)

    def _select(self, view: str) -> str:
        columns = ", ".join(quote_identifier(c) for c in self._columns)
        sql = f"SELECT {columns}, {ROW}, {self._key} AS {KEY}, {self._raw} AS {RAW} FROM {view}"
        if self._after is not None:
            # Rows without an id stay: they are rejected (with their row number) on every pass.
            sql = f"SELECT * FROM ({sql}) WHERE {KEY} IS NULL OR {KEY} > {quote_literal(self._after)}"
        return sql

    def give_up(self, error: BaseException) -> bool:
        """Whether ``error`` is the segment's database out of memory (then the differ streams from now on)."""
        if self.problem is not None or not out_of_memory(error):
            return False
        self.problem = f"the segment's database ran out of memory: {str(error).splitlines()[0]}"
        self.close()
        return True

    def close(self) -> None:
        """Close the cursor, and let go of the stored fingerprints (tens of MB a million): the differ is done here."""
        if self._con is not None:
            self._con.close()
            self._con = None
            self.survivors = False
        self._stored = self._stored.slice(0, 0)
