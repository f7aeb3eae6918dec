"""The SQLite store's tables, their version, and the conversion of older files.

Its own room so that the layout a file has on disk reads in one place, apart from the
reads and writes of each role (:mod:`sync.state.sqlite`); the conversions call the roles'
own packing (:func:`sync.state.sqlite.fingerprints.write_base`,
:func:`sync.state.sqlite.intents.insert_intent_chunks`) so one format has one writer.
"""

from __future__ import annotations

import sqlite3
from typing import Final

import pyarrow as pa

from sync.differ import FINGERPRINT_SCHEMA
from sync.state.sqlite.connection import StateSchemaError
from sync.state.sqlite.fingerprints import write_base
from sync.state.sqlite.intents import insert_intent_chunks
from sync.state.sqlite.members import CREATE as MEMBER_TABLES

SCHEMA_VERSION: Final = 4


_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS leases (
        activation    TEXT    PRIMARY KEY,
        owner         TEXT    NOT NULL,
        token         INTEGER NOT NULL,
        expires_at_us INTEGER
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS fingerprint_base (
        activation TEXT    NOT NULL,
        chunk      INTEGER NOT NULL,
        rows       INTEGER NOT NULL,
        blob       BLOB    NOT NULL,
        PRIMARY KEY (activation, chunk)
    ) WITHOUT ROWID
    """,
    # The chunks' sizes without their blobs: a WITHOUT ROWID row is its index entry, so
    # summing ``rows`` over the table read every blob's overflow pages (~0.1 s at 10M
    # fingerprints, twice a run: the fold's check at its start and its end). This index
    # holds (activation, rows, chunk) alone. Older files get it on open.
    "CREATE INDEX IF NOT EXISTS fingerprint_base_rows ON fingerprint_base (activation, rows)",
    """
    CREATE TABLE IF NOT EXISTS fingerprint_journal (
        activation TEXT    NOT NULL,
        seq        INTEGER NOT NULL,
        rows       INTEGER NOT NULL,
        blob       BLOB    NOT NULL,
        PRIMARY KEY (activation, seq)
    ) WITHOUT ROWID
    """,
    # lo, hi: the smallest and largest id in the blob, as UTF-8 bytes (a BLOB compares
    # bytewise, the order Arrow's binary comparisons use), so clear_intents reads only the
    # blobs whose range can hold an id it clears. A rowid table, not WITHOUT ROWID: there a
    # row is an index entry, and scanning rows, lo, hi read each blob's overflow pages too
    # (~1.5 ms for 60 blobs, per record_intents); here the blob is only read when selected.
    """
    CREATE TABLE IF NOT EXISTS intent_batches (
        activation TEXT    NOT NULL,
        seq        INTEGER NOT NULL,
        rows       INTEGER NOT NULL,
        lo         BLOB    NOT NULL,
        hi         BLOB    NOT NULL,
        blob       BLOB    NOT NULL,
        PRIMARY KEY (activation, seq)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS meta (
        activation TEXT PRIMARY KEY,
        body       TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS runs (
        run_id     TEXT PRIMARY KEY,
        activation TEXT NOT NULL,
        started_at TEXT NOT NULL,
        trigger_id TEXT,
        record     TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS runs_by_activation ON runs (activation, started_at)",
    "CREATE INDEX IF NOT EXISTS runs_by_trigger ON runs (activation, trigger_id)",
    # Added after version 1 shipped, without a version bump: CREATE TABLE IF NOT EXISTS
    # adds it to an existing file on open, and an older cepsync simply never reads it.
    """
    CREATE TABLE IF NOT EXISTS deliveries (
        activation  TEXT    NOT NULL,
        trigger_id  TEXT    NOT NULL,
        attempts    INTEGER NOT NULL,
        first_at_us INTEGER NOT NULL,
        last_at_us  INTEGER NOT NULL,
        PRIMARY KEY (activation, trigger_id)
    ) WITHOUT ROWID
    """,
    # Added the same way: the request an HTTP idempotency key first came with
    # (StateStore.record_trigger_request), kept as long as delivery counts.
    """
    CREATE TABLE IF NOT EXISTS trigger_requests (
        trigger_id     TEXT    PRIMARY KEY,
        request_digest TEXT    NOT NULL,
        first_at_us    INTEGER NOT NULL,
        last_at_us     INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Added the same way: payloads Batch refused (StateStore.record_refusals). kind and runs
    # came with schema version 4 (added to older files on open); NULL in a row written
    # before, which Refusal.read interprets.
    """
    CREATE TABLE IF NOT EXISTS refusals (
        activation TEXT    NOT NULL,
        custom_id  TEXT    NOT NULL,
        payload    INTEGER NOT NULL,
        field      TEXT    NOT NULL,
        reason     TEXT    NOT NULL,
        kind       TEXT,
        runs       INTEGER,
        PRIMARY KEY (activation, custom_id)
    ) WITHOUT ROWID
    """,
    # Added the same way: an activation's Batch audience (StateStore.load_members...).
    *MEMBER_TABLES,
)
# Columns of the refusals table added after it first shipped, with their types.
_REFUSAL_COLUMNS_V4: Final = (("kind", "TEXT"), ("runs", "INTEGER"))


def check_version(found: int | None, path: str) -> None:
    """Refuse a file a newer cepsync wrote (its tables may mean something this one does not know)."""
    if found is not None and found > SCHEMA_VERSION:
        raise StateSchemaError(
            f"state database {path} has schema version {found}, but this version of "
            f"cepsync understands up to {SCHEMA_VERSION}: upgrade cepsync (refusing to touch it)"
        )


def create_or_upgrade(conn: sqlite3.Connection, path: str) -> None:
    """Create the tables, or convert an older file's, inside the caller's write transaction.

    Raises:
        StateSchemaError: The file (``path``, for the message) was written by a newer schema version.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    found = row[0] if row else None
    check_version(found, path)
    for statement in _SCHEMA:
        conn.execute(statement)
    if found is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif found < SCHEMA_VERSION:
        # In the transaction that reads the version: a second process opening the
        # file meanwhile waits, then finds it converted.
        if found == 1:
            _migrate_from_v1(conn)
        _migrate_intents(conn)
        _migrate_refusals(conn)
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _migrate_from_v1(conn: sqlite3.Connection) -> None:
    """Version 1 kept one row per fingerprint: pack each activation's into base blobs."""
    activations = [a for (a,) in conn.execute("SELECT DISTINCT activation FROM fingerprints")]
    for activation in activations:
        rows = conn.execute(
            "SELECT custom_id, raw, payload FROM fingerprints WHERE activation = ? ORDER BY custom_id",
            (activation,),
        ).fetchall()
        ids, raws, payloads = zip(*rows, strict=True) if rows else ((), (), ())
        table = pa.table(
            [
                pa.array(ids, pa.string()),
                # Version 1 stored the u64 fingerprints as their signed two's complement.
                pa.array(raws, pa.int64()).view(pa.uint64()),
                pa.array(payloads, pa.int64()).view(pa.uint64()),
                pa.nulls(len(ids), pa.binary()),
            ],
            schema=FINGERPRINT_SCHEMA,
        )
        write_base(conn, activation, table)
    conn.execute("DROP TABLE fingerprints")


def _migrate_intents(conn: sqlite3.Connection) -> None:
    """Versions 1 and 2 kept one ``intents`` row per id: pack each activation's into blobs.

    Converted once, when the file is opened, rather than read in both layouts forever:
    the rows are few in a healthy state (a crashed run leaves at most its requests in
    flight and one flush window), and one layout keeps set semantics in one place.
    """
    table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'intents'").fetchone()
    if table is None:
        return
    activations = [a for (a,) in conn.execute("SELECT DISTINCT activation FROM intents")]
    for activation in activations:
        ids = [i for (i,) in conn.execute("SELECT custom_id FROM intents WHERE activation = ?", (activation,))]
        insert_intent_chunks(conn, activation, pa.array(ids, pa.string()))
    conn.execute("DROP TABLE intents")


def _migrate_refusals(conn: sqlite3.Connection) -> None:
    """Versions up to 3 kept refusals without ``kind`` and ``runs``: add both, NULL in old rows.

    :meth:`sync.model.Refusal.read` says what such a row is. A file that had no refusals
    table yet got today's on open.
    """
    present = {row[1] for row in conn.execute("PRAGMA table_info(refusals)")}
    for name, definition in _REFUSAL_COLUMNS_V4:
        if name not in present:
            # Names and definitions come from the fixed tuple above, never from input.
            conn.execute(f"ALTER TABLE refusals ADD COLUMN {name} {definition}")
