"""The SQLite store itself: the roles composed, the file opened (read-write or read-only), reset, close.

Opening is its own room: WAL, ``synchronous = FULL``, the retries while another process
sets the same file up, and the read-only path that must never write a byte, are about the
file, not about any one role's tables (:mod:`sync.state.sqlite`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from sync.errors import ConfigError
from sync.state import core
from sync.state.sqlite import schema
from sync.state.sqlite.connection import StateNotInitialised
from sync.state.sqlite.fingerprints import FingerprintTables
from sync.state.sqlite.intents import IntentTables
from sync.state.sqlite.leases import LeaseTables
from sync.state.sqlite.members import TABLES as MEMBER_TABLES
from sync.state.sqlite.members import MemberTables
from sync.state.sqlite.runs import RunTables


class SQLiteStateStore(FingerprintTables, LeaseTables, IntentTables, MemberTables, RunTables):
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
        self._stats = {"transactions": 0, "statements": 0, "rows_written": 0}
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
        schema.check_version(found, self._path)
        if found == schema.SCHEMA_VERSION:
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
            schema.create_or_upgrade(conn, self._path)

    # -- admin --------------------------------------------------------------------------------

    def reset(self, activation: str, *, now: datetime | None = None) -> None:
        """Delete the activation's rows but its lease and runs, in one write transaction.

        See :meth:`sync.state.base.StateStore.reset`.
        """
        moment = core.require_aware(now if now is not None else datetime.now(UTC), "now")
        with self._write() as conn:
            core.refuse_if_held(activation, self._lease_record(conn, activation), moment, taker=None)
            rows = 0
            for table in (
                "fingerprint_base",
                "fingerprint_journal",
                "intent_batches",
                "refusals",
                "meta",
                *MEMBER_TABLES,
            ):
                # Table names come from the fixed tuple above, never from input.
                rows += conn.execute(f"DELETE FROM {table} WHERE activation = ?", (activation,)).rowcount  # noqa: S608
            self._count(5 + len(MEMBER_TABLES), rows)

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
