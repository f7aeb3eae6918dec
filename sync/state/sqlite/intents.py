"""The intent role of the SQLite store: mirror intents (packed) and the payloads Batch refused.

Both are what a run notes about profiles it has not settled yet (:class:`sync.state.base.IntentStore`):
an id it may be about to create, a payload Batch would not apply.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.model import IntentsNote, Lease, Refusal
from sync.state import core
from sync.state.core import U64_LIMIT
from sync.state.sqlite.connection import SQLiteTables, signed, unpack

# A blob of mirror intents: the ids alone.
_INTENT_SCHEMA: Final = pa.schema([("custom_id", pa.string())])
_INTENT_IPC_OPTIONS: Final = core.ipc_write_options()
# Ids per blob when intents are merged (sorted, so each blob holds a narrow range of ids and
# a clear reads only the blobs its ids fall in): ~1 MB of ids, ~1 ms to unpack.
_INTENT_CHUNK_ROWS: Final = 50_000
# Blobs under _INTENT_CHUNK_ROWS an activation may hold before record_intents merges them.
# In a healthy run the outstanding intents are the groups in flight plus one flush window, a
# few blobs; many mean requests failed (their intents stay) or a crash left them.
_INTENT_MERGE_AT: Final = 64


def _pack_intents(ids: pa.Array | pa.ChunkedArray) -> memoryview:
    # Uncompressed: intents are few and short-lived, and lz4 would cost more CPU per call
    # (packing and unpacking 1,000 ids) than the bytes it saves in the WAL.
    return memoryview(core.pack_table(pa.table([ids], schema=_INTENT_SCHEMA), _INTENT_IPC_OPTIONS))


def _id_range(ids: pa.Array | pa.ChunkedArray) -> tuple[bytes, bytes]:
    """The smallest and largest of (non-empty) ``ids`` as UTF-8 bytes, in SQLite's BLOB order.

    Arrow orders strings bytewise, as SQLite compares BLOBs (and as Python orders str:
    UTF-8 keeps code point order).
    """
    bounds = pc.min_max(ids).as_py()
    return bounds["min"].encode(), bounds["max"].encode()


def insert_intents(conn: sqlite3.Connection, activation: str, ids: pa.Array | pa.ChunkedArray) -> None:
    """Append one blob holding ``ids`` (not empty), after the activation's last one."""
    row = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM intent_batches WHERE activation = ?", (activation,)
    ).fetchone()
    lo, hi = _id_range(ids)
    conn.execute(
        "INSERT INTO intent_batches (activation, seq, rows, lo, hi, blob) VALUES (?, ?, ?, ?, ?, ?)",
        (
            activation,
            (row[0] if row else 0) + 1,
            len(ids),
            lo,
            hi,
            _pack_intents(ids),
        ),
    )


def insert_intent_chunks(conn: sqlite3.Connection, activation: str, ids: pa.Array | pa.ChunkedArray) -> None:
    """Append ``ids`` once each, sorted, in blobs of ``_INTENT_CHUNK_ROWS``."""
    unique = pc.unique(ids)
    ordered = unique.take(pc.sort_indices(unique))
    for start in range(0, len(ordered), _INTENT_CHUNK_ROWS):
        insert_intents(conn, activation, ordered.slice(start, _INTENT_CHUNK_ROWS))


