"""SQLite state store: the embedded default for local runs, the demo and most tests.

One database file holds every activation's lease, fingerprints, mirror intents, meta
and run records. Two overlapping runs (two processes) may open the same file: the
lease row, read and written inside ``BEGIN IMMEDIATE`` transactions, makes the second
one exit cleanly, and the fencing token checked in every run-owned write makes a run
whose lease was taken over unable to commit anything.

Layout (schema version 4)::

    schema_version(version)
    leases(activation PK, owner, token, expires_at_us)      -- expires_at_us NULL = released
    fingerprint_base(activation, chunk, rows, blob)         -- PK (activation, chunk): packed fingerprints
    fingerprint_journal(activation, seq, rows, blob)        -- PK (activation, seq): one per commit
    intent_batches(activation, seq, rows, lo, hi, blob)     -- PK (activation, seq): packed mirror intents
    meta(activation PK, body JSON)
    runs(run_id PK, activation, started_at, trigger_id, record JSON)
    deliveries(activation, trigger_id, attempts, first_at_us, last_at_us)  -- PK (activation, trigger_id)
    trigger_requests(trigger_id PK, request_digest, first_at_us, last_at_us)
    refusals(activation, custom_id, payload, field, reason, kind, runs)  -- PK (activation, custom_id)

Fingerprints are packed, as in the Firestore store: a run loads a million of them as a
handful of Arrow IPC blobs (``custom_id, raw, payload``), read straight into the Arrow
table the differ joins against, with no Python object per profile. Each
:meth:`SQLiteStateStore.commit` appends one journal blob (``custom_id, raw, payload, put``;
absolute values, so applying one twice changes nothing); :meth:`SQLiteStateStore.compact`
folds the journal into the base chunks in the same fenced transaction, at the start of a run
(after a crash) and at its end.

Mirror intents are packed too: each :meth:`SQLiteStateStore.record_intents` call (one request
group) appends one blob of its ids (``custom_id``), with the smallest and largest id (``lo``,
``hi``) beside it. :meth:`SQLiteStateStore.clear_intents` reads only the blobs whose range
meets the cleared ids', and rewrites or deletes those that held one; many small blobs are
merged into sorted ones of ``_INTENT_CHUNK_ROWS`` ids. An id may sit in several blobs; it is
an intent while any holds it, and a clear removes it from all.

Older files are converted when opened, in the transaction that reads their version: schema
version 1 kept one row per fingerprint, versions 1 and 2 one ``intents`` row per id, and
version 3's refusals had no ``kind`` nor ``runs`` (:meth:`sync.model.Refusal.read` reads
them). Version 4 came with the refusal kinds because a version-3 cepsync would read an item
error's row as a value refusal, and never send that profile again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import FINGERPRINT_SCHEMA, JOURNAL_SCHEMA
from sync.errors import ConfigError, FatalError
from sync.memory import release_free_memory
from sync.model import ActivationMeta, Fingerprint, IntentsNote, JournalEntry, Lease, Refusal
from sync.state import core
from sync.state.base import DELIVERY_RETENTION
from sync.state.core import U64_LIMIT, LeaseRecord
from sync.state.fold import fold_journal, has_repeats, latest_entries_table, no_common_ids

SCHEMA_VERSION: Final = 4

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Fingerprints per base blob (a SQLite blob is at most 1 GB; a million fingerprints pack
# into ~15-30 MB).
_CHUNK_ROWS: Final = 250_000
# lz4: ids compress about 3x, at a few ms per million fingerprints.
_IPC_OPTIONS: Final = pa.ipc.IpcWriteOptions(compression="lz4")

# A blob of mirror intents: the ids alone.
_INTENT_SCHEMA: Final = pa.schema([("custom_id", pa.string())])
_INTENT_IPC_OPTIONS: Final = pa.ipc.IpcWriteOptions()
# Ids per blob when intents are merged (sorted, so each blob holds a narrow range of ids and
# a clear reads only the blobs its ids fall in): ~1 MB of ids, ~1 ms to unpack.
_INTENT_CHUNK_ROWS: Final = 50_000
# Blobs under _INTENT_CHUNK_ROWS an activation may hold before record_intents merges them.
# In a healthy run the outstanding intents are the groups in flight plus one flush window, a
# few blobs; many mean requests failed (their intents stay) or a crash left them.
_INTENT_MERGE_AT: Final = 64


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
)
# Columns of the refusals table added after it first shipped, with their types.
_REFUSAL_COLUMNS_V4: Final = (("kind", "TEXT"), ("runs", "INTEGER"))


class StateSchemaError(FatalError):
    """The state database was written by a newer (or unknown) version of cepsync."""


class StateNotInitialised(FatalError):
    """A read-only open found no cepsync state: no file, or an empty one (nothing was written)."""


def _to_us(moment: datetime, what: str) -> int:
    """Microseconds since the epoch of an aware datetime (exact, unlike a float)."""
    return (core.require_aware(moment, what) - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _signed(value: int) -> int:
    """An unsigned 64-bit value as SQLite's signed INTEGER (two's complement; ``% 2**64`` undoes it)."""
    return value - U64_LIMIT if value >= U64_LIMIT // 2 else value


def _pack(table: pa.Table) -> memoryview:
    return memoryview(core.pack_table(table, _IPC_OPTIONS))


def _unpack(blob: bytes, schema: pa.Schema, where: str) -> pa.Table:
    return core.unpack_table(blob, schema, where, StateSchemaError)


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


class SQLiteStateStore:
    """A :class:`sync.state.base.StateStore` in one SQLite file (or ``":memory:"``).

    Safe to share between threads (one connection, one internal lock) and between
    processes (SQLite file locking, WAL, a busy timeout).

    Args:
        path: Database file; parent directories are created. ``":memory:"`` gives a
            private in-memory store (tests, dry runs).
        busy_timeout_seconds: How long a write waits for another process's write
            transaction before failing with ``sqlite3.OperationalError`` ("database is
            locked"). Our transactions are short, so a few seconds covers two
            overlapping runs.

        read_only: Open an existing file without ever writing to it (``plan``, ``history``,
            ``report``): nothing is created, the schema is neither created nor upgraded in the
            file, and a file without cepsync's schema raises :class:`StateNotInitialised`.
            An older schema is copied into memory and upgraded there. SQLite may leave its
            empty ``-wal``/``-shm`` side files beside the database: it needs them to read a
            WAL database safely while a run writes (docs/how-state-is-kept.md).

    Raises:
        StateSchemaError: The file was written by a newer schema version.
    """

    def __init__(self, path: str | Path, *, busy_timeout_seconds: float = 5.0, read_only: bool = False) -> None:
        self._path = str(path)
        self._read_only = read_only and self._path != ":memory:"
        if self._path != ":memory:" and not self._read_only:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stats: dict[str, int] = {"transactions": 0, "statements": 0, "rows_written": 0}
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so no
        # implicit (deferred) transaction can start and upgrade its lock later, which
        # is where SQLite returns SQLITE_BUSY without waiting on the busy handler.
        # check_same_thread=False: the engine may call from a worker thread; self._lock
        # serialises every use of the connection.
        if self._read_only:
            self._conn = self._connect_read_only(busy_timeout_seconds)
        else:
            self._conn = sqlite3.connect(
                self._path,
                timeout=busy_timeout_seconds,
                isolation_level=None,
                check_same_thread=False,
            )
        try:
            self._open(busy_timeout_seconds)
        except BaseException:
            self._conn.close()
            raise

    def _connect_read_only(self, busy_timeout_seconds: float) -> sqlite3.Connection:
        """A ``mode=ro`` connection (SQLite's own guarantee that nothing is written).

        In a directory this user cannot write, SQLite cannot make the ``-shm`` file a WAL
        database needs; then no run can be writing either (it could not make its ``-wal``),
        so the file is opened as immutable.
        """
        uri = Path(self._path).absolute().as_uri()
        if not Path(self._path).is_file():
            raise StateNotInitialised(f"no state at {self._path}: nothing has run with this state yet")

        def connect(parameters: str) -> sqlite3.Connection:
            return sqlite3.connect(
                f"{uri}?{parameters}",
                uri=True,
                timeout=busy_timeout_seconds,
                isolation_level=None,
                check_same_thread=False,
            )

        conn = connect("mode=ro")
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as error:
            conn.close()
            if "unable to open" not in str(error) or os.access(Path(self._path).parent, os.W_OK):
                raise
            conn = connect("mode=ro&immutable=1")
        return conn

    def _open_read_only(self) -> None:
        """Check the schema of a read-only file; an older one is upgraded in a copy in memory."""
        conn = self._conn
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            if tables:
                raise ConfigError(
                    f"{self._path} is a SQLite database but not a cepsync state (no schema_version table); "
                    "it was left untouched",
                    field="--state",
                )
            raise StateNotInitialised(f"no state at {self._path}: the file is empty, nothing has run with it yet")
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        found = row[0] if row else None
        if found is not None and found > SCHEMA_VERSION:
            raise StateSchemaError(
                f"state database {self._path} has schema version {found}, but this version of "
                f"cepsync understands up to {SCHEMA_VERSION}: upgrade cepsync (refusing to touch it)"
            )
        if found == SCHEMA_VERSION:
            return
        # An older layout: read it as this version does, in a copy the file never sees.
        copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        conn.backup(copy)
        conn.close()
        self._conn = copy
        self._ensure_schema()

    def _open(self, busy_timeout_seconds: float) -> None:
        """Configure the connection and the schema, waiting out another process doing the same.

        Two runs started at once on a new file both switch it to WAL and create the schema;
        SQLite can answer "database is locked" to the journal-mode switch without calling
        its busy handler (seen in the fault campaign's overlapping starts), so the set-up is
        retried until the busy timeout, like any other lock wait.
        """
        deadline = time.monotonic() + busy_timeout_seconds
        pause = 0.01
        while True:
            try:
                if self._read_only:
                    self._conn.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout_seconds * 1000))}")
                    self._open_read_only()
                    return
                self._configure(busy_timeout_seconds)
                self._ensure_schema()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    # -- set-up -----------------------------------------------------------------------------

    def _configure(self, busy_timeout_seconds: float) -> None:
        conn = self._conn
        # Also set through connect(timeout=...); the pragma makes it explicit and covers
        # statements outside Python's own retry (the busy handler lives in SQLite).
        conn.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout_seconds * 1000))}")
        # WAL: readers (a `cepsync history` while a run commits) never block the writer
        # and vice versa. In-memory databases answer "memory" and that is fine.
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL, not NORMAL: in WAL mode NORMAL does not fsync the WAL at each commit,
        # only at checkpoints, so a power loss or VM preemption can roll back commits
        # that already returned. Guarantee 1 needs "commit returned ⇒ durable": the
        # engine has already told the run record that those profiles are synced, and
        # guarantee 3 bounds re-sends by the last *durable* flush. FULL fsyncs the WAL
        # on every commit; commits are per flush (thousands of rows), so it is cheap.
        conn.execute("PRAGMA synchronous = FULL")

    def _ensure_schema(self) -> None:
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = row[0] if row else None
            if found is not None and found > SCHEMA_VERSION:
                raise StateSchemaError(
                    f"state database {self._path} has schema version {found}, but this version of "
                    f"cepsync understands up to {SCHEMA_VERSION}: upgrade cepsync (refusing to touch it)"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            if found is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif found < SCHEMA_VERSION:
                # In the transaction that reads the version: a second process opening the
                # file meanwhile waits, then finds it converted.
                if found == 1:
                    self._migrate_from_v1(conn)
                self._migrate_intents(conn)
                self._migrate_refusals(conn)
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def _migrate_from_v1(self, conn: sqlite3.Connection) -> None:
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
                ],
                schema=FINGERPRINT_SCHEMA,
            )
            self._write_base(conn, activation, table)
        conn.execute("DROP TABLE fingerprints")

    def _migrate_intents(self, conn: sqlite3.Connection) -> None:
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
            self._insert_intent_chunks(conn, activation, pa.array(ids, pa.string()))
        conn.execute("DROP TABLE intents")

    def _migrate_refusals(self, conn: sqlite3.Connection) -> None:
        """Versions up to 3 kept refusals without ``kind`` and ``runs``: add both, NULL in old rows.

        :meth:`sync.model.Refusal.read` says what such a row is. A file that had no refusals
        table yet got today's on open.
        """
        present = {row[1] for row in conn.execute("PRAGMA table_info(refusals)")}
        for name, definition in _REFUSAL_COLUMNS_V4:
            if name not in present:
                # Names and definitions come from the fixed tuple above, never from input.
                conn.execute(f"ALTER TABLE refusals ADD COLUMN {name} {definition}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with the write lock up front.

        BEGIN IMMEDIATE takes SQLite's RESERVED lock before the first read, so the lease
        check and the writes it guards see the same state: no other process can slip a
        lease takeover in between (a DEFERRED transaction could read, lose the race to
        upgrade, and fail with SQLITE_BUSY regardless of busy_timeout).
        """
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) can leave the transaction open;
                # roll it back so the connection is usable and nothing half-applied stays.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._stats["transactions"] += 1

    def _count(self, statements: int, rows: int) -> None:
        self._stats["statements"] += statements
        self._stats["rows_written"] += max(0, rows)

    @staticmethod
    def _lease_record(conn: sqlite3.Connection, activation: str) -> LeaseRecord | None:
        row = conn.execute(
            "SELECT owner, token, expires_at_us FROM leases WHERE activation = ?", (activation,)
        ).fetchone()
        if row is None:
            return None
        owner, token, expires_at_us = row
        return LeaseRecord(owner, token, None if expires_at_us is None else _from_us(expires_at_us))

    def _check_lease(self, conn: sqlite3.Connection, lease: Lease) -> None:
        """Raise LeaseLost unless ``lease`` is still current (:func:`sync.state.core.check_lease`)."""
        core.check_lease(lease, self._lease_record(conn, lease.activation))

    # -- lease --------------------------------------------------------------------------------

    def acquire_lease(self, activation: str, owner: str, ttl_seconds: float, now: datetime) -> Lease:
        """Take the activation's lease in one write transaction (see :class:`sync.state.base.StateStore`).

        Raises:
            LeaseHeld: Another owner holds an unexpired lease (the message names it and
                when it expires).
            ValueError: ``ttl_seconds`` is not positive or ``now`` is naive.
        """
        expires_at = core.lease_expiry(activation, ttl_seconds, now)
        with self._write() as conn:
            current = self._lease_record(conn, activation)
            core.refuse_if_held(activation, current, now, taker=owner)
            token = 1 if current is None else current.token + 1
            cursor = conn.execute(
                "INSERT INTO leases (activation, owner, token, expires_at_us) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (activation) DO UPDATE SET "
                "owner = excluded.owner, token = excluded.token, expires_at_us = excluded.expires_at_us",
                (activation, owner, token, _to_us(expires_at, "expires_at")),
            )
            self._count(2, cursor.rowcount)
        return Lease(activation=activation, owner=owner, token=token, expires_at=expires_at)

    def renew_lease(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        """Extend our lease to ``now + ttl_seconds``, keeping its token (LeaseLost if it is not ours)."""
        expires_at = core.lease_expiry(lease.activation, ttl_seconds, now)
        with self._write() as conn:
            self._check_lease(conn, lease)
            cursor = conn.execute(
                "UPDATE leases SET expires_at_us = ? WHERE activation = ?",
                (_to_us(expires_at, "expires_at"), lease.activation),
            )
            self._count(2, cursor.rowcount)
        return Lease(activation=lease.activation, owner=lease.owner, token=lease.token, expires_at=expires_at)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up so the next run need not wait for expiry (no-op if not ours).

        The row (and its token counter) stays: only the expiry is cleared.
        """
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE leases SET expires_at_us = NULL WHERE activation = ? AND token = ? AND owner = ?",
                (lease.activation, lease.token, lease.owner),
            )
            self._count(1, cursor.rowcount)

    # -- fingerprints -------------------------------------------------------------------------

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        """Every committed fingerprint of the activation, keyed by custom_id (journal included)."""
        return core.fingerprints_of(self.load_fingerprint_table(activation))

    def load_fingerprint_table(self, activation: str) -> pa.Table:
        """Every committed fingerprint as an Arrow table (``sync.state.base.FINGERPRINT_SCHEMA``).

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
        where = f"state database {self._path}, activation {activation!r}"
        base = [
            _unpack(blob, FINGERPRINT_SCHEMA, where)
            for (blob,) in conn.execute(
                "SELECT blob FROM fingerprint_base WHERE activation = ? ORDER BY chunk", (activation,)
            )
        ]
        journal = [
            _unpack(blob, JOURNAL_SCHEMA, where)
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

    def compact(self, lease: Lease, now: datetime) -> None:
        """Fold the journal into the base blobs, in one fenced transaction.

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
        """
        activation = lease.activation
        with self._write() as conn:
            self._check_lease(conn, lease)
            pending = conn.execute(
                "SELECT COUNT(*) FROM fingerprint_journal WHERE activation = ?", (activation,)
            ).fetchone()
            if not pending or not pending[0]:
                self._count(2, 0)
                return
            # A journal of at most one chunk (a delta) is folded a stored chunk at a time; a
            # larger one that only adds ids (a first sync) is appended; anything else folds.
            appended = self._fold_by_chunk(conn, activation)
            if appended is None:
                appended = self._append_to_base(conn, activation)
            if appended is not None:
                conn.execute("DELETE FROM fingerprint_journal WHERE activation = ?", (activation,))
                self._count(6, appended)
                return
            base, journal = self._read_blobs(conn, activation)
            folded = fold_journal(base, journal)
            conn.execute("DELETE FROM fingerprint_journal WHERE activation = ?", (activation,))
            self._write_base(conn, activation, folded)
            self._count(6, folded.num_rows)

    def _append_to_base(self, conn: sqlite3.Connection, activation: str) -> int | None:
        """Compact a journal larger than a chunk that only adds new ids by appending them.

        A first sync (a smaller journal goes through :meth:`_fold_by_chunk`). Memory decides how
        (``docs/how-a-run-works.md``, "Memory"): a first pass over the journal keeps its ids
        alone, to check that none repeats and, one base chunk at a time, that none is
        stored already; a second pass streams the journal into new chunks, a chunk at a
        time, after filling up the last, partly filled one. Nothing else is rewritten.

        Returns:
            The number of fingerprints appended, or None (nothing written) when the journal
            deletes, repeats or updates an id: the general fold then runs.
        """
        where = f"state database {self._path}, activation {activation!r}"
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
                yield _unpack(row[0], JOURNAL_SCHEMA, where)

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
            pending.append(table.select(["custom_id", "raw", "payload"]).cast(FINGERPRINT_SCHEMA))
            rows += table.num_rows
            while rows >= _CHUNK_ROWS:
                gathered = pa.concat_tables(pending)
                self._insert_chunk(conn, activation, next_chunk, gathered.slice(0, _CHUNK_ROWS))
                pending, rows, next_chunk = [gathered.slice(_CHUNK_ROWS)], rows - _CHUNK_ROWS, next_chunk + 1
        if rows:
            self._insert_chunk(conn, activation, next_chunk, pa.concat_tables(pending))

    def _fold_by_chunk(self, conn: sqlite3.Connection, activation: str) -> int | None:
        """Compact a journal of at most one chunk, a stored chunk at a time.

        The usual delta: a few thousand changed, new and removed profiles against millions
        stored. The journal's last entry per id is taken; each stored chunk that holds one
        of its ids is rewritten without them; the ids it puts are then appended. The same
        result as the general fold (``fold_journal``), reading each stored chunk once and
        holding one at a time instead of the whole state (``docs/how-a-run-works.md``,
        "Memory"). A journal that only adds ids rewrites no stored chunk but the last.

        Returns:
            The number of fingerprints written, or None (nothing written) when the journal
            is larger than a chunk: appending or the general fold then runs.
        """
        where = f"state database {self._path}, activation {activation!r}"
        row = conn.execute(
            "SELECT COALESCE(SUM(rows), 0) FROM fingerprint_journal WHERE activation = ?", (activation,)
        ).fetchone()
        if not row or row[0] > _CHUNK_ROWS:
            return None
        journal = [
            _unpack(blob, JOURNAL_SCHEMA, where)
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
        for chunk, rows in chunks:
            stored = self._base_chunk(conn, activation, chunk, where)
            hit = pc.is_in(stored.column("custom_id"), value_set=touched)
            if pc.any(hit).as_py():
                remaining = stored.filter(pc.invert(hit))
                conn.execute("DELETE FROM fingerprint_base WHERE activation = ? AND chunk = ?", (activation, chunk))
                if remaining.num_rows:
                    self._insert_chunk(conn, activation, chunk, remaining)
                rows = remaining.num_rows
                rewritten += rows
                del remaining
            if rows:
                kept.append((chunk, rows))
            del stored, hit
            release_free_memory()  # one chunk at a time: the next one reuses this one's memory
        puts = latest.filter(latest.column("put"))
        self._append_chunks(conn, activation, kept, [puts], where)
        return rewritten + int(puts.num_rows)

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
    def _base_chunk(conn: sqlite3.Connection, activation: str, chunk: int, where: str) -> pa.Table:
        row = conn.execute(
            "SELECT blob FROM fingerprint_base WHERE activation = ? AND chunk = ?", (activation, chunk)
        ).fetchone()
        return _unpack(row[0], FINGERPRINT_SCHEMA, where)

    @staticmethod
    def _insert_chunk(conn: sqlite3.Connection, activation: str, chunk: int, table: pa.Table) -> None:
        conn.execute(
            "INSERT INTO fingerprint_base (activation, chunk, rows, blob) VALUES (?, ?, ?, ?)",
            (activation, chunk, table.num_rows, _pack(table)),
        )
        release_free_memory()  # the packed chunk is written: the next one reuses its memory

    def _write_base(self, conn: sqlite3.Connection, activation: str, table: pa.Table) -> None:
        conn.execute("DELETE FROM fingerprint_base WHERE activation = ?", (activation,))
        for chunk, start in enumerate(range(0, table.num_rows, _CHUNK_ROWS)):
            part = table.slice(start, _CHUNK_ROWS)
            conn.execute(
                "INSERT INTO fingerprint_base (activation, chunk, rows, blob) VALUES (?, ?, ?, ?)",
                (activation, chunk, part.num_rows, _pack(part)),
            )

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
            self._insert_intents(conn, activation, ids)
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
        where = f"state database {self._path}, activation {activation!r}"
        with self._lock:
            cursor = self._conn.execute("SELECT blob FROM intent_batches WHERE activation = ?", (activation,))
            tables = [_unpack(blob, _INTENT_SCHEMA, where) for (blob,) in cursor]
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
            where = f"state database {self._path}, activation {activation!r}"
            tables = [_unpack(blob, _INTENT_SCHEMA, where) for _, blob in candidates]
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

    def _insert_intents(self, conn: sqlite3.Connection, activation: str, ids: pa.Array | pa.ChunkedArray) -> None:
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

    def _insert_intent_chunks(self, conn: sqlite3.Connection, activation: str, ids: pa.Array | pa.ChunkedArray) -> None:
        """Append ``ids`` once each, sorted, in blobs of ``_INTENT_CHUNK_ROWS``."""
        unique = pc.unique(ids)
        ordered = unique.take(pc.sort_indices(unique))
        for start in range(0, len(ordered), _INTENT_CHUNK_ROWS):
            self._insert_intents(conn, activation, ordered.slice(start, _INTENT_CHUNK_ROWS))

    def _merge_intents(self, conn: sqlite3.Connection, activation: str) -> None:
        """Fold the activation's blobs under ``_INTENT_CHUNK_ROWS`` ids into sorted, full ones."""
        where = f"state database {self._path}, activation {activation!r}"
        small = (activation, _INTENT_CHUNK_ROWS)
        tables = [
            _unpack(blob, _INTENT_SCHEMA, where)
            for (blob,) in conn.execute("SELECT blob FROM intent_batches WHERE activation = ? AND rows < ?", small)
        ]
        conn.execute("DELETE FROM intent_batches WHERE activation = ? AND rows < ?", small)
        merged = pa.concat_tables(tables).column("custom_id")
        self._insert_intent_chunks(conn, activation, merged)
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
                _signed(core.check_u64(r.payload, activation, r.custom_id, "payload")),
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

    # -- per-activation meta ------------------------------------------------------------------

    def load_meta(self, activation: str) -> ActivationMeta:
        """The activation's meta, or a fresh :class:`ActivationMeta`."""
        with self._lock:
            row = self._conn.execute("SELECT body FROM meta WHERE activation = ?", (activation,)).fetchone()
            self._stats["statements"] += 1
        return ActivationMeta() if row is None else ActivationMeta.from_json(row[0])

    def save_meta(self, lease: Lease, meta: ActivationMeta) -> None:
        """Replace the activation's meta (fenced).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
            TypeError: ``meta.continuation`` is not JSON-serialisable.
        """
        body = core.meta_json(lease.activation, meta)
        with self._write() as conn:
            self._check_lease(conn, lease)
            cursor = conn.execute(
                "INSERT INTO meta (activation, body) VALUES (?, ?) "
                "ON CONFLICT (activation) DO UPDATE SET body = excluded.body",
                (lease.activation, body),
            )
            self._count(2, cursor.rowcount)

    # -- run records --------------------------------------------------------------------------

    def save_run(self, record: dict[str, Any]) -> None:
        """Insert or replace a run record in one transaction (not fenced, see the protocol).

        Raises:
            ValueError: ``run_id`` or ``activation`` is missing or not a string.
            TypeError: The record is not JSON-serialisable.
        """
        row = core.run_row(record)
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (run_id, activation, started_at, trigger_id, record) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET activation = excluded.activation, "
                "started_at = excluded.started_at, trigger_id = excluded.trigger_id, "
                "record = excluded.record",
                (row.run_id, row.activation, row.started_at, row.trigger_id, row.body),
            )
            self._count(1, cursor.rowcount)

    def list_runs(self, activation: str, limit: int = 20) -> list[dict[str, Any]]:
        """The activation's run records, newest ``started_at`` first, at most ``limit``.

        Raises:
            ValueError: ``limit`` is negative.
        """
        core.check_limit(activation, limit)
        with self._lock:
            rows = self._conn.execute(
                "SELECT record FROM runs WHERE activation = ? ORDER BY started_at DESC, run_id DESC LIMIT ?",
                (activation, limit),
            ).fetchall()
            self._stats["statements"] += 1
        return [core.run_record(body) for (body,) in rows]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run record, or None."""
        with self._lock:
            row = self._conn.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            self._stats["statements"] += 1
        return None if row is None else core.run_record(row[0])

    def find_run_by_trigger(self, activation: str, trigger_id: str) -> dict[str, Any] | None:
        """The run started by this trigger id (Pub/Sub redelivers at least once), newest if several."""
        with self._lock:
            row = self._conn.execute(
                "SELECT record FROM runs WHERE activation = ? AND trigger_id = ? "
                "ORDER BY started_at DESC, run_id DESC LIMIT 1",
                (activation, trigger_id),
            ).fetchone()
            self._stats["statements"] += 1
        return None if row is None else core.run_record(row[0])

    # -- delivery attempts --------------------------------------------------------------------

    def record_delivery_attempt(self, activation: str, trigger_id: str, now: datetime) -> int:
        """Count one more delivery of ``trigger_id`` to ``activation``; return the count so far.

        One write transaction (an upsert), which also forgets counts last touched more than
        :data:`sync.state.base.DELIVERY_RETENTION` before ``now``.
        """
        now_us = _to_us(now, "now")
        horizon_us = _to_us(now - DELIVERY_RETENTION, "now")
        with self._write() as conn:
            pruned = conn.execute("DELETE FROM deliveries WHERE last_at_us < ?", (horizon_us,)).rowcount
            row = conn.execute(
                "INSERT INTO deliveries (activation, trigger_id, attempts, first_at_us, last_at_us) "
                "VALUES (?, ?, 1, ?, ?) "
                "ON CONFLICT (activation, trigger_id) DO UPDATE SET attempts = attempts + 1, last_at_us = ? "
                "RETURNING attempts",
                (activation, trigger_id, now_us, now_us, now_us),
            ).fetchone()
            self._count(2, pruned + 1)
        return int(row[0])

    def delivery_attempts(self, activation: str, trigger_id: str) -> int:
        """How many deliveries of ``trigger_id`` were counted (0 if none)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT attempts FROM deliveries WHERE activation = ? AND trigger_id = ?", (activation, trigger_id)
            ).fetchone()
            self._stats["statements"] += 1
        return 0 if row is None else int(row[0])

    def record_trigger_request(self, trigger_id: str, request_digest: str, now: datetime) -> str:
        """Store ``request_digest`` for a new ``trigger_id``; return the digest stored for it.

        One write transaction (an upsert that keeps the first digest), which also forgets keys
        last used more than :data:`sync.state.base.DELIVERY_RETENTION` before ``now``.
        """
        now_us = _to_us(now, "now")
        horizon_us = _to_us(now - DELIVERY_RETENTION, "now")
        with self._write() as conn:
            pruned = conn.execute("DELETE FROM trigger_requests WHERE last_at_us < ?", (horizon_us,)).rowcount
            row = conn.execute(
                "INSERT INTO trigger_requests (trigger_id, request_digest, first_at_us, last_at_us) "
                "VALUES (?, ?, ?, ?) "
                "ON CONFLICT (trigger_id) DO UPDATE SET last_at_us = excluded.last_at_us "
                "RETURNING request_digest",
                (trigger_id, request_digest, now_us, now_us),
            ).fetchone()
            self._count(2, pruned + 1)
        return str(row[0])

    # -- admin --------------------------------------------------------------------------------

    def reset(self, activation: str, *, now: datetime | None = None) -> None:
        """Delete the activation's rows but its lease and runs, in one write transaction.

        See :meth:`sync.state.base.StateStore.reset`.
        """
        moment = core.require_aware(now if now is not None else datetime.now(UTC), "now")
        with self._write() as conn:
            core.refuse_if_held(activation, self._lease_record(conn, activation), moment, taker=None)
            rows = 0
            for table in ("fingerprint_base", "fingerprint_journal", "intent_batches", "refusals", "meta"):
                # Table names come from the fixed tuple above, never from input.
                rows += conn.execute(f"DELETE FROM {table} WHERE activation = ?", (activation,)).rowcount  # noqa: S608
            self._count(5, rows)

    # -- housekeeping -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters for benchmarks: write ``transactions``, ``statements`` run, ``rows_written``."""
        with self._lock:
            return dict(self._stats)

    backend = "sqlite"

    def op_counts(self) -> dict[str, int]:
        """The same counters, as every counting store names the method (``sync.state.base.CountsOperations``)."""
        return self.stats()

    def close(self) -> None:
        """Close the connection (idempotent). The store is unusable afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SQLiteStateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStateStore({self._path!r})"
