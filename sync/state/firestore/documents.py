"""The Firestore client as the store uses it: counted operations, transactions rerun on contention.

Counted as Firestore bills them, plus what the run record and the benchmark report about
contention and hot documents (docs/how-state-is-kept.md, "Firestore").
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth import exceptions as auth_exceptions
from google.cloud import firestore
from google.cloud.firestore import Client, DocumentReference, Query, Transaction

from sync.errors import FatalError, SyncError, TransientError
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
# at most 60 s; then a TransientError that says what contended reaches the run, which fails
# retryable (the function's delivery is retried as a whole).
CONTENTION_TIMEOUT_SECONDS: Final = 60.0


# Answers that a later try may not meet: the service, a proxy or the network were busy or down.
_TRANSIENT = (
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    api_exceptions.DeadlineExceeded,
    api_exceptions.Aborted,
    api_exceptions.Cancelled,
    api_exceptions.Unknown,
    auth_exceptions.TransportError,
)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Firestore's errors as the run's families: transient (retry the run) or fatal (fix the deployment).

    Our own errors pass through; an error of neither kind is left as it is.
    """
    try:
        yield
    except SyncError:
        raise
    except api_exceptions.RetryError as error:
        raise TransientError(
            f"Firestore did not answer while {what}: the client's retries ran out (last: {error.cause or error}); "
            "the run stopped and can be retried: what Batch acknowledged before is kept"
        ) from None
    except _TRANSIENT as error:
        raise TransientError(
            f"Firestore failed while {what}: {type(error).__name__}: {error}; the run stopped and can be "
            "retried: what Batch acknowledged before is kept"
        ) from None
    except (
        api_exceptions.PermissionDenied,
        api_exceptions.Unauthenticated,
        api_exceptions.Unauthorized,
        api_exceptions.Forbidden,
        auth_exceptions.RefreshError,
        auth_exceptions.DefaultCredentialsError,
    ) as error:
        raise FatalError(
            f"Firestore refused the request while {what}: {type(error).__name__}: {error}. The function's "
            "service account needs roles/datastore.user on the project (infra/iam.tf); from a laptop, "
            "'gcloud auth application-default login'"
        ) from None
    except api_exceptions.NotFound as error:
        raise FatalError(
            f"Firestore answered NotFound while {what}: {error}. Does the database exist? Check "
            "CEPSYNC_FIRESTORE_DATABASE or the firestore:// state URL (docs/function.md)"
        ) from None


def transaction_retry(timeout: float = CONTENTION_TIMEOUT_SECONDS) -> api_retry.Retry:
    """Reruns of a contended transaction: jittered, 50 ms doubling to 2 s, for ``timeout`` seconds."""
    return api_retry.Retry(predicate=_contended, initial=0.05, maximum=2.0, multiplier=2.0, timeout=timeout)


TRANSACTION_RETRY: Final = transaction_retry()
# Windows of the per-document write rates (Firestore: about one sustained write per second
# per document): the most writes one document took within any 1 s, and within any 10 s.
_BURST_WINDOW: Final = 1.0
_SUSTAINED_WINDOW: Final = 10.0


@dataclass
class _DocumentRate:
    recent: collections.deque[float]
    writes: int = 0
    peak_1s: int = 0
    peak_10s: int = 0


