"""Firestore state store: production state on GCP.

A delta run compares *every* segment row with its stored fingerprint, so one document per
profile would cost one read per profile per run (1M profiles ≈ 1M reads, minutes and real
money). This store packs fingerprints instead:

Layout (``P`` is the collection prefix, ``cepsync`` by default)::

    P_activations/{activation}            lease (owner, token, expires_at), meta_json,
                                          and one state map per namespace ("fp", "intents")
      fp_shards/{gen:06d}-{k:05d}         blob: zlib(packed records), shard k of generation gen
      fp_journal/{seq:012d}               blob: zlib(packed entries incl. deletions), one per
                                          commit (or several for a large one)
      intent_shards/{gen:06d}-{k:05d}     the same two layers for mirror-mode intents
      intent_journal/{seq:012d}
      refusals/{sha256(custom_id)}        custom_id, payload (decimal text: a u64), field,
                                          reason, gen: a payload Batch refused. One document
                                          per refused profile (they are few: the mapper
                                          refuses what Batch would); only those whose gen
                                          equals the activation's ``refusals_gen`` count, so
                                          a reset forgets them all in its one transaction
    P_runs/{run_id}                       record_json, activation, started_at, trigger_id,
                                          run_key, trigger_key (see "Run records" below)
    P_deliveries/{sha256(activation NUL trigger_id)}
                                          activation, trigger_id, attempts, first_at,
                                          last_at, expire_at (a TTL policy deletes it)

A record goes to shard ``blake2b-64(custom_id) mod K`` (``K`` a power of two, so growing
``K`` splits every shard into whole shards of the next layout). Every blob is a columnar
packing (char lengths as u32, the ids as one UTF-8 block, a flag byte per journal entry,
then raw and payload as u64 arrays), so decoding a shard is a handful of C-level calls
plus one slice per id, not one ``struct.unpack`` per record.

Writes:

* :meth:`FirestoreStateStore.commit` is one transaction: read the activation document,
  check the lease (else :class:`~sync.errors.LeaseLost`, nothing written), take the next
  journal sequence numbers and write the journal documents. Journal entries are absolute
  values (a fingerprint, or a deletion), so applying one twice changes nothing.
* :meth:`FirestoreStateStore.compact` folds the journal into the shards. Every shard
  write is a fenced transaction; the journal is dropped (its low-water mark advanced)
  only after every shard is written, so a crash at any point leaves shards + journal
  that load to the same state, and the next compaction finishes the job. Growing ``K``
  writes a new *generation* of shards and flips the activation document to it in one
  transaction, so readers never see a half-resharded layout. Superseded shards and
  folded journal documents are deleted afterwards (garbage collection, recorded in the
  activation document so a crash never leaks documents).

Reads: :meth:`FirestoreStateStore.load_fingerprints` is one read-only transaction
(a consistent snapshot) of ``1 + K + J`` documents: about 65 reads for a million
profiles after compaction.

Indexing (production): Firestore indexes every field by default. The blob fields are
never queried; indexing them only costs index storage and write latency (and Firestore
only indexes the first 1,500 bytes of a value anyway). Exempt them with single-field index
exemptions, see :data:`INDEX_EXEMPTIONS`. The emulator does not model index limits, so
tests cannot prove this either way.

Run records: ``list_runs`` must be "newest first for one activation". An equality filter
on ``activation`` plus ``order_by(started_at)`` would need a composite index; instead
each record carries ``run_key = activation + NUL + started_at + NUL + run_id`` and the
query is a range on that one field plus an ordering on it, which the automatic
single-field index serves (in the emulator and in production, no index to declare).
``find_run_by_trigger`` is an equality on ``trigger_key = activation + NUL + trigger_id``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.cloud import firestore

from sync.errors import FatalError, LeaseHeld, LeaseLost
from sync.model import ActivationMeta, Fingerprint, JournalEntry, Lease, Refusal
from sync.state.base import DELIVERY_RETENTION, fold_journal

# Firestore hard limits (https://cloud.google.com/firestore/quotas): a document is at most
# 1 MiB (1,048,576 bytes) including its name and field names; an API request (so a
# transaction's commit) at most 10 MiB; a transaction or batch at most 500 writes.
_MAX_DOCUMENT_BYTES: Final = 1_048_576
_MAX_WRITES_PER_COMMIT: Final = 500
# Bytes of blobs per commit request. Production accepts 10 MiB requests, but the emulator's
# gRPC server refuses messages over 4 MiB (RESOURCE_EXHAUSTED, which the client then
# retries for 60 s): 3.5 MiB works on both, and costs only a few more transactions.
_COMMIT_BYTE_BUDGET: Final = 3_500_000
# Bytes reserved in a shard document for its name and non-blob fields.
_DOCUMENT_OVERHEAD: Final = 4096
_MIN_TARGET_SHARD_BYTES: Final = 1024
_MAX_TARGET_SHARD_BYTES: Final = _MAX_DOCUMENT_BYTES - _DOCUMENT_OVERHEAD - 32 * 1024
# How many shard documents one get_all fetches during compaction: bounds the memory
# holding decoded shards (each up to target_shard_bytes compressed).
_SHARD_READ_BATCH: Final = 16
# A single run record is one document; leave room for its other fields.
_MAX_RECORD_JSON_BYTES: Final = _MAX_DOCUMENT_BYTES - 64 * 1024


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

# zlib level 1: fingerprints are random 64-bit values that no level compresses; on a
# million "user-NNNNNNN" records level 6 saved 3 % of the bytes for 35 % more encode time.
_ZLIB_LEVEL: Final = 1

_U64_LIMIT: Final = 1 << 64
# Collection ids and document ids must not contain '/', be '.' or '..', or match __.*__.
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_RESERVED_ID_RE: Final = re.compile(r"__.*__")

# Blob layout: header, u32 char lengths, UTF-8 ids, [u8 flags], [u64 raw, u64 payload].
_HEADER: Final = struct.Struct("<4sII")  # magic, record count, byte length of the id block
_ENTRY_FIXED_BYTES: Final = 4 + 1 + 8 + 8  # length, flag, raw, payload (upper bound per record)


class StateCorruptError(FatalError):
    """A state document cannot be decoded (written by an unknown version, or damaged)."""


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
        IndexExemption(f"{prefix}_activations", "meta_json", "meta as JSON, never queried"),
        IndexExemption(f"{prefix}_runs", "record_json", "run record as JSON, never queried"),
    ]


INDEX_EXEMPTIONS: Final = index_exemptions()


@dataclass(frozen=True, slots=True)
class _Namespace:
    """One packed keyspace: fingerprints (with values) or intents (ids only)."""

    key: str  # field of the activation document holding this namespace's state map
    shards: str  # subcollection id
    journal: str  # subcollection id
    with_values: bool
    shard_magic: bytes
    journal_magic: bytes


_FP: Final = _Namespace("fp", "fp_shards", "fp_journal", True, b"CFS1", b"CFJ1")
_INTENTS: Final = _Namespace("intents", "intent_shards", "intent_journal", False, b"CIS1", b"CIJ1")
_NAMESPACES: Final = (_FP, _INTENTS)


@dataclass(slots=True)
class _Columns:
    """Decoded records of one blob. ``flags`` is 1 (put) / 0 (remove) per journal entry."""

    ids: list[str]
    flags: bytes | None
    raws: list[int]
    payloads: list[int]


def _u32_array(values: Iterable[int]) -> array[int]:
    packed = array("I", values)
    if packed.itemsize != 4:  # pragma: no cover - every CPython platform we deploy on has 4-byte "I"
        raise RuntimeError("array('I') is not 32-bit on this platform")
    return packed


def _encode(
    magic: bytes, ids: Sequence[str], flags: bytes | None, raws: Sequence[int], payloads: Sequence[int]
) -> bytes:
    """Pack and compress records. Lengths are in code points, so decoding slices one str."""
    lengths = _u32_array(map(len, ids))
    id_block = "".join(ids).encode("utf-8")
    parts = [_HEADER.pack(magic, len(ids), len(id_block)), b"", id_block]
    values = b""
    if raws or payloads:
        raw_array = array("Q", raws)
        payload_array = array("Q", payloads)
        if sys.byteorder == "big":  # pragma: no cover - stored little-endian everywhere
            raw_array.byteswap()
            payload_array.byteswap()
        values = raw_array.tobytes() + payload_array.tobytes()
    if sys.byteorder == "big":  # pragma: no cover
        lengths.byteswap()
    parts[1] = lengths.tobytes()
    if flags is not None:
        parts.append(flags)
    parts.append(values)
    return zlib.compress(b"".join(parts), _ZLIB_LEVEL)


def _unpack(blob: bytes, magic: bytes, *, with_flags: bool, with_values: bool, where: str) -> tuple[bytes, int, int]:
    """The decompressed body of a blob, its record count and its id block's byte length (checked)."""
    try:
        body = zlib.decompress(blob)
        found, count, id_bytes = _HEADER.unpack_from(body, 0)
    except (zlib.error, struct.error) as exc:
        raise StateCorruptError(f"{where}: state blob cannot be decoded ({exc})") from exc
    if found != magic:
        raise StateCorruptError(f"{where}: state blob has format {found!r}, expected {magic!r}")
    expected = _HEADER.size + 4 * count + id_bytes + (count if with_flags else 0) + (16 * count if with_values else 0)
    if len(body) != expected:
        raise StateCorruptError(f"{where}: state blob is {len(body)} bytes, expected {expected}")
    return body, count, id_bytes


