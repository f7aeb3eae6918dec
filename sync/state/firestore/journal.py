"""Journal documents: what each commit appends (fenced), and loading a namespace from one snapshot.

A commit is one transaction: read the activation document, check the lease (else
:class:`~sync.errors.LeaseLost`, nothing written), take the next journal sequence numbers
and write the journal documents. Entries are absolute values (a fingerprint, or a
deletion), so applying one twice changes nothing. A commit whose blobs exceed one
transaction's budget (3.5 MB, about 150,000 entries) is split into several fenced
transactions, each of which lands whole or not at all.
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud.firestore import DocumentReference, Transaction

from sync.model import Lease
from sync.state.firestore import codec
from sync.state.firestore.codec import StateCorruptError
from sync.state.firestore.documents import Documents
from sync.state.firestore.layout import Collections, Doc, Namespace, NamespaceState, commit_groups

# One journal blob: (blob, entries in it).
_Blob = tuple[bytes, int]
# A blob as read: (document path, blob).
_Stored = tuple[str, bytes]
# A namespace as loaded: its shard tables and its live journal tables, oldest first.
Loaded = tuple[list[pa.Table], list[pa.Table]]


class Journal:
    def __init__(self, docs: Documents, collections: Collections, target_bytes: int) -> None:
        self._docs = docs
        self._collections = collections
        self._target = target_bytes

    def append(self, lease: Lease, ns: Namespace, table: pa.Table, now: datetime | None) -> None:
        """Write ``table`` (a journal table of ``ns``) as journal documents, in fenced transactions.

        At least one transaction, so that an empty append is fenced too.
        """
        for group in commit_groups(self._blobs(table), lambda blob: len(blob[0])) or [[]]:

            def write(txn: Transaction, group: list[_Blob] = group) -> None:
                ref = self._collections.activation(lease.activation)
                doc = self._docs.fenced(ref, lease, txn)
                if not group:
                    return
                state = NamespaceState.from_doc(doc, ns)
                for blob, count in group:
                    journal_doc: Doc = {"blob": blob, "entries": count, "token": lease.token}
                    if now is not None:
                        journal_doc["written_at"] = now
                    self._docs.set(txn, self._collections.journal(ref, ns, state.next), journal_doc)
                    state.next += 1
                doc[ns.key] = state.to_doc()
                self._docs.set(txn, ref, doc)

            self._docs.transact(write)

    def _blobs(self, table: pa.Table) -> list[_Blob]:
        """The table in blobs each under the target size.

        Cut on an upper bound of the uncompressed size, which bounds the compressed one;
        a blob over the target all the same is cut in two again.
        """
        budget = self._target - codec.BLOB_OVERHEAD_BYTES
        sizes = pc.add(pc.binary_length(table.column("custom_id")), codec.RECORD_FIXED_BYTES).to_pylist()
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
        """The shard tables and the live journal tables in sequence order, from one consistent snapshot."""
        ref = self._collections.activation(activation)

        def read(txn: Transaction) -> tuple[list[_Stored], list[_Stored]]:
            doc = self._docs.get(ref, txn)
            if doc is None:
                return [], []
            state = NamespaceState.from_doc(doc, ns)
            shard_refs = [self._collections.shard(ref, ns, state.gen, k) for k in range(state.count)]
            journal_refs = [self._collections.journal(ref, ns, seq) for seq in range(state.low, state.next)]
            docs = self._docs.get_all(shard_refs + journal_refs, txn)
            shards = []
            for shard_ref in shard_refs:
                shard = docs[shard_ref.path]
                # A shard that would be empty is never written: absent means empty.
                if shard is not None:
                    shards.append((shard_ref.path, shard["blob"]))
            return shards, _journal_blobs(docs, journal_refs, f"activation {activation!r}: ", state.low)

        shards, journal = self._docs.transact(read, read_only=True)
        return (
            [codec.decode(blob, ns, journal=False, where=path) for path, blob in shards],
            [codec.decode(blob, ns, journal=True, where=path) for path, blob in journal],
        )

    def read_live(self, ref: DocumentReference, ns: Namespace, low: int, upto: int) -> list[pa.Table]:
        """Journal documents ``low <= seq < upto`` as tables, outside a transaction (compaction)."""
        refs = [self._collections.journal(ref, ns, seq) for seq in range(low, upto)]
        blobs = _journal_blobs(self._docs.get_all(refs), refs, "", low)
        return [codec.decode(blob, ns, journal=True, where=path) for path, blob in blobs]


def _journal_blobs(docs: dict[str, Doc | None], refs: list[DocumentReference], context: str, low: int) -> list[_Stored]:
    """(path, blob) of each journal document; every one of the live range must be there."""
    blobs = []
    for journal_ref in refs:
        entry = docs[journal_ref.path]
        if entry is None:
            raise StateCorruptError(
                f"{context}journal document {journal_ref.path} is missing (live range {low}..{low + len(refs) - 1})"
            )
        blobs.append((journal_ref.path, entry["blob"]))
    return blobs
