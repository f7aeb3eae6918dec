"""The run role of the SQLite store: run records, delivery counts and idempotency keys.

:class:`sync.state.base.RunStore`. None of it is fenced: a run that lost its lease still
records why, and deliveries are counted before a run takes the lease.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sync.state import core
from sync.state.base import DELIVERY_RETENTION
from sync.state.sqlite.connection import SQLiteTables, to_us


class RunTables(SQLiteTables):
    """:class:`sync.state.base.RunStore` on the ``runs``, ``deliveries`` and ``trigger_requests`` tables."""

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
        now_us = to_us(now, "now")
        horizon_us = to_us(now - DELIVERY_RETENTION, "now")
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
        now_us = to_us(now, "now")
        horizon_us = to_us(now - DELIVERY_RETENTION, "now")
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
