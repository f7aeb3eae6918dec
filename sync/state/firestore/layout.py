"""Where the Firestore store keeps what: collections, document names, limits, index exemptions.

Layout (``P`` is the collection prefix, ``cepsync`` by default)::

    P_activations/{activation}            lease (owner, token, expires_at), meta_json,
                                          refusals_gen, and one state map per namespace
                                          ("fp", "intents": :class:`NamespaceState`)
      fp_shards/{gen:06d}-{k:05d}         blob: shard k of generation gen (sync.state.firestore.codec)
      fp_journal/t{token:012d}-{seq:012d} blob: the entries of one commit, deletions included
                                          (or of part of a large one), entries, token, written_at
                                          (``{seq:012d}`` alone: written before release 0.9, read
                                          by their live range ``low <= seq < next``)
      intent_shards/{gen:06d}-{k:05d}     the same two layers for mirror-mode intents
      intent_journal/t{token:012d}-{seq:012d}
      member_shards/, member_journal/     the same for the members of the activation's Batch
      member_intent_shards/,              audience and the ids an audience call may have
      member_intent_journal/              changed ("members", "member_intents"; the audience's
                                          name is the activation document's ``audience_name``)
      refusals/{sha256(custom_id)}        custom_id, payload (decimal text: a u64), field,
                                          reason, gen: a payload Batch refused. One document
                                          per refused profile (they are few: the mapper
                                          refuses what Batch would); only those whose gen
                                          equals the activation's ``refusals_gen`` count, so
                                          a reset forgets them all in its one transaction
    P_runs/{run_id}                       record_json, activation, started_at, trigger_id,
                                          run_key, trigger_key (see :func:`run_key`)
    P_deliveries/{sha256(activation NUL trigger_id)}
                                          activation, trigger_id, attempts, first_at,
                                          last_at, expire_at (a TTL policy deletes it)
    P_deliveries/request-{sha256(trigger_id)}
                                          trigger_id, request_digest, first_at, last_at,
                                          expire_at: the request an HTTP idempotency key
                                          first came with (in this collection for its TTL
                                          policy; the prefix keeps the ids apart)

A record goes to shard ``blake2b-64(custom_id) mod K`` (``K`` a power of two, so growing
``K`` splits every shard into whole shards of the next layout).

No hot document (docs/how-state-is-kept.md, "Firestore"): Firestore sustains about one
write per second per document, and a transaction locks what it reads. A journal document's
id is its writer's lease token plus a sequence number of that writer's process, so
appending needs no shared counter: an append reads the activation document in its
transaction (the fence: the lease must still be the writer's when the append commits) and
writes only its new journal documents. The activation document is written by the lease
(acquire, renewal every third of the TTL, release), by meta saves and by compaction (a few
writes at the start and end of a run), never once per request or flush. Ids sort by token,
then sequence, so the journal reads back in the order it was written: a later run's
entries after an earlier one's, and one run's flushes in order (they are serialised).

Indexing (production): Firestore indexes every field by default. The blob fields are
never queried; indexing them only costs index storage and write latency (and Firestore
only indexes the first 1,500 bytes of a value anyway). Exempt them with single-field index
exemptions, see :data:`INDEX_EXEMPTIONS`. The emulator does not model index limits, so
tests cannot prove this either way.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import pyarrow as pa
from google.cloud.firestore import Client, CollectionReference, DocumentReference

T = TypeVar("T")

# A Firestore document's fields as the client gives and takes them.
Doc = dict[str, Any]

# Firestore hard limits (https://cloud.google.com/firestore/quotas): a document is at most
# 1 MiB (1,048,576 bytes) including its name and field names; an API request (so a
# transaction's commit) at most 10 MiB; a transaction or batch at most 500 writes.
MAX_DOCUMENT_BYTES: Final = 1_048_576
MAX_WRITES_PER_COMMIT: Final = 500
# Bytes of blobs per commit request. Production accepts 10 MiB requests, but the emulator's
# gRPC server refuses messages over 4 MiB (RESOURCE_EXHAUSTED, which the client then
# retries for 60 s): 3.5 MiB works on both, and costs only a few more transactions.
COMMIT_BYTE_BUDGET: Final = 3_500_000
# Bytes reserved in a shard document for its name and non-blob fields.
DOCUMENT_OVERHEAD: Final = 4096
MIN_TARGET_SHARD_BYTES: Final = 1024
MAX_TARGET_SHARD_BYTES: Final = MAX_DOCUMENT_BYTES - DOCUMENT_OVERHEAD - 32 * 1024
# How many shard documents one get_all fetches during compaction: bounds the memory
# holding decoded shards (each up to target_shard_bytes compressed).
SHARD_READ_BATCH: Final = 16
# A single run record is one document; leave room for its other fields.
MAX_RECORD_JSON_BYTES: Final = MAX_DOCUMENT_BYTES - 64 * 1024

# Collection ids and document ids must not contain '/', be '.' or '..', or match __.*__.
PREFIX_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_RESERVED_ID_RE: Final = re.compile(r"__.*__")


def commit_groups(items: Sequence[T], size: Callable[[T], int]) -> list[list[T]]:
    """Items in order, grouped into commits under :data:`COMMIT_BYTE_BUDGET` and the write count limit.

    One write of each commit is kept for the activation document.
    """
    groups: list[list[T]] = []
    group_bytes = 0
    for item in items:
        if not groups or (
            group_bytes + size(item) > COMMIT_BYTE_BUDGET or len(groups[-1]) >= MAX_WRITES_PER_COMMIT - 1
        ):
            groups.append([])
            group_bytes = 0
        groups[-1].append(item)
        group_bytes += size(item)
    return groups


def check_document_id(value: str, what: str) -> None:
    if (
        not value
        or "/" in value
        or value in {".", ".."}
        or _RESERVED_ID_RE.fullmatch(value)
        or len(value.encode("utf-8")) > 1500
    ):
        raise ValueError(
            f"{what} {value!r} cannot be a Firestore document id (no '/', not '.' or '..', "
            "not __…__, at most 1,500 bytes)"
        )


# -- index exemptions (a deployment concern: infra/firestore.tf declares the same list) -----


@dataclass(frozen=True, slots=True)
class IndexExemption:
    """A single-field index exemption the deployment must declare (Terraform ``google_firestore_field``)."""

    collection: str
    field: str
    reason: str


def index_exemptions(prefix: str = "cepsync") -> list[IndexExemption]:
    """The single-field index exemptions this store wants in production, for ``prefix``.

    Subcollection ids (``fp_shards``...) do not depend on the prefix: an exemption on a
    collection id applies to every collection with that id, wherever it is nested.
    """
    blob = "packed state blob, never queried; only its first 1,500 bytes would be indexed"
    return [
        IndexExemption("fp_shards", "blob", blob),
        IndexExemption("fp_journal", "blob", blob),
        IndexExemption("intent_shards", "blob", blob),
        IndexExemption("intent_journal", "blob", blob),
        IndexExemption("member_shards", "blob", blob),
        IndexExemption("member_journal", "blob", blob),
        IndexExemption("member_intent_shards", "blob", blob),
        IndexExemption("member_intent_journal", "blob", blob),
        IndexExemption(f"{prefix}_activations", "meta_json", "meta as JSON, never queried"),
        IndexExemption(f"{prefix}_runs", "record_json", "run record as JSON, never queried"),
    ]


INDEX_EXEMPTIONS: Final = index_exemptions()


# -- packed namespaces ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Namespace:
    """One packed keyspace: fingerprints (with values) or intents (ids only)."""

    key: str  # field of the activation document holding this namespace's state map
    shards: str  # subcollection id
    journal: str  # subcollection id
    with_values: bool


FP: Final = Namespace("fp", "fp_shards", "fp_journal", with_values=True)
INTENTS: Final = Namespace("intents", "intent_shards", "intent_journal", with_values=False)
NAMESPACES: Final = (FP, INTENTS)
# An activation's Batch audience (docs/audiences.md): sets of ids like the intents, compacted by
# the run that keeps the audience (MemberStore.compact_members), emptied by a reset too.
MEMBERS: Final = Namespace("members", "member_shards", "member_journal", with_values=False)
MEMBER_INTENTS: Final = Namespace("member_intents", "member_intent_shards", "member_intent_journal", with_values=False)
AUDIENCE_NAMESPACES: Final = (MEMBERS, MEMBER_INTENTS)


@dataclass(slots=True)
class NamespaceState:
    """The state map of one namespace in the activation document.

    ``gen``/``count``: the live shard generation and its shard count K (0: no shards).
    ``gen_seq``: the highest generation ever allocated (generations are never reused).
    ``folded``: journal documents named ``t…`` up to this id (included) are folded into the
    shards (or forgotten by a reset); the live journal is every ``t…`` id above it.
    ``gc_folded``: ``t…`` journal documents up to this id are deleted too.
    ``low``/``next``: documents of the numbered journal written before ``t…`` ids
    (``low <= seq < next`` are live; nothing writes there any more, so after the first
    compaction ``low == next`` for good).
    ``gc_from``: numbered journal documents ``gc_from <= seq < low`` are folded and not yet deleted.
    ``building``: a generation being written by a compaction (garbage if that one died).
    ``retired``: superseded generations whose shard documents are not yet deleted.
    """

    gen: int = 0
    count: int = 0
    gen_seq: int = 0
    folded: str = ""
    gc_folded: str = ""
    low: int = 0
    next: int = 0
    gc_from: int = 0
    building: dict[str, int] | None = None
    retired: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def from_doc(cls, doc: Doc | None, ns: Namespace) -> NamespaceState:
        raw = (doc or {}).get(ns.key) or {}
        building = raw.get("building")
        return cls(
            gen=int(raw.get("gen", 0)),
            count=int(raw.get("count", 0)),
            gen_seq=int(raw.get("gen_seq", 0)),
            folded=str(raw.get("folded", "")),
            gc_folded=str(raw.get("gc_folded", "")),
            low=int(raw.get("low", 0)),
            next=int(raw.get("next", 0)),
            gc_from=int(raw.get("gc_from", 0)),
            building=None if building is None else {"gen": int(building["gen"]), "count": int(building["count"])},
            retired=[{"gen": int(r["gen"]), "count": int(r["count"])} for r in raw.get("retired") or ()],
        )

    def to_doc(self) -> Doc:
        return {
            "gen": self.gen,
            "count": self.count,
            "gen_seq": self.gen_seq,
            "folded": self.folded,
            "gc_folded": self.gc_folded,
            "low": self.low,
            "next": self.next,
            "gc_from": self.gc_from,
            "building": self.building,
            "retired": list(self.retired),
        }

    @property
    def has_garbage(self) -> bool:
        return bool(self.retired) or self.gc_from < self.low or self.gc_folded < self.folded

    def abandon_build(self) -> None:
        """A generation announced by a compaction that died before its flip never went live: garbage."""
        if self.building is not None:
            self.retired.append(self.building)
            self.building = None

    def mark_folded(self, upto: JournalMark) -> None:
        """The journal up to ``upto`` (see :class:`JournalMark`) is in the shards now."""
        self.low = max(self.low, upto.numbered)
        self.folded = max(self.folded, upto.named)

    def go_live(self, gen: int, count: int, folded_upto: JournalMark) -> None:
        """Make generation ``gen`` of ``count`` shards the live one, with the journal up to ``folded_upto`` in it."""
        if self.count:
            self.retired.append({"gen": self.gen, "count": self.count})
        self.gen, self.count, self.building = gen, count, None
        self.mark_folded(folded_upto)

    def empty(self, lease_token: int) -> None:
        """Retire every shard and forget the whole journal (a reset): the namespace loads empty.

        Every journal document was written under a token up to ``lease_token`` (the
        activation's current one), and every later writer takes a higher token.
        """
        if self.count:
            self.retired.append({"gen": self.gen, "count": self.count})
        self.abandon_build()
        self.count = 0
        self.low = self.next
        self.folded = max(self.folded, token_ceiling(lease_token))


@dataclass(frozen=True, slots=True)
class JournalMark:
    """How far a fold read the journal: numbered documents below ``numbered``, named ids up to ``named``."""

    numbered: int
    named: str


# -- journal document ids -----------------------------------------------------------------------

# Named journal ids start with this letter; numbered (older) ones with a digit, which sorts
# before it, so one range query reads exactly the named ones.
JOURNAL_ID_PREFIX: Final = "t"
# The first id after every named one ("u" follows "t").
JOURNAL_ID_END: Final = "u"


def journal_id(token: int, seq: int) -> str:
    """The id of a journal document written under lease ``token``, ``seq``-th of its writer.

    Fixed-width decimals, so ids sort as (token, seq) pairs do.
    """
    return f"{JOURNAL_ID_PREFIX}{token:012d}-{seq:012d}"


def token_ceiling(token: int) -> str:
    """An id above every journal id of ``token`` and below every id of ``token + 1``."""
    # "~" sorts after "-" and every digit.
    return f"{JOURNAL_ID_PREFIX}{token:012d}~"


def shard_hash(custom_id: str) -> int:
    """The 64-bit hash whose low bits pick an id's shard."""
    # blake2b, not hash(): Python's str hash is salted per process, and the shard of an
    # id must be the same in every function instance, forever.
    return int.from_bytes(hashlib.blake2b(custom_id.encode("utf-8"), digest_size=8).digest(), "big")


def shard_hashes(ids: pa.Array | pa.ChunkedArray) -> pa.UInt64Array:
    """:func:`shard_hash` of every id of a (non-null) string column, as a u64 column.

    Hashed straight from the column's UTF-8 buffer: no Python string per id, so a
    compaction of a million ids holds 8 bytes an id here, not a Python object.
    """
    hashes = array("Q")
    blake2b = hashlib.blake2b
    from_bytes = int.from_bytes
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError("custom_id column holds nulls; a state record always has an id")
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = array("q" if pa.types.is_large_string(chunk.type) else "i")
        offsets.frombytes(memoryview(offsets_buffer)[: (chunk.offset + len(chunk) + 1) * offsets.itemsize])
        data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
        for row in range(chunk.offset, chunk.offset + len(chunk)):
            hashes.append(from_bytes(blake2b(data[offsets[row] : offsets[row + 1]], digest_size=8).digest(), "big"))
    column: pa.UInt64Array = pa.Array.from_buffers(pa.uint64(), len(hashes), [None, pa.py_buffer(hashes)])
    return column


def next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


# -- document references ----------------------------------------------------------------------


class Collections:
    """The store's collections under one prefix, and the names of the documents in them."""

    def __init__(self, client: Client, prefix: str) -> None:
        if not PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"Firestore collection prefix {prefix!r} must match {PREFIX_RE.pattern}")
        self.prefix = prefix
        self.activations: CollectionReference = client.collection(f"{prefix}_activations")
        self.runs: CollectionReference = client.collection(f"{prefix}_runs")
        self.deliveries: CollectionReference = client.collection(f"{prefix}_deliveries")

    def activation(self, activation: str) -> DocumentReference:
        check_document_id(activation, "activation")
        return self.activations.document(activation)

    def run(self, run_id: str) -> DocumentReference:
        return self.runs.document(run_id)

    def delivery(self, activation: str, trigger_id: str) -> DocumentReference:
        # A trigger id may hold '/' or be long: hash the pair into a valid document id.
        return self.deliveries.document(hashlib.sha256(f"{activation}\0{trigger_id}".encode()).hexdigest())

    def trigger_request(self, trigger_id: str) -> DocumentReference:
        # Delivery documents are named by 64 hex digits alone: the prefix cannot meet one.
        return self.deliveries.document("request-" + hashlib.sha256(trigger_id.encode()).hexdigest())

    @staticmethod
    def shard(activation_ref: DocumentReference, ns: Namespace, gen: int, k: int) -> DocumentReference:
        return _subcollection(activation_ref, ns.shards).document(f"{gen:06d}-{k:05d}")

    @staticmethod
    def journal(activation_ref: DocumentReference, ns: Namespace, seq: int) -> DocumentReference:
        """A numbered journal document (written before named ids; only read and deleted now)."""
        return _subcollection(activation_ref, ns.journal).document(f"{seq:012d}")

    @staticmethod
    def journal_named(activation_ref: DocumentReference, ns: Namespace, doc_id: str) -> DocumentReference:
        return _subcollection(activation_ref, ns.journal).document(doc_id)

    @staticmethod
    def journal_collection(activation_ref: DocumentReference, ns: Namespace) -> CollectionReference:
        return _subcollection(activation_ref, ns.journal)

    @staticmethod
    def refusals(activation_ref: DocumentReference) -> CollectionReference:
        return _subcollection(activation_ref, "refusals")

    @staticmethod
    def refusal(activation_ref: DocumentReference, custom_id: str) -> DocumentReference:
        return _subcollection(activation_ref, "refusals").document(hashlib.sha256(custom_id.encode()).hexdigest())


def _subcollection(activation_ref: DocumentReference, collection_id: str) -> CollectionReference:
    collection: CollectionReference = activation_ref.collection(collection_id)  # unannotated in the client
    return collection


def run_key(activation: str, started_at: str, run_id: str) -> str:
    """What ``list_runs`` ranges and orders on: one field, so no composite index to declare.

    An equality filter on ``activation`` plus ``order_by(started_at)`` would need a
    composite index; a range on this key plus an ordering on it is served by the automatic
    single-field index (in the emulator and in production). NUL sorts before every other
    character, so ``[activation NUL, activation \\x01)`` holds exactly one activation's
    keys, in started_at then run_id order.
    """
    return f"{activation}\0{started_at}\0{run_id}"


def trigger_key(activation: str, trigger_id: str) -> str:
    """What ``find_run_by_trigger`` looks a run up by (an equality on one field)."""
    return f"{activation}\0{trigger_id}"
