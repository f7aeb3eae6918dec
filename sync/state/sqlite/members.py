"""The member role of the SQLite store: an activation's Batch audience, as packed sets of ids.

Two sets per activation, each in a table shaped like ``intent_batches`` (a blob of ids with
its smallest and largest id beside it, :mod:`sync.state.sqlite.intents`): ``audience_members``
(the members Batch acknowledged) and ``audience_intents`` (ids an audience call may have
changed without a committed acknowledgement). ``audience_state`` names the audience. A
million members are about twenty blobs of 50,000 sorted ids; a change reads and rewrites only
the blobs whose id range holds one of its ids (``docs/audiences.md``, "State").
"""

from __future__ import annotations

import sqlite3
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.model import IntentsNote, Lease
from sync.state.base import Members
from sync.state.sqlite.connection import SQLiteTables, unpack
from sync.state.sqlite.intents import _id_range, _pack_intents

MEMBERS: Final = "audience_members"
INTENTS: Final = "audience_intents"
# The tables this role writes (reset deletes from them too).
TABLES: Final = ("audience_state", MEMBERS, INTENTS)

_SCHEMA: Final = pa.schema([("custom_id", pa.string())])
# Ids per blob once merged, and how many smaller blobs a set may hold before it is merged.
_CHUNK_ROWS: Final = 50_000
_MERGE_AT: Final = 64

# The role's tables, created on open like every table added after version 1
# (sync.state.sqlite.schema): an older cepsync never reads them.
_SET_TABLE: Final = """
    CREATE TABLE IF NOT EXISTS {table} (
        activation TEXT    NOT NULL,
        seq        INTEGER NOT NULL,
        rows       INTEGER NOT NULL,
        lo         BLOB    NOT NULL,
        hi         BLOB    NOT NULL,
        blob       BLOB    NOT NULL,
        PRIMARY KEY (activation, seq)
    )
"""
CREATE: Final = (
    _SET_TABLE.format(table=MEMBERS),
    _SET_TABLE.format(table=INTENTS),
    "CREATE TABLE IF NOT EXISTS audience_state (activation TEXT PRIMARY KEY, audience TEXT NOT NULL)",
)


def _strings(ids: pa.Array | pa.ChunkedArray, activation: str) -> pa.Array:
    """``ids`` as one string array without nulls (ValueError naming the activation otherwise)."""
    array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ValueError(f"activation {activation!r}: member ids must be strings, not {array.type}")
    if array.null_count:
        raise ValueError(f"activation {activation!r}: a member id is null")
    return array.cast(pa.string())


class _IdSet:
    """One packed set of ids of one activation in one of this role's tables (``table`` a constant)."""

    def __init__(self, conn: sqlite3.Connection, table: str, activation: str, where: str) -> None:
        self.conn, self.table, self.activation, self.where = conn, table, activation, where

    def load(self) -> pa.Array:
        blobs = self.conn.execute(f"SELECT blob FROM {self.table} WHERE activation = ?", (self.activation,))  # noqa: S608
        tables = [unpack(blob, _SCHEMA, self.where) for (blob,) in blobs]
        if not tables:
            return pa.array([], pa.string())
        unique: pa.Array = pc.unique(pa.concat_tables(tables).column("custom_id").combine_chunks())
        return unique

    def add(self, ids: pa.Array) -> int:
        """Append ``ids`` as sorted blobs, merging small blobs past ``_MERGE_AT``; rows written."""
        if not len(ids):
            return 0
        self._insert_sorted(ids)
        small = self.conn.execute(
            f"SELECT COUNT(*) FROM {self.table} WHERE activation = ? AND rows < ?",  # noqa: S608
            (self.activation, _CHUNK_ROWS),
        ).fetchone()
        if small and small[0] > _MERGE_AT:
            self._merge()
        return len(ids)

    def remove(self, ids: pa.Array) -> int:
        """Take ``ids`` out of every blob holding one (only blobs whose range meets theirs are read); rows written."""
        if not len(ids):
            return 0
        lowest, highest = _id_range(ids)
        candidates = self.conn.execute(
            f"SELECT seq, blob FROM {self.table} WHERE activation = ? AND hi >= ? AND lo <= ? ORDER BY seq",  # noqa: S608
            (self.activation, lowest, highest),
        ).fetchall()
        written = 0
        for seq, blob in candidates:
            held = unpack(blob, _SCHEMA, self.where).column("custom_id").combine_chunks()
            hit = pc.is_in(held, value_set=ids)
            hits = pc.sum(hit).as_py() or 0
            if not hits:
                continue
            if hits < len(held):
                kept = held.filter(pc.invert(hit))
                lo, hi = _id_range(kept)
                self.conn.execute(
                    f"UPDATE {self.table} SET rows = ?, lo = ?, hi = ?, blob = ? WHERE activation = ? AND seq = ?",  # noqa: S608
                    (len(kept), lo, hi, _pack_intents(kept), self.activation, seq),
                )
            else:
                self.conn.execute(f"DELETE FROM {self.table} WHERE activation = ? AND seq = ?", (self.activation, seq))  # noqa: S608
            written += 1
        return written

    def clear(self) -> None:
        self.conn.execute(f"DELETE FROM {self.table} WHERE activation = ?", (self.activation,))  # noqa: S608

    def _insert_sorted(self, ids: pa.Array) -> None:
        unique = pc.unique(ids)
        ordered = unique.take(pc.sort_indices(unique))
        row = self.conn.execute(
            f"SELECT COALESCE(MAX(seq), 0) FROM {self.table} WHERE activation = ?",  # noqa: S608
            (self.activation,),
        ).fetchone()
        seq = row[0] if row else 0
        for start in range(0, len(ordered), _CHUNK_ROWS):
            chunk = ordered.slice(start, _CHUNK_ROWS)
            lo, hi = _id_range(chunk)
            seq += 1
            self.conn.execute(
                f"INSERT INTO {self.table} (activation, seq, rows, lo, hi, blob) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (self.activation, seq, len(chunk), lo, hi, _pack_intents(chunk)),
            )

    def _merge(self) -> None:
        small = (self.activation, _CHUNK_ROWS)
        tables = [
            unpack(blob, _SCHEMA, self.where)
            for (blob,) in self.conn.execute(
                f"SELECT blob FROM {self.table} WHERE activation = ? AND rows < ?",  # noqa: S608
                small,
            )
        ]
        self.conn.execute(f"DELETE FROM {self.table} WHERE activation = ? AND rows < ?", small)  # noqa: S608
        self._insert_sorted(pa.concat_tables(tables).column("custom_id").combine_chunks())


