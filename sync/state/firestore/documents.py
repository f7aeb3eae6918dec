"""The Firestore client as the store uses it: counted reads and writes, transactions rerun on contention."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.cloud import firestore
from google.cloud.firestore import Client, DocumentReference, Transaction

from sync.model import Lease
from sync.state import core
from sync.state.core import LeaseRecord
from sync.state.firestore.layout import MAX_WRITES_PER_COMMIT, Doc

T = TypeVar("T")


def _contended(exc: BaseException) -> bool:
    """Whether a transaction failed only because others held its documents (worth a rerun)."""
    if isinstance(exc, api_exceptions.Aborted):
        return True
    # The client's "Failed to commit transaction in N attempts", raised from the last Aborted.
    return isinstance(exc, ValueError) and isinstance(exc.__cause__, api_exceptions.Aborted)


# Reruns of a whole transaction that lost to contention: 50 ms doubling to 2 s, jittered, for
# at most 60 s (then the error reaches the run, which fails and is retried as a whole).
TRANSACTION_RETRY: Final = api_retry.Retry(
    predicate=_contended, initial=0.05, maximum=2.0, multiplier=2.0, timeout=60.0
)


def lease_record(doc: Doc | None) -> LeaseRecord | None:
    """The lease an activation document holds, if it ever held one."""
    if doc is None or "lease_token" not in doc:
        return None
    return LeaseRecord(doc.get("lease_owner"), doc["lease_token"], doc.get("lease_expires_at"))


class Documents:
    """Reads, writes and transactions on one client, counted as Firestore bills them.

    One read per document fetched or requested by id (a missing document requested by id
    still costs one read), at least one read per query, one write per document set, one
    delete per document deleted. A transaction retried after contention counts every
    attempt. Safe to share between threads (the client is; the counters take a lock).
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._ops: dict[str, int] = {"reads": 0, "writes": 0, "deletes": 0, "transactions": 0}

    def op_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ops)

    def count(self, *, reads: int = 0, writes: int = 0, deletes: int = 0, transactions: int = 0) -> None:
        with self._lock:
            self._ops["reads"] += reads
            self._ops["writes"] += writes
            self._ops["deletes"] += deletes
            self._ops["transactions"] += transactions

    # -- reads --------------------------------------------------------------------------------

    def get(self, ref: DocumentReference, transaction: Transaction | None = None) -> Doc | None:
        snapshot = ref.get(transaction=transaction)
        self.count(reads=1)
        return snapshot.to_dict() if snapshot.exists else None

    def get_all(
        self, refs: Sequence[DocumentReference], transaction: Transaction | None = None
    ) -> dict[str, Doc | None]:
        """Fetch documents by reference in one round trip; keyed by document path.

        get_all streams results in no particular order, hence the mapping by path.
        """
        if not refs:
            return {}
        found: dict[str, Doc | None] = {ref.path: None for ref in refs}
        for snapshot in self.client.get_all(list(refs), transaction=transaction):
            if snapshot.exists:
                found[snapshot.reference.path] = snapshot.to_dict()
        self.count(reads=len(refs))
        return found

    # -- writes -------------------------------------------------------------------------------

    def set(self, txn: Transaction, ref: DocumentReference, doc: Doc) -> None:
        txn.set(ref, doc)
        self.count(writes=1)

    def delete_all(self, refs: Sequence[DocumentReference]) -> None:
        """Delete documents in batches (not atomic as a whole: for documents nobody reads any more)."""
        for start in range(0, len(refs), MAX_WRITES_PER_COMMIT):
            batch = self.client.batch()
            chunk = refs[start : start + MAX_WRITES_PER_COMMIT]
            for ref in chunk:
                batch.delete(ref)
            batch.commit()
            self.count(deletes=len(chunk))

    # -- transactions -------------------------------------------------------------------------

    def transact(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Run ``body`` in a transaction; rerun it whole while Firestore reports contention.

        The client retries a commit that was aborted 5 times with no pause, and does not retry
        an abort raised by a read inside the body. Under real contention (several deliveries
        of one Pub/Sub message counting themselves at once) both happen, so the whole
        transaction is rerun with jittered exponential backoff (:data:`TRANSACTION_RETRY`).
        Every body only reads, decides and writes inside its transaction, so a rerun is safe.
        """
        return TRANSACTION_RETRY(self._attempt)(body, read_only)

    def _attempt(self, body: Callable[[Transaction], T], read_only: bool) -> T:
        transaction = self.client.transaction(read_only=read_only)

        def counted(txn: Transaction) -> T:
            self.count(transactions=1)
            return body(txn)

        try:
            result: T = firestore.transactional(counted)(transaction)
        except ValueError as exc:
            # google-cloud-firestore rolls back when the body raises; if the transaction
            # had not begun yet (a KeyboardInterrupt during BeginTransaction), the rollback
            # itself raises ValueError("...cannot be rolled back") and hides the original.
            # Retries exhausted is also a ValueError, but raised *from* the last Aborted.
            original = exc.__context__
            if exc.__cause__ is None and original is not None and original is not exc:
                raise original from None
            raise
        return result

    def fenced(self, ref: DocumentReference, lease: Lease, transaction: Transaction | None = None) -> Doc:
        """The activation document, read in ``transaction``, if ``lease`` is still current (else LeaseLost).

        Without a transaction the check is only an early exit: every write that follows
        checks the lease again in its own transaction.
        """
        doc = self.get(ref, transaction)
        core.check_lease(lease, lease_record(doc))
        assert doc is not None  # check_lease raised otherwise
        return doc