def _decode(blob: bytes, magic: bytes, *, with_flags: bool, with_values: bool, where: str) -> _Columns:
    body, count, id_bytes = _unpack(blob, magic, with_flags=with_flags, with_values=with_values, where=where)
    offset = _HEADER.size
    lengths = array("I")
    lengths.frombytes(body[offset : offset + 4 * count])
    offset += 4 * count
    text = body[offset : offset + id_bytes].decode("utf-8")
    offset += id_bytes
    flags: bytes | None = None
    if with_flags:
        flags = body[offset : offset + count]
        offset += count
    raws: list[int] = []
    payloads: list[int] = []
    if with_values:
        raw_array = array("Q")
        raw_array.frombytes(body[offset : offset + 8 * count])
        offset += 8 * count
        payload_array = array("Q")
        payload_array.frombytes(body[offset : offset + 8 * count])
        if sys.byteorder == "big":  # pragma: no cover
            raw_array.byteswap()
            payload_array.byteswap()
        raws = raw_array.tolist()
        payloads = payload_array.tolist()
    if sys.byteorder == "big":  # pragma: no cover
        lengths.byteswap()
    ends = list(itertools.accumulate(lengths))
    starts = [0, *ends[:-1]] if ends else []
    ids = [text[a:b] for a, b in zip(starts, ends, strict=True)]
    return _Columns(ids, flags, raws, payloads)


def _decode_table(blob: bytes, magic: bytes, *, with_flags: bool, where: str) -> pa.Table:
    """A fingerprint blob as Arrow arrays over its own bytes (plus ``put`` for a journal blob)."""
    body, count, id_bytes = _unpack(blob, magic, with_flags=with_flags, with_values=True, where=where)
    if sys.byteorder == "big":  # pragma: no cover - blobs are little-endian; decode the slow way
        columns = _decode(blob, magic, with_flags=with_flags, with_values=True, where=where)
        arrays = [pa.array(columns.ids, pa.string()), pa.array(columns.raws, pa.uint64())]
        arrays.append(pa.array(columns.payloads, pa.uint64()))
        if with_flags:
            assert columns.flags is not None
            arrays.append(pa.array([bool(flag) for flag in columns.flags], pa.bool_()))
        return pa.table(arrays, names=["custom_id", "raw", "payload", "put"][: len(arrays)])
    buffer = pa.py_buffer(body)
    offset = _HEADER.size
    lengths = pa.Array.from_buffers(pa.uint32(), count, [None, buffer.slice(offset, 4 * count)])
    offset += 4 * count
    id_block = buffer.slice(offset, id_bytes)
    offset += id_bytes
    if count and pc.sum(lengths).as_py() == id_bytes:
        # Lengths are in code points; when they add up to the byte count every id is ASCII,
        # so they are byte lengths too and become Arrow offsets as they are.
        ends = pc.cumulative_sum(lengths.cast(pa.int64())).cast(pa.int32())
        offsets = pa.concat_arrays([pa.array([0], pa.int32()), ends])
        ids: pa.Array = pa.Array.from_buffers(pa.string(), count, [None, offsets.buffers()[1], id_block])
    else:
        text = id_block.to_pybytes().decode("utf-8")
        bounds = list(itertools.accumulate(lengths.to_pylist()))
        ids = pa.array([text[a:b] for a, b in zip([0, *bounds[:-1]], bounds, strict=True)], pa.string())
    arrays = [ids]
    put: pa.Array | None = None
    if with_flags:
        put = pa.Array.from_buffers(pa.uint8(), count, [None, buffer.slice(offset, count)]).cast(pa.bool_())
        offset += count
    arrays.append(pa.Array.from_buffers(pa.uint64(), count, [None, buffer.slice(offset, 8 * count)]))
    offset += 8 * count
    arrays.append(pa.Array.from_buffers(pa.uint64(), count, [None, buffer.slice(offset, 8 * count)]))
    names = ["custom_id", "raw", "payload"]
    if put is not None:
        arrays.append(put)
        names.append("put")
    return pa.table(arrays, names=names)


def _hash64(custom_id: str) -> int:
    # blake2b, not hash(): Python's str hash is salted per process, and the shard of an
    # id must be the same in every function instance, forever.
    return int.from_bytes(hashlib.blake2b(custom_id.encode("utf-8"), digest_size=8).digest(), "big")


def _next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def _check_u64(value: int, activation: str, custom_id: str, name: str) -> None:
    # bool is an int subclass; a bool here is a caller bug, not a hash.
    if type(value) is not int or not 0 <= value < _U64_LIMIT:
        raise ValueError(
            f"activation {activation!r}, custom_id {custom_id!r}: fingerprint {name} must be an "
            f"unsigned 64-bit int (0 … 2**64-1), got {value!r}"
        )


def _check_ids_encodable(activation: str, custom_ids: Iterable[str]) -> None:
    for custom_id in custom_ids:
        if not isinstance(custom_id, str):
            raise ValueError(f"activation {activation!r}: custom_id must be a str, got {custom_id!r}")
        try:
            custom_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"activation {activation!r}: custom_id {custom_id!r} is not valid UTF-8") from exc


def _require_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {moment.isoformat()}")


def _check_document_id(value: str, what: str) -> None:
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


