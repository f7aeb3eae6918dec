"""The member role of the Firestore store: an activation's Batch audience, on the packed machinery.

The members and the ids an audience call may have changed are two more namespaces of ids
(:data:`~sync.state.firestore.layout.MEMBERS`, :data:`~sync.state.firestore.layout.MEMBER_INTENTS`),
kept exactly as the mirror intents are: shards of ``blake2b-64(id) mod K`` under 700 kB, one
journal document per commit named by the writer's lease token (no shared counter, the
activation document only read), folded by the same compaction. Reusing it is safe because a
namespace's shards, journal and state map are its own (separate subcollections, a separate
field of the activation document), its entries are absolute (an id put or cleared), and every
write is fenced by the lease like the fingerprints'. A million members take about a dozen
shards; a call of 10,000 ids appends one journal document (docs/audiences.md, "State").
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud.firestore import Transaction

from sync.model import IntentsNote, Lease
from sync.state.base import Members
from sync.state.firestore import codec
from sync.state.firestore.compaction import Compactor
from sync.state.firestore.documents import Documents
from sync.state.firestore.journal import Journal, _next_seq
from sync.state.firestore.layout import (
    AUDIENCE_NAMESPACES,
    MEMBER_INTENTS,
    MEMBERS,
    Collections,
    Namespace,
    NamespaceState,
    journal_id,
)

# The activation document's field naming the audience the members belong to.
AUDIENCE_FIELD = "audience_name"


def _ids(custom_ids: pa.Array | pa.ChunkedArray, activation: str) -> pa.Array:
    array = custom_ids.combine_chunks() if isinstance(custom_ids, pa.ChunkedArray) else custom_ids
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ValueError(f"activation {activation!r}: member ids must be strings, not {array.type}")
    if array.null_count:
        raise ValueError(f"activation {activation!r}: a member id is null")
    return array.cast(pa.string())


def _entries(ns: Namespace, ids: pa.Array, *, put: bool) -> pa.Table:
    """A journal table of ``ns`` putting (or clearing) ``ids``, built in columns."""
    flags = pc.fill_null(pa.nulls(len(ids), pa.bool_()), put)
    return pa.table([ids, flags], schema=codec.schema(ns, journal=True))


class FirestoreMembers:
    """:class:`sync.state.base.MemberStore` for :class:`~sync.state.firestore.store.FirestoreStateStore`."""

    _docs: Documents
    _collections: Collections
    _journal: Journal
    _compactor: Compactor

    def _load_set(self, activation: str, ns: Namespace) -> pa.Array:
        """A namespace of ids as one array: shard ids not overridden by the journal, plus the journal's puts."""
        loaded = self._journal.load(activation, ns)
        latest = codec.latest_table(ns, loaded.journal)
        touched = latest.column("custom_id")
        parts = [
            table.column("custom_id").filter(pc.invert(pc.is_in(table.column("custom_id"), value_set=touched)))
            for table in loaded.shards
        ]
        parts.append(touched.filter(latest.column("put")))
        chunks = [chunk for part in parts for chunk in (part.chunks if isinstance(part, pa.ChunkedArray) else [part])]
        return pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())

    def load_members(self, activation: str) -> Members:
        """The audience, its acknowledged members and its unconfirmed ids."""
        doc = self._docs.get(self._collections.activation(activation))
        name = (doc or {}).get(AUDIENCE_FIELD)
        return Members(
            name if isinstance(name, str) else None,
            self._load_set(activation, MEMBERS),
            self._load_set(activation, MEMBER_INTENTS),
        )

    def _empty(self, lease: Lease, audience: str | None) -> bool:
        """Empty both namespaces (and name ``audience``) in one fenced transaction, then collect the garbage.

        With ``audience`` given, nothing happens when it is already the named one. Returns
        whether the namespaces were emptied.
        """
        ref = self._collections.activation(lease.activation)

        def body(txn: Transaction) -> bool:
            doc = self._docs.fenced(ref, lease, txn)
            if audience is not None and doc.get(AUDIENCE_FIELD) == audience:
                return False
            # Forget everything written so far, this lease's own appends included: unlike a
            # reset, the lease holder goes on writing under the same token, so the mark is the
            # next id of this process's sequence, not the token's ceiling.
            mark = journal_id(lease.token, _next_seq())
            for ns in AUDIENCE_NAMESPACES:
                state = NamespaceState.from_doc(doc, ns)
                if state.count:
                    state.retired.append({"gen": state.gen, "count": state.count})
                state.abandon_build()
                state.count = 0
                state.low = state.next
                state.folded = max(state.folded, mark)
                doc[ns.key] = state.to_doc()
            if audience is not None:
                doc[AUDIENCE_FIELD] = audience
            self._docs.set(txn, ref, doc)
            return True

        emptied: bool = self._docs.transact(body, what=f"starting the audience of activation {lease.activation!r}")
        if emptied:
            for ns in AUDIENCE_NAMESPACES:
                for _ in self._compactor.collect_garbage(lease.activation, ns):
                    pass
        return emptied

    def start_members(self, lease: Lease, audience: str) -> bool:
        """Name the audience; another audience's members and unconfirmed ids are forgotten (fenced)."""
        previous = (self._docs.get(self._collections.activation(lease.activation)) or {}).get(AUDIENCE_FIELD)
        return self._empty(lease, audience) and previous is not None

    def forget_members(self, lease: Lease) -> None:
        """Forget every member and unconfirmed id (fenced)."""
        self._empty(lease, None)

    def record_member_intents(self, lease: Lease, custom_ids: pa.Array) -> IntentsNote:
        """Note ids an audience call may change: one journal append (fenced); the note names its documents."""
        ids = _ids(custom_ids, lease.activation)
        documents = self._journal.append(lease, MEMBER_INTENTS, _entries(MEMBER_INTENTS, ids, put=True), None)
        return IntentsNote(tuple(ids.to_pylist()), tuple(documents))

    def retire_member_intents(self, lease: Lease, note: IntentsNote) -> None:
        """Delete the note's journal documents while live, else append a clear of its ids (fenced)."""
        if not note.documents or not self._journal.retire(lease, MEMBER_INTENTS, note.documents):
            self.clear_member_intents(lease, pa.array(note.custom_ids, pa.string()))

    def clear_member_intents(self, lease: Lease, custom_ids: pa.Array) -> None:
        """Append a clear of these ids (fenced)."""
        ids = _ids(custom_ids, lease.activation)
        self._journal.append(lease, MEMBER_INTENTS, _entries(MEMBER_INTENTS, ids, put=False), None)

    def commit_members(self, lease: Lease, added: pa.Array, removed: pa.Array) -> None:
        """One journal append of the call's outcome: ``added`` put, ``removed`` cleared (fenced, all or none)."""
        add, drop = _ids(added, lease.activation), _ids(removed, lease.activation)
        table = pa.concat_tables([_entries(MEMBERS, add, put=True), _entries(MEMBERS, drop, put=False)])
        self._journal.append(lease, MEMBERS, table, None)

    def compact_members(self, lease: Lease) -> None:
        """Fold both namespaces' journals into their shards (fenced; crash-safe as every compaction)."""
        for ns in AUDIENCE_NAMESPACES:
            for _ in self._compactor.compact(lease, ns):
                pass
