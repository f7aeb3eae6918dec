"""FirestoreStateStore: the StateStore protocol on Cloud Firestore (production state on GCP).

A delta run compares *every* segment row with its stored fingerprint, so one document per
profile would cost one read per profile per run (1M profiles ≈ 1M reads, minutes and real
money). This store packs fingerprints instead, into shard and journal documents
(:mod:`.layout`, :mod:`.codec`): :meth:`FirestoreStateStore.commit` appends journal
documents (:mod:`.journal`), :meth:`FirestoreStateStore.compact` folds them into the
shards (:mod:`.compaction`).

Reads: :meth:`FirestoreStateStore.load_fingerprint_table` is one read-only transaction
(a consistent snapshot) of ``1 + K + J`` documents: about 65 reads for a million
profiles after compaction.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud import firestore
from google.cloud.firestore import DocumentReference, Transaction

from sync.model import ActivationMeta, Fingerprint, IntentsNote, JournalEntry, Lease, Refusal
from sync.state import core
from sync.state.base import DELIVERY_RETENTION
from sync.state.firestore import codec
from sync.state.firestore.compaction import CompactionStep, Compactor
from sync.state.firestore.documents import Documents, lease_record
from sync.state.firestore.journal import Journal
from sync.state.firestore.layout import (
    AUDIENCE_NAMESPACES,
    FP,
    INTENTS,
    MAX_RECORD_JSON_BYTES,
    MAX_TARGET_SHARD_BYTES,
    MAX_WRITES_PER_COMMIT,
    MIN_TARGET_SHARD_BYTES,
    NAMESPACES,
    Collections,
    Doc,
    NamespaceState,
    check_document_id,
    run_key,
    trigger_key,
)
from sync.state.firestore.members import AUDIENCE_FIELD, FirestoreMembers
from sync.state.fold import fold_journal

# Writes one refusal transaction may hold besides the activation document, with room to spare.
_REFUSALS_PER_TRANSACTION = MAX_WRITES_PER_COMMIT - 100


class FirestoreStateStore(FirestoreMembers):
    """A :class:`sync.state.base.StateStore` on Cloud Firestore (Native mode).

    Safe to share between threads (the Firestore client is; the counters take a lock).
    Two function instances each with their own store on the same database are safe: the
    lease, read and written in transactions, lets one run at a time commit.

    Args:
        client: A ``google.cloud.firestore.Client`` (production, or the emulator through
            ``FIRESTORE_EMULATOR_HOST``).
        prefix: Collection prefix, so several deployments (or tests) can share one database.
        target_shard_bytes: Largest compressed blob a shard or journal document may hold;
            compaction grows the shard count when a shard would exceed it. Must stay well
            under Firestore's 1 MiB document limit.
        close_client: Whether :meth:`close` closes ``client`` (leave False when the client
            is shared).
        contention_timeout: Seconds a transaction is rerun while other transactions hold
            its documents, before the call fails with a :class:`~sync.errors.TransientError`.

    Raises:
        ValueError: ``prefix`` is not a valid collection id start or ``target_shard_bytes``
            is out of range.
    """

    def __init__(
        self,
        client: firestore.Client,
        *,
        prefix: str = "cepsync",
        target_shard_bytes: int = 700_000,
        close_client: bool = False,
        contention_timeout: float = 60.0,
    ) -> None:
        self._collections = Collections(client, prefix)
        if not MIN_TARGET_SHARD_BYTES <= target_shard_bytes <= MAX_TARGET_SHARD_BYTES:
            raise ValueError(
                f"target_shard_bytes must be between {MIN_TARGET_SHARD_BYTES} and "
                f"{MAX_TARGET_SHARD_BYTES} (Firestore documents are at most 1 MiB), got {target_shard_bytes}"
            )
        self._client = client
        self._close_client = close_client
        self._docs = Documents(client, contention_timeout=contention_timeout)
        self._journal = Journal(self._docs, self._collections, target_shard_bytes)
        self._compactor = Compactor(self._docs, self._collections, self._journal, target_shard_bytes)

    backend = "firestore"

    def op_counts(self) -> dict[str, int]:
        """Document ``reads``, ``writes`` and ``deletes`` issued by this store, ``transactions``
        (every attempt) and ``contention_retries`` (attempts rerun after contention).

        Counted as Firestore bills them (see :class:`sync.state.firestore.documents.Documents`).
        """
        return self._docs.op_counts()

    def document_writes(self) -> dict[str, Any]:
        """How hot the hottest document this store wrote was (``WriteRates.summary``).

        Firestore sustains about one write per second per document; this store's design
        keeps every document under it (docs/how-state-is-kept.md, "Firestore").
        """
        return self._docs.rates.summary()

    def _fenced_update(self, lease: Lease, change: Callable[[Doc], None], what: str) -> None:
        """Apply ``change`` to the activation document in one transaction fenced by ``lease``."""
        ref = self._collections.activation(lease.activation)

        def body(txn: Transaction) -> None:
            doc = self._docs.fenced(ref, lease, txn)
            change(doc)
            self._docs.set(txn, ref, doc)

        self._docs.transact(body, what=f"{what} of activation {lease.activation!r}")

    # -- lease --------------------------------------------------------------------------------

    def acquire_lease(self, activation: str, owner: str, ttl_seconds: float, now: datetime) -> Lease:
        """Take the activation's lease in one transaction (see :class:`sync.state.base.StateStore`).

        Raises:
            LeaseHeld: Another owner holds an unexpired lease.
            ValueError: ``ttl_seconds`` is not positive, or ``now`` is naive.
        """
        expires_at = core.lease_expiry(activation, ttl_seconds, now)
        ref = self._collections.activation(activation)

        def body(txn: Transaction) -> int:
            doc = self._docs.get(ref, txn) or {}
            core.refuse_if_held(activation, lease_record(doc), now, taker=owner)
            token = int(doc.get("lease_token", 0)) + 1
            doc.update(lease_owner=owner, lease_token=token, lease_expires_at=expires_at)
            self._docs.set(txn, ref, doc)
            return token

        token = self._docs.transact(body, what=f"taking the lease of activation {activation!r}")
        return Lease(activation=activation, owner=owner, token=token, expires_at=expires_at)

    def renew_lease(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        """Extend our lease to ``now + ttl_seconds``, keeping its token (LeaseLost if it is not ours)."""
        expires_at = core.lease_expiry(lease.activation, ttl_seconds, now)
        self._fenced_update(lease, lambda doc: doc.update(lease_expires_at=expires_at), "renewing the lease")
        return Lease(activation=lease.activation, owner=lease.owner, token=lease.token, expires_at=expires_at)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up so the next run need not wait for expiry (no-op if not ours).

        The token counter stays: only the expiry is cleared.
        """
        ref = self._collections.activation(lease.activation)

        def body(txn: Transaction) -> None:
            doc = self._docs.get(ref, txn)
            current = lease_record(doc)
            if doc is None or current is None or current.expires_at is None:
                return
            if current.token != lease.token or current.owner != lease.owner:
                return
            doc["lease_expires_at"] = None
            self._docs.set(txn, ref, doc)

        self._docs.transact(body, what=f"releasing the lease of activation {lease.activation!r}")

    # -- fingerprints -------------------------------------------------------------------------

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        """Every committed fingerprint of the activation (shards plus the live journal)."""
        return core.fingerprints_of(self.load_fingerprint_table(activation))

    def load_fingerprint_table(self, activation: str) -> pa.Table:
        """Every committed fingerprint as an Arrow table (``sync.differ.FINGERPRINT_SCHEMA``).

        The shard and journal blobs are Arrow IPC streams (:mod:`sync.state.firestore.codec`);
        the live journal is folded in columns (:func:`sync.state.fold.fold_journal`).
        """
        loaded = self._journal.load(activation, FP)
        return fold_journal(loaded.shards, loaded.journal)

    def commit(self, lease: Lease, entries: Sequence[JournalEntry] | pa.Table, now: datetime) -> None:
        """Durably apply acknowledged outcomes as journal documents (fenced; see :mod:`.journal`).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing (more) is written.
            ValueError: A fingerprint is not an unsigned 64-bit int, or a custom_id is not
                valid text; nothing is written.
        """
        core.require_aware(now, "now")
        self._journal.append(lease, FP, core.journal_table(lease.activation, entries), now)

    def compact(self, lease: Lease, now: datetime, *, when_due: bool = False) -> None:
        """Fold the journals (fingerprints and intents) into the shards (fenced).

        Idempotent and crash-safe: see :meth:`iter_compaction`.

        Raises:
            LeaseLost: ``lease`` is no longer current. What was written before is harmless.
        """
        for _ in self.iter_compaction(lease, now, when_due=when_due):
            pass

    def iter_compaction(
        self, lease: Lease, now: datetime, *, when_due: bool = False
    ) -> Generator[CompactionStep, None, None]:
        """Compact step by step, yielding after each durable write.

        Stopping the iteration at any point (a time budget running out, a crash) leaves
        a state that loads exactly as before, and the next compaction completes the
        work: journal entries are absolute values, shards are rewritten whole in fenced
        transactions, and the journal is dropped only once every shard holding its
        entries is written.

        ``when_due``: the fingerprints' journal is folded only once it is worth it
        (:meth:`Compactor.compact`); the intents' always is.

        Raises:
            LeaseLost: ``lease`` is no longer current.
        """
        core.require_aware(now, "now")
        for ns in NAMESPACES:
            yield from self._compactor.compact(lease, ns, when_due=when_due and ns is FP)

    # -- mirror intents -----------------------------------------------------------------------

    def record_intents(self, lease: Lease, custom_ids: Iterable[str]) -> IntentsNote:
        """Durably note ids this activation may be about to create (fenced; idempotent).

        The note names the journal documents written, so that :meth:`retire_intents` can
        delete them instead of appending a clear of every id.
        """
        ids = core.unique_ids(lease.activation, custom_ids)
        documents = self._journal.append(lease, INTENTS, codec.intent_table(ids, put=True), None)
        return IntentsNote(tuple(ids), tuple(documents))

    def retire_intents(self, lease: Lease, note: IntentsNote) -> None:
        """Forget a note's intents: its journal documents deleted while live, else a clear of its ids (fenced)."""
        if not note.documents or not self._journal.retire(lease, INTENTS, note.documents):
            self._write_intents(lease, note.custom_ids, put=False)

    def load_intents(self, activation: str) -> set[str]:
        """Ids noted as possibly synced and not yet cleared."""
        loaded = self._journal.load(activation, INTENTS)
        latest = codec.latest_table(INTENTS, loaded.journal)
        intents: set[str] = set()
        for table in loaded.shards:
            ids = table.column("custom_id")
            intents.update(ids.filter(pc.invert(pc.is_in(ids, value_set=latest.column("custom_id")))).to_pylist())
        intents.update(latest.filter(latest.column("put")).column("custom_id").to_pylist())
        return intents

    def clear_intents(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget intents for ids cleared in Batch (fenced; unknown ids are ignored)."""
        self._write_intents(lease, custom_ids, put=False)

    def _write_intents(self, lease: Lease, custom_ids: Iterable[str], *, put: bool) -> None:
        """Journal intents noted (``put``) or cleared (LeaseLost if ``lease`` is not current; nothing written)."""
        ids = core.unique_ids(lease.activation, custom_ids)
        self._journal.append(lease, INTENTS, codec.intent_table(ids, put=put), None)

    # -- payloads Batch refused -----------------------------------------------------------------

    def _fenced_refusal_writes(
        self,
        lease: Lease,
        custom_ids: Iterable[str],
        write: Callable[[Transaction, DocumentReference, str, int], None],
    ) -> None:
        """Apply ``write(txn, ref, custom_id, gen)`` to ids in fenced transactions of bounded size."""
        ids = core.unique_ids(lease.activation, custom_ids)
        ref = self._collections.activation(lease.activation)
        start = 0
        while True:  # at least one transaction, so an empty call is fenced too
            chunk = ids[start : start + _REFUSALS_PER_TRANSACTION]

            def body(txn: Transaction, chunk: list[str] = chunk) -> None:
                gen = int(self._docs.fenced(ref, lease, txn).get("refusals_gen", 0))
                for custom_id in chunk:
                    write(txn, self._collections.refusal(ref, custom_id), custom_id, gen)

            self._docs.transact(body)
            start += len(chunk)
            if start >= len(ids):
                return

    def record_refusals(self, lease: Lease, refusals: Sequence[Refusal]) -> None:
        """Remember payloads Batch did not apply, one document per id, a newer one replacing it (fenced).

        Besides the fields :mod:`.layout` lists, a document holds ``kind`` (``value`` or
        ``item_error``) and ``runs`` (:class:`sync.model.Refusal`); documents written before
        those existed are read by :meth:`sync.model.Refusal.read`.
        """
        by_id = {refusal.custom_id: refusal for refusal in refusals}
        for refusal in by_id.values():
            core.check_u64(refusal.payload, lease.activation, refusal.custom_id, "payload")

        def write(txn: Transaction, ref: DocumentReference, custom_id: str, gen: int) -> None:
            refusal = by_id[custom_id]
            self._docs.set(
                txn,
                ref,
                {
                    "custom_id": custom_id,
                    "payload": str(refusal.payload),
                    "field": refusal.field,
                    "reason": refusal.reason,
                    "kind": refusal.kind.value,
                    "runs": refusal.runs,
                    "gen": gen,
                },
            )

        self._fenced_refusal_writes(lease, by_id, write)

    def load_refusals(self, activation: str) -> dict[str, Refusal]:
        """Every entry of the activation, by custom_id, of either kind (one read per entry)."""
        ref = self._collections.activation(activation)
        doc = self._docs.get(ref)
        if doc is None:
            return {}
        gen = int(doc.get("refusals_gen", 0))
        refusals: dict[str, Refusal] = {}
        for snapshot in self._collections.refusals(ref).stream():
            self._docs.count(reads=1)
            data = snapshot.to_dict() or {}
            if data.get("gen") != gen:
                continue  # forgotten by a reset, not yet deleted
            custom_id = str(data["custom_id"])
            # kind and runs are absent from documents written before they existed (Refusal.read).
            refusals[custom_id] = Refusal.read(
                custom_id,
                int(data["payload"]),
                str(data["field"]),
                str(data["reason"]),
                data.get("kind"),
                data.get("runs"),
            )
        return refusals

    def clear_refusals(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget the refusals of these ids (fenced; unknown ids are ignored)."""

        def delete(txn: Transaction, ref: DocumentReference, custom_id: str, gen: int) -> None:
            txn.delete(ref)
            self._docs.count(deletes=1)

        self._fenced_refusal_writes(lease, custom_ids, delete)

    def _delete_forgotten_refusals(self, activation: str) -> None:
        """After a reset: delete refusal documents of older generations (best effort)."""
        ref = self._collections.activation(activation)
        gen = int((self._docs.get(ref) or {}).get("refusals_gen", 0))
        stale = []
        for snapshot in self._collections.refusals(ref).stream():
            self._docs.count(reads=1)
            if (snapshot.to_dict() or {}).get("gen") != gen:
                stale.append(snapshot.reference)
        self._docs.delete_all(stale)

    # -- per-activation meta ------------------------------------------------------------------

    def load_meta(self, activation: str) -> ActivationMeta:
        """The activation's meta, or a fresh :class:`ActivationMeta`."""
        body = (self._docs.get(self._collections.activation(activation)) or {}).get("meta_json")
        return ActivationMeta() if body is None else ActivationMeta.from_json(body)

    def save_meta(self, lease: Lease, meta: ActivationMeta) -> None:
        """Replace the activation's meta, a field of the activation document (fenced)."""
        body = core.meta_json(lease.activation, meta)
        self._fenced_update(lease, lambda doc: doc.update(meta_json=body), "saving the meta")

    # -- run records --------------------------------------------------------------------------

    def save_run(self, record: dict[str, Any]) -> None:
        """Insert or replace a run record: one document, not fenced (see the protocol).

        Raises:
            ValueError: ``run_id`` or ``activation`` is missing, not a string, or not a
                valid document id; or the record exceeds a Firestore document.
            TypeError: The record is not JSON-serialisable.
        """
        row = core.run_row(record, check_run_id=lambda run_id: check_document_id(run_id, "run_id"))
        if len(row.body.encode("utf-8")) > MAX_RECORD_JSON_BYTES:
            raise ValueError(
                f"run record {row.run_id!r} of activation {row.activation!r} is {len(row.body)} characters of "
                "JSON; a Firestore document holds at most 1 MiB (bound the rejected-row samples)"
            )
        doc: Doc = {
            "activation": row.activation,
            "started_at": row.started_at,
            "trigger_id": row.trigger_id,
            "run_key": run_key(row.activation, row.started_at, row.run_id),
            "trigger_key": None if row.trigger_id is None else trigger_key(row.activation, row.trigger_id),
            "record_json": row.body,
        }
        self._docs.set_now(self._collections.run(row.run_id), doc)

    def list_runs(self, activation: str, limit: int = 20) -> list[dict[str, Any]]:
        """The activation's run records, newest ``started_at`` first (then run_id), at most ``limit``.

        One query: a range on ``run_key`` (:func:`sync.state.firestore.layout.run_key`).

        Raises:
            ValueError: ``limit`` is negative.
        """
        core.check_limit(activation, limit)
        if limit == 0:
            return []
        query = (
            self._collections.runs.where(filter=firestore.FieldFilter("run_key", ">=", f"{activation}\0"))
            .where(filter=firestore.FieldFilter("run_key", "<", f"{activation}\x01"))
            .order_by("run_key", direction=firestore.Query.DESCENDING)
            .limit(limit)
        )
        records = [core.run_record(snapshot.get("record_json")) for snapshot in query.stream()]
        self._docs.count(reads=max(1, len(records)))
        return records

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run record, or None."""
        try:
            check_document_id(run_id, "run_id")
        except ValueError:
            return None
        doc = self._docs.get(self._collections.run(run_id))
        return None if doc is None else core.run_record(doc["record_json"])

    def find_run_by_trigger(self, activation: str, trigger_id: str) -> dict[str, Any] | None:
        """The run started by this trigger id (Pub/Sub redelivers at least once), newest if several."""
        query = self._collections.runs.where(
            filter=firestore.FieldFilter("trigger_key", "==", trigger_key(activation, trigger_id))
        )
        found: list[Doc] = [snapshot.to_dict() or {} for snapshot in query.stream()]
        self._docs.count(reads=max(1, len(found)))
        if not found:
            return None
        return core.run_record(max(found, key=lambda doc: doc["run_key"])["record_json"])

    # -- delivery attempts --------------------------------------------------------------------

    def record_delivery_attempt(self, activation: str, trigger_id: str, now: datetime) -> int:
        """Count one more delivery of ``trigger_id`` to ``activation``; return the count so far.

        One transaction (read, increment, write), so concurrent deliveries of one message
        get distinct counts. ``expire_at`` (``now`` + :data:`sync.state.base.DELIVERY_RETENTION`)
        is the field a Firestore TTL policy deletes the document by (infra/firestore.tf).
        """
        core.require_aware(now, "now")
        ref = self._collections.delivery(activation, trigger_id)

        def body(txn: Transaction) -> int:
            doc = self._docs.get(ref, txn)
            attempts = int(doc["attempts"]) + 1 if doc is not None else 1
            self._docs.set(
                txn,
                ref,
                {
                    "activation": activation,
                    "trigger_id": trigger_id,
                    "attempts": attempts,
                    "first_at": doc["first_at"] if doc is not None else now,
                    "last_at": now,
                    "expire_at": now + DELIVERY_RETENTION,
                },
            )
            return attempts

        return self._docs.transact(body, what=f"counting a delivery of {trigger_id!r} to activation {activation!r}")

    def delivery_attempts(self, activation: str, trigger_id: str) -> int:
        """How many deliveries of ``trigger_id`` were counted (0 if none)."""
        doc = self._docs.get(self._collections.delivery(activation, trigger_id))
        return 0 if doc is None else int(doc["attempts"])

    def record_trigger_request(self, trigger_id: str, request_digest: str, now: datetime) -> str:
        """Store ``request_digest`` for a new ``trigger_id``; return the digest stored for it.

        One transaction (read, then write the new key or the later use), so of two concurrent
        first requests one digest wins. ``expire_at`` is the TTL field, as for delivery counts.
        """
        core.require_aware(now, "now")
        ref = self._collections.trigger_request(trigger_id)

        def body(txn: Transaction) -> str:
            doc = self._docs.get(ref, txn)
            stored = str(doc["request_digest"]) if doc is not None else request_digest
            self._docs.set(
                txn,
                ref,
                {
                    "trigger_id": trigger_id,
                    "request_digest": stored,
                    "first_at": doc["first_at"] if doc is not None else now,
                    "last_at": now,
                    "expire_at": now + DELIVERY_RETENTION,
                },
            )
            return stored

        return self._docs.transact(body, what=f"recording the request of trigger {trigger_id!r}")

    # -- admin --------------------------------------------------------------------------------

    def reset(self, activation: str, *, now: datetime | None = None) -> None:
        """Empty the live layout in one transaction, then delete what it held as garbage.

        See :meth:`sync.state.base.StateStore.reset`; the refusal documents are forgotten
        at once (``refusals_gen``) and deleted after.
        """
        moment = core.require_aware(now if now is not None else datetime.now(UTC), "now")
        ref = self._collections.activation(activation)

        def body(txn: Transaction) -> bool:
            doc = self._docs.get(ref, txn)
            if doc is None:
                return False
            core.refuse_if_held(activation, lease_record(doc), moment, taker=None)
            token = int(doc.get("lease_token", 0))
            for ns in (*NAMESPACES, *AUDIENCE_NAMESPACES):
                state = NamespaceState.from_doc(doc, ns)
                state.empty(token)
                doc[ns.key] = state.to_doc()
            if "lease_token" in doc:
                # An expired run may still hold this token: released, it can write nothing more
                # (its appends would be forgotten by the reset anyway, being under its token).
                doc["lease_expires_at"] = None
            doc.pop("meta_json", None)
            doc.pop(AUDIENCE_FIELD, None)
            doc["refusals_gen"] = int(doc.get("refusals_gen", 0)) + 1
            self._docs.set(txn, ref, doc)
            return True

        if self._docs.transact(body, what=f"resetting activation {activation!r}"):
            for ns in (*NAMESPACES, *AUDIENCE_NAMESPACES):
                for _ in self._compactor.collect_garbage(activation, ns):
                    pass
            self._delete_forgotten_refusals(activation)

    # -- housekeeping -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the Firestore client if this store owns it (``close_client=True``)."""
        if self._close_client:
            self._client.close()  # type: ignore[no-untyped-call]  # google-cloud-firestore ships no annotations here

    def __repr__(self) -> str:
        return f"FirestoreStateStore(project={self._client.project!r}, prefix={self._collections.prefix!r})"
