"""Compaction: folding a namespace's journal into its shards, growing the shard count, garbage collection.

Every shard write is a fenced transaction; the journal is dropped (its low-water mark
advanced) only after every shard is written, so a crash at any point leaves shards +
journal that load to the same state, and the next compaction finishes the job. Growing
``K`` writes a new *generation* of shards and flips the activation document to it in one
transaction, so readers never see a half-resharded layout. Superseded shards and folded
journal documents are deleted afterwards (garbage collection, recorded in the activation
document so a crash never leaks documents).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud.firestore import DocumentReference, Transaction

from sync.errors import FatalError, LeaseLost
from sync.model import Lease
from sync.state.firestore import codec
from sync.state.firestore.documents import Documents
from sync.state.firestore.journal import Journal, LiveJournal
from sync.state.firestore.layout import (
    SHARD_READ_BATCH,
    Collections,
    Doc,
    JournalMark,
    Namespace,
    NamespaceState,
    commit_groups,
    next_power_of_two,
    shard_hashes,
)
from sync.state.fold import FOLD_DUE_ROWS, fold_due

# Journal entries cut by shard at once: compressing a part costs a fixed ~0.2 ms whatever
# its size, so parts of a few hundred entries (one 10,000-entry journal document cut 64
# ways) would spend seconds on it for a million entries.
CUT_ROWS: Final = 65_536


def _batched(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """``tables`` (one schema, in order) regrouped into tables of at least ``rows`` rows, the last one shorter."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        held.append(table)
        count += table.num_rows
        if count >= rows:
            yield pa.concat_tables(held)
            held, count = [], 0
    if held:
        yield pa.concat_tables(held)


def _puts(entries: pa.Table) -> pa.Table:
    """The entries that put a record (all of them, without a copy, in a first sync's journal)."""
    put = entries.column("put")
    if put.null_count == 0 and pc.all(put).as_py() is not False:
        return entries
    kept: pa.Table = entries.filter(put)
    return kept


def _by_shard(records: pa.Table, shard_count: int) -> Iterator[tuple[int, pa.Table]]:
    """``records`` cut by the shard each id belongs to in a layout of ``shard_count`` shards.

    A stable sort of the shard numbers (8 bytes of hash and 8 of index an id), then one
    copy per shard: a shard's records keep their order, and each copy is the size of one
    shard, freed as soon as the caller is done with it.
    """
    if records.num_rows == 0:
        return
    if shard_count == 1:
        yield 0, records
        return
    if records.column(0).num_chunks > 1:
        records = records.combine_chunks()  # take() over many chunks is slow
    shard = pc.bit_wise_and(shard_hashes(records.column("custom_id")), pa.scalar(shard_count - 1, pa.uint64()))
    order = pc.sort_indices(shard)
    start = 0
    for entry in pc.value_counts(shard.take(order)):
        k, rows = entry["values"].as_py(), entry["counts"].as_py()
        yield k, records.take(order.slice(start, rows))
        start += rows


@dataclass(frozen=True, slots=True)
class CompactionStep:
    """Progress of :meth:`FirestoreStateStore.iter_compaction`, yielded after each durable write.

    Attributes:
        namespace: ``"fp"`` (fingerprints) or ``"intents"``.
        kind: ``"shards_written"`` (a fenced batch of shard documents),
            ``"build_started"`` (a new shard generation was announced),
            ``"journal_folded"`` (the live layout now includes the journal; for a
            re-shard this is the flip to the new generation), or
            ``"garbage_collected"`` (superseded documents deleted).
        shard_count: K of the layout being written or made live.
        documents: Documents written or deleted by this step.
    """

    namespace: str
    kind: str
    shard_count: int
    documents: int


@dataclass(frozen=True, slots=True)
class _Fold:
    """One namespace's fold: under whose lease, from which state, which live journal."""

    lease: Lease
    ns: Namespace
    ref: DocumentReference
    state: NamespaceState
    live: LiveJournal

    @property
    def upto(self) -> JournalMark:
        return self.live.upto


