"""The lease role of the SQLite store: the ``leases`` row of an activation, and its meta written under it.

:class:`sync.state.base.LeaseStore`. The lease's record and the fencing check every
run-owned write makes live with the connection (:mod:`sync.state.sqlite.connection`), since
every role checks it.
"""

from __future__ import annotations

from datetime import datetime

from sync.model import ActivationMeta, Lease
from sync.state import core
from sync.state.sqlite.connection import SQLiteTables, to_us


class LeaseTables(SQLiteTables):
    """:class:`sync.state.base.LeaseStore` on the ``leases`` and ``meta`` tables."""

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
                (activation, owner, token, to_us(expires_at, "expires_at")),
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
                (to_us(expires_at, "expires_at"), lease.activation),
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