class IntentTables(SQLiteTables):
    """:class:`sync.state.base.IntentStore` on the ``intent_batches`` and ``refusals`` tables."""

    # -- mirror intents -----------------------------------------------------------------------
    #
    # Packed, like fingerprints: each record_intents call adds one blob of its ids, so a
    # request group costs a few statements and columnar work, no Python object per id. An id
    # recorded twice may sit in two blobs: load_intents returns the union, and clear_intents
    # removes an id from every blob that holds it, which keeps set semantics.

    def record_intents(self, lease: Lease, custom_ids: Iterable[str]) -> IntentsNote:
        """Durably note ids this activation may be about to create (fenced; idempotent).

        One blob per call. When an activation holds more than ``_INTENT_MERGE_AT`` blobs
        under ``_INTENT_CHUNK_ROWS`` ids (requests failed, or a crash left intents), they
        are merged, in this transaction, into sorted blobs of ``_INTENT_CHUNK_ROWS`` ids.

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
            ValueError: An id is not a str (or not valid UTF-8); nothing is written.
        """
        activation = lease.activation
        ids = core.id_array(activation, custom_ids)
        note = IntentsNote(tuple(ids.to_pylist()))
        with self._write() as conn:
            self._check_lease(conn, lease)
            if not len(ids):
                self._count(1, 0)
                return note
            insert_intents(conn, activation, ids)
            row = conn.execute(
                "SELECT COUNT(*) FROM intent_batches WHERE activation = ? AND rows < ?",
                (activation, _INTENT_CHUNK_ROWS),
            ).fetchone()
            self._count(4, len(ids))
            if row and row[0] > _INTENT_MERGE_AT:
                self._merge_intents(conn, activation)
        return note

    def retire_intents(self, lease: Lease, note: IntentsNote) -> None:
        """Forget a note's intents: a clear of its ids (its blob may have been merged since)."""
        self.clear_intents(lease, note.custom_ids)

    def load_intents(self, activation: str) -> set[str]:
        """Ids noted as possibly synced and not yet cleared."""
        where = self._where(activation)
        with self._lock:
            cursor = self._conn.execute("SELECT blob FROM intent_batches WHERE activation = ?", (activation,))
            tables = [unpack(blob, _INTENT_SCHEMA, where) for (blob,) in cursor]
            self._stats["statements"] += 1
        if not tables:
            return set()
        return set(pa.concat_tables(tables).column("custom_id").to_pylist())

    def clear_intents(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget intents for ids cleared in Batch (fenced; unknown ids are ignored).

        Reads the blobs whose id range overlaps the cleared ids' range, finds the ids in
        them with one ``is_in`` over their concatenation, and rewrites (or deletes) only the
        blobs that held one, in one transaction.

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is deleted.
            ValueError: An id is not a str (or not valid UTF-8); nothing is deleted.
        """
        activation = lease.activation
        cleared = core.id_array(activation, custom_ids)
        with self._write() as conn:
            self._check_lease(conn, lease)
            if not len(cleared):
                self._count(1, 0)
                return
            lowest, highest = _id_range(cleared)
            candidates = conn.execute(
                "SELECT seq, blob FROM intent_batches WHERE activation = ? AND hi >= ? AND lo <= ? ORDER BY seq",
                (activation, lowest, highest),
            ).fetchall()
            self._count(2, 0)
            if not candidates:
                return
            where = self._where(activation)
            tables = [unpack(blob, _INTENT_SCHEMA, where) for _, blob in candidates]
            held = pa.concat_tables(tables).column("custom_id")
            value_set = cleared.combine_chunks() if isinstance(cleared, pa.ChunkedArray) else cleared
            hit = pc.is_in(held, value_set=value_set)
            start = 0
            for (seq, _), table in zip(candidates, tables, strict=True):
                mask = hit.slice(start, table.num_rows)
                start += table.num_rows
                hits = pc.sum(mask).as_py() or 0
                if not hits:
                    continue
                if hits < table.num_rows:
                    kept = table.column("custom_id").filter(pc.invert(mask))
                    lo, hi = _id_range(kept)
                    conn.execute(
                        "UPDATE intent_batches SET rows = ?, lo = ?, hi = ?, blob = ? WHERE activation = ? AND seq = ?",
                        (len(kept), lo, hi, _pack_intents(kept), activation, seq),
                    )
                else:
                    conn.execute("DELETE FROM intent_batches WHERE activation = ? AND seq = ?", (activation, seq))
                self._count(1, 1)

    def _merge_intents(self, conn: sqlite3.Connection, activation: str) -> None:
        """Fold the activation's blobs under ``_INTENT_CHUNK_ROWS`` ids into sorted, full ones."""
        where = self._where(activation)
        small = (activation, _INTENT_CHUNK_ROWS)
        tables = [
            unpack(blob, _INTENT_SCHEMA, where)
            for (blob,) in conn.execute("SELECT blob FROM intent_batches WHERE activation = ? AND rows < ?", small)
        ]
        conn.execute("DELETE FROM intent_batches WHERE activation = ? AND rows < ?", small)
        merged = pa.concat_tables(tables).column("custom_id")
        insert_intent_chunks(conn, activation, merged)
        self._count(2 + len(merged) // _INTENT_CHUNK_ROWS, len(merged))

    # -- payloads Batch refused -----------------------------------------------------------------

    def record_refusals(self, lease: Lease, refusals: Sequence[Refusal]) -> None:
        """Remember payloads Batch did not apply, one per id, a newer one replacing it (fenced).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
        """
        activation = lease.activation
        rows = [
            (
                activation,
                r.custom_id,
                signed(core.check_u64(r.payload, activation, r.custom_id, "payload")),
                r.field,
                r.reason,
                r.kind.value,
                r.runs,
            )
            for r in refusals
        ]
        with self._write() as conn:
            self._check_lease(conn, lease)
            if rows:
                conn.executemany(
                    "INSERT OR REPLACE INTO refusals (activation, custom_id, payload, field, reason, kind, runs) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            self._count(2 if rows else 1, len(rows))

    def load_refusals(self, activation: str) -> dict[str, Refusal]:
        """Every refusal and item error kept for the activation, by custom_id."""
        with self._lock:
            cursor = self._conn.execute(
                "SELECT custom_id, payload, field, reason, kind, runs FROM refusals WHERE activation = ?",
                (activation,),
            )
            refusals = {
                custom_id: Refusal.read(custom_id, payload % U64_LIMIT, field, reason, kind, runs)
                for custom_id, payload, field, reason, kind, runs in cursor
            }
            self._stats["statements"] += 1
        return refusals

    def clear_refusals(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Delete the refusal rows of these ids (fenced: LeaseLost and nothing deleted if ``lease`` is stale)."""
        rows = [(lease.activation, custom_id) for custom_id in core.unique_ids(lease.activation, custom_ids)]
        with self._write() as conn:
            self._check_lease(conn, lease)
            sql = "DELETE FROM refusals WHERE activation = ? AND custom_id = ?"
            written = conn.executemany(sql, rows).rowcount if rows else 0
            self._count(2 if rows else 1, written)
