"""Firestore state store: production state on GCP (the store is :class:`FirestoreStateStore`).

One module a concern:

* :mod:`.layout`: collections, document names, limits, the state map of a namespace,
  and the index exemptions a deployment declares.
* :mod:`.codec`: the blobs of shard and journal documents (Arrow IPC);
  :mod:`.legacy` reads the format written before it.
* :mod:`.documents`: the client as the store uses it: counted reads and writes,
  transactions rerun on contention, the lease fence.
* :mod:`.journal`: appending a commit's journal documents, loading a namespace.
* :mod:`.compaction`: folding the journal into the shards, growing the shard count,
  garbage collection.
* :mod:`.store`: :class:`FirestoreStateStore`, the public class.
"""

from sync.state.firestore.codec import StateCorruptError
from sync.state.firestore.compaction import CompactionStep
from sync.state.firestore.documents import TRANSACTION_RETRY
from sync.state.firestore.layout import INDEX_EXEMPTIONS, IndexExemption, index_exemptions
from sync.state.firestore.store import FirestoreStateStore

__all__ = [
    "INDEX_EXEMPTIONS",
    "TRANSACTION_RETRY",
    "CompactionStep",
    "FirestoreStateStore",
    "IndexExemption",
    "StateCorruptError",
    "index_exemptions",
]
