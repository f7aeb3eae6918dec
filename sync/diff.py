"""Change detection in columns: the segment against the acknowledged fingerprints, in DuckDB.

A delta run must look at every segment row, and most rows did not move. This stage never
builds a Python object for a row that did not move: the segment streams as Arrow record
batches into an in-memory DuckDB database (the *differ*), which computes each row's
Custom ID key and raw-values hash and joins them against the stored fingerprints, an Arrow
table of ``custom_id, raw, payload, attributes``. Only the rows that need mapping come back out.

What each call hands over (``docs/how-a-run-works.md``, "Following one row"):

1. :meth:`SegmentDiff.scan_ids`: row count, null ids, duplicated ids (``GROUP BY … HAVING
   count(*) > 1``), how many ids already have a stored fingerprint, and the ids that left
   the segment (mirror removals, an anti-join against the synced ids). Everything a guard
   needs is known before anything is mapped or sent.
2. :meth:`SegmentDiff.moved_rows` (runs that have state): rows with a stored fingerprint
   whose raw hash moved. They are few in a delta and must be mapped before the first send,
   because the ``changed_percent`` guard counts the payloads that really differ.
3. :meth:`SegmentDiff.rows_to_send`: rows without a stored fingerprint (new), rows with a
   bad or duplicated id (to be rejected with a reason), and in a full pass every row. It
   feeds the send pipeline as it goes: the first request leaves after one batch.

How often the segment is read:

- **with stored fingerprints, one read** for a delta (:mod:`sync.delta_pass`): the id scan
  reads every mapped column once, drops in DuckDB the rows whose (id, raw hash) pair is
  stored, and keeps the others (null, new, moved ids) as Arrow; the ids go to a file from
  which the counts, duplicates and removals are computed. The moved rows and the stream
  are then served from the kept rows. Only a stored id that is now duplicated with an
  unchanged copy needs a read of its own (restricted to the duplicated ids). A delta whose
  new rows exceed :data:`sync.delta_pass.KEPT_BUDGET_BYTES` (a first sync's continuation)
  keeps its moved rows only and streams the new ones in a second read; one whose moved rows
  alone exceed it (a mapping change) reads again as below. A full pass reads twice: the
  pass, then every row.
- **with nothing stored** (a first sync), two reads: the Custom ID column alone, then every
  row (nothing to compare, nothing to keep).

The raw hash and the key are :mod:`sync.raw_hash`'s recipes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Final

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from sync.delta_pass import (
    KEPT_BUDGET_BYTES,
    IdTee,
    KeptRows,
    duplicated_rows_sql,
    hash_pairs_sql,
    kept_moved_sql,
    kept_table_sql,
    kept_to_send_sql,
    pass_sql,
)
from sync.differ import (
    KEY,
    RAW,
    ROW,
    DiffRequest,
    FingerprintStore,
    IdScan,
    for_the_differ,
    register_stored,
)
from sync.duckdb_sql import bound_memory, quote_identifier, quote_literal
from sync.local_differ import LocalDiff
from sync.raw_hash import key_sql, raw_salt
from sync.scratch import scratch_directory
from sync.sources.base import Source, local_segment
from sync.stream_sql import NEW_BY_HASH_SQL, send_sql, streamed_moved_sql

__all__ = ["OUTPUT_BATCH_ROWS", "EmbeddedDiffer", "SegmentDiff", "key_sql", "raw_salt"]

# Rows per batch handed to the mapper: small enough that the first request leaves within a
# second of the stream starting and that a batch's working set (its Python values, Arrow
# arrays and DuckDB vectors, at every stage at once) stays small, large enough that
# per-batch overhead is negligible. One DuckDB vector. At the peak of a 1M full load, 10,000
# cost ~40 MB more than 4,096, and 4,096 8 MB more than 2,048, for the same CPU
# (`python bench/bench_sync.py --repeat 1 --baseline none --big-rows 0`).
OUTPUT_BATCH_ROWS: Final = 2_048
# The differ's own memory cap. DuckDB spills a larger hash table to a temporary directory
# of its own instead of growing without bound. A million stored ids join within it; past
# LARGE_STATE_ROWS the stored table itself takes ~32 bytes an id of the run's memory, so the
# differ gets half the cap, and spills more (measured in docs/how-a-run-works.md, "Memory").
DIFFER_MEMORY_LIMIT: Final = "128MB"
DIFFER_MEMORY_LIMIT_LARGE_STATE: Final = "64MB"
LARGE_STATE_ROWS: Final = 2_000_000


class SegmentDiff:
    """The differ of one run: an in-memory DuckDB holding the stored fingerprints.

    A :class:`sync.differ.Differ`. It sorts a full pass by id in this process's memory
    (~120 MB a million rows), so the engine asks for that order only when a run may hand
    over to a continuation (``orders_for_free`` is false).

    Args:
        source: Where the segment comes from (streamed; read once in a delta, see the module docstring).
        columns: The mapped columns, Custom ID first (``ProfileMapper.columns``).
        schema: The segment's Arrow schema (``Source.schema()``).
        stored: The acknowledged fingerprints (``sync.differ.FINGERPRINT_SCHEMA``).
        intents: Ids recorded as possibly synced (mirror mode), not in ``stored``.
        unconfirmed: Ids an earlier run sent without a committed acknowledgement (its notes
            were never settled): Batch may hold a payload their stored fingerprint does not
            say, so it is read as zero, and they are mapped and sent again.
        salt: :func:`raw_salt` of this run.
        after: A continued full pass's watermark: :meth:`rows_to_send` leaves out the rows
            whose id is at or below it (its first legs sent them), before joining or sorting.
        kept_budget_bytes: The most a delta's pass keeps of the rows it carries on
            (:data:`sync.delta_pass.KEPT_BUDGET_BYTES`); past it, the segment is read again.
        local_memory: The cap of the differ's queries in a local segment's database
            (default :func:`sync.local_pass.local_memory_limit`).
    """

    def __init__(
        self,
        source: Source,
        *,
        columns: Sequence[str],
        schema: pa.Schema,
        stored: pa.Table,
        intents: Sequence[str] = (),
        unconfirmed: Sequence[str] = (),
        salt: str,
        on_rows: Callable[[int], None] | None = None,
        after: str | None = None,
        kept_budget_bytes: int = KEPT_BUDGET_BYTES,
        local_memory: str | None = None,
    ) -> None:
        self._source = source
        self._kept_budget = kept_budget_bytes
        self._columns = list(columns)
        self._id_column = self._columns[0]
        self._schema = schema
        self._key = key_sql(self._id_column, schema.field(self._id_column).type)
        self._raw = "hash(" + ", ".join([quote_literal(salt), *(quote_identifier(c) for c in self._columns)]) + ")"
        self._names = itertools.count()
        self._on_rows = on_rows
        self._after = after
        self.stored_count = stored.num_rows
        self.seconds = {"read": 0.0, "hash_and_diff": 0.0}
        self.orders_for_free = False
        self._stored = for_the_differ(stored, unconfirmed)
        self._intents = pa.table({"custom_id": pa.array(sorted(set(intents)), pa.string())})
        # Ids the id scan found more than once (key, copies), copied into every database.
        self._duplicates = pa.table({"k": pa.array([], pa.string()), "copies": pa.array([], pa.int64())})
        # Set by the id scan: no segment id shares its hash with another stored id, so
        # matching ids by their 8-byte hashes is exact (the pass, and a delta's stream).
        self._new_by_hash = False
        # Set by the id scan's pass: the rows it kept are in the table ``kept`` (and, when
        # ``_kept_duplicates``, every copy of every duplicated id among them).
        self._kept = False
        # ... and the new and null ids' rows too (not only the moved ones): a delta's stream
        # is served from them, without a read.
        self._kept_all = False
        self._kept_duplicates = True
        self._reported = False  # on_rows heard of the segment's rows once already
        self._scanned_rows = 0  # the id scan's row count
        self._below_watermark = 0  # ... and how many of its rows are at or below ``after``
        self._spill = scratch_directory("diff")
        self._own: duckdb.DuckDBPyConnection | None = None  # the differ's own database, once needed
        # A DuckDB source: a delta's pass runs in its database (sync.local_differ), unless a
        # mapped column would hash otherwise there (then ``local_problem`` says why).
        segment = local_segment(source)
        self._local: LocalDiff | None = None
        if segment is not None:
            self._local = LocalDiff(
                segment,
                columns=self._columns,
                schema=schema,
                key=self._key,
                raw=self._raw,
                stored=self._stored,
                intents=self._intents,
                after=after,
                memory=local_memory,
            )
        # Where a delta's pass ran, for the run record: None (no pass: nothing stored),
        # "segment_database" (sync.local_pass) or "stream" (sync.delta_pass).
        self.compared_in: str | None = None

    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        """The differ's own database (a local segment's delta never needs it: it is opened when first used)."""
        if self._own is None:
            self._own = self._connect()
        return self._own

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A differ database: the stored fingerprints and intents registered, memory bounded."""
        con = duckdb.connect(":memory:")
        # The differ's joins always build their hash table on the stored side and stream
        # the segment through it. DuckDB cannot know how many rows an Arrow stream holds
        # (it guesses one), so its optimiser would otherwise build on the segment and hold
        # all of it in memory before the first row comes out.
        con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
        limit = DIFFER_MEMORY_LIMIT if self.stored_count <= LARGE_STATE_ROWS else DIFFER_MEMORY_LIMIT_LARGE_STATE
        bound_memory(con, memory_limit=limit, spill_directory=self._spill.name)
        con.execute("SET allocator_background_threads = true")
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET threads = 1")
        register_stored(con, self._stored)
        con.register("intents", self._intents)
        con.execute("CREATE TEMP TABLE duplicates (k VARCHAR, copies BIGINT)")
        self._load_duplicates(con)
        return con

    def _load_duplicates(self, con: duckdb.DuckDBPyConnection) -> None:
        if self._duplicates.num_rows:
            con.register("duplicates_found", self._duplicates)
            con.execute("INSERT INTO duplicates SELECT k, copies FROM duplicates_found")
            con.unregister("duplicates_found")

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
        if self._local is not None:
            self._local.close()
        self._spill.cleanup()
        # The stored fingerprints (tens of MB a million) are not needed past the diff.
        self._stored = self._stored.slice(0, 0)

    @property
    def local_problem(self) -> str | None:
        """Why a local segment's database is not queried (a column's type, out of memory), or None."""
        return self._local.problem if self._local is not None else None

    def _queries_locally(self) -> bool:
        return self._local is not None and self._local.problem is None

    # -- reads -------------------------------------------------------------------------------

    def _stream(
        self,
        columns: list[str],
        *,
        numbered: bool,
        report: bool = False,
        con: duckdb.DuckDBPyConnection | None = None,
        tee: Callable[[pa.RecordBatch], None] | None = None,
    ) -> str:
        """Register one streamed read of the segment (in ``con``, the differ's by default); return its name.

        ``report``: tell ``on_rows`` (unless an earlier read did); ``tee``: handed every batch read.
        """
        batches = self._source.read_batches(columns)
        schema = pa.schema([self._schema.field(c) for c in columns])
        if numbered:
            schema = schema.append(pa.field(ROW, pa.int64()))
        report = report and not self._reported
        self._reported = self._reported or report

        def timed() -> Iterator[pa.RecordBatch]:
            row = 0
            base: pa.Array | None = None
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                self.seconds["read"] += time.perf_counter() - started
                if batch is None:
                    return
                if report and self._on_rows is not None:
                    self._on_rows(batch.num_rows)
                if tee is not None:
                    tee(batch)
                if numbered:
                    # Row numbers (from 1, in read order) for rejected rows: one shared base
                    # array, shifted per batch, never a Python int per row.
                    if base is None or len(base) < batch.num_rows:
                        base = pa.array(range(1, max(batch.num_rows, OUTPUT_BATCH_ROWS) + 1), pa.int64())
                    numbers = pc.add(base.slice(0, batch.num_rows), pa.scalar(row, pa.int64()))
                    batch = pa.RecordBatch.from_arrays([*batch.columns, numbers], schema=schema)
                    row += batch.num_rows
                yield batch

        name = f"segment_{next(self._names)}"
        (self._con if con is None else con).register(name, pa.RecordBatchReader.from_batches(schema, timed()))
        return name

    def _fetch(self, sql: str, con: duckdb.DuckDBPyConnection | None = None) -> Iterator[pa.RecordBatch]:
        started = time.perf_counter()
        reader: pa.RecordBatchReader = (self._con if con is None else con).sql(sql).to_arrow_reader(OUTPUT_BATCH_ROWS)
        yield from self._drain(reader, started)

    def _drain(self, reader: pa.RecordBatchReader, started: float) -> Iterator[pa.RecordBatch]:
        read_before = self.seconds["read"]
        try:
            while True:
                batch = reader.read_next_batch()
                self._account(started, read_before)
                yield batch
                started, read_before = time.perf_counter(), self.seconds["read"]
        except StopIteration:
            self._account(started, read_before)

    def _account(self, started: float, read_before: float) -> None:
        elapsed = time.perf_counter() - started
        self.seconds["hash_and_diff"] += max(0.0, elapsed - (self.seconds["read"] - read_before))

    def scan_ids(self) -> IdScan:
        """Counts, duplicates, and the ids that left; with stored fingerprints, the delta's one read.

        With nothing stored, the Custom ID column alone is read. Otherwise :meth:`_pass`
        reads every mapped column once and keeps the rows that may need mapping (a local
        segment: :func:`sync.local_pass.run_pass`, or, out of memory there, the stream).
        """
        try:
            return self._scan_ids()
        except (duckdb.OutOfMemoryException, OSError) as error:
            if not self._give_up_local(error):
                raise
            return self._scan_ids()

    def _give_up_local(self, error: BaseException) -> bool:
        """Whether ``error`` is the local segment's database out of memory (then stream from now on)."""
        return self._local is not None and self._local.give_up(error)

    def _scan_ids(self) -> IdScan:
        if self.stored_count and self._local is not None:
            with ExitStack() as settings:
                local = self._local.connection(settings)
                if local is not None:
                    return self._local_pass(local)
        started = time.perf_counter()
        read_before = self.seconds["read"]
        tee: IdTee | None = None
        kept: KeptRows | None = None
        # A database of its own, closed at the end: DuckDB keeps what a query freed for reuse
        # until its database closes, and the scan's hash tables (tens of MB a million ids)
        # are never needed again. Only the duplicated ids move over. (A local segment's scan
        # runs on the differ's cursor in the source's database: _local_pass.)
        con: duckdb.DuckDBPyConnection | None = None
        stack = ExitStack()
        try:
            local = None
            if self.stored_count:
                tee, kept = self._pass()
                self.compared_in = "stream"
                con = self._connect()
                con.register("segment_ids", tee.reader())
                view = "segment_ids"
            elif self._local is not None and (local := self._local.connection(stack)) is not None:
                # Nothing stored, a local segment: its ids, queried where they lie.
                con = local
                view = f"({self._local.segment_sql([self._id_column])}) AS segment"
            else:
                con = self._connect()
                view = self._stream([self._id_column], numbered=False, con=con)
            con.execute(f"CREATE OR REPLACE TEMP TABLE seen AS SELECT {self._key} AS k FROM {view}")
            if tee is not None:
                con.unregister("segment_ids")
                tee.remove()
            rows, keyed = con.execute("SELECT count(*), count(k) FROM seen").fetchone() or (0, 0)
            # Every query below builds its hash table on the smaller side, or on 8-byte
            # hashes of the ids, never on a million ids as strings twice over: the scan's
            # peak is the run's (docs/how-a-run-works.md, "Memory"). Duplicated ids are
            # found among the ids whose hash repeats (every duplicated id, and the rare
            # distinct ids whose hashes collide), then counted exactly.
            con.execute(
                "INSERT INTO duplicates SELECT k, count(*) FROM seen "
                "SEMI JOIN (SELECT hash(k) AS h FROM seen WHERE k IS NOT NULL GROUP BY h HAVING count(*) > 1) c "
                "ON c.h = hash(seen.k) WHERE seen.k IS NOT NULL GROUP BY k HAVING count(*) > 1"
            )
            copies = con.sql("SELECT k, copies FROM duplicates").to_arrow_table()
            duplicates = dict(zip(copies["k"].to_pylist(), copies["copies"].to_pylist(), strict=True))
            distinct = int(keyed) - sum(duplicates.values()) + len(duplicates)
            # Stored and intent ids stream through one anti-join on the segment's ids; only
            # the few that come out are deduplicated (an intent may also be stored).
            gone = con.execute(
                "SELECT custom_id, bool_or(is_stored) FROM (SELECT custom_id, TRUE AS is_stored FROM stored "
                "UNION ALL SELECT custom_id, FALSE FROM intents) synced "
                "ANTI JOIN (SELECT k FROM seen WHERE k IS NOT NULL) s ON s.k = synced.custom_id "
                "GROUP BY custom_id ORDER BY custom_id"
            ).fetchall()
            removed = [key for key, _ in gone]
            # Stored ids are unique: those in the segment are the stored ones less those
            # that left, and the matched ones are those less the duplicated ones.
            ((stored_duplicated,),) = con.execute(
                "SELECT count(*) FROM stored SEMI JOIN duplicates ON duplicates.k = stored.custom_id"
            ).fetchall()
            matched = self.stored_count - sum(1 for _, is_stored in gone if is_stored) - int(stored_duplicated)
            # Intent ids are unique (a sorted set): the synced ids are the stored ones plus
            # the intents that are not stored, counted by a join built on the intents.
            overlap_row = con.execute("SELECT count(*) FROM stored SEMI JOIN intents USING (custom_id)").fetchone()
            overlap = int(overlap_row[0]) if overlap_row else 0
            synced = self.stored_count + self._intents.num_rows - overlap
            if self.stored_count:
                self._new_by_hash = self._hashes_are_exact(con, matched + int(stored_duplicated))
            self._scanned_rows = int(rows)
            below_row = (
                con.execute("SELECT count(*) FROM seen WHERE k <= ?", [self._after]).fetchone()
                if self._after is not None
                else None
            )
            self._below_watermark = int(below_row[0]) if below_row else 0
        finally:
            if con is not None and con is not local:
                con.close()
            elif con is not None:
                con.execute("DROP TABLE IF EXISTS seen")
            stack.close()
            if tee is not None:
                tee.remove()
        self._duplicates = copies  # into the differ's own database (now, or once opened)
        if self._own is not None:
            self._load_duplicates(self._own)
        if kept is not None and not kept.overflowed:
            self._keep(kept, duplicate_rows=sum(duplicates.values()))
        self._account(started, read_before)
        return IdScan(
            rows=int(rows),
            null_ids=int(rows) - int(keyed),
            duplicates=duplicates,
            matched=matched,
            new_ids=distinct - len(duplicates) - matched,
            removed=removed,
            synced=synced,
            below_watermark=int(below_row[0]) if below_row else 0,
        )

    def _local_pass(self, con: duckdb.DuckDBPyConnection) -> IdScan:
        """The delta's pass and id scan in the local segment's database (:func:`sync.local_pass.run_pass`)."""
        assert self._local is not None
        started, read_before = time.perf_counter(), self.seconds["read"]
        found = self._local.run_pass(con)
        self.compared_in = "segment_database"
        self._scanned_rows, self._below_watermark = found.scan.rows, found.scan.below_watermark
        if self._on_rows is not None and not self._reported:
            self._on_rows(found.scan.rows)
        self._reported = True
        self._duplicates = found.duplicates  # into the differ's own database if ever opened
        if self._own is not None:
            self._load_duplicates(self._own)
        self._account(started, read_before)
        return found.scan

    def _pass(self) -> tuple[IdTee, KeptRows]:
        """The delta's one read: the rows whose (id, raw hash) pair is not stored, and every id.

        Rows are matched on their id's 8-byte hash (16 bytes a stored id in the join), which
        :meth:`_hashes_are_exact` proves exact before any kept row is used.
        """
        tee = IdTee(Path(self._spill.name) / "segment-ids.arrows", self._schema.field(self._id_column))
        kept = KeptRows(self._kept_budget)
        # A database of its own, closed once read: its hash table is not needed after it.
        con = self._connect()
        try:
            view = self._stream(self._columns, numbered=True, report=True, con=con, tee=tee)
            reader: pa.RecordBatchReader = con.sql(pass_sql(self._select(view))).to_arrow_reader(OUTPUT_BATCH_ROWS)
            kept.schema = reader.schema
            for batch in reader:
                kept.add(batch)
        except BaseException:
            tee.remove()
            raise
        finally:
            con.close()
        return tee, kept

    def _hashes_are_exact(self, con: duckdb.DuckDBPyConnection, present: int) -> bool:
        """Whether each segment id's 8-byte hash is the hash of no stored id but itself.

        ``present``: the distinct segment ids that are stored. Every one of them pairs
        with its own stored hash, so the (segment id, stored id) pairs of equal hashes
        number ``present`` exactly when no segment id pairs with another stored id. Then
        the pass dropped exactly the rows whose id and raw hash are stored, and a delta's
        stream may tell a new id by its hash.
        """
        ((pairs,),) = con.execute(hash_pairs_sql()).fetchall()
        return int(pairs) == present

    def _keep(self, kept: KeptRows, *, duplicate_rows: int) -> None:
        """The pass's rows, with their stored fingerprint, into the differ's table ``kept``."""
        self._con.register("kept_rows", kept.table())
        kept.batches.clear()
        try:
            self._con.execute(f"CREATE OR REPLACE TEMP TABLE kept AS {kept_table_sql(self._columns, 'kept_rows')}")
        finally:
            self._con.unregister("kept_rows")
        ((count,),) = self._con.execute(
            f"SELECT count(*) FROM kept SEMI JOIN duplicates d ON d.k = kept.{KEY}"
        ).fetchall()
        # Every copy of every duplicated id was kept (a new id's copies always are): the
        # stream needs no read of its own for them.
        self._kept_duplicates = int(count) == duplicate_rows
        self._kept = True
        self._kept_all = not kept.moved_only

    def _serves_kept(self) -> bool:
        return self._kept and self._new_by_hash

    def _select(self, view: str, *, after: str | None = None) -> str:
        columns = ", ".join(quote_identifier(c) for c in self._columns)
        sql = f"SELECT {columns}, {ROW}, {self._key} AS {KEY}, {self._raw} AS {RAW} FROM {view}"
        if after is not None:
            # Rows without an id stay: they are rejected (with their row number) on every pass.
            sql = f"SELECT * FROM ({sql}) WHERE {KEY} IS NULL OR {KEY} > {quote_literal(after)}"
        return sql

    def moved_rows(self) -> Iterator[pa.RecordBatch]:
        """Rows with a stored fingerprint whose raw hash moved (not duplicated)."""
        local = self._local if self._local is not None and self._local.survivors else None
        if self.stored_count == 0 or (local is not None and not local.moved):
            return iter(())
        if local is not None:
            return self._or_streamed(local.moved_rows(self._fetch), self._moved_rows)
        if self._serves_kept():
            # Re-checked exactly: the kept rows met the stored ones on the id itself.
            return self._fetch(kept_moved_sql(self._columns))
        return self._moved_rows()

    def _moved_rows(self) -> Iterator[pa.RecordBatch]:
        # In a database of its own, closed once read: its hash tables are not kept for the
        # stream, which builds its own (sync.stream_sql.moved_sql says how it joins).
        con = self._connect()
        try:
            view = self._stream(self._columns, numbered=True, con=con)
            yield from self._fetch(streamed_moved_sql(self._select(view)), con)
        finally:
            con.close()

    def rows_to_send(self, *, full: bool, ordered: bool = False) -> Iterator[pa.RecordBatch]:
        """Rows to map and send: new ids, bad or duplicated ids, and every row in a full pass.

        Args:
            full: Every row, including those whose fingerprint is unchanged.
            ordered: In Custom ID order (a full pass with a send checkpoint needs it).

        Rows at or below the watermark (``after``) never come out.
        """
        if not full and self.stored_count and self._serves_kept() and self._kept_all:
            return self._kept_to_send()
        if self._queries_locally():
            return self._local_rows_to_send(full=full, ordered=ordered)
        return self._streamed_rows_to_send(full=full, ordered=ordered)

    def _send_sql(self, view: str, *, full: bool, ordered: bool) -> str:
        # A continuation never joins or sorts what its first legs sent.
        selected = self._select(view, after=self._after)
        stored = bool(self.stored_count)
        new = NEW_BY_HASH_SQL if self._new_by_hash else None
        return send_sql(selected, stored=stored, full=full, new=new, ordered=ordered)

    def _streamed_rows_to_send(self, *, full: bool, ordered: bool) -> Iterator[pa.RecordBatch]:
        view = self._stream(self._columns, numbered=True, report=True)
        return self._fetch(self._send_sql(view, full=full, ordered=ordered))

    def _local_rows_to_send(self, *, full: bool, ordered: bool) -> Iterator[pa.RecordBatch]:
        """:meth:`rows_to_send` in the local segment's database: the same SQL, the rows numbered there.

        The progress hears of the rows as they come out, then of the rest of the segment's.
        """
        report = self._on_rows if not self._reported else None
        self._reported = True
        told = 0
        local = self._local_stream(full=full, ordered=ordered)
        for batch in self._or_streamed(local, lambda: self._streamed_rows_to_send(full=full, ordered=ordered)):
            if report is not None:
                report(batch.num_rows)
                told += batch.num_rows
            yield batch
        if report is not None and self._scanned_rows > told:
            report(self._scanned_rows - told)

    def _local_stream(self, *, full: bool, ordered: bool) -> Iterator[pa.RecordBatch]:
        assert self._local is not None
        with ExitStack() as stack:
            con = self._local.connection(stack, sorts=ordered)
            if con is None:  # a mapped column would hash otherwise there
                yield from self._streamed_rows_to_send(full=full, ordered=ordered)
                return
            rows = self._scanned_rows - self._below_watermark
            yield from self._local.stream(con, self._fetch, full=full, ordered=ordered, rows=rows)

    def _or_streamed(
        self, local: Iterator[pa.RecordBatch], streamed: Callable[[], Iterator[pa.RecordBatch]]
    ) -> Iterator[pa.RecordBatch]:
        """``local``'s batches; ``streamed``'s if its first ran the segment's database out of memory.

        A sort runs before its first batch: out of memory, if ever, there.
        """
        try:
            first = next(local, None)
        except (duckdb.OutOfMemoryException, OSError) as error:
            if not self._give_up_local(error):
                raise
            yield from streamed()
            return
        if first is not None:
            yield first
            yield from local

    def _kept_to_send(self) -> Iterator[pa.RecordBatch]:
        """A delta's rows to send from what the pass kept; the duplicated ids' own read if it must."""
        yield from self._fetch(kept_to_send_sql(self._columns, duplicates=self._kept_duplicates, after=self._after))
        if not self._kept_duplicates:
            # A stored id now duplicated, a copy of it unchanged: the pass could not know
            # it would be duplicated, and dropped that copy. Only then, a read restricted to
            # the duplicated ids brings every copy (with its row number).
            view = self._stream(self._columns, numbered=True)
            yield from self._fetch(duplicated_rows_sql(self._select(view, after=self._after)))


