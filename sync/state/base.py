"""The state protocols: small roles, and the StateStore every backend (SQLite, Firestore) implements.

A piece of the sync depends on the role it uses, not on the whole store: the differ on
:class:`FingerprintStore` (defined in :mod:`sync.differ`, the floor it stands on, and
re-exported here), the lease holder on :class:`LeaseStore`, the sender on
:class:`IntentStore`, the function's redelivery and idempotency checks on :class:`RunStore`.
A store may implement one role only (the warehouse store keeps the fingerprints only);
:class:`StateStore` is all of them in one backend, plus :meth:`StateStore.reset` and
:meth:`StateStore.close`. The journal fold the backends share is :mod:`sync.state.fold`.

Guarantees a backend must keep (the conformance suite in tests/state/ proves them):

* A fingerprint moves only through :meth:`FingerprintStore.commit`, which the engine calls
  with acknowledged profiles only; an entry whose fingerprint is None deletes the id.
  :meth:`FingerprintStore.compact` is a no-op where there is no journal.
* Every write that belongs to a run (commit, intents, refusals, meta, compaction) checks the
  lease's fencing token inside the same transaction; a stale token raises
  :class:`sync.errors.LeaseLost` and writes nothing.
* :meth:`FingerprintStore.load_fingerprints` and
  :meth:`FingerprintStore.load_fingerprint_table` return committed state including any
  journal not yet compacted (a crash between commit and compaction loses nothing). The
  table is what a run loads: tens of bytes a profile and no Python object per profile
  (``sync.diff`` joins it against the segment in DuckDB).
* :meth:`RunStore.record_delivery_attempt` is an atomic increment: the Cloud Function
  bounds Pub/Sub redeliveries of one message with it (see sync/function/handlers.py).
  :meth:`RunStore.record_trigger_request` keeps the first request an HTTP idempotency key
  came with, atomically, so a key reused with another request is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from sync.differ import FingerprintStore
from sync.model import ActivationMeta, IntentsNote, Lease, Refusal

__all__ = [
    "DELIVERY_RETENTION",
    "CountsOperations",
    "FingerprintStore",
    "IntentStore",
    "LeaseStore",
    "MemberStore",
    "Members",
    "RunStore",
    "StateStore",
    "operation_counts",
    "operations_between",
]

# How long a delivery count is kept. Pub/Sub keeps an unacknowledged message at most 7 days
# (31 with topic retention); a count outliving that could never be consulted again.
DELIVERY_RETENTION = timedelta(days=31)


@runtime_checkable
class CountsOperations(Protocol):
    """A store that counts what it asks of its backend (Firestore bills per document read and written).

    The run record keeps what one run cost (``state_ops``, docs/run-record.md), and
    ``cepsync history`` shows it.
    """

    @property
    def backend(self) -> str:
        """What the counters count: ``firestore``, ``sqlite``..."""
        ...

    def op_counts(self) -> dict[str, int]:
        """Counters since the store was opened (names are the backend's own)."""
        ...


def operation_counts(store: object) -> dict[str, int] | None:
    """``store``'s counters so far, or None for a store that does not count."""
    return store.op_counts() if isinstance(store, CountsOperations) else None


def operations_between(store: object, before: dict[str, int] | None) -> dict[str, str | int] | None:
    """What ``store`` asked of its backend since ``before`` was read (``state_ops`` of a run record)."""
    after = operation_counts(store)
    if after is None or before is None:
        return None
    assert isinstance(store, CountsOperations)  # operation_counts answered
    spent: dict[str, str | int] = {"backend": store.backend}
    spent.update({key: value - before.get(key, 0) for key, value in after.items()})
    return spent


class LeaseStore(Protocol):
    """Who may write an activation's state: its lease, and the meta a run writes under it."""

    def acquire_lease(self, activation: str, owner: str, ttl_seconds: float, now: datetime) -> Lease:
        """Take the activation's lease, or raise LeaseHeld if another owner holds an unexpired one.

        A lease is held while ``now < expires_at``. Every acquisition (new, expired,
        released, or re-acquired by the same owner) increments the fencing token, which
        never goes backwards: releases and :meth:`StateStore.reset` keep the counter.
        """

    def renew_lease(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        """Extend our lease; raise LeaseLost if its token is no longer current."""

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up (no-op if it is no longer ours)."""

    def load_meta(self, activation: str) -> ActivationMeta:
        """The activation's meta, or a fresh one."""

    def save_meta(self, lease: Lease, meta: ActivationMeta) -> None:
        """Replace the activation's meta (fenced)."""


class IntentStore(Protocol):
    """What a run notes about profiles it has not settled: mirror intents, and payloads Batch refused.

    Every write is fenced by the lease.
    """

    def record_intents(self, lease: Lease, custom_ids: Iterable[str]) -> IntentsNote:
        """Durably note ids this activation may be about to create (fenced); what was written.

        Intents are a set: noting an id twice keeps it once, and repeats in one call are
        fine. Called once per flush window of request groups before any of them leaves, so
        a call should cost a few writes and columnar work, not a write or a Python object
        per id. Raises ValueError, writing nothing, if an id is not a str that encodes as UTF-8.
        """

    def retire_intents(self, lease: Lease, note: IntentsNote) -> None:
        """Forget the intents ``note`` recorded, every id of it being settled (fenced).

        Like :meth:`clear_intents` of the note's ids, except that an id some other note
        (or an earlier run) also recorded may remain: a store may drop the note's own
        records whole. The engine retires a note once all its ids are committed.
        """

    def load_intents(self, activation: str) -> set[str]:
        """Ids noted as possibly synced and not yet cleared."""

    def clear_intents(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget intents for ids that were cleared in Batch (fenced).

        One clear removes an id however often it was noted; an id never noted is ignored.
        Called after each journal flush with the ids it committed.
        """

    def record_refusals(self, lease: Lease, refusals: Sequence[Refusal]) -> None:
        """Remember payloads Batch did not apply, one entry per id (a newer one replaces it; fenced).

        Every field of :class:`sync.model.Refusal` is kept, ``kind`` and ``runs`` included:
        an item error not yet persistent is an entry too (its count of runs in a row).
        """

    def load_refusals(self, activation: str) -> dict[str, Refusal]:
        """Every entry of the activation, by custom_id, of either kind.

        Entries written before kinds existed are read by :meth:`sync.model.Refusal.read`.
        """

    def clear_refusals(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget the entries of these ids (Batch acknowledged a payload since; fenced)."""


@dataclass(frozen=True)
class Members:
    """An activation's audience as its state holds it (``docs/audiences.md``).

    ``audience``: the audience the members belong to (None: no audience was ever started).
    ``ids``: the members Batch acknowledged (a string array, each id once).
    ``unconfirmed``: ids an audience call may have changed without a committed
    acknowledgement (a crash, a call that failed): their membership in Batch is unknown,
    so a run sends each of them again, as it should be now.
    """

    audience: str | None
    ids: pa.Array
    unconfirmed: pa.Array


class MemberStore(Protocol):
    """The members of an activation's Batch audience, and the ids a call may have changed.

    Sets of ids, packed (a million members cost a few blobs, never a row or a Python object
    per id). Every write is fenced by the lease. An activation has at most one audience:
    :meth:`start_members` names it, and forgets the state of another one.
    """

    def load_members(self, activation: str) -> Members:
        """The audience, its acknowledged members and its unconfirmed ids (empty arrays for none)."""

    def start_members(self, lease: Lease, audience: str) -> bool:
        """Make ``audience`` the one the member state is about (fenced).

        When the state was about another audience, its members and unconfirmed ids are
        forgotten first. Returns whether anything was forgotten.
        """

    def forget_members(self, lease: Lease) -> None:
        """Forget every member and unconfirmed id, keeping the audience's name (fenced)."""

    def record_member_intents(self, lease: Lease, custom_ids: pa.Array) -> IntentsNote:
        """Durably note ids an audience call is about to add or remove, before it leaves (fenced)."""

    def retire_member_intents(self, lease: Lease, note: IntentsNote) -> None:
        """Forget a note's ids once their outcome is committed (fenced; another note's may stay)."""

    def clear_member_intents(self, lease: Lease, custom_ids: pa.Array) -> None:
        """Forget these ids' unconfirmed marks, however often noted (fenced)."""

    def commit_members(self, lease: Lease, added: pa.Array, removed: pa.Array) -> None:
        """Apply what Batch acknowledged: ``added`` become members, ``removed`` are not (fenced, all or none)."""

    def compact_members(self, lease: Lease) -> None:
        """Fold what commits appended into the packed sets (a no-op where nothing is appended; fenced)."""


class RunStore(Protocol):
    """What the runs of an activation leave behind: their records, delivery counts, idempotency keys.

    Nothing here is fenced: a run that lost its lease must still record why, and a delivery
    is counted before a run takes the lease.
    """

    def save_run(self, record: dict[str, Any]) -> None:
        """Insert or replace a run record (keyed by record['run_id'], JSON-serialisable).

        Not fenced: a run that lost its lease must still be able to record why.
        ``record["activation"]`` is required; ``record["started_at"]`` (an ISO-8601
        string in one format, so that string order is time order) orders
        :meth:`list_runs`; ``record["trigger_id"]`` feeds :meth:`find_run_by_trigger`.
        """

    def list_runs(self, activation: str, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first."""

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run record, or None."""

    def find_run_by_trigger(self, activation: str, trigger_id: str) -> dict[str, Any] | None:
        """The run started by this trigger id (a Pub/Sub message/CloudEvent id), if any."""

    def record_delivery_attempt(self, activation: str, trigger_id: str, now: datetime) -> int:
        """Count one more delivery of a trigger (a Pub/Sub message id) to the activation.

        Returns the number of deliveries counted so far, this one included (1 the first
        time). Atomic: two concurrent deliveries of one message get two different numbers.
        Not fenced (it is counted before the run takes its lease). Counts older than
        :data:`DELIVERY_RETENTION` may be forgotten: Pub/Sub never redelivers that late.
        """

    def delivery_attempts(self, activation: str, trigger_id: str) -> int:
        """How many deliveries of the trigger were counted (0 if none)."""

    def record_trigger_request(self, trigger_id: str, request_digest: str, now: datetime) -> str:
        """Remember which request an idempotency key (an HTTP trigger id) came with.

        The first call for ``trigger_id`` stores ``request_digest`` and returns it; every later
        call returns the digest stored first, whatever it is given, so the caller can tell a
        key reused with another request. Keyed by the trigger id alone, across activations
        (the request names its activation). Atomic: of two concurrent first calls, one
        digest is stored and both get it. Not fenced; kept like delivery counts, for
        :data:`DELIVERY_RETENTION` after the key's last use.
        """


@runtime_checkable
class StateStore(FingerprintStore, LeaseStore, IntentStore, MemberStore, RunStore, Protocol):
    """Every role in one store, as a backend (SQLite, Firestore) implements them, plus what spans them."""

    def reset(self, activation: str, *, now: datetime | None = None) -> None:
        """Forget fingerprints, intents, refusals, members and meta (not run history): the next run is full.

        Neither run records nor the lease's token counter are forgotten. Refuses while a run
        holds the lease rather than pull state from under it.

        Args:
            activation: The activation to reset.
            now: The time to judge lease expiry by; defaults to the wall clock (UTC).

        Raises:
            LeaseHeld: A run holds an unexpired lease; nothing is deleted.
        """

    def close(self) -> None:
        """Release connections."""
