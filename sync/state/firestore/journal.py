"""Journal documents: what each commit appends (fenced, no shared document written), and loading.

An append is one transaction per group of blobs: read the activation document and check
the lease (else :class:`~sync.errors.LeaseLost`, nothing written), then create the journal
documents. Their ids are the writer's lease token and a sequence number of its process
(:func:`~sync.state.firestore.layout.journal_id`), so no counter is shared and the
activation document is not written: appends from several requests in flight only *read*
it, and Firestore lets readers share a document while the lease renewal waits its turn.

Why that read fences (docs/how-state-is-kept.md, "Firestore"): Firestore transactions are
serialisable. An acquisition that supersedes the lease writes the activation document; an
append read it. Either the append committed first (it was written under a current lease,
and the new holder's compaction, which starts after the acquisition, folds it), or it is
ordered after the acquisition, reads the new token and writes nothing.

Entries are absolute values (a fingerprint, or a deletion), so applying one twice changes
nothing. A commit whose blobs exceed one transaction's budget (3.5 MB, about 150,000
entries) is split into several fenced transactions, each of which lands whole or not at all.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud import firestore
from google.cloud.firestore import DocumentReference, Query, Transaction
from google.cloud.firestore_v1.field_path import FieldPath

from sync.model import Lease
from sync.state.firestore import codec
from sync.state.firestore.codec import StateCorruptError
from sync.state.firestore.documents import Documents
from sync.state.firestore.layout import (
    JOURNAL_ID_END,
    JOURNAL_ID_PREFIX,
    Collections,
    Doc,
    JournalMark,
    Namespace,
    NamespaceState,
    commit_groups,
    journal_id,
)

# One journal blob: (blob, entries in it).
_Blob = tuple[bytes, int]
# A blob as read: (document path, blob).
_Stored = tuple[str, bytes]

# Sequence numbers of this process's journal documents. A lease token is granted to one
# acquisition, by one process, so (token, seq) is unique; one counter for the process keeps
# seq increasing across every store instance it opens.
_SEQUENCE = itertools.count(1)
_SEQUENCE_LOCK = threading.Lock()


def _next_seq() -> int:
    with _SEQUENCE_LOCK:
        return next(_SEQUENCE)


@dataclass(frozen=True, slots=True)
class Loaded:
    """A namespace as loaded: its shard tables and its live journal tables, oldest first."""

    shards: list[pa.Table]
    journal: list[pa.Table]


@dataclass(frozen=True, slots=True)
class LiveJournal:
    """The live journal of a namespace as compaction reads it (compressed), and how far that reaches."""

    ns: Namespace
    blobs: list[_Stored]
    upto: JournalMark
    # The entries the documents say they hold, summed; None when one does not say (a
    # numbered journal an older cepsync wrote): then they are counted by decoding.
    entries: int | None = None

    @property
    def documents(self) -> int:
        return len(self.blobs)

    @property
    def compressed_bytes(self) -> int:
        return sum(len(blob) for _, blob in self.blobs)

    def consume(self) -> Iterator[pa.Table]:
        """The journal's tables in write order, decoded one at a time; each blob is let go once decoded."""
        self.blobs.reverse()
        while self.blobs:
            path, blob = self.blobs.pop()
            yield codec.decode(blob, self.ns, journal=True, where=path)


