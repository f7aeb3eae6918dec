"""What every role of the SQLite store shares: the connection, its write transaction, the lease check.

Each role's mixin (:mod:`sync.state.sqlite`) subclasses :class:`SQLiteTables`, so that its
writes go through the one ``BEGIN IMMEDIATE`` transaction that checks the fencing token, and
its reads through the one lock. Also the errors the store raises and the conversions every
table uses (times as integer microseconds, u64 as SQLite's signed INTEGER, packed blobs).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Final

import pyarrow as pa

from sync.errors import FatalError
from sync.model import Lease
from sync.state import core
from sync.state.core import U64_LIMIT, LeaseRecord

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class StateSchemaError(FatalError):
    """The state database was written by a newer (or unknown) version of cepsync."""


class StateNotInitialised(FatalError):
    """A read-only open found no cepsync state: no file, or an empty one (nothing was written)."""


def to_us(moment: datetime, what: str) -> int:
    """Microseconds since the epoch of an aware datetime (exact, unlike a float)."""
    return (core.require_aware(moment, what) - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def signed(value: int) -> int:
    """An unsigned 64-bit value as SQLite's signed INTEGER (two's complement; ``% 2**64`` undoes it)."""
    return value - U64_LIMIT if value >= U64_LIMIT // 2 else value


def unpack(blob: bytes, schema: pa.Schema, where: str) -> pa.Table:
    return core.unpack_table(blob, schema, where, StateSchemaError)


class SQLiteTables:
    """The state one connection holds, and the transactions every role's mixin writes in.

    Not a store on its own: :class:`sync.state.sqlite.store.SQLiteStateStore` opens the
    connection and sets these attributes.
    """

    _path: str
    _conn: sqlite3.Connection
    _lock: threading.Lock
    # Counters for benchmarks and the run record (transactions, statements, rows_written).
    _stats: dict[str, int]

    def _where(self, activation: str) -> str:
        """Where a blob came from, for the error an unreadable one raises."""
        return f"state database {self._path}, activation {activation!r}"

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
        return LeaseRecord(owner, token, None if expires_at_us is None else from_us(expires_at_us))

    def _check_lease(self, conn: sqlite3.Connection, lease: Lease) -> None:
        """Raise LeaseLost unless ``lease`` is still current (:func:`sync.state.core.check_lease`)."""
        core.check_lease(lease, self._lease_record(conn, lease.activation))