class EmbeddedDiffer:
    """The embedded differ's factory: fingerprints from a state store, compared in DuckDB here.

    A :class:`sync.differ.DifferFactory`: the default of every run whose activation says
    ``diff: function`` (``sync.runtime.open_differ`` builds it).

    Args:
        source: The segment (read by each differ it opens; its ``engine`` salts the raw hash).
        fingerprints: Where the acknowledged fingerprints are (the run's state store).
    """

    def __init__(self, source: Source, fingerprints: FingerprintStore) -> None:
        self._source = source
        self._fingerprints = fingerprints
        self._opened: SegmentDiff | None = None

    @property
    def fingerprints(self) -> FingerprintStore:
        return self._fingerprints

    def open(self, activation: str, request: DiffRequest) -> SegmentDiff:
        stored = self._fingerprints.load_fingerprint_table(activation)
        salt = raw_salt(request.mapping_version, request.schema, request.columns, self._source.engine)
        self._opened = SegmentDiff(
            self._source,
            columns=request.columns,
            schema=request.schema,
            stored=stored,
            intents=request.intents,
            unconfirmed=request.unconfirmed,
            salt=salt,
            on_rows=request.on_rows,
            after=request.after,
        )
        return self._opened

    def record(self) -> dict[str, object]:
        """Where the run's delta pass ran, and why not in a local segment's database if it could not."""
        diff = self._opened
        if diff is None or diff.compared_in is None:
            return {}
        where: dict[str, object] = {"ran_in": diff.compared_in}
        if diff.local_problem is not None:
            where["not_in_segment_database_because"] = diff.local_problem
        return {"delta_pass": where}

    def close(self) -> None:
        """Nothing of its own to close: the source and the store are their opener's."""
