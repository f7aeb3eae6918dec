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

# Parts a first compaction folds the journal in, before it knows how many shards the live
# records need: bounds what one fold sorts to 1/64 of the journal.
FOLD_PARTITIONS: Final = 64


def _sources(parts: list[pa.Table], shard_count: int) -> list[Callable[[], pa.Table]]:
    """Folded parts of a ``len(parts)``-shard layout as the shards of a layout of at most ``shard_count``.

    Both counts are powers of two. With at least as many shards as parts, each part is a
    whole shard of its own layout (split further by :meth:`Compactor._split`); with fewer,
    shard ``k`` is the union of the parts congruent to ``k``.
    """
    if shard_count >= len(parts):
        return [functools.partial(_itself, part) for part in parts]
    return [
        functools.partial(pa.concat_tables, [part for p, part in enumerate(parts) if p & (shard_count - 1) == k])
        for k in range(shard_count)
    ]


def _itself(part: pa.Table) -> pa.Table:
    return part


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

    def compact(self, lease: Lease, ns: Namespace) -> Iterator[CompactionStep]:
        """Fold the live journal of ``ns`` into its shards, then collect its garbage."""
        ref = self._collections.activation(lease.activation)
        state = NamespaceState.from_doc(self._docs.fenced(ref, lease), ns)
        live = self._journal.read_live(ref, ns, state)
        if live.documents or state.building is not None:
            yield from self._fold(_Fold(lease, ns, ref, state, live))
        yield from self.collect_garbage(lease.activation, ns)

    # -- folding ------------------------------------------------------------------------------

    def _fold(self, fold: _Fold) -> Iterator[CompactionStep]:
        """Fold in columns, a shard's worth at a time (docs/how-state-is-kept.md, "Firestore").

        The journal is read as compressed blobs, cut by shard one decoded document at a
        time, then each shard's entries are folded apart: a million ids noted and cleared
        again never become a Python object each, nor one table sorted whole.
        """
        state = fold.state
        if state.count == 0:
            # First compaction (or after a reset): fold in FOLD_PARTITIONS parts, then size
            # K on the uncompressed size of what is live, which bounds the compressed one.
            live = [_puts(part) for part in self._folded_by_shard(fold, FOLD_PARTITIONS)]
            estimate = sum(
                (pc.sum(pc.binary_length(part.column("custom_id"))).as_py() or 0)
                + codec.RECORD_FIXED_BYTES * part.num_rows
                for part in live
            )
            shard_count = next_power_of_two(-(-estimate // self._target))
            yield from self._build_generation(fold, _sources(live, shard_count), shard_count)
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

    def _folded_by_shard(self, fold: _Fold, shard_count: int) -> list[pa.Table]:
        """The live journal folded to each id's last entry, as the parts of a ``shard_count``-shard layout.

        Every id is hashed once. A fingerprint journal is mostly distinct puts: it is cut
        by shard one decoded document at a time (only compressed blobs and the cut entries
        are held), then each shard's entries are folded apart. An intent journal is mostly
        ids noted then cleared again: it is folded whole first (without values, 17 bytes
        an entry), and only what is left is cut by shard.
        """
        ns = fold.ns
        parts = [codec.entries(ns, codec.schema(ns, journal=True).empty_table())] * shard_count
        if not ns.with_values:
            for k, entries in _by_shard(codec.latest_table(ns, fold.live.tables()), shard_count):
                parts[k] = entries
            return parts
        buckets: list[list[pa.Table]] = [[] for _ in range(shard_count)]
        for table in fold.live.tables():
            for k, entries in _by_shard(codec.entries(ns, table), shard_count):
                buckets[k].append(entries)
        for k, bucket in enumerate(buckets):
            if bucket:
                parts[k] = codec.last_per_id(pa.concat_tables(bucket))
        return parts

    def _merge(self, fold: _Fold) -> dict[int, bytes]:
        """The journal merged into every shard it touches: ``{k: new blob}`` (only compressed results kept)."""
        ns, ref, state = fold.ns, fold.ref, fold.state
        groups = {k: part for k, part in enumerate(self._folded_by_shard(fold, state.count)) if part.num_rows}
        merged: dict[int, bytes] = {}
        affected = sorted(groups)
        for start in range(0, len(affected), SHARD_READ_BATCH):
            batch = affected[start : start + SHARD_READ_BATCH]
            shard_refs = {k: self._collections.shard(ref, ns, state.gen, k) for k in batch}
            docs = self._docs.get_all(list(shard_refs.values()))
            for k in batch:
                path = shard_refs[k].path
                current = docs[path]
                entries = groups.pop(k)
                stored = codec.schema(ns, journal=False).empty_table()
                if current is not None:
                    stored = self._decode_shard(ns, current["blob"], path)
                # The journal's last word on an id replaces what the shard held: a put is
                # its new record, a deletion leaves nothing.
                replaced = pc.is_in(stored.column("custom_id"), value_set=entries.column("custom_id"))
                puts = codec.shard_table(ns, entries.filter(entries.column("put")))
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
        """Write a new shard generation of (at least) ``shard_count`` shards and flip to it.

        ``sources`` are the records of the old layout with the journal already merged
        (for a first build, one source: the journal's puts).
        """
        lease, ns, state = fold.lease, fold.ns, fold.state
        blobs = self._split(lease.activation, ns, sources, shard_count)
        while blobs is None:
            shard_count *= 2
            blobs = self._split(lease.activation, ns, sources, shard_count)

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
            current.go_live(new_gen, shard_count, fold.upto)

        yield from self._write_then_fold(
            lease,
            ns,
            lambda current: current.building == announced,
            [(self._collections.shard(fold.ref, ns, new_gen, k), blob) for k, blob in sorted(blobs.items())],
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
                blob = self._encode_shard(ns, part)
                if len(blob) > self._target:
                    if part.num_rows == 1:
                        raise FatalError(
                            f"activation {activation!r}: one {ns.key} record packs to {len(blob)} "
                            f"bytes, over the {self._target}-byte shard target"
                        )
                    return None
                blobs[k] = blob
        return blobs

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