class Compactor:
    def __init__(self, docs: Documents, collections: Collections, journal: Journal, target_bytes: int) -> None:
        self._docs = docs
        self._collections = collections
        self._journal = journal
        self._target = target_bytes

    def compact(self, lease: Lease, ns: Namespace, *, when_due: bool = False) -> Iterator[CompactionStep]:
        """Fold the live journal of ``ns`` into its shards, then collect its garbage.

        ``when_due``: only once the journal is worth folding (:meth:`_due`); a journal
        left is applied by every load.
        """
        ref = self._collections.activation(lease.activation)
        state = NamespaceState.from_doc(self._docs.fenced(ref, lease), ns)
        live = self._journal.read_live(ref, ns, state)
        if state.building is not None or (live.documents and (not when_due or self._due(state, live))):
            yield from self._fold(_Fold(lease, ns, ref, state, live))
        yield from self.collect_garbage(lease.activation, ns)

    def _due(self, state: NamespaceState, live: LiveJournal) -> bool:
        """Whether the live journal is worth folding now (:func:`sync.state.fold.fold_due`).

        The shards do not count their fingerprints, so the store passes an estimate: K
        shards filled to half the target on average, at the journal's own compressed bytes
        per entry (both are the same records, packed alike). A first build, and a numbered
        journal an older cepsync wrote, are always due.
        """
        if state.count == 0 or state.low < state.next:
            return True
        # Each journal document says how many entries it holds: nothing is decoded to count
        # them (a document without the count, never written by this version, is decoded).
        rows = live.entries
        if rows is None:
            rows = 0
            for path, blob in live.blobs:
                rows += codec.decode(blob, live.ns, journal=True, where=path).num_rows
                if rows > FOLD_DUE_ROWS:
                    return True
        per_entry = live.compressed_bytes / max(rows, 1)
        stored = int(state.count * self._target / 2 / max(per_entry, 1.0))
        return fold_due(journal_rows=rows, journal_documents=live.documents, stored_rows=stored)

    # -- folding ------------------------------------------------------------------------------

    def _fold(self, fold: _Fold) -> Iterator[CompactionStep]:
        """Fold in columns, one shard at a time (docs/how-state-is-kept.md, "Firestore").

        The journal is cut by shard one decoded document at a time into compressed parts,
        then each shard's parts are folded (each id's last entry) and merged into it, and
        only compressed blobs are kept: a million-profile journal is never held decoded
        whole, nor as a Python object per entry.
        """
        state = fold.state
        if state.count == 0:
            # First compaction (or after a reset): size K on the compressed journal (the
            # shards hold the same records, sorted, so they pack at least as tightly), and
            # double it in the rare case one shard still comes out over the target.
            upto = fold.live.upto
            shard_count = next_power_of_two(-(-fold.live.compressed_bytes * 5 // (self._target * 4)))
            blobs = self._first_shards(fold, shard_count)
            while blobs is None:
                shard_count *= 2
                fold = _Fold(fold.lease, fold.ns, fold.ref, state, self._journal.read_live(fold.ref, fold.ns, state))
                blobs = self._first_shards(fold, shard_count)
            yield from self._publish_generation(fold, blobs, shard_count, upto)
            return

        merged = self._merge(fold)
        largest = max(map(len, merged.values()), default=0)
        if largest > self._target:
            # Grow: split every shard into `factor` shards of the next layout, sized on the
            # largest merged shard seen (the rest hash evenly). Decoded one old shard at a
            # time (only compressed blobs stay in memory).
            factor = max(2, next_power_of_two(-(-largest * 4 // (self._target * 3))))
            sources = [
                functools.partial(self._decode_shard, fold.ns, merged[k], f"merged shard {k}")
                if k in merged
                else functools.partial(self._read_shard, fold.ref, fold.ns, state.gen, k)
                for k in range(state.count)
            ]
            yield from self._build_generation(fold, sources, state.count * factor)
            return
        yield from self._rewrite_in_place(fold, merged)

    def _cut(self, fold: _Fold, shard_count: int) -> dict[int, list[bytes]]:
        """The live journal's entries by shard of a ``shard_count``-shard layout, as compressed parts in write order.

        Consumes the live journal one document at a time, so the compressed journal and
        the compressed parts are, together, about the size of one of them.
        """
        parts: dict[int, list[bytes]] = {}
        for batch in _batched((codec.entries(fold.ns, table) for table in fold.live.consume()), CUT_ROWS):
            for k, entries in _by_shard(batch, shard_count):
                parts.setdefault(k, []).append(codec.encode(entries))
        return parts

    def _folded(self, ns: Namespace, parts: list[bytes]) -> pa.Table:
        """One shard's compressed parts folded to each id's last entry."""
        tables = [codec.decode(blob, ns, journal=True, where="a compaction part") for blob in parts]
        return codec.last_per_id(pa.concat_tables(tables))

    def _first_shards(self, fold: _Fold, shard_count: int) -> dict[int, bytes] | None:
        """The live journal as ``shard_count`` shard blobs, or None if one would exceed the target."""
        blobs: dict[int, bytes] = {}
        parts = self._cut(fold, shard_count)
        for k in sorted(parts):
            records = _puts(self._folded(fold.ns, parts.pop(k)))
            if records.num_rows == 0:
                continue  # a shard that would be empty is never written: absent means empty
            blob = self._fitting_shard(fold.lease.activation, fold.ns, records)
            if blob is None:
                return None
            blobs[k] = blob
        return blobs

    def _merge(self, fold: _Fold) -> dict[int, bytes]:
        """The journal merged into every shard it touches: ``{k: new blob}`` (only compressed results kept)."""
        ns, ref, state = fold.ns, fold.ref, fold.state
        parts = self._cut(fold, state.count)
        merged: dict[int, bytes] = {}
        affected = sorted(parts)
        for start in range(0, len(affected), SHARD_READ_BATCH):
            batch = affected[start : start + SHARD_READ_BATCH]
            shard_refs = {k: self._collections.shard(ref, ns, state.gen, k) for k in batch}
            docs = self._docs.get_all(list(shard_refs.values()))
            for k in batch:
                path = shard_refs[k].path
                current = docs[path]
                entries = self._folded(ns, parts.pop(k))
                stored = codec.schema(ns, journal=False).empty_table()
                if current is not None:
                    stored = self._decode_shard(ns, current["blob"], path)
                # The journal's last word on an id replaces what the shard held: a put is
                # its new record, a deletion leaves nothing.
                replaced = pc.is_in(stored.column("custom_id"), value_set=entries.column("custom_id"))
                puts = codec.shard_table(ns, _puts(entries))
                merged[k] = self._encode_shard(ns, pa.concat_tables([stored.filter(pc.invert(replaced)), puts]))
        return merged

    def _rewrite_in_place(self, fold: _Fold, merged: dict[int, bytes]) -> Iterator[CompactionStep]:
        """Write the merged shards over the live ones, then drop the folded journal."""
        gen, count = fold.state.gen, fold.state.count

        def finish(current: NamespaceState) -> None:
            current.mark_folded(fold.upto)
            current.abandon_build()

        yield from self._write_then_fold(
            fold.lease,
            fold.ns,
            lambda current: current.gen == gen and current.count == count,
            [(self._collections.shard(fold.ref, fold.ns, gen, k), blob) for k, blob in sorted(merged.items())],
            count,
            finish,
        )

    # -- a new generation ---------------------------------------------------------------------

    def _build_generation(
        self, fold: _Fold, sources: Sequence[Callable[[], pa.Table]], shard_count: int
    ) -> Iterator[CompactionStep]:
        """Write a new shard generation of (at least) ``shard_count`` shards from ``sources`` and flip to it.

        ``sources`` are the records of the old layout with the journal already merged.
        """
        blobs = self._split(fold.lease.activation, fold.ns, sources, shard_count)
        while blobs is None:
            shard_count *= 2
            blobs = self._split(fold.lease.activation, fold.ns, sources, shard_count)
        yield from self._publish_generation(fold, blobs, shard_count, fold.upto)

    def _publish_generation(
        self, fold: _Fold, blobs: dict[int, bytes], shard_count: int, upto: JournalMark
    ) -> Iterator[CompactionStep]:
        """Announce a new generation, write its shard ``blobs``, then flip to it with the journal to ``upto`` folded."""
        lease, ns, state = fold.lease, fold.ns, fold.state
        # Announce the generation before writing it, so a compaction that dies half way
        # leaves documents the next one knows to delete.
        new_gen = max(state.gen_seq, state.gen, (state.building or {}).get("gen", 0)) + 1
        announced = {"gen": new_gen, "count": shard_count}

        def announce(current: NamespaceState) -> None:
            current.abandon_build()
            current.gen_seq = max(current.gen_seq, new_gen)
            current.building = dict(announced)

        self._update_state(lease, ns, announce)
        yield CompactionStep(ns.key, "build_started", shard_count, 1)

        def flip(current: NamespaceState) -> None:
            if current.building != announced:
                raise LeaseLost(
                    f"activation {lease.activation!r}: shard generation {new_gen} was superseded during "
                    "compaction; nothing was flipped"
                )
            current.go_live(new_gen, shard_count, upto)

        writes = [(self._collections.shard(fold.ref, ns, new_gen, k), blobs.pop(k)) for k in sorted(blobs)]
        yield from self._write_then_fold(
            lease,
            ns,
            lambda current: current.building == announced,
            writes,
            shard_count,
            flip,
        )

    def _split(
        self,
        activation: str,
        ns: Namespace,
        sources: Sequence[Callable[[], pa.Table]],
        shard_count: int,
    ) -> dict[int, bytes] | None:
        """The sources' records as ``shard_count`` shard blobs, or None if one would exceed the target.

        ``sources[i]`` holds the records of shard ``i`` of a layout of ``len(sources)``
        shards, at most ``shard_count``. Both counts are powers of two, so each source splits
        into whole new shards (or is one, when the counts are equal: no hashing then), and
        sources are encoded one at a time: only compressed blobs are kept.
        """
        blobs: dict[int, bytes] = {}
        for index, source in enumerate(sources):
            records = source()
            if len(sources) == shard_count:
                parts: Iterable[tuple[int, pa.Table]] = [(index, records)] if records.num_rows else []
            else:
                parts = _by_shard(records, shard_count)
            for k, part in parts:
                blob = self._fitting_shard(activation, ns, part)
                if blob is None:
                    return None
                blobs[k] = blob
        return blobs

    def _fitting_shard(self, activation: str, ns: Namespace, records: pa.Table) -> bytes | None:
        """``records`` as a shard blob, or None if it exceeds the target (more shards are needed).

        Raises:
            FatalError: One record alone exceeds the target: no shard count helps.
        """
        blob = self._encode_shard(ns, records)
        if len(blob) <= self._target:
            return blob
        if records.num_rows == 1:
            raise FatalError(
                f"activation {activation!r}: one {ns.key} record packs to {len(blob)} "
                f"bytes, over the {self._target}-byte shard target"
            )
        return None

    def _write_then_fold(
        self,
        lease: Lease,
        ns: Namespace,
        layout: Callable[[NamespaceState], bool],
        writes: list[tuple[DocumentReference, bytes]],
        shard_count: int,
        make_live: Callable[[NamespaceState], None],
    ) -> Iterator[CompactionStep]:
        """Write shard blobs in fenced transactions under the commit limits, then apply ``make_live`` to the state.

        A fenced transaction, not a BulkWriter: BulkWriter writes are neither atomic nor
        conditional, so a stale owner could clobber shards after losing the lease.
        ``layout`` must still hold for the namespace state: a reset while this run's
        lease had expired retires the generation being written, and shards written after
        that would be orphans nobody deletes. ``make_live`` makes the written shards the
        live layout with the journal folded into it.
        """

        def check_layout(current: NamespaceState) -> None:
            if not layout(current):
                raise LeaseLost(
                    f"activation {lease.activation!r}: the {ns.key} shard layout changed during "
                    "compaction (reset while the lease had expired?); nothing more was written"
                )

        written = 0
        for batch in commit_groups(writes, lambda write: len(write[1])):
            self._update_state(
                lease, ns, check_layout, writes=[(ref, {"blob": b, "token": lease.token}) for ref, b in batch]
            )
            written += len(batch)
            yield CompactionStep(ns.key, "shards_written", shard_count, len(batch))
        self._update_state(lease, ns, make_live)
        yield CompactionStep(ns.key, "journal_folded", shard_count, written)

    def _update_state(
        self,
        lease: Lease,
        ns: Namespace,
        change: Callable[[NamespaceState], None],
        writes: Sequence[tuple[DocumentReference, Doc]] = (),
    ) -> None:
        """In one transaction fenced by ``lease``: apply ``change`` to the namespace's state, or write ``writes``.

        With ``writes``, ``change`` only checks the state (raises to write nothing); the
        activation document is not rewritten.
        """
        ref = self._collections.activation(lease.activation)

        def body(txn: Transaction) -> None:
            doc = self._docs.fenced(ref, lease, txn)
            current = NamespaceState.from_doc(doc, ns)
            change(current)
            for write_ref, data in writes:
                self._docs.set(txn, write_ref, data)
            if not writes:
                doc[ns.key] = current.to_doc()
                self._docs.set(txn, ref, doc)

        self._docs.transact(body, what=f"compacting the {ns.key} state of activation {lease.activation!r}")

    # -- shard documents ----------------------------------------------------------------------

    @staticmethod
    def _encode_shard(ns: Namespace, records: pa.Table) -> bytes:
        return codec.encode(codec.shard_table(ns, records))

    @staticmethod
    def _decode_shard(ns: Namespace, blob: bytes, where: str) -> pa.Table:
        return codec.decode(blob, ns, journal=False, where=where)

    def _read_shard(self, ref: DocumentReference, ns: Namespace, gen: int, k: int) -> pa.Table:
        shard_ref = self._collections.shard(ref, ns, gen, k)
        doc = self._docs.get(shard_ref)
        if doc is None:
            return codec.schema(ns, journal=False).empty_table()
        return self._decode_shard(ns, doc["blob"], shard_ref.path)

    # -- garbage ------------------------------------------------------------------------------

    def collect_garbage(self, activation: str, ns: Namespace) -> Iterator[CompactionStep]:
        """Delete retired shard generations and folded journal documents.

        Not fenced: these documents are outside the live layout, nobody reads them, and
        generation numbers and journal ids are never reused, so deleting them is safe
        whoever holds the lease.
        """
        ref = self._collections.activation(activation)
        state = NamespaceState.from_doc(self._docs.get(ref), ns)
        if not state.has_garbage:
            return
        retired = list(state.retired)
        gc_upto = state.low
        folded = state.folded
        refs = [self._collections.shard(ref, ns, r["gen"], k) for r in retired for k in range(r["count"])]
        refs += [self._collections.journal(ref, ns, seq) for seq in range(state.gc_from, gc_upto)]
        if state.gc_folded < folded:
            refs += self._journal.folded_refs(ref, ns, state.gc_folded, folded)
        self._docs.delete_all(refs)

        def forget(txn: Transaction) -> None:
            doc = self._docs.get(ref, txn)
            assert doc is not None
            current = NamespaceState.from_doc(doc, ns)
            current.retired = [r for r in current.retired if r not in retired]
            current.gc_from = max(current.gc_from, gc_upto)
            current.gc_folded = max(current.gc_folded, folded)
            doc[ns.key] = current.to_doc()
            self._docs.set(txn, ref, doc)

        self._docs.transact(forget, what=f"recording the {ns.key} garbage collected for activation {activation!r}")
        yield CompactionStep(ns.key, "garbage_collected", state.count, len(refs))