class WriteRates:
    """Writes per document over time: which document was hottest, and how hot.

    Kept for documents written at least twice only in effect: a journal or shard
    document written once never leads. Memory stays bounded: a document idle for longer
    than the sustained window is folded into the summary and dropped.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._documents: dict[str, _DocumentRate] = {}
        self._written = 0
        self._hottest = ("", 0, 0, 0)  # path, writes, peak in 1 s, peak in 10 s
        self._last_prune = clock()

    def record(self, paths: Sequence[str]) -> None:
        now = self._clock()
        with self._lock:
            for path in paths:
                rate = self._documents.get(path)
                if rate is None:
                    rate = self._documents[path] = _DocumentRate(collections.deque())
                    self._written += 1
                rate.writes += 1
                rate.recent.append(now)
                while now - rate.recent[0] > _SUSTAINED_WINDOW:
                    rate.recent.popleft()
                rate.peak_10s = max(rate.peak_10s, len(rate.recent))
                in_burst = sum(1 for moment in reversed(rate.recent) if now - moment <= _BURST_WINDOW)
                rate.peak_1s = max(rate.peak_1s, in_burst)
                self._consider(path, rate)
            if now - self._last_prune > _SUSTAINED_WINDOW:
                self._last_prune = now
                idle = [p for p, r in self._documents.items() if now - r.recent[-1] > _SUSTAINED_WINDOW]
                for path in idle:
                    del self._documents[path]

    def _consider(self, path: str, rate: _DocumentRate) -> None:
        if (rate.peak_10s, rate.peak_1s, rate.writes) > (self._hottest[3], self._hottest[2], self._hottest[1]):
            self._hottest = (path, rate.writes, rate.peak_1s, rate.peak_10s)

    def summary(self) -> dict[str, Any]:
        """``documents`` written, the ``hottest`` one (by writes within 10 s), its ``hottest_writes``
        in all, ``peak_writes_1s`` (within any 1 s) and ``peak_writes_per_second_10s`` (within any 10 s, per second).
        """
        with self._lock:
            path, writes, peak_1s, peak_10s = self._hottest
            return {
                "documents": self._written,
                "hottest": path,
                "hottest_writes": writes,
                "peak_writes_1s": peak_1s,
                "peak_writes_per_second_10s": round(peak_10s / _SUSTAINED_WINDOW, 2),
            }


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
    attempt in ``transactions``, and every attempt after the first in ``contention_retries``.
    Safe to share between threads (the client is; the counters take a lock).
    """

    def __init__(self, client: Client, *, contention_timeout: float = CONTENTION_TIMEOUT_SECONDS) -> None:
        self.client = client
        self._retry = (
            TRANSACTION_RETRY
            if contention_timeout == CONTENTION_TIMEOUT_SECONDS
            else transaction_retry(contention_timeout)
        )
        self._contention_timeout = contention_timeout
        self._lock = threading.Lock()
        self._ops: dict[str, int] = {
            "reads": 0,
            "writes": 0,
            "deletes": 0,
            "transactions": 0,
            "contention_retries": 0,
        }
        self.rates = WriteRates()
        # Paths each transaction attempt has set so far, by attempt: recorded once it commits.
        self._staged: dict[int, list[str]] = {}

    def op_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ops)

    def count(
        self, *, reads: int = 0, writes: int = 0, deletes: int = 0, transactions: int = 0, contention_retries: int = 0
    ) -> None:
        with self._lock:
            self._ops["reads"] += reads
            self._ops["writes"] += writes
            self._ops["deletes"] += deletes
            self._ops["transactions"] += transactions
            self._ops["contention_retries"] += contention_retries

    # -- reads --------------------------------------------------------------------------------

    def get(self, ref: DocumentReference, transaction: Transaction | None = None) -> Doc | None:
        with translated(f"reading {ref.path}"):
            snapshot = ref.get(transaction=transaction)
        self.count(reads=1)
        return snapshot.to_dict() if snapshot.exists else None

    def get_all(
        self, refs: Sequence[DocumentReference], transaction: Transaction | None = None
    ) -> dict[str, Doc | None]:
        """Fetch documents by reference in one round trip; keyed by document path."""
        return dict(self.each(refs, transaction))

    def each(
        self, refs: Sequence[DocumentReference], transaction: Transaction | None = None
    ) -> Iterator[tuple[str, Doc | None]]:
        """Documents by reference, in one round trip, as they arrive: (path, fields or None if missing).

        get_all streams results in no particular order. A caller that decodes each one as it
        comes holds one document's fields at a time, not all of them.
        """
        if not refs:
            return
        with translated(f"reading {len(refs)} documents such as {refs[0].path}"):
            for snapshot in self.client.get_all(list(refs), transaction=transaction):
                yield snapshot.reference.path, (snapshot.to_dict() if snapshot.exists else None)
        self.count(reads=len(refs))

    def query(self, query: Query, what: str, transaction: Transaction | None = None) -> Iterator[tuple[str, Doc]]:
        """(document path, fields) of what ``query`` matches; a query costs one read even when empty."""
        matched = 0
        with translated(what):
            stream = transaction.get(query) if transaction is not None else query.stream()
            for snapshot in stream:
                matched += 1
                yield snapshot.reference.path, snapshot.to_dict() or {}
        self.count(reads=max(1, matched))

    def query_refs(self, query: Query, what: str) -> list[DocumentReference]:
        """The documents ``query`` matches, fields not fetched (still one read each, one if none)."""
        with translated(what):
            refs: list[DocumentReference] = [snapshot.reference for snapshot in query.select([]).stream()]
        self.count(reads=max(1, len(refs)))
        return refs

    # -- writes -------------------------------------------------------------------------------

    def set(self, txn: Transaction, ref: DocumentReference, doc: Doc) -> None:
        txn.set(ref, doc)
        self.count(writes=1)
        self._staged.setdefault(id(txn), []).append(ref.path)

    def set_now(self, ref: DocumentReference, doc: Doc) -> None:
        """One write outside a transaction (a run record: one writer, never contended)."""
        with translated(f"writing {ref.path}"):
            ref.set(doc)
        self.count(writes=1)
        self.rates.record([ref.path])

    def delete_all(self, refs: Sequence[DocumentReference]) -> None:
        """Delete documents in batches (not atomic as a whole: for documents nobody reads any more)."""
        for start in range(0, len(refs), MAX_WRITES_PER_COMMIT):
            batch = self.client.batch()
            chunk = refs[start : start + MAX_WRITES_PER_COMMIT]
            for ref in chunk:
                batch.delete(ref)
            with translated(f"deleting {len(chunk)} documents such as {chunk[0].path}"):
                batch.commit()
            self.count(deletes=len(chunk))

    # -- transactions -------------------------------------------------------------------------

    def transact(self, body: Callable[[Transaction], T], *, read_only: bool = False, what: str | None = None) -> T:
        """Run ``body`` in a transaction; rerun it whole while Firestore reports contention.

        The client retries a commit that was aborted 5 times with no pause, and does not retry
        an abort raised by a read inside the body. Under real contention (several deliveries
        of one Pub/Sub message counting themselves at once) both happen, so the whole
        transaction is rerun with jittered exponential backoff (:func:`transaction_retry`).
        Every body only reads, decides and writes inside its transaction, so a rerun is safe.

        Args:
            body: Reads, decides and writes through the transaction it is given.
            read_only: A read-only transaction (a consistent snapshot; locks nothing).
            what: What the transaction does, for the error when contention outlasts the retries.

        Raises:
            TransientError: Contention lasted the contention timeout (60 s unless the store was
                given another); the message says what contended and what to change. Or
                Firestore was unavailable (:func:`translated`).
            FatalError: Firestore refused the request (permissions, no such database).
        """
        attempts = [0]
        try:
            # Any other failure of Firestore's becomes a transient or fatal error too.
            with translated(what or "a state transaction"):
                try:
                    return self._retry(self._attempt)(body, read_only, attempts)
                except api_exceptions.RetryError as exc:  # only contention is retried here
                    raise TransientError(
                        f"Firestore contention: {what or 'a state transaction'} was aborted {attempts[0]} times "
                        f"in {self._contention_timeout:g} s because other transactions held the same documents "
                        f"(last: {exc.cause or exc}). Another process is writing this activation's state at the "
                        "same time (two deployments or a CLI run sharing one Firestore prefix?), or the database "
                        "is overloaded; the run stopped and can be retried: what Batch acknowledged before is kept"
                    ) from None
        finally:
            if attempts[0] > 1:
                self.count(contention_retries=attempts[0] - 1)

    def _attempt(self, body: Callable[[Transaction], T], read_only: bool, attempts: list[int]) -> T:
        transaction = self.client.transaction(read_only=read_only)
        key = id(transaction)

        def counted(txn: Transaction) -> T:
            self.count(transactions=1)
            attempts[0] += 1
            self._staged[key] = []
            return body(txn)

        try:
            result: T = firestore.transactional(counted)(transaction)
            self.rates.record(self._staged.get(key, []))
        except ValueError as exc:
            # google-cloud-firestore rolls back when the body raises; if the transaction
            # had not begun yet (a KeyboardInterrupt during BeginTransaction), the rollback
            # itself raises ValueError("...cannot be rolled back") and hides the original.
            # Retries exhausted is also a ValueError, but raised *from* the last Aborted.
            original = exc.__context__
            if exc.__cause__ is None and original is not None and original is not exc:
                raise original from None
            raise
        finally:
            self._staged.pop(key, None)
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