@dataclass(slots=True)
class _NsState:
    """The state map of one namespace in the activation document.

    ``gen``/``count``: the live shard generation and its shard count K (0: no shards).
    ``gen_seq``: the highest generation ever allocated (generations are never reused).
    ``low``/``next``: live journal documents are ``low <= seq < next``.
    ``gc_from``: journal documents ``gc_from <= seq < low`` are folded and not yet deleted.
    ``building``: a generation being written by a compaction (garbage if that one died).
    ``retired``: superseded generations whose shard documents are not yet deleted.
    """

    gen: int = 0
    count: int = 0
    gen_seq: int = 0
    low: int = 0
    next: int = 0
    gc_from: int = 0
    building: dict[str, int] | None = None
    retired: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None, ns: _Namespace) -> _NsState:
        raw = (doc or {}).get(ns.key) or {}
        building = raw.get("building")
        return cls(
            gen=int(raw.get("gen", 0)),
            count=int(raw.get("count", 0)),
            gen_seq=int(raw.get("gen_seq", 0)),
            low=int(raw.get("low", 0)),
            next=int(raw.get("next", 0)),
            gc_from=int(raw.get("gc_from", 0)),
            building=None if building is None else {"gen": int(building["gen"]), "count": int(building["count"])},
            retired=[{"gen": int(r["gen"]), "count": int(r["count"])} for r in raw.get("retired") or ()],
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "gen": self.gen,
            "count": self.count,
            "gen_seq": self.gen_seq,
            "low": self.low,
            "next": self.next,
            "gc_from": self.gc_from,
            "building": self.building,
            "retired": list(self.retired),
        }

    @property
    def has_garbage(self) -> bool:
        return bool(self.retired) or self.gc_from < self.low


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