class MemberTables(SQLiteTables):
    """:class:`sync.state.base.MemberStore` on ``audience_state``, ``audience_members`` and ``audience_intents``."""

    def _set(self, conn: sqlite3.Connection, table: str, activation: str) -> _IdSet:
        return _IdSet(conn, table, activation, self._where(activation))

    def load_members(self, activation: str) -> Members:
        """The audience, its acknowledged members and its unconfirmed ids, read in one transaction."""
        with self._lock:
            conn = self._conn
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audience_state'").fetchone():
                # A file opened read-only (`cepsync plan`) that no run of this version wrote yet.
                return Members(None, pa.array([], pa.string()), pa.array([], pa.string()))
            conn.execute("BEGIN")
            try:
                row = conn.execute("SELECT audience FROM audience_state WHERE activation = ?", (activation,)).fetchone()
                ids = self._set(conn, MEMBERS, activation).load()
                unconfirmed = self._set(conn, INTENTS, activation).load()
            finally:
                conn.execute("COMMIT")
            self._stats["statements"] += 4
        return Members(row[0] if row else None, ids, unconfirmed)

    def start_members(self, lease: Lease, audience: str) -> bool:
        """Name the audience; another audience's members and unconfirmed ids are forgotten (fenced)."""
        with self._write() as conn:
            self._check_lease(conn, lease)
            row = conn.execute(
                "SELECT audience FROM audience_state WHERE activation = ?", (lease.activation,)
            ).fetchone()
            if row is not None and row[0] == audience:
                self._count(2, 0)
                return False
            for table in (MEMBERS, INTENTS):
                self._set(conn, table, lease.activation).clear()
            conn.execute(
                "INSERT OR REPLACE INTO audience_state (activation, audience) VALUES (?, ?)",
                (lease.activation, audience),
            )
            self._count(5, 1)
            return row is not None

    def forget_members(self, lease: Lease) -> None:
        """Forget every member and unconfirmed id (fenced)."""
        with self._write() as conn:
            self._check_lease(conn, lease)
            for table in (MEMBERS, INTENTS):
                self._set(conn, table, lease.activation).clear()
            self._count(3, 0)

    def record_member_intents(self, lease: Lease, custom_ids: pa.Array) -> IntentsNote:
        """Note ids an audience call may change, as one blob (fenced)."""
        ids = _strings(custom_ids, lease.activation)
        with self._write() as conn:
            self._check_lease(conn, lease)
            self._count(3, self._set(conn, INTENTS, lease.activation).add(ids))
        return IntentsNote(tuple(ids.to_pylist()))

    def retire_member_intents(self, lease: Lease, note: IntentsNote) -> None:
        """Forget a note's ids (their blob may have been merged since: a clear of them)."""
        self.clear_member_intents(lease, pa.array(note.custom_ids, pa.string()))

    def clear_member_intents(self, lease: Lease, custom_ids: pa.Array) -> None:
        """Take these ids out of every intent blob holding one (fenced)."""
        ids = _strings(custom_ids, lease.activation)
        with self._write() as conn:
            self._check_lease(conn, lease)
            self._count(2, self._set(conn, INTENTS, lease.activation).remove(ids))

    def commit_members(self, lease: Lease, added: pa.Array, removed: pa.Array) -> None:
        """Apply an acknowledged call in one fenced transaction: every id of it first taken out, then ``added`` put."""
        add = _strings(added, lease.activation)
        drop = _strings(removed, lease.activation)
        with self._write() as conn:
            self._check_lease(conn, lease)
            members = self._set(conn, MEMBERS, lease.activation)
            # An id re-added (an unconfirmed one) must not sit in two blobs: out first, then in.
            written = members.remove(pa.concat_arrays([add, drop]))
            written += members.add(add)
            self._count(3, written)

    def compact_members(self, lease: Lease) -> None:
        """Nothing is appended here (the sets are rewritten in place): only the lease is checked."""
        with self._write() as conn:
            self._check_lease(conn, lease)
            self._count(1, 0)
