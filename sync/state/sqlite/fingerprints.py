"""The fingerprint role of the SQLite store: packed base chunks and the journal of commits.

The one role a differ reads (:class:`sync.differ.FingerprintStore`), and the largest: the
compaction that folds the journal into the base chunks decides between three ways by memory
(``docs/how-a-run-works.md``, "Memory").
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import FINGERPRINT_COLUMNS, FINGERPRINT_SCHEMA, JOURNAL_SCHEMA
from sync.memory import release_free_memory
from sync.model import Fingerprint, JournalEntry, Lease
from sync.state import core
from sync.state.fold import (
    SpillingFold,
    fold_due,
    fold_journal,
    has_repeats,
    latest_entries_table,
    no_common_ids,
    without_ids,
)
from sync.state.sqlite.connection import SQLiteTables, unpack

# Fingerprints per base blob (a SQLite blob is at most 1 GB; a million fingerprints pack
# into ~15-30 MB).
_CHUNK_ROWS: Final = 250_000
# The largest journal folded a stored chunk at a time (:meth:`FingerprintTables._fold_by_chunk`).
# It holds the journal's last entry of each id and, while a chunk is looked up, a hash set of
# their ids: ~200 bytes an entry at most, ~200 MB at this size, whatever the state's size. A
# larger journal that is not a first sync's is folded by :class:`sync.state.fold.SpillingFold`,
# within its cap.
_FOLD_BY_CHUNK_ROWS: Final = 1_000_000
# lz4: ids compress about 3x, at a few ms per million fingerprints.
_IPC_OPTIONS: Final = core.ipc_write_options("lz4")


def _pack(table: pa.Table) -> memoryview:
    return memoryview(core.pack_table(table, _IPC_OPTIONS))


class FingerprintTables(SQLiteTables):
    """:class:`sync.differ.FingerprintStore` on the ``fingerprint_base`` and ``fingerprint_journal`` tables."""

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        """Every committed fingerprint of the activation, keyed by custom_id (journal included)."""
        return core.fingerprints_of(self.load_fingerprint_table(activation))

    def load_fingerprint_table(self, activation: str) -> pa.Table:
        """Every committed fingerprint as an Arrow table (``sync.differ.FINGERPRINT_SCHEMA``).

        The base blobs and the journal blobs not yet compacted, read in one transaction and
        folded in columns (:func:`sync.state.fold.fold_journal`).
        """
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                base, journal = self._read_blobs(conn, activation)
            finally:
                conn.execute("COMMIT")
            self._stats["statements"] += 2
        return fold_journal(base, journal)

    def _read_blobs(self, conn: sqlite3.Connection, activation: str) -> tuple[list[pa.Table], list[pa.Table]]:
        where = self._where(activation)
        base = [
            unpack(blob, FINGERPRINT_SCHEMA, where)
            for (blob,) in conn.execute(
                "SELECT blob FROM fingerprint_base WHERE activation = ? ORDER BY chunk", (activation,)
            )
        ]
        journal = [
            unpack(blob, JOURNAL_SCHEMA, where)
            for (blob,) in conn.execute(
                "SELECT blob FROM fingerprint_journal WHERE activation = ? ORDER BY seq", (activation,)
            )
        ]
        return base, journal

    def commit(self, lease: Lease, entries: Sequence[JournalEntry] | pa.Table, now: datetime) -> None:
        """Append the entries as one journal blob, in one fenced transaction.

        ``now`` is accepted for the protocol.

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
            ValueError: A fingerprint value is not an unsigned 64-bit int; nothing is written.
        """
        activation = lease.activation
        table = core.journal_table(activation, entries)
        blob = _pack(table) if table.num_rows else None
        with self._write() as conn:
            self._check_lease(conn, lease)
            if blob is None:
                self._count(1, 0)
                return
            row = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM fingerprint_journal WHERE activation = ?", (activation,)
            ).fetchone()
            conn.execute(
                "INSERT INTO fingerprint_journal (activation, seq, rows, blob) VALUES (?, ?, ?, ?)",
                (activation, (row[0] if row else 0) + 1, table.num_rows, blob),
            )
            self._count(3, table.num_rows)

    def compact(self, lease: Lease, now: datetime, *, when_due: bool = False) -> None:
        """Fold the journal into the base blobs, in one fenced transaction.

        ``when_due``: only if the journal is large enough for folding to be worth it now
        (:func:`sync.state.fold.fold_due`); otherwise it stays, and every load applies it.

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
        """
        activation = lease.activation
        with self._write() as conn:
            self._check_lease(conn, lease)
            pending = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM fingerprint_journal WHERE activation = ?",
                (activation,),
            ).fetchone()
            if not pending or not pending[0]:
                self._count(2, 0)
                return
            if when_due:
                stored = conn.execute(
                    "SELECT COALESCE(SUM(rows), 0) FROM fingerprint_base WHERE activation = ?", (activation,)
                ).fetchone()
                due = fold_due(
                    journal_rows=int(pending[1]),
                    journal_documents=int(pending[0]),
                    stored_rows=int(stored[0]) if stored else 0,
                )
                if not due:
                    self._count(3, 0)
                    return
            # A journal of at most a chunk (a delta) is folded a stored chunk at a time; a larger
            # one that only adds ids (a first sync) is appended; one of up to a million entries
            # (several deltas' journals) is folded a stored chunk at a time; anything else goes
            # through a fold that spills to disk past its cap.
            appended = self._fold_by_chunk(conn, activation, up_to=_CHUNK_ROWS)
            if appended is None:
                appended = self._append_to_base(conn, activation)
            if appended is None:
                appended = self._fold_by_chunk(conn, activation, up_to=_FOLD_BY_CHUNK_ROWS)
            if appended is not None:
                conn.execute("DELETE FROM fingerprint_journal WHERE activation = ?", (activation,))
                self._count(6, appended)
                return
            written = self._fold_spilling(conn, activation)
            conn.execute("DELETE FROM fingerprint_journal WHERE activation = ?", (activation,))
            self._count(6, written)

    def _append_to_base(self, conn: sqlite3.Connection, activation: str) -> int | None:
        """Compact a journal larger than a chunk that only adds new ids by appending them.

        A first sync (a smaller journal goes through :meth:`_fold_by_chunk`). Memory decides how
        (``docs/how-a-run-works.md``, "Memory"): a first pass over the journal keeps its ids
        alone, to check that none repeats and, one base chunk at a time, that none is
        stored already; a second pass streams the journal into new chunks, a chunk at a
        time, after filling up the last, partly filled one. Nothing else is rewritten.

        Returns:
            The number of fingerprints appended, or None (nothing written) when the journal
            deletes, repeats or updates an id: the chunked or the spilling fold then runs.
        """
        where = self._where(activation)
        journal = self._journal_reader(conn, activation, where)

        ids = self._journal_ids(journal())
        if ids is None or has_repeats(ids):
            return None
        chunks = conn.execute(
            "SELECT chunk, rows FROM fingerprint_base WHERE activation = ? ORDER BY chunk", (activation,)
        ).fetchall()
        for chunk, _rows in chunks:
            stored = self._base_chunk(conn, activation, chunk, where)
            disjoint = no_common_ids(stored.column("custom_id"), ids)
            del stored
            release_free_memory()  # one chunk at a time: the next one reuses this one's memory
            if not disjoint:
                return None
        appended = len(ids)
        del ids
        release_free_memory()
        self._append_chunks(conn, activation, chunks, journal(), where)
        return appended

    def _append_chunks(
        self,
        conn: sqlite3.Connection,
        activation: str,
        chunks: list[tuple[int, int]],
        tables: Iterable[pa.Table],
        where: str,
    ) -> None:
        """Append fingerprints (ids stored nowhere yet) to the base chunks ``(chunk, rows)``.

        The last chunk is filled up first, so that many small runs do not leave many small
        chunks; then new chunks are cut, one at a time.
        """
        pending: list[pa.Table] = []
        rows = 0
        next_chunk = chunks[-1][0] + 1 if chunks else 0
        if chunks and chunks[-1][1] < _CHUNK_ROWS:
            next_chunk = chunks[-1][0]
            pending.append(self._base_chunk(conn, activation, next_chunk, where))
            rows = pending[0].num_rows
            conn.execute("DELETE FROM fingerprint_base WHERE activation = ? AND chunk = ?", (activation, next_chunk))
        for table in tables:
            pending.append(table.select(list(FINGERPRINT_COLUMNS)).cast(FINGERPRINT_SCHEMA))
            rows += table.num_rows
            while rows >= _CHUNK_ROWS:
                gathered = pa.concat_tables(pending)
                self._insert_chunk(conn, activation, next_chunk, gathered.slice(0, _CHUNK_ROWS))
                pending, rows, next_chunk = [gathered.slice(_CHUNK_ROWS)], rows - _CHUNK_ROWS, next_chunk + 1
        if rows:
            self._insert_chunk(conn, activation, next_chunk, pa.concat_tables(pending))

    def _fold_by_chunk(self, conn: sqlite3.Connection, activation: str, *, up_to: int) -> int | None:
        """Compact a journal of at most ``up_to`` entries, a stored chunk at a time.

        The usual delta: a few thousand changed, new and removed profiles against millions
        stored (a few hundred thousand once several deltas' journals are due). The journal's
        last entry per id is taken; each stored chunk that holds one of its ids is rewritten
        without them; the ids it puts are then appended. The same result as the general fold
        (``fold_journal``), reading each stored chunk once and holding two at a time instead
        of the whole state (``docs/how-a-run-works.md``, "Memory"): one in SQLite's hands on
        this thread, the one before it decoded, looked up and packed again on a worker. A
        journal that only adds ids rewrites no stored chunk but the last.

        Returns:
            The number of fingerprints written, or None (nothing written) when the journal
            has more than ``up_to`` entries.
        """
        where = self._where(activation)
        row = conn.execute(
            "SELECT COALESCE(SUM(rows), 0) FROM fingerprint_journal WHERE activation = ?", (activation,)
        ).fetchone()
        if not row or row[0] > up_to:
            return None
        journal = [
            unpack(blob, JOURNAL_SCHEMA, where)
            for (blob,) in conn.execute(
                "SELECT blob FROM fingerprint_journal WHERE activation = ? ORDER BY seq", (activation,)
            )
        ]
        latest = latest_entries_table(journal)
        del journal
        touched = latest.column("custom_id").combine_chunks()
        chunks = conn.execute(
            "SELECT chunk, rows FROM fingerprint_base WHERE activation = ? ORDER BY chunk", (activation,)
        ).fetchall()
        kept: list[tuple[int, int]] = []
        rewritten = 0

        def settle(chunk: int, rows: int, rewrite: Future[tuple[int, memoryview | None] | None]) -> None:
            nonlocal rewritten
            result = rewrite.result()
            if result is not None:
                rows, packed = result
                if packed is None:
                    conn.execute("DELETE FROM fingerprint_base WHERE activation = ? AND chunk = ?", (activation, chunk))
                else:
                    conn.execute(
                        "UPDATE fingerprint_base SET rows = ?, blob = ? WHERE activation = ? AND chunk = ?",
                        (rows, packed, activation, chunk),
                    )
                rewritten += rows
                del packed
                release_free_memory()  # a chunk at a time: the next one reuses this one's memory
            if rows:
                kept.append((chunk, rows))

        # SQLite reads and writes on this thread while a worker decodes, looks up and packs
        # the chunk read before (Arrow and lz4 let the GIL go): two chunks in hand at most.
        with ThreadPoolExecutor(1, thread_name_prefix="cepsync-fold") as pool:
            pending: deque[tuple[int, int, Future[tuple[int, memoryview | None] | None]]] = deque()
            for chunk, rows in chunks:
                blob = self._base_blob(conn, activation, chunk)
                pending.append((chunk, rows, pool.submit(_rewritten, blob, touched, where)))
                del blob
                if len(pending) > 1:
                    settle(*pending.popleft())
            while pending:
                settle(*pending.popleft())
        puts = latest.filter(latest.column("put"))
        self._append_chunks(conn, activation, kept, [puts], where)
        return rewritten + int(puts.num_rows)

    def _fold_spilling(self, conn: sqlite3.Connection, activation: str) -> int:
        """Compact any other journal (over :data:`_FOLD_BY_CHUNK_ROWS` entries, not only adding ids).

        The stored chunks and the journal are read a blob at a time into a fold that spills
        to disk past its cap (:class:`sync.state.fold.SpillingFold`); the chunks are then
        replaced by the result, written a chunk at a time. Memory is bounded by the fold's
        cap (and DuckDB's own overhead beside it) and a chunk, not by the state's size
        (``docs/how-a-run-works.md``, "Memory").

        Returns:
            The number of fingerprints written.
        """
        where = self._where(activation)
        chunks = [
            chunk
            for (chunk,) in conn.execute(
                "SELECT chunk FROM fingerprint_base WHERE activation = ? ORDER BY chunk", (activation,)
            )
        ]
        journal = self._journal_reader(conn, activation, where)

        with SpillingFold() as fold:
            fold.add_base(self._base_chunk(conn, activation, chunk, where) for chunk in chunks)
            fold.add_journal(journal())
            release_free_memory()
            conn.execute("DELETE FROM fingerprint_base WHERE activation = ?", (activation,))
            written = 0

            def folded() -> Iterator[pa.Table]:
                nonlocal written
                for table in fold.folded(_CHUNK_ROWS):
                    written += table.num_rows
                    yield table

            self._append_chunks(conn, activation, [], folded(), where)
        return written

    @staticmethod
    def _journal_reader(conn: sqlite3.Connection, activation: str, where: str) -> Callable[[], Iterator[pa.Table]]:
        """The journal's tables, oldest first, a blob at a time; each call of the result reads them again."""
        seqs = [
            seq
            for (seq,) in conn.execute(
                "SELECT seq FROM fingerprint_journal WHERE activation = ? ORDER BY seq", (activation,)
            )
        ]

        def journal() -> Iterator[pa.Table]:
            for seq in seqs:
                row = conn.execute(
                    "SELECT blob FROM fingerprint_journal WHERE activation = ? AND seq = ?", (activation, seq)
                ).fetchone()
                yield unpack(row[0], JOURNAL_SCHEMA, where)

        return journal

    @staticmethod
    def _journal_ids(tables: Iterable[pa.Table]) -> pa.ChunkedArray | None:
        """The ids of journal tables that only put (None at the first deletion), gathered.

        Held as thousands of small arrays (one per flush) they would take about twice
        their size; they are gathered into arrays of ~100,000 ids.
        """
        gathered: list[pa.Array] = []
        pending: list[pa.Array] = []
        rows = 0
        for table in tables:
            if pc.all(table.column("put")).as_py() is False:
                return None
            pending.extend(table.column("custom_id").chunks)
            rows += table.num_rows
            if rows >= _CHUNK_ROWS // 10:
                gathered.append(pa.concat_arrays(pending))
                pending, rows = [], 0
        if pending:
            gathered.append(pa.concat_arrays(pending))
        return pa.chunked_array(gathered, pa.string())

    @staticmethod
    def _base_blob(conn: sqlite3.Connection, activation: str, chunk: int) -> bytes:
        row = conn.execute(
            "SELECT blob FROM fingerprint_base WHERE activation = ? AND chunk = ?", (activation, chunk)
        ).fetchone()
        return bytes(row[0])

    @classmethod
    def _base_chunk(cls, conn: sqlite3.Connection, activation: str, chunk: int, where: str) -> pa.Table:
        return unpack(cls._base_blob(conn, activation, chunk), FINGERPRINT_SCHEMA, where)

    @staticmethod
    def _insert_chunk(conn: sqlite3.Connection, activation: str, chunk: int, table: pa.Table) -> None:
        conn.execute(
            "INSERT INTO fingerprint_base (activation, chunk, rows, blob) VALUES (?, ?, ?, ?)",
            (activation, chunk, table.num_rows, _pack(table)),
        )
        release_free_memory()  # the packed chunk is written: the next one reuses its memory


def _rewritten(blob: bytes, touched: pa.Array, where: str) -> tuple[int, memoryview | None] | None:
    """A stored chunk's blob without the ``touched`` ids: its rows and new blob (None: none left).

    None when the chunk holds none of them (nothing to write).
    """
    remaining = without_ids(unpack(blob, FINGERPRINT_SCHEMA, where), touched)
    if remaining is None:
        return None
    return remaining.num_rows, _pack(remaining) if remaining.num_rows else None


def write_base(conn: sqlite3.Connection, activation: str, table: pa.Table) -> None:
    """Replace the activation's base chunks with ``table`` (a version-1 file's fingerprints, converted)."""
    conn.execute("DELETE FROM fingerprint_base WHERE activation = ?", (activation,))
    for chunk, start in enumerate(range(0, table.num_rows, _CHUNK_ROWS)):
        part = table.slice(start, _CHUNK_ROWS)
        conn.execute(
            "INSERT INTO fingerprint_base (activation, chunk, rows, blob) VALUES (?, ?, ?, ?)",
            (activation, chunk, part.num_rows, _pack(part)),
        )