class FirestoreStateStore:
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
    ) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"Firestore collection prefix {prefix!r} must match {_PREFIX_RE.pattern}")
        if not _MIN_TARGET_SHARD_BYTES <= target_shard_bytes <= _MAX_TARGET_SHARD_BYTES:
            raise ValueError(
                f"target_shard_bytes must be between {_MIN_TARGET_SHARD_BYTES} and "
                f"{_MAX_TARGET_SHARD_BYTES} (Firestore documents are at most 1 MiB), got {target_shard_bytes}"
            )
        self._client = client
        self._prefix = prefix
        self._target = target_shard_bytes
        self._close_client = close_client
        self._activations = client.collection(f"{prefix}_activations")
        self._runs = client.collection(f"{prefix}_runs")
        self._deliveries = client.collection(f"{prefix}_deliveries")
        self._lock = threading.Lock()
        self._ops: dict[str, int] = {"reads": 0, "writes": 0, "deletes": 0, "transactions": 0}

    # -- counters -----------------------------------------------------------------------------

    def op_counts(self) -> dict[str, int]:
        """Document ``reads``, ``writes`` and ``deletes`` issued by this store, and ``transactions``.

        Counted as Firestore bills them: one read per document fetched or requested by
        id (a missing document requested by id still costs one read), at least one read
        per query, one write per document set, one delete per document deleted. A
        transaction retried after contention counts every attempt.
        """
        with self._lock:
            return dict(self._ops)

    def _count(self, *, reads: int = 0, writes: int = 0, deletes: int = 0, transactions: int = 0) -> None:
        with self._lock:
            self._ops["reads"] += reads
            self._ops["writes"] += writes
            self._ops["deletes"] += deletes
            self._ops["transactions"] += transactions

    # -- references ---------------------------------------------------------------------------

    def _activation_ref(self, activation: str) -> Any:
        _check_document_id(activation, "activation")
        return self._activations.document(activation)

    @staticmethod
    def _shard_ref(activation_ref: Any, ns: _Namespace, gen: int, k: int) -> Any:
        return activation_ref.collection(ns.shards).document(f"{gen:06d}-{k:05d}")

    @staticmethod
    def _journal_ref(activation_ref: Any, ns: _Namespace, seq: int) -> Any:
        return activation_ref.collection(ns.journal).document(f"{seq:012d}")

    # -- low-level reads and transactions -----------------------------------------------------

    def _get(self, ref: Any, transaction: Any = None) -> dict[str, Any] | None:
        snapshot = ref.get(transaction=transaction)
        self._count(reads=1)
        return snapshot.to_dict() if snapshot.exists else None

    def _get_all(self, refs: Sequence[Any], transaction: Any = None) -> dict[str, dict[str, Any] | None]:
        """Fetch documents by reference in one round trip; keyed by document path.

        get_all streams results in no particular order, hence the mapping by path.
        """
        if not refs:
            return {}
        found: dict[str, dict[str, Any] | None] = {ref.path: None for ref in refs}
        for snapshot in self._client.get_all(list(refs), transaction=transaction):
            if snapshot.exists:
                found[snapshot.reference.path] = snapshot.to_dict()
        self._count(reads=len(refs))
        return found

    def _run_transaction(self, body: Callable[[Any], Any], *, read_only: bool = False) -> Any:
        """Run ``body`` in a transaction; rerun it whole while Firestore reports contention.

        The client retries a commit that was aborted 5 times with no pause, and does not retry
        an abort raised by a read inside the body. Under real contention (several deliveries
        of one Pub/Sub message counting themselves at once) both happen, so the whole
        transaction is rerun with jittered exponential backoff (:data:`TRANSACTION_RETRY`).
        Every body only reads, decides and writes inside its transaction, so a rerun is safe.
        """
        return TRANSACTION_RETRY(self._attempt_transaction)(body, read_only)

    def _attempt_transaction(self, body: Callable[[Any], Any], read_only: bool) -> Any:
        transaction = self._client.transaction(read_only=read_only)

        def counted(txn: Any) -> Any:
            self._count(transactions=1)
            return body(txn)

        try:
            return firestore.transactional(counted)(transaction)
        except ValueError as exc:
            # google-cloud-firestore rolls back when the body raises; if the transaction
            # had not begun yet (a KeyboardInterrupt during BeginTransaction), the rollback
            # itself raises ValueError("...cannot be rolled back") and hides the original.
            # Retries exhausted is also a ValueError, but raised *from* the last Aborted.
            original = exc.__context__
            if exc.__cause__ is None and original is not None and original is not exc:
                raise original from None
            raise

    def _fenced_doc(self, txn: Any, lease: Lease) -> tuple[Any, dict[str, Any]]:
        """Read the activation document inside ``txn`` and check ``lease`` is still current."""
        ref = self._activation_ref(lease.activation)
        doc = self._get(ref, txn)
        _check_lease(doc, lease)
        assert doc is not None  # _check_lease raised otherwise
        return ref, doc

    def _write_doc(self, txn: Any, ref: Any, doc: dict[str, Any]) -> None:
        txn.set(ref, doc)
        self._count(writes=1)

    # -- lease --------------------------------------------------------------------------------

    def acquire_lease(self, activation: str, owner: str, ttl_seconds: float, now: datetime) -> Lease:
        """Take the activation's lease, or raise LeaseHeld if another owner holds an unexpired one.

        A lease is held while ``now < expires_at``. Every acquisition (new, expired,
        released, or re-acquired by the same owner) increments the fencing token, which
        never goes backwards: releases and :meth:`reset` keep the counter.

        Raises:
            LeaseHeld: Another owner holds an unexpired lease.
            ValueError: ``ttl_seconds`` is not positive, or ``now`` is naive.
        """
        if not ttl_seconds > 0:
            raise ValueError(f"activation {activation!r}: lease ttl_seconds must be > 0, got {ttl_seconds!r}")
        _require_aware(now, "now")
        expires_at = now + timedelta(seconds=ttl_seconds)
        ref = self._activation_ref(activation)

        def body(txn: Any) -> int:
            doc = self._get(ref, txn) or {}
            held_by = doc.get("lease_owner")
            held_until = doc.get("lease_expires_at")
            if held_until is not None and now < held_until and held_by != owner:
                raise LeaseHeld(
                    f"activation {activation!r}: lease held by owner {held_by!r} "
                    f"until {held_until.isoformat()} (token {doc.get('lease_token')})"
                )
            token = int(doc.get("lease_token", 0)) + 1
            doc.update(lease_owner=owner, lease_token=token, lease_expires_at=expires_at)
            self._write_doc(txn, ref, doc)
            return token

        token = self._run_transaction(body)
        return Lease(activation=activation, owner=owner, token=token, expires_at=expires_at)

    def renew_lease(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        """Extend our lease to ``now + ttl_seconds``, keeping its token.

        Raises:
            LeaseLost: The lease was taken over or released.
            ValueError: ``ttl_seconds`` is not positive, or ``now`` is naive.
        """
        if not ttl_seconds > 0:
            raise ValueError(f"activation {lease.activation!r}: lease ttl_seconds must be > 0, got {ttl_seconds!r}")
        _require_aware(now, "now")
        expires_at = now + timedelta(seconds=ttl_seconds)

        def body(txn: Any) -> None:
            ref, doc = self._fenced_doc(txn, lease)
            doc["lease_expires_at"] = expires_at
            self._write_doc(txn, ref, doc)

        self._run_transaction(body)
        return Lease(activation=lease.activation, owner=lease.owner, token=lease.token, expires_at=expires_at)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up so the next run need not wait for expiry (no-op if not ours).

        The token counter stays: only the expiry is cleared.
        """
        ref = self._activation_ref(lease.activation)

        def body(txn: Any) -> None:
            doc = self._get(ref, txn)
            if (
                doc is None
                or doc.get("lease_token") != lease.token
                or doc.get("lease_owner") != lease.owner
                or doc.get("lease_expires_at") is None
            ):
                return
            doc["lease_expires_at"] = None
            self._write_doc(txn, ref, doc)

        self._run_transaction(body)

    # -- fingerprints -------------------------------------------------------------------------

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        """Every committed fingerprint of the activation (shards plus the live journal)."""
        result: dict[str, Fingerprint] = {}
        for columns, is_journal in self._load_namespace(activation, _FP):
            if not is_journal:
                result.update(zip(columns.ids, map(Fingerprint, columns.raws, columns.payloads), strict=True))
                continue
            assert columns.flags is not None
            for custom_id, flag, raw, payload in zip(
                columns.ids, columns.flags, columns.raws, columns.payloads, strict=True
            ):
                if flag:
                    result[custom_id] = Fingerprint(raw, payload)
                else:
                    result.pop(custom_id, None)
        return result

    def load_fingerprint_table(self, activation: str) -> pa.Table:
        """Every committed fingerprint as an Arrow table (``sync.state.base.FINGERPRINT_SCHEMA``).

        Each blob is turned into Arrow arrays over its own bytes (ids as one UTF-8 block plus
        offsets, the two u64 columns as they are stored): no Python object per profile. The
        live journal is folded in columns (:func:`sync.state.base.fold_journal`).
        """
        base: list[pa.Table] = []
        journal: list[pa.Table] = []
        for path, blob, is_journal in self._load_blobs(activation, _FP):
            magic = _FP.journal_magic if is_journal else _FP.shard_magic
            table = _decode_table(blob, magic, with_flags=is_journal, where=path)
            (journal if is_journal else base).append(table)
        return fold_journal(base, journal)

    def commit(self, lease: Lease, entries: Sequence[JournalEntry], now: datetime) -> None:
        """Durably apply acknowledged outcomes as journal documents (fenced).

        Entries with a fingerprint upsert it; entries with ``fingerprint=None`` delete it.
        If one custom_id appears more than once, the last entry wins. The journal
        documents are written in one transaction that checks the lease; a commit whose
        packed journal exceeds one transaction's budget (3.5 MB compressed, about
        150,000 entries) is split into several fenced transactions,
        each of which lands whole or not at all.

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing (more) is written.
            ValueError: A fingerprint is not an unsigned 64-bit int, or a custom_id is not
                valid text; nothing is written.
        """
        _require_aware(now, "now")
        latest: dict[str, Fingerprint | None] = {}
        for entry in entries:
            latest[entry.custom_id] = entry.fingerprint
        activation = lease.activation
        _check_ids_encodable(activation, latest)
        puts: dict[str, tuple[int, int] | None] = {}
        for custom_id, fingerprint in latest.items():
            if fingerprint is None:
                puts[custom_id] = None
            else:
                _check_u64(fingerprint.raw, activation, custom_id, "raw")
                _check_u64(fingerprint.payload, activation, custom_id, "payload")
                puts[custom_id] = (fingerprint.raw, fingerprint.payload)
        self._append_journal(lease, _FP, puts, now)

    def compact(self, lease: Lease, now: datetime) -> None:
        """Fold the journals (fingerprints and intents) into the shards (fenced).

        Idempotent and crash-safe: see :meth:`iter_compaction`.

        Raises:
            LeaseLost: ``lease`` is no longer current. What was written before is harmless.
        """
        for _ in self.iter_compaction(lease, now):
            pass

    def iter_compaction(self, lease: Lease, now: datetime) -> Generator[CompactionStep, None, None]:
        """Compact step by step, yielding after each durable write.

        Stopping the iteration at any point (a time budget running out, a crash) leaves
        a state that loads exactly as before, and the next compaction completes the
        work: journal entries are absolute values, shards are rewritten whole in fenced
        transactions, and the journal is dropped only once every shard holding its
        entries is written.

        Raises:
            LeaseLost: ``lease`` is no longer current.
        """
        _require_aware(now, "now")
        for ns in _NAMESPACES:
            yield from self._compact_namespace(lease, ns)

    # -- mirror intents -----------------------------------------------------------------------

    def record_intents(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Durably note ids this activation may be about to create (fenced; idempotent).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
        """
        ids = list(dict.fromkeys(custom_ids))
        _check_ids_encodable(lease.activation, ids)
        self._append_journal(lease, _INTENTS, dict.fromkeys(ids, (0, 0)), None)

    def load_intents(self, activation: str) -> set[str]:
        """Ids noted as possibly synced and not yet cleared."""
        intents: set[str] = set()
        for columns, is_journal in self._load_namespace(activation, _INTENTS):
            if not is_journal:
                intents.update(columns.ids)
                continue
            assert columns.flags is not None
            for custom_id, flag in zip(columns.ids, columns.flags, strict=True):
                if flag:
                    intents.add(custom_id)
                else:
                    intents.discard(custom_id)
        return intents

    def clear_intents(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget intents for ids cleared in Batch (fenced; unknown ids are ignored).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
        """
        ids = list(dict.fromkeys(custom_ids))
        _check_ids_encodable(lease.activation, ids)
        self._append_journal(lease, _INTENTS, dict.fromkeys(ids), None)

    # -- payloads Batch refused -----------------------------------------------------------------

    @staticmethod
    def _refusal_ref(activation_ref: Any, custom_id: str) -> Any:
        return activation_ref.collection("refusals").document(hashlib.sha256(custom_id.encode()).hexdigest())

    def _fenced_refusal_writes(self, lease: Lease, custom_ids: Sequence[str], write: Callable[..., None]) -> None:
        """Apply ``write(txn, ref, custom_id, gen)`` to ids in fenced transactions of bounded size."""
        ids = list(dict.fromkeys(custom_ids))
        _check_ids_encodable(lease.activation, ids)
        start = 0
        while True:  # at least one transaction, so an empty call is fenced too
            chunk = ids[start : start + _MAX_WRITES_PER_COMMIT - 100]

            def body(txn: Any, chunk: list[str] = chunk) -> None:
                ref, doc = self._fenced_doc(txn, lease)
                gen = int(doc.get("refusals_gen", 0))
                for custom_id in chunk:
                    write(txn, self._refusal_ref(ref, custom_id), custom_id, gen)

            self._run_transaction(body)
            start += len(chunk)
            if start >= len(ids):
                return

    def record_refusals(self, lease: Lease, refusals: Sequence[Refusal]) -> None:
        """Remember payloads Batch refused, one per id, a newer one replacing it (fenced).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing more is written.
        """
        by_id = {refusal.custom_id: refusal for refusal in refusals}
        for refusal in by_id.values():
            _check_u64(refusal.payload, lease.activation, refusal.custom_id, "payload")

        def write(txn: Any, ref: Any, custom_id: str, gen: int) -> None:
            refusal = by_id[custom_id]
            txn.set(
                ref,
                {
                    "custom_id": custom_id,
                    "payload": str(refusal.payload),
                    "field": refusal.field,
                    "reason": refusal.reason,
                    "gen": gen,
                },
            )
            self._count(writes=1)

        self._fenced_refusal_writes(lease, list(by_id), write)

    def load_refusals(self, activation: str) -> dict[str, Refusal]:
        """Every remembered refusal of the activation, by custom_id (one read per refusal)."""
        ref = self._activation_ref(activation)
        doc = self._get(ref)
        if doc is None:
            return {}
        gen = int(doc.get("refusals_gen", 0))
        refusals: dict[str, Refusal] = {}
        for snapshot in ref.collection("refusals").stream():
            self._count(reads=1)
            data = snapshot.to_dict() or {}
            if data.get("gen") != gen:
                continue  # forgotten by a reset, not yet deleted
            custom_id = str(data["custom_id"])
            refusals[custom_id] = Refusal(custom_id, int(data["payload"]), str(data["field"]), str(data["reason"]))
        return refusals

    def clear_refusals(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        """Forget the refusals of these ids (fenced; unknown ids are ignored).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing more is deleted.
        """

        def delete(txn: Any, ref: Any, custom_id: str, gen: int) -> None:
            txn.delete(ref)
            self._count(deletes=1)

        self._fenced_refusal_writes(lease, list(custom_ids), delete)

    def _delete_forgotten_refusals(self, activation: str) -> None:
        """After a reset: delete refusal documents of older generations (best effort)."""
        ref = self._activation_ref(activation)
        doc = self._get(ref) or {}
        gen = int(doc.get("refusals_gen", 0))
        batch = self._client.batch()
        pending = 0
        for snapshot in ref.collection("refusals").stream():
            self._count(reads=1)
            if (snapshot.to_dict() or {}).get("gen") != gen:
                batch.delete(snapshot.reference)
                pending += 1
                if pending == _MAX_WRITES_PER_COMMIT:
                    batch.commit()
                    self._count(deletes=pending)
                    batch, pending = self._client.batch(), 0
        if pending:
            batch.commit()
            self._count(deletes=pending)

    # -- per-activation meta ------------------------------------------------------------------

    def load_meta(self, activation: str) -> ActivationMeta:
        """The activation's meta, or a fresh :class:`ActivationMeta`."""
        doc = self._get(self._activation_ref(activation))
        body = (doc or {}).get("meta_json")
        return ActivationMeta() if body is None else ActivationMeta.from_json(body)

    def save_meta(self, lease: Lease, meta: ActivationMeta) -> None:
        """Replace the activation's meta (fenced).

        Raises:
            LeaseLost: ``lease`` is no longer current; nothing is written.
            TypeError: ``meta.continuation`` is not JSON-serialisable.
        """
        try:
            body = meta.to_json()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"activation {lease.activation!r}: meta is not JSON-serialisable: {exc}") from exc

        def write(txn: Any) -> None:
            ref, doc = self._fenced_doc(txn, lease)
            doc["meta_json"] = body
            self._write_doc(txn, ref, doc)

        self._run_transaction(write)

    # -- run records --------------------------------------------------------------------------

    def save_run(self, record: dict[str, Any]) -> None:
        """Insert or replace a run record keyed by ``record["run_id"]``.

        Not fenced: a run that lost its lease must still be able to record why.
        ``record["activation"]`` is required; ``record["started_at"]`` (an ISO-8601
        string in one format, so that string order is time order) orders
        :meth:`list_runs`; ``record["trigger_id"]`` feeds :meth:`find_run_by_trigger`.

        Raises:
            ValueError: ``run_id`` or ``activation`` is missing, not a string, or not a
                valid document id; or the record exceeds a Firestore document.
            TypeError: The record is not JSON-serialisable.
        """
        run_id = record.get("run_id")
        activation = record.get("activation")
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run record needs a non-empty string 'run_id', got {run_id!r}")
        if not isinstance(activation, str) or not activation:
            raise ValueError(f"run record {run_id!r} needs a non-empty string 'activation', got {activation!r}")
        _check_document_id(run_id, "run_id")
        started_at = record.get("started_at")
        trigger_id = record.get("trigger_id")
        try:
            body = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"run record {run_id!r} is not JSON-serialisable: {exc}") from exc
        if len(body.encode("utf-8")) > _MAX_RECORD_JSON_BYTES:
            raise ValueError(
                f"run record {run_id!r} of activation {activation!r} is {len(body)} characters of JSON; "
                "a Firestore document holds at most 1 MiB (bound the rejected-row samples)"
            )
        started = "" if started_at is None else str(started_at)
        doc: dict[str, Any] = {
            "activation": activation,
            "started_at": started,
            "trigger_id": None if trigger_id is None else str(trigger_id),
            "run_key": f"{activation}\0{started}\0{run_id}",
            "trigger_key": None if trigger_id is None else f"{activation}\0{trigger_id}",
            "record_json": body,
        }
        self._runs.document(run_id).set(doc)
        self._count(writes=1)

    def list_runs(self, activation: str, limit: int = 20) -> list[dict[str, Any]]:
        """The activation's run records, newest ``started_at`` first (then run_id), at most ``limit``.

        Raises:
            ValueError: ``limit`` is negative.
        """
        if limit < 0:
            raise ValueError(f"activation {activation!r}: list_runs limit must be >= 0, got {limit}")
        if limit == 0:
            return []
        # NUL sorts before every other character, so [activation NUL, activation \x01)
        # holds exactly this activation's keys, in started_at then run_id order.
        query = (
            self._runs.where(filter=firestore.FieldFilter("run_key", ">=", f"{activation}\0"))
            .where(filter=firestore.FieldFilter("run_key", "<", f"{activation}\x01"))
            .order_by("run_key", direction=firestore.Query.DESCENDING)
            .limit(limit)
        )
        records = [json.loads(snapshot.get("record_json")) for snapshot in query.stream()]
        self._count(reads=max(1, len(records)))
        return records

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run record, or None."""
        try:
            _check_document_id(run_id, "run_id")
        except ValueError:
            return None
        doc = self._get(self._runs.document(run_id))
        return None if doc is None else dict(json.loads(doc["record_json"]))

    def find_run_by_trigger(self, activation: str, trigger_id: str) -> dict[str, Any] | None:
        """The run started by this trigger id (Pub/Sub redelivers at least once), newest if several."""
        query = self._runs.where(filter=firestore.FieldFilter("trigger_key", "==", f"{activation}\0{trigger_id}"))
        found: list[dict[str, Any]] = [snapshot.to_dict() or {} for snapshot in query.stream()]
        self._count(reads=max(1, len(found)))
        if not found:
            return None
        newest = max(found, key=lambda doc: doc["run_key"])
        return dict(json.loads(newest["record_json"]))

    # -- delivery attempts --------------------------------------------------------------------

    def _delivery_ref(self, activation: str, trigger_id: str) -> Any:
        # A trigger id may hold '/' or be long: hash the pair into a valid document id.
        key = hashlib.sha256(f"{activation}\0{trigger_id}".encode()).hexdigest()
        return self._deliveries.document(key)

    def record_delivery_attempt(self, activation: str, trigger_id: str, now: datetime) -> int:
        """Count one more delivery of ``trigger_id`` to ``activation``; return the count so far.

        One transaction (read, increment, write), so concurrent deliveries of one message
        get distinct counts. ``expire_at`` (``now`` + :data:`sync.state.base.DELIVERY_RETENTION`)
        is the field a Firestore TTL policy deletes the document by (infra/firestore.tf).
        """
        _require_aware(now, "now")
        ref = self._delivery_ref(activation, trigger_id)

        def body(txn: Any) -> int:
            doc = self._get(ref, txn)
            attempts = int(doc["attempts"]) + 1 if doc is not None else 1
            self._write_doc(
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

        return int(self._run_transaction(body))

    def delivery_attempts(self, activation: str, trigger_id: str) -> int:
        """How many deliveries of ``trigger_id`` were counted (0 if none)."""
        doc = self._get(self._delivery_ref(activation, trigger_id))
        return 0 if doc is None else int(doc["attempts"])

    # -- admin --------------------------------------------------------------------------------

    def reset(self, activation: str, *, now: datetime | None = None) -> None:
        """Forget fingerprints, intents, refusals and meta (not run history, not the token counter).

        The live layout is emptied in one transaction (the next run is a full one); the
        superseded documents are then deleted as garbage.

        Args:
            activation: The activation to reset.
            now: The time to judge lease expiry by; defaults to the wall clock (UTC).

        Raises:
            LeaseHeld: A run holds an unexpired lease; nothing is deleted.
        """
        moment = now if now is not None else datetime.now(UTC)
        _require_aware(moment, "now")
        ref = self._activation_ref(activation)

        def body(txn: Any) -> bool:
            doc = self._get(ref, txn)
            if doc is None:
                return False
            held_until = doc.get("lease_expires_at")
            if held_until is not None and moment < held_until:
                raise LeaseHeld(
                    f"activation {activation!r}: cannot reset while owner {doc.get('lease_owner')!r} holds "
                    f"the lease until {held_until.isoformat()} (token {doc.get('lease_token')})"
                )
            for ns in _NAMESPACES:
                state = _NsState.from_doc(doc, ns)
                if state.count:
                    state.retired.append({"gen": state.gen, "count": state.count})
                if state.building is not None:
                    state.retired.append(state.building)
                state.building = None
                state.count = 0
                state.low = state.next
                doc[ns.key] = state.to_doc()
            doc.pop("meta_json", None)
            doc["refusals_gen"] = int(doc.get("refusals_gen", 0)) + 1
            self._write_doc(txn, ref, doc)
            return True

        if self._run_transaction(body):
            for ns in _NAMESPACES:
                for _ in self._collect_garbage(activation, ns):
                    pass
            self._delete_forgotten_refusals(activation)

    # -- housekeeping -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the Firestore client if this store owns it (``close_client=True``)."""
        if self._close_client:
            self._client.close()  # type: ignore[no-untyped-call]  # google-cloud-firestore ships no annotations here

    def __repr__(self) -> str:
        return f"FirestoreStateStore(project={self._client.project!r}, prefix={self._prefix!r})"

    # -- journal ------------------------------------------------------------------------------

    def _pack_journal(self, ns: _Namespace, puts: dict[str, tuple[int, int] | None]) -> list[tuple[bytes, int]]:
        """Split entries into journal blobs each under the target size: ``(blob, entry count)``.

        Chunks are sized on the uncompressed packing, which bounds the compressed size
        (zlib adds at most a few bytes per 16 KiB to incompressible input).
        """
        chunks: list[tuple[bytes, int]] = []
        budget = self._target - _HEADER.size - 1024
        ids: list[str] = []
        flags = bytearray()
        raws: list[int] = []
        payloads: list[int] = []
        size = 0

        def flush() -> None:
            chunks.append(
                (
                    _encode(
                        ns.journal_magic,
                        ids,
                        bytes(flags),
                        raws if ns.with_values else (),
                        payloads if ns.with_values else (),
                    ),
                    len(ids),
                )
            )
            ids.clear()
            flags.clear()
            raws.clear()
            payloads.clear()

        for custom_id, value in puts.items():
            entry_size = _ENTRY_FIXED_BYTES + len(custom_id.encode("utf-8"))
            if ids and size + entry_size > budget:
                flush()
                size = 0
            ids.append(custom_id)
            flags.append(0 if value is None else 1)
            raws.append(0 if value is None else value[0])
            payloads.append(0 if value is None else value[1])
            size += entry_size
        if ids:
            flush()
        return chunks

    def _append_journal(
        self, lease: Lease, ns: _Namespace, puts: dict[str, tuple[int, int] | None], now: datetime | None
    ) -> None:
        chunks = self._pack_journal(ns, puts)
        # Group chunks into commits under Firestore's request size and write count limits
        # (one write per commit is the activation document).
        groups: list[list[tuple[bytes, int]]] = [[]]
        group_bytes = 0
        for chunk in chunks:
            current = groups[-1]
            if current and (
                group_bytes + len(chunk[0]) > _COMMIT_BYTE_BUDGET or len(current) >= _MAX_WRITES_PER_COMMIT - 1
            ):
                groups.append([])
                group_bytes = 0
            groups[-1].append(chunk)
            group_bytes += len(chunk[0])

        for group in groups:

            def write(txn: Any, group: list[tuple[bytes, int]] = group) -> None:
                ref, doc = self._fenced_doc(txn, lease)
                if not group:
                    return
                state = _NsState.from_doc(doc, ns)
                for blob, count in group:
                    journal_doc: dict[str, Any] = {"blob": blob, "entries": count, "token": lease.token}
                    if now is not None:
                        journal_doc["written_at"] = now
                    txn.set(self._journal_ref(ref, ns, state.next), journal_doc)
                    self._count(writes=1)
                    state.next += 1
                doc[ns.key] = state.to_doc()
                self._write_doc(txn, ref, doc)

            self._run_transaction(write)

    # -- loading ------------------------------------------------------------------------------

    def _load_namespace(self, activation: str, ns: _Namespace) -> list[tuple[_Columns, bool]]:
        """Decoded shards then journal documents in sequence order, from one consistent snapshot."""
        return [
            (
                _decode(
                    blob,
                    ns.journal_magic if is_journal else ns.shard_magic,
                    with_flags=is_journal,
                    with_values=ns.with_values,
                    where=path,
                ),
                is_journal,
            )
            for path, blob, is_journal in self._load_blobs(activation, ns)
        ]

    def _load_blobs(self, activation: str, ns: _Namespace) -> list[tuple[str, bytes, bool]]:
        """(path, blob, is_journal) of the shards then the journal, from one consistent snapshot."""
        ref = self._activation_ref(activation)

        def read(txn: Any) -> list[tuple[str, bytes, bool]]:
            doc = self._get(ref, txn)
            if doc is None:
                return []
            state = _NsState.from_doc(doc, ns)
            shard_refs = [self._shard_ref(ref, ns, state.gen, k) for k in range(state.count)]
            journal_refs = [self._journal_ref(ref, ns, seq) for seq in range(state.low, state.next)]
            docs = self._get_all(shard_refs + journal_refs, txn)
            blobs: list[tuple[str, bytes, bool]] = []
            for shard_ref in shard_refs:
                shard = docs[shard_ref.path]
                # A shard that would be empty is never written: absent means empty.
                if shard is not None:
                    blobs.append((shard_ref.path, shard["blob"], False))
            for journal_ref in journal_refs:
                entry = docs[journal_ref.path]
                if entry is None:
                    raise StateCorruptError(
                        f"activation {activation!r}: journal document {journal_ref.path} is missing "
                        f"(live range {state.low}..{state.next - 1})"
                    )
                blobs.append((journal_ref.path, entry["blob"], True))
            return blobs

        blobs: list[tuple[str, bytes, bool]] = self._run_transaction(read, read_only=True)
        return blobs

    # -- compaction ---------------------------------------------------------------------------

    def _read_fenced(self, lease: Lease) -> tuple[Any, dict[str, Any]]:
        """Read the activation document outside a transaction and check the lease.

        Only an early exit: every write that follows checks the lease again in its own
        transaction.
        """
        ref = self._activation_ref(lease.activation)
        doc = self._get(ref)
        _check_lease(doc, lease)
        assert doc is not None
        return ref, doc

    def _encode_shard(self, ns: _Namespace, records: dict[str, tuple[int, int]]) -> bytes:
        ids = sorted(records)  # sorted: deterministic blobs, and shared id prefixes compress better
        if ns.with_values:
            values = [records[custom_id] for custom_id in ids]
            return _encode(ns.shard_magic, ids, None, [v[0] for v in values], [v[1] for v in values])
        return _encode(ns.shard_magic, ids, None, (), ())

    def _decode_shard(self, ns: _Namespace, blob: bytes, where: str) -> dict[str, tuple[int, int]]:
        columns = _decode(blob, ns.shard_magic, with_flags=False, with_values=ns.with_values, where=where)
        if ns.with_values:
            return dict(zip(columns.ids, zip(columns.raws, columns.payloads, strict=True), strict=True))
        return dict.fromkeys(columns.ids, (0, 0))

    def _compact_namespace(self, lease: Lease, ns: _Namespace) -> Iterator[CompactionStep]:
        ref, doc = self._read_fenced(lease)
        state = _NsState.from_doc(doc, ns)
        upto = state.next
        if state.low < upto or state.building is not None:
            yield from self._fold(lease, ns, ref, state, upto)
        yield from self._collect_garbage(lease.activation, ns)

    def _read_pending(self, ref: Any, ns: _Namespace, low: int, upto: int) -> dict[str, tuple[int, int] | None]:
        """The live journal merged in sequence order: the last entry per id wins."""
        pending: dict[str, tuple[int, int] | None] = {}
        refs = [self._journal_ref(ref, ns, seq) for seq in range(low, upto)]
        docs = self._get_all(refs)
        for journal_ref in refs:
            entry = docs[journal_ref.path]
            if entry is None:
                raise StateCorruptError(
                    f"journal document {journal_ref.path} is missing (live range {low}..{upto - 1})"
                )
            columns = _decode(
                entry["blob"], ns.journal_magic, with_flags=True, with_values=ns.with_values, where=journal_ref.path
            )
            assert columns.flags is not None
            if ns.with_values:
                for custom_id, flag, raw, payload in zip(
                    columns.ids, columns.flags, columns.raws, columns.payloads, strict=True
                ):
                    pending[custom_id] = (raw, payload) if flag else None
            else:
                for custom_id, flag in zip(columns.ids, columns.flags, strict=True):
                    pending[custom_id] = (0, 0) if flag else None
        return pending

    def _fold(self, lease: Lease, ns: _Namespace, ref: Any, state: _NsState, upto: int) -> Iterator[CompactionStep]:
        pending = self._read_pending(ref, ns, state.low, upto)
        hashes = {custom_id: _hash64(custom_id) for custom_id in pending}

        if state.count == 0:
            # First compaction (or after a reset): size K on the uncompressed packing,
            # which bounds the compressed size.
            estimate = sum(_ENTRY_FIXED_BYTES + len(i.encode("utf-8")) for i, v in pending.items() if v is not None)
            shard_count = _next_power_of_two(-(-estimate // self._target))
            live = {i: v for i, v in pending.items() if v is not None}
            sources: list[Callable[[], dict[str, tuple[int, int]]]] = [lambda: live]
            yield from self._build_generation(lease, ns, ref, state, upto, sources, hashes, shard_count)
            return

        mask = state.count - 1
        groups: dict[int, dict[str, tuple[int, int] | None]] = {}
        for custom_id, value in pending.items():
            groups.setdefault(hashes[custom_id] & mask, {})[custom_id] = value

        # Merge the journal into every affected shard; keep only the compressed results.
        merged: dict[int, bytes] = {}
        largest = 0
        affected = sorted(groups)
        for start in range(0, len(affected), _SHARD_READ_BATCH):
            batch = affected[start : start + _SHARD_READ_BATCH]
            shard_refs = {k: self._shard_ref(ref, ns, state.gen, k) for k in batch}
            docs = self._get_all(list(shard_refs.values()))
            for k in batch:
                path = shard_refs[k].path
                current = docs[path]
                records = {} if current is None else self._decode_shard(ns, current["blob"], path)
                for custom_id, value in groups[k].items():
                    if value is None:
                        records.pop(custom_id, None)
                    else:
                        records[custom_id] = value
                blob = self._encode_shard(ns, records)
                merged[k] = blob
                largest = max(largest, len(blob))

        if largest > self._target:
            # Grow: split every shard into `factor` shards of the next layout, sized on the
            # largest merged shard seen (the rest hash evenly).
            factor = max(2, _next_power_of_two(-(-largest * 4 // (self._target * 3))))
            # Decoded one old shard at a time (only compressed blobs stay in memory).
            sources = [
                functools.partial(self._decode_shard, ns, merged[k], f"merged shard {k}")
                if k in merged
                else functools.partial(self._read_shard, ref, ns, state.gen, k)
                for k in range(state.count)
            ]
            yield from self._build_generation(lease, ns, ref, state, upto, sources, hashes, state.count * factor)
            return

        written = 0
        gen, count = state.gen, state.count
        for batch_refs in self._write_batches(
            lease,
            ns,
            lambda current: current.gen == gen and current.count == count,
            [(self._shard_ref(ref, ns, state.gen, k), blob) for k, blob in sorted(merged.items())],
        ):
            written += batch_refs
            yield CompactionStep(ns.key, "shards_written", state.count, batch_refs)

        def finish(txn: Any) -> None:
            activation_ref, doc = self._fenced_doc(txn, lease)
            current = _NsState.from_doc(doc, ns)
            current.low = max(current.low, upto)
            if current.building is not None:
                # A generation announced by a compaction that died before its flip:
                # it never went live, so it is garbage now.
                current.retired.append(current.building)
                current.building = None
            doc[ns.key] = current.to_doc()
            self._write_doc(txn, activation_ref, doc)

        self._run_transaction(finish)
        yield CompactionStep(ns.key, "journal_folded", state.count, written)

    def _read_shard(self, ref: Any, ns: _Namespace, gen: int, k: int) -> dict[str, tuple[int, int]]:
        shard_ref = self._shard_ref(ref, ns, gen, k)
        doc = self._get(shard_ref)
        return {} if doc is None else self._decode_shard(ns, doc["blob"], shard_ref.path)

    def _build_generation(
        self,
        lease: Lease,
        ns: _Namespace,
        ref: Any,
        state: _NsState,
        upto: int,
        sources: Sequence[Callable[[], dict[str, tuple[int, int]]]],
        hashes: dict[str, int],
        shard_count: int,
    ) -> Iterator[CompactionStep]:
        """Write a new shard generation of ``shard_count`` shards and flip to it.

        ``sources`` are the records of the old layout with the journal already merged
        (for a first build, one source: the journal itself). Since both counts are powers
        of two, each old shard splits into whole new shards, so sources are encoded one
        at a time and only compressed blobs are kept.
        """
        blobs: dict[int, bytes] = {}
        while True:
            blobs.clear()
            mask = shard_count - 1
            too_big = False
            for source in sources:
                records = source()
                parts: dict[int, dict[str, tuple[int, int]]] = {}
                for custom_id, value in records.items():
                    digest = hashes.get(custom_id)
                    if digest is None:
                        digest = _hash64(custom_id)
                    parts.setdefault(digest & mask, {})[custom_id] = value
                for k, part in parts.items():
                    blob = self._encode_shard(ns, part)
                    if len(blob) > self._target:
                        if len(part) == 1:
                            raise FatalError(
                                f"activation {lease.activation!r}: one {ns.key} record packs to {len(blob)} "
                                f"bytes, over the {self._target}-byte shard target"
                            )
                        too_big = True
                        break
                    blobs[k] = blob
                if too_big:
                    break
            if not too_big:
                break
            shard_count *= 2

        # Announce the generation before writing it, so a compaction that dies half way
        # leaves documents the next one knows to delete.
        new_gen = max(state.gen_seq, state.gen, (state.building or {}).get("gen", 0)) + 1

        def announce(txn: Any) -> None:
            activation_ref, doc = self._fenced_doc(txn, lease)
            current = _NsState.from_doc(doc, ns)
            if current.building is not None:
                current.retired.append(current.building)
            current.gen_seq = max(current.gen_seq, new_gen)
            current.building = {"gen": new_gen, "count": shard_count}
            doc[ns.key] = current.to_doc()
            self._write_doc(txn, activation_ref, doc)

        self._run_transaction(announce)
        yield CompactionStep(ns.key, "build_started", shard_count, 1)

        written = 0
        announced = {"gen": new_gen, "count": shard_count}
        for batch_refs in self._write_batches(
            lease,
            ns,
            lambda current: current.building == announced,
            [(self._shard_ref(ref, ns, new_gen, k), blob) for k, blob in sorted(blobs.items())],
        ):
            written += batch_refs
            yield CompactionStep(ns.key, "shards_written", shard_count, batch_refs)

        def flip(txn: Any) -> None:
            activation_ref, doc = self._fenced_doc(txn, lease)
            current = _NsState.from_doc(doc, ns)
            if current.building != {"gen": new_gen, "count": shard_count}:
                raise LeaseLost(
                    f"activation {lease.activation!r}: shard generation {new_gen} was superseded during "
                    "compaction; nothing was flipped"
                )
            if current.count:
                current.retired.append({"gen": current.gen, "count": current.count})
            current.gen = new_gen
            current.count = shard_count
            current.building = None
            current.low = max(current.low, upto)
            doc[ns.key] = current.to_doc()
            self._write_doc(txn, activation_ref, doc)

        self._run_transaction(flip)
        yield CompactionStep(ns.key, "journal_folded", shard_count, written)

    def _write_batches(
        self,
        lease: Lease,
        ns: _Namespace,
        layout: Callable[[_NsState], bool],
        writes: list[tuple[Any, bytes]],
    ) -> Iterator[int]:
        """Write shard blobs in fenced transactions under the commit size and count limits.

        A fenced transaction, not a BulkWriter: BulkWriter writes are neither atomic nor
        conditional, so a stale owner could clobber shards after losing the lease.
        ``layout`` must still hold for the namespace state: a reset while this run's
        lease had expired retires the generation being written, and shards written after
        that would be orphans nobody deletes.
        """
        batch: list[tuple[Any, bytes]] = []
        batch_bytes = 0

        def commit(items: list[tuple[Any, bytes]]) -> None:
            def write(txn: Any) -> None:
                _, doc = self._fenced_doc(txn, lease)
                if not layout(_NsState.from_doc(doc, ns)):
                    raise LeaseLost(
                        f"activation {lease.activation!r}: the {ns.key} shard layout changed during "
                        "compaction (reset while the lease had expired?); nothing more was written"
                    )
                for shard_ref, blob in items:
                    txn.set(shard_ref, {"blob": blob, "token": lease.token})
                    self._count(writes=1)

            self._run_transaction(write)

        for item in writes:
            if batch and (batch_bytes + len(item[1]) > _COMMIT_BYTE_BUDGET or len(batch) >= _MAX_WRITES_PER_COMMIT - 1):
                commit(batch)
                yield len(batch)
                batch, batch_bytes = [], 0
            batch.append(item)
            batch_bytes += len(item[1])
        if batch:
            commit(batch)
            yield len(batch)

    def _collect_garbage(self, activation: str, ns: _Namespace) -> Iterator[CompactionStep]:
        """Delete retired shard generations and folded journal documents.

        Not fenced: these documents are outside the live layout, nobody reads them, and
        generation and sequence numbers are never reused, so deleting them is safe
        whoever holds the lease.
        """
        ref = self._activation_ref(activation)
        doc = self._get(ref)
        state = _NsState.from_doc(doc, ns)
        if not state.has_garbage:
            return
        retired = list(state.retired)
        gc_upto = state.low
        refs = [self._shard_ref(ref, ns, r["gen"], k) for r in retired for k in range(r["count"])]
        refs += [self._journal_ref(ref, ns, seq) for seq in range(state.gc_from, gc_upto)]
        for start in range(0, len(refs), _MAX_WRITES_PER_COMMIT):
            batch = self._client.batch()
            chunk = refs[start : start + _MAX_WRITES_PER_COMMIT]
            for doc_ref in chunk:
                batch.delete(doc_ref)
            batch.commit()
            self._count(deletes=len(chunk))

        def forget(txn: Any) -> None:
            current_doc = self._get(ref, txn)
            current = _NsState.from_doc(current_doc, ns)
            current.retired = [r for r in current.retired if r not in retired]
            current.gc_from = max(current.gc_from, gc_upto)
            assert current_doc is not None
            current_doc[ns.key] = current.to_doc()
            self._write_doc(txn, ref, current_doc)

        self._run_transaction(forget)
        yield CompactionStep(ns.key, "garbage_collected", state.count, len(refs))


def _check_lease(doc: dict[str, Any] | None, lease: Lease) -> None:
    """Raise LeaseLost unless ``lease`` is still the activation's current lease.

    The token is what fences: an expired lease whose token is still current has not
    been taken over, so nobody else can have written, and its writes are safe. A
    released lease is no longer ours, even if nobody took it since.
    """
    if doc is None or "lease_token" not in doc:
        raise LeaseLost(
            f"activation {lease.activation!r}: no lease on record (token {lease.token} of owner "
            f"{lease.owner!r} is not current); nothing was written"
        )
    token, owner = doc.get("lease_token"), doc.get("lease_owner")
    if token != lease.token or owner != lease.owner:
        raise LeaseLost(
            f"activation {lease.activation!r}: lease token {lease.token} of owner {lease.owner!r} "
            f"was superseded by token {token} of owner {owner!r}; nothing was written"
        )
    if doc.get("lease_expires_at") is None:
        raise LeaseLost(
            f"activation {lease.activation!r}: lease token {lease.token} of owner {lease.owner!r} "
            "was released; nothing was written"
        )