class Journal:
    def __init__(self, docs: Documents, collections: Collections, target_bytes: int) -> None:
        self._docs = docs
        self._collections = collections
        self._target = target_bytes

    def append(self, lease: Lease, ns: Namespace, table: pa.Table, now: datetime | None) -> list[str]:
        """Write ``table`` (a journal table of ``ns``) as journal documents, in fenced transactions.

        Returns the ids of the documents written. At least one transaction, so that an
        empty append is fenced too. The sequence
        numbers are taken when the call starts: the engine serialises the appends whose
        order matters (flushes; an intent is cleared only after the commit that follows its
        send), and appends in flight together touch different ids.
        """
        ref = self._collections.activation(lease.activation)
        written: list[str] = []
        for group in commit_groups(self._blobs(table), lambda blob: len(blob[0])) or [[]]:
            named = [(journal_id(lease.token, _next_seq()), blob, count) for blob, count in group]

            def write(txn: Transaction, named: list[tuple[str, bytes, int]] = named) -> None:
                self._docs.fenced(ref, lease, txn)  # read, never written: no hot document
                for doc_id, blob, count in named:
                    journal_doc: Doc = {"blob": blob, "entries": count, "token": lease.token}
                    if now is not None:
                        journal_doc["written_at"] = now
                    self._docs.set(txn, self._collections.journal_named(ref, ns, doc_id), journal_doc)

            self._docs.transact(write, what=f"appending {ns.key} journal documents of activation {lease.activation!r}")
            written += [doc_id for doc_id, _, _ in named]
        return written

    def retire(self, lease: Lease, ns: Namespace, doc_ids: Sequence[str]) -> bool:
        """Delete live journal documents of ``ns`` whole, fenced; False (nothing deleted) if one was folded.

        A note's documents are in the journal until a compaction folds them into the
        shards; then only a clear entry can undo them.
        """
        ref = self._collections.activation(lease.activation)

        def delete(txn: Transaction) -> bool:
            state = NamespaceState.from_doc(self._docs.fenced(ref, lease, txn), ns)
            if any(doc_id <= state.folded for doc_id in doc_ids):
                return False
            for doc_id in doc_ids:
                txn.delete(self._collections.journal_named(ref, ns, doc_id))
            self._docs.count(deletes=len(doc_ids))
            return True

        deleted: bool = self._docs.transact(
            delete, what=f"retiring {ns.key} journal documents of activation {lease.activation!r}"
        )
        return deleted

    def _blobs(self, table: pa.Table) -> list[_Blob]:
        """The table in blobs each under the target size.

        Cut on an upper bound of the uncompressed size, which bounds the compressed one;
        a blob over the target all the same is cut in two again.
        """
        budget = self._target - codec.BLOB_OVERHEAD_BYTES
        sizes = pc.add(pc.binary_length(table.column("custom_id")), codec.RECORD_FIXED_BYTES)
        if "attributes" in table.column_names:
            sizes = pc.add(sizes, pc.fill_null(pc.binary_length(table.column("attributes")), 0))
        sizes = sizes.to_pylist()
        blobs: list[_Blob] = []
        start = size = 0
        for row, entry_size in enumerate(sizes):
            if row > start and size + entry_size > budget:
                blobs += self._encode_under_target(table.slice(start, row - start))
                start, size = row, 0
            size += entry_size
        if start < table.num_rows:
            blobs += self._encode_under_target(table.slice(start))
        return blobs

    def _encode_under_target(self, table: pa.Table) -> list[_Blob]:
        blob = codec.encode(table)
        if len(blob) <= self._target or table.num_rows == 1:
            return [(blob, table.num_rows)]
        half = table.num_rows // 2
        return self._encode_under_target(table.slice(0, half)) + self._encode_under_target(table.slice(half))

    # -- reading ------------------------------------------------------------------------------

    def load(self, activation: str, ns: Namespace) -> Loaded:
        """The shard tables and the live journal tables in write order, from one consistent snapshot.

        Each shard is decoded as it arrives, so only one compressed blob is held beside
        the tables (a million fingerprints: ~22 MB of blobs, ~28 MB of tables).
        """
        ref = self._collections.activation(activation)

        def read(txn: Transaction) -> Loaded:
            doc = self._docs.get(ref, txn)
            if doc is None:
                return Loaded([], [])
            state = NamespaceState.from_doc(doc, ns)
            shard_paths = {self._collections.shard(ref, ns, state.gen, k).path for k in range(state.count)}
            shard_refs = [self._collections.shard(ref, ns, state.gen, k) for k in range(state.count)]
            numbered_refs = [self._collections.journal(ref, ns, seq) for seq in range(state.low, state.next)]
            shards: list[pa.Table] = []
            numbered: dict[str, Doc | None] = {}
            for path, fields in self._docs.each(shard_refs + numbered_refs, txn):
                if path not in shard_paths:
                    numbered[path] = fields
                elif fields is not None:  # a shard that would be empty is never written: absent means empty
                    shards.append(codec.decode(fields["blob"], ns, journal=False, where=path))
            stored = _numbered_blobs(numbered, numbered_refs, f"activation {activation!r}: ", state.low)
            stored += self._named_blobs(ref, ns, state.folded, txn)
            return Loaded(shards, [codec.decode(blob, ns, journal=True, where=path) for path, blob in stored])

        loaded: Loaded = self._docs.transact(read, read_only=True, what=f"loading activation {activation!r}")
        return loaded

    def read_live(self, ref: DocumentReference, ns: Namespace, state: NamespaceState) -> LiveJournal:
        """The live journal after ``state``'s folds, as tables, outside a transaction (compaction).

        Compaction runs under the lease, with none of its own appends in flight: nothing can
        be added below what this reads (a stale writer's append fails its fence).
        """
        numbered_refs = [self._collections.journal(ref, ns, seq) for seq in range(state.low, state.next)]
        blobs = _numbered_blobs(self._docs.get_all(numbered_refs), numbered_refs, "", state.low)
        counts: list[int | None] = [None] * len(blobs)
        named = self._named_docs(ref, ns, state.folded, None)
        blobs += [(path, doc["blob"]) for path, doc in named]
        counts += [doc.get("entries") for _, doc in named]
        last = named[-1][0].rsplit("/", 1)[-1] if named else state.folded
        entries = None if None in counts else sum(count for count in counts if count is not None)
        return LiveJournal(ns, blobs, JournalMark(numbered=state.next, named=last), entries)

    def _named_blobs(
        self, ref: DocumentReference, ns: Namespace, folded: str, txn: Transaction | None
    ) -> list[_Stored]:
        """(path, blob) of every named journal document above ``folded``, in id order."""
        return [(path, doc["blob"]) for path, doc in self._named_docs(ref, ns, folded, txn)]

    def _named_docs(
        self, ref: DocumentReference, ns: Namespace, folded: str, txn: Transaction | None
    ) -> list[tuple[str, Doc]]:
        """(path, document) of every named journal document above ``folded``, in id order."""
        collection = self._collections.journal_collection(ref, ns)
        query = _named_range(collection, after=folded or JOURNAL_ID_PREFIX)
        return list(self._docs.query(query, f"reading the live {ns.journal} of {ref.path}", txn))

    def folded_refs(self, ref: DocumentReference, ns: Namespace, after: str, upto: str) -> list[DocumentReference]:
        """Named journal documents in ``(after, upto]``: folded ones, for garbage collection."""
        collection = self._collections.journal_collection(ref, ns)
        query = _named_range(collection, after=after or JOURNAL_ID_PREFIX, upto=upto)
        return self._docs.query_refs(query, f"listing the folded {ns.journal} of {ref.path}")


def _named_range(collection: firestore.CollectionReference, *, after: str, upto: str | None = None) -> Query:
    """Named journal ids in ``(after, upto]`` (``upto`` None: every named id above ``after``), in id order."""
    document_id = FieldPath.document_id()
    query = collection.where(filter=firestore.FieldFilter(document_id, ">", collection.document(after)))
    if upto is None:
        query = query.where(filter=firestore.FieldFilter(document_id, "<", collection.document(JOURNAL_ID_END)))
    else:
        query = query.where(filter=firestore.FieldFilter(document_id, "<=", collection.document(upto)))
    ordered: Query = query.order_by(document_id)
    return ordered


def _numbered_blobs(
    docs: dict[str, Doc | None], refs: list[DocumentReference], context: str, low: int
) -> list[_Stored]:
    """(path, blob) of each numbered journal document; every one of the live range must be there."""
    blobs = []
    for journal_ref in refs:
        entry = docs[journal_ref.path]
        if entry is None:
            raise StateCorruptError(
                f"{context}journal document {journal_ref.path} is missing (live range {low}..{low + len(refs) - 1})"
            )
        blobs.append((journal_ref.path, entry["blob"]))
    return blobs
