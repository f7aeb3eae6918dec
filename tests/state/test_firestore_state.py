"""FirestoreStateStore on the real client against the official Firestore emulator.

The shared StateStore contract, plus what only the packed Firestore layout has: a
million-profile round trip in a bounded number of reads, a 1 % delta, crashes between
commit and compaction and in the middle of a compaction, shard-count growth, two
function instances racing for the lease, and the index exemptions the infrastructure
must declare.

Load the fixtures with ``-p fixtures_firestore`` until the root conftest lists the plugin.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from google.cloud import firestore
from member_conformance import MemberStoreContract
from state_conformance import TTL, StateStoreContract, at, entries, fp

from sync.errors import LeaseHeld, LeaseLost, TransientError
from sync.model import ActivationMeta, Fingerprint, JournalEntry, Lease, Refusal, RefusalKind
from sync.state.base import StateStore
from sync.state.firestore import INDEX_EXEMPTIONS, FirestoreStateStore, codec, index_exemptions
from tests.support.firestore_emulator import FirestoreEmulator

pytestmark = pytest.mark.emulator

MakeStore = Callable[..., FirestoreStateStore]
MIB = 1_048_576


class TestFirestoreStateStore(StateStoreContract, MemberStoreContract):
    @pytest.fixture
    def store(self, make_firestore_store: MakeStore) -> StateStore:
        return make_firestore_store()


# -- helpers ---------------------------------------------------------------------------------


def random_fingerprints(count: int, seed: int, id_format: str = "user-{:07d}") -> dict[str, Fingerprint]:
    values = array("Q")
    values.frombytes(random.Random(seed).randbytes(16 * count))
    v = values.tolist()
    return {id_format.format(n): Fingerprint(v[2 * n], v[2 * n + 1]) for n in range(count)}


def commit_in_flushes(
    store: StateStore, lease: Lease, fingerprints: dict[str, Fingerprint | None], flush: int = 10_000
) -> None:
    items = [JournalEntry(k, v) for k, v in fingerprints.items()]
    for start in range(0, len(items), flush):
        store.commit(lease, items[start : start + flush], at(1))


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


@dataclass
class RawLayout:
    """What is actually stored for one namespace of one activation, read around the store."""

    state: dict[str, Any]
    shard_sizes: dict[str, int]  # document id -> blob bytes
    journal_ids: list[str]

    @property
    def live_journal_ids(self) -> list[str]:
        """Journal documents not yet folded into the shards (named ids above ``folded``)."""
        return [doc_id for doc_id in self.journal_ids if doc_id > self.state.get("folded", "")]


def raw_layout(client: firestore.Client, prefix: str, activation: str, namespace: str = "fp") -> RawLayout:
    ref = client.collection(f"{prefix}_activations").document(activation)
    snapshot = ref.get()
    state = (snapshot.to_dict() or {}).get(namespace, {}) if snapshot.exists else {}
    shards = "fp_shards" if namespace == "fp" else "intent_shards"
    journal = "fp_journal" if namespace == "fp" else "intent_journal"
    shard_sizes = {doc.id: len(doc.get("blob")) for doc in ref.collection(shards).stream()}
    journal_ids = sorted(doc.id for doc in ref.collection(journal).stream())
    return RawLayout(state, shard_sizes, journal_ids)


def live_shard_ids(layout: RawLayout) -> set[str]:
    gen = layout.state["gen"]
    return {doc_id for doc_id in layout.shard_sizes if int(doc_id.split("-")[0]) == gen}


def report(message: str) -> None:
    """Numbers for the benchmark note, shown even when output is captured (``-rA`` / ``-s``)."""
    print(message)


# -- a million profiles ----------------------------------------------------------------------


@dataclass
class Million:
    store: FirestoreStateStore
    client: firestore.Client
    prefix: str
    lease: Lease
    expected: dict[str, Fingerprint]
    commit_ops: dict[str, int]
    compact_ops: dict[str, int]
    load_ops: dict[str, int]
    loaded: dict[str, Fingerprint]


@pytest.fixture(scope="module")
def million(firestore_emulator: FirestoreEmulator, firestore_client: firestore.Client) -> Iterator[Million]:
    prefix = "million"
    store = FirestoreStateStore(firestore_client, prefix=prefix)
    expected = random_fingerprints(1_000_000, seed=1)
    lease = store.acquire_lease("big", "full-run", 3600, at(0))
    before = store.op_counts()
    commit_in_flushes(store, lease, dict(expected))
    after_commit = store.op_counts()
    store.compact(lease, at(2))
    after_compact = store.op_counts()
    loaded = store.load_fingerprints("big")
    after_load = store.op_counts()
    yield Million(
        store=store,
        client=firestore_client,
        prefix=prefix,
        lease=lease,
        expected=expected,
        commit_ops=delta(before, after_commit),
        compact_ops=delta(after_commit, after_compact),
        load_ops=delta(after_compact, after_load),
        loaded=loaded,
    )
    # A million fingerprints weigh tens of MB in the emulator's memory: drop them.
    firestore_emulator.reset()


@pytest.mark.slow
def test_million_profiles_round_trip_in_few_reads(million: Million) -> None:
    assert len(million.loaded) == 1_000_000
    assert million.loaded == million.expected

    layout = raw_layout(million.client, million.prefix, "big")
    live = live_shard_ids(layout)
    shard_count = layout.state["count"]
    largest = max(layout.shard_sizes[doc_id] for doc_id in live)
    report(
        f"\n1M profiles: commit (100 flushes of 10k) {million.commit_ops}; compact {million.compact_ops}; "
        f"load {million.load_ops}; K={shard_count} shards, largest {largest} bytes, "
        f"total {sum(layout.shard_sizes[d] for d in live)} bytes"
    )
    assert shard_count & (shard_count - 1) == 0  # a power of two
    assert largest < MIB
    assert largest <= 700_000  # the store's target, not just Firestore's limit
    assert million.load_ops["reads"] < 300
    assert million.load_ops["writes"] == 0
    # Compaction folded the journal: nothing live, folded documents deleted.
    assert layout.live_journal_ids == []
    assert layout.state["folded"] == layout.state["gc_folded"] > ""
    assert layout.journal_ids == []
    assert set(layout.shard_sizes) == live


@pytest.mark.slow
def test_one_percent_delta_commit_and_compact(million: Million) -> None:
    store, lease = million.store, million.lease
    rnd = random.Random(2)
    changed_ids = rnd.sample(sorted(million.expected), 10_000)
    changes: dict[str, Fingerprint | None] = {
        custom_id: Fingerprint(rnd.getrandbits(64), rnd.getrandbits(64)) for custom_id in changed_ids[:9_000]
    }
    changes.update(dict.fromkeys(changed_ids[9_000:]))  # 1,000 removals (mirror mode)
    expected = dict(million.expected)
    for custom_id, value in changes.items():
        if value is None:
            del expected[custom_id]
        else:
            expected[custom_id] = value

    before = store.op_counts()
    store.commit(lease, [JournalEntry(k, v) for k, v in changes.items()], at(10))
    after_commit = store.op_counts()
    assert store.load_fingerprints("big") == expected  # journal not compacted yet
    after_load = store.op_counts()
    store.compact(lease, at(11))
    after_compact = store.op_counts()
    assert store.load_fingerprints("big") == expected
    report(
        f"\n1% delta (9k changed, 1k removed of 1M): commit {delta(before, after_commit)}; "
        f"load before compaction {delta(after_commit, after_load)}; compact {delta(after_load, after_compact)}"
    )
    commit_ops = delta(before, after_commit)
    assert commit_ops["reads"] == 1  # the activation document, read in the fenced transaction
    assert commit_ops["transactions"] == 1
    assert delta(after_commit, after_load)["reads"] < 300


# -- crashes ---------------------------------------------------------------------------------


def test_crash_between_commit_and_compaction_loses_nothing(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    first = make_firestore_store()
    lease = first.acquire_lease("act", "run-a", TTL, at(0))
    committed = random_fingerprints(5_000, seed=3)
    commit_in_flushes(first, lease, dict(committed), flush=1_000)
    first.record_intents(lease, ["new-1", "new-2"])
    # run-a dies here: no compaction, no release. A new function instance takes over.
    second = make_firestore_store(new_client=True)
    assert second.load_fingerprints("act") == committed
    assert second.load_intents("act") == {"new-1", "new-2"}
    assert len(raw_layout(firestore_client, firestore_prefix, "act").journal_ids) == 5

    takeover = second.acquire_lease("act", "run-b", TTL, at(TTL + 1))
    second.compact(takeover, at(TTL + 2))
    layout = raw_layout(firestore_client, firestore_prefix, "act")
    assert layout.journal_ids == []
    assert layout.state["count"] >= 1
    assert second.load_fingerprints("act") == committed
    assert second.load_intents("act") == {"new-1", "new-2"}
    assert raw_layout(firestore_client, firestore_prefix, "act", "intents").journal_ids == []


def test_crash_after_shards_written_before_journal_dropped_recovers(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    store = make_firestore_store()
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    base = random_fingerprints(3_000, seed=4)
    commit_in_flushes(store, lease, dict(base))
    store.compact(lease, at(1))
    shards_before = raw_layout(firestore_client, firestore_prefix, "act").state["count"]

    changes: dict[str, Fingerprint | None] = {f"user-{n:07d}": fp(n) for n in range(0, 3_000, 7)}
    changes.update({f"user-{n:07d}": None for n in range(3, 3_000, 11)})
    changes["brand-new"] = fp(99)
    store.commit(lease, [JournalEntry(k, v) for k, v in changes.items()], at(2))
    expected = {**base, **{k: v for k, v in changes.items() if v is not None}}
    for key in [k for k, v in changes.items() if v is None]:
        expected.pop(key, None)

    steps = store.iter_compaction(lease, at(3))
    step = next(steps)
    assert (step.namespace, step.kind) == ("fp", "shards_written")
    steps.close()  # the function instance dies here: shards written, journal still live

    layout = raw_layout(firestore_client, firestore_prefix, "act")
    assert layout.state["count"] == shards_before  # same layout, updated in place
    assert len(layout.live_journal_ids) == 1  # the journal is still live
    assert len(layout.journal_ids) == 1
    fresh = make_firestore_store(new_client=True)
    assert fresh.load_fingerprints("act") == expected  # journal re-applied on folded shards: idempotent

    fresh.compact(lease, at(4))  # same run, restarted (lease still current)
    layout = raw_layout(firestore_client, firestore_prefix, "act")
    assert layout.journal_ids == []
    assert fresh.load_fingerprints("act") == expected
    fresh.compact(lease, at(5))  # nothing left to fold: a no-op
    assert fresh.load_fingerprints("act") == expected


def test_crash_during_a_reshard_leaves_no_orphans(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    store = make_firestore_store(target_shard_bytes=4096)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    committed = random_fingerprints(2_000, seed=5)
    commit_in_flushes(store, lease, dict(committed), flush=500)

    steps = store.iter_compaction(lease, at(1))
    kinds = [next(steps).kind, next(steps).kind]
    steps.close()  # died after writing part of a new generation, before the flip
    assert kinds == ["build_started", "shards_written"]
    layout = raw_layout(firestore_client, firestore_prefix, "act")
    assert layout.state["count"] == 0  # the new generation never went live
    assert layout.state["building"] is not None
    assert layout.shard_sizes  # orphan candidates exist
    assert store.load_fingerprints("act") == committed

    store.compact(lease, at(2))
    layout = raw_layout(firestore_client, firestore_prefix, "act")
    assert layout.state["building"] is None
    assert layout.state["retired"] == []
    assert set(layout.shard_sizes) == live_shard_ids(layout)  # the abandoned generation was deleted
    assert layout.journal_ids == []
    assert store.load_fingerprints("act") == committed


def test_reset_during_an_expired_runs_compaction_stops_it_without_orphans(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    store = make_firestore_store(target_shard_bytes=4096)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    commit_in_flushes(store, lease, dict(random_fingerprints(2_000, seed=10)), flush=500)
    steps = store.iter_compaction(lease, at(TTL + 1))  # the run's lease has expired, nobody took it
    assert next(steps).kind == "build_started"
    store.reset("act", now=at(TTL + 2))  # allowed: the lease is expired; the reset releases it
    with pytest.raises(LeaseLost, match="was released"):
        next(steps)
    for namespace in ("fp", "intents"):
        layout = raw_layout(firestore_client, firestore_prefix, "act", namespace)
        assert layout.shard_sizes == {}
        assert layout.journal_ids == []
    assert store.load_fingerprints("act") == {}


# -- blobs written by the previous codec -------------------------------------------------------

LEGACY_BLOBS = Path(__file__).parent / "legacy_firestore_blobs"  # see test_firestore_codec.py


def test_a_layout_written_by_the_previous_codec_loads_and_compacts(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    # The documents as the store wrote them before Arrow IPC: one shard (K = 1) and one live
    # journal document per namespace, zlib-packed (tests/state/legacy_firestore_blobs).
    ref = firestore_client.collection(f"{firestore_prefix}_activations").document("act")
    live = {"gen": 1, "count": 1, "gen_seq": 1, "low": 0, "next": 1, "gc_from": 0, "building": None, "retired": []}
    ref.set({"fp": live, "intents": live})
    for kind in ("fp", "intent"):  # fp_shards/, fp_journal/, intent_shards/, intent_journal/
        blob = (LEGACY_BLOBS / f"{kind}_shard{'_text' if kind == 'fp' else ''}.bin").read_bytes()
        ref.collection(f"{kind}_shards").document("000001-00000").set({"blob": blob, "token": 1})
        blob = (LEGACY_BLOBS / f"{kind}_journal.bin").read_bytes()
        ref.collection(f"{kind}_journal").document(f"{0:012d}").set({"blob": blob, "entries": 2, "token": 1})
    u64_max = 2**64 - 1
    expected = {
        "emoji-🎉": Fingerprint(u64_max, u64_max),
        "é-2": Fingerprint(11, 12),
        "用户-42": Fingerprint(9, 10),
        "new": Fingerprint(u64_max, 1),
    }

    store = make_firestore_store()
    assert store.load_fingerprints("act") == expected
    table = store.load_fingerprint_table("act")
    assert dict(zip(table.column("custom_id").to_pylist(), table.column("raw").to_pylist(), strict=True)) == {
        custom_id: value.raw for custom_id, value in expected.items()
    }
    assert store.load_intents("act") == {"ï-2", "i-3"}

    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    store.commit(lease, entries(("later", fp(1)), ("new", None)), at(1))  # a new-format journal after a legacy one
    expected["later"] = fp(1)
    del expected["new"]
    assert store.load_fingerprints("act") == expected
    store.compact(lease, at(2))
    for namespace in ("fp", "intents"):
        layout = raw_layout(firestore_client, firestore_prefix, "act", namespace)
        assert layout.journal_ids == []
        assert list(layout.shard_sizes) == ["000001-00000"]  # rewritten in place
    for shard in ref.collection("fp_shards").stream():
        assert shard.get("blob")[:4] == b"\xff\xff\xff\xff"  # rewritten as Arrow IPC
    assert store.load_fingerprints("act") == expected
    assert store.load_intents("act") == {"ï-2", "i-3"}


# -- growth ----------------------------------------------------------------------------------


def test_refusal_documents_written_before_kinds_existed_still_load(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    store = make_firestore_store()
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    activation = firestore_client.collection(f"{firestore_prefix}_activations").document("act")
    # The document shape the previous release wrote (no kind, no runs; payload as decimal text).
    for custom_id, payload, field_name, reason in (
        ("u1", str(2**64 - 1), "firstname", "too long"),
        ("é-2", "7", "(profile)", "server: internal error"),
    ):
        document = hashlib.sha256(custom_id.encode()).hexdigest()
        activation.collection("refusals").document(document).set(
            {"custom_id": custom_id, "payload": payload, "field": field_name, "reason": reason, "gen": 0}
        )
    # One naming an attribute is a value refusal; one naming none may have been a server
    # error, so it is sent again (an item error seen once): Refusal.read.
    assert store.load_refusals("act") == {
        "u1": Refusal("u1", 2**64 - 1, "firstname", "too long", RefusalKind.VALUE, 1),
        "é-2": Refusal("é-2", 7, "(profile)", "server: internal error", RefusalKind.ITEM_ERROR, 1),
    }
    # Rewritten by today's store, a document carries both new fields.
    store.record_refusals(lease, [Refusal("é-2", 7, "(profile)", "server: again", RefusalKind.ITEM_ERROR, 2)])
    stored = activation.collection("refusals").document(hashlib.sha256("é-2".encode()).hexdigest()).get().to_dict()
    assert stored is not None
    assert (stored["kind"], stored["runs"]) == ("item_error", 2)
    assert store.load_refusals("act")["é-2"].runs == 2


def test_shard_count_grows_in_powers_of_two_and_old_shards_are_deleted(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    target = 8192
    store = make_firestore_store(target_shard_bytes=target)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    expected = random_fingerprints(300, seed=6)
    commit_in_flushes(store, lease, dict(expected))
    store.compact(lease, at(1))
    first = raw_layout(firestore_client, firestore_prefix, "act")

    more = random_fingerprints(4_000, seed=7, id_format="more-{:05d}")
    commit_in_flushes(store, lease, dict(more), flush=1_000)
    expected.update(more)
    store.compact(lease, at(2))
    grown = raw_layout(firestore_client, firestore_prefix, "act")

    assert grown.state["count"] > first.state["count"]
    for count in (first.state["count"], grown.state["count"]):
        assert count & (count - 1) == 0
    assert grown.state["gen"] > first.state["gen"]
    assert set(grown.shard_sizes) == live_shard_ids(grown)  # the superseded generation is gone
    assert max(grown.shard_sizes.values()) <= target
    assert grown.state["retired"] == []
    assert store.load_fingerprints("act") == expected
    assert make_firestore_store(new_client=True).load_fingerprints("act") == expected


def test_a_run_leaves_a_small_journal_unfolded_and_folds_it_once_due(
    make_firestore_store: MakeStore,
    firestore_client: firestore.Client,
    firestore_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # compact(when_due=True), as a run calls it: a delta far below FOLD_DUE_SHARE of the
    # state writes no shard (its journal documents stay live, every load applies them);
    # deltas that bring the journal to the share are folded, shards rewritten in place.
    target = 16_384
    store = make_firestore_store(target_shard_bytes=target)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    expected: dict[str, Fingerprint | None] = dict(random_fingerprints(20_000, seed=8))
    commit_in_flushes(store, lease, dict(expected), flush=5_000)
    store.compact(lease, at(1), when_due=True)  # nothing was stored: always due
    folded = raw_layout(firestore_client, firestore_prefix, "act")
    assert folded.live_journal_ids == []
    assert folded.state["count"] > 1
    shards_before = dict(folded.shard_sizes)

    rnd = random.Random(9)
    ids = sorted(expected)
    small = {custom_id: fp(rnd.getrandbits(32)) for custom_id in rnd.sample(ids, 60)}
    small.update(dict.fromkeys(rnd.sample(ids, 20)))
    commit_in_flushes(store, lease, dict(small), flush=40)
    expected.update(small)
    before = store.op_counts()
    decoded: list[str] = []
    decode = codec.decode

    def counted(blob: bytes, *args: Any, **kwargs: Any) -> pa.Table:
        decoded.append(kwargs["where"])
        return decode(blob, *args, **kwargs)

    monkeypatch.setattr(codec, "decode", counted)
    store.compact(lease, at(2), when_due=True)
    monkeypatch.setattr(codec, "decode", decode)
    # The journal documents say how many entries they hold: none is decoded to count them.
    assert decoded == []
    assert delta(before, store.op_counts())["writes"] == 0
    left = raw_layout(firestore_client, firestore_prefix, "act")
    assert len(left.live_journal_ids) == 2
    assert left.shard_sizes == shards_before
    wanted = {k: v for k, v in expected.items() if v is not None}
    assert store.load_fingerprints("act") == wanted
    assert make_firestore_store(new_client=True).load_fingerprints("act") == wanted

    # A fifth of the state at once: due whatever the shards' fill.
    large = {custom_id: fp(rnd.getrandbits(32)) for custom_id in rnd.sample(ids, 4_000)}
    commit_in_flushes(store, lease, dict(large), flush=2_000)
    expected.update(large)
    store.compact(lease, at(3), when_due=True)
    done = raw_layout(firestore_client, firestore_prefix, "act")
    assert done.live_journal_ids == []
    assert done.shard_sizes != shards_before
    wanted = {k: v for k, v in expected.items() if v is not None}
    assert store.load_fingerprints("act") == wanted
    assert make_firestore_store(new_client=True).load_fingerprints("act") == wanted


def test_reset_deletes_shards_and_journal_documents(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    store = make_firestore_store(target_shard_bytes=4096)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    commit_in_flushes(store, lease, dict(random_fingerprints(1_000, seed=8)))
    store.compact(lease, at(1))
    store.commit(lease, entries(("late", fp(1))), at(2))
    store.record_intents(lease, ["late"])
    store.release_lease(lease)
    assert raw_layout(firestore_client, firestore_prefix, "act").shard_sizes

    store.reset("act", now=at(3))
    for namespace in ("fp", "intents"):
        layout = raw_layout(firestore_client, firestore_prefix, "act", namespace)
        assert layout.shard_sizes == {}
        assert layout.journal_ids == []
    assert store.load_fingerprints("act") == {}
    next_lease = store.acquire_lease("act", "run-b", TTL, at(4))
    assert next_lease.token > lease.token
    store.commit(next_lease, entries(("again", fp(2))), at(5))
    store.compact(next_lease, at(6))
    assert store.load_fingerprints("act") == {"again": fp(2)}


# -- no hot document ---------------------------------------------------------------------------


def test_appends_read_the_activation_document_and_never_write_it(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    # Firestore sustains about one write per second per document: a run with requests in
    # flight appends several times a second, so no append may rewrite a shared document.
    store = make_firestore_store()
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    ref = firestore_client.collection(f"{firestore_prefix}_activations").document("act")
    written_at = ref.get().update_time
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for k in range(5):
                ids = [f"u{n}-{k}-{i}" for i in range(10)]
                store.record_intents(lease, ids)
                store.commit(lease, [JournalEntry(i, fp(n)) for i in ids], at(1))
                store.clear_intents(lease, ids)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert ref.get().update_time == written_at  # 120 appends, not one write to the activation
    assert len(store.load_fingerprints("act")) == 400
    assert store.op_counts()["contention_retries"] == 0
    hottest = store.document_writes()
    assert hottest["peak_writes_1s"] == 1, hottest  # every journal document is written once
    assert hottest["documents"] == 121  # the acquisition, and one document per append


def test_exhausted_contention_is_a_transient_error_that_says_what_contended(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    # Another process holding the activation document in a transaction past the retry
    # budget (2 s here, 60 s by default) must end in an error that names what contended,
    # not in an "unexpected RetryError".
    store = make_firestore_store(contention_timeout=2.0)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    ref = firestore_client.collection(f"{firestore_prefix}_activations").document("act")
    holder = firestore_client.transaction()
    holder._begin()  # a transaction that reads the document and then sits on its lock
    ref.get(transaction=holder)
    try:
        with pytest.raises(
            TransientError, match=r"renewing the lease of activation 'act' was aborted \d+ times in 2 s"
        ):
            store.renew_lease(lease, TTL, at(1))
    finally:
        holder._rollback()
    assert store.op_counts()["contention_retries"] >= 1


# -- two function instances ------------------------------------------------------------------


def race_for_lease(stores: list[FirestoreStateStore], activation: str) -> list[Lease | LeaseHeld]:
    """Both instances try to take the lease at the same moment, from two threads."""
    barrier = threading.Barrier(len(stores))
    outcomes: list[Lease | LeaseHeld | None] = [None] * len(stores)

    def contend(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = stores[index].acquire_lease(activation, f"instance-{index}", TTL, at(0))
        except LeaseHeld as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(outcome is not None for outcome in outcomes), outcomes
    return [outcome for outcome in outcomes if outcome is not None]


def test_two_instances_racing_for_the_lease_exactly_one_wins(make_firestore_store: MakeStore) -> None:
    stores = [make_firestore_store(new_client=True), make_firestore_store(new_client=True)]
    # Each round costs ~2 s: the emulator resolves the write-write conflict by lock timeout.
    for round_number in range(3):
        outcomes = race_for_lease(stores, f"race-{round_number}")
        winners = [o for o in outcomes if isinstance(o, Lease)]
        losers = [o for o in outcomes if isinstance(o, LeaseHeld)]
        assert len(winners) == 1, outcomes
        assert len(losers) == 1, outcomes
        assert winners[0].token == 1
        assert winners[0].owner in str(losers[0])


def test_stale_instance_writes_nothing(make_firestore_store: MakeStore) -> None:
    a = make_firestore_store(new_client=True)
    b = make_firestore_store(new_client=True)
    old = a.acquire_lease("act", "instance-a", TTL, at(0))
    a.commit(old, entries(("u1", fp(1))), at(1))
    a.record_intents(old, ["u1"])
    a.save_meta(old, ActivationMeta(mapping_version="v1"))
    new = b.acquire_lease("act", "instance-b", TTL, at(TTL + 1))  # a's lease expired, b takes over

    writes_before = a.op_counts()["writes"]
    with pytest.raises(LeaseLost):
        a.commit(old, entries(("u1", None), ("u2", fp(2))), at(TTL + 2))
    with pytest.raises(LeaseLost):
        a.record_intents(old, ["u2"])
    with pytest.raises(LeaseLost):
        a.clear_intents(old, ["u1"])
    with pytest.raises(LeaseLost):
        a.save_meta(old, ActivationMeta(mapping_version="v2"))
    with pytest.raises(LeaseLost):
        a.compact(old, at(TTL + 2))
    with pytest.raises(LeaseLost):
        a.renew_lease(old, TTL, at(TTL + 2))
    assert a.op_counts()["writes"] == writes_before  # not a single document written

    assert b.load_fingerprints("act") == {"u1": fp(1)}
    assert b.load_intents("act") == {"u1"}
    assert b.load_meta("act") == ActivationMeta(mapping_version="v1")
    b.commit(new, entries(("u2", fp(2))), at(TTL + 3))
    assert a.load_fingerprints("act") == {"u1": fp(1), "u2": fp(2)}


# -- infrastructure facts --------------------------------------------------------------------


def test_every_large_field_written_has_an_index_exemption(
    make_firestore_store: MakeStore, firestore_client: firestore.Client, firestore_prefix: str
) -> None:
    store = make_firestore_store(target_shard_bytes=50_000)
    lease = store.acquire_lease("act", "run-a", TTL, at(0))
    commit_in_flushes(store, lease, dict(random_fingerprints(4_000, seed=9)))
    store.record_intents(lease, [f"user-{n:07d}" for n in range(4_000)])
    store.save_meta(lease, ActivationMeta(mapping_version="v", owned_keys={f"attribute_{n}" for n in range(200)}))
    store.save_run(
        {
            "run_id": "run-a",
            "activation": "act",
            "started_at": "2026-01-01T00:00:00Z",
            "rejected_samples": [{"custom_id": f"u{n}", "reason": "invalid_email"} for n in range(200)],
        }
    )
    store.commit(lease, entries(("late", fp(1))), at(1))  # a live journal document too
    store.compact(lease, at(2))
    store.commit(lease, [JournalEntry(f"user-{n:07d}", fp(n)) for n in range(3_000)], at(3))

    exempt = {(e.collection, e.field) for e in index_exemptions(firestore_prefix)}
    large: set[tuple[str, str]] = set()

    def visit(collection: Any) -> None:
        for snapshot in collection.stream():
            for name, value in (snapshot.to_dict() or {}).items():
                if isinstance(value, bytes | str) and len(value) > 1500:
                    large.add((collection.id, name))
            for sub in snapshot.reference.collections():
                visit(sub)

    visit(firestore_client.collection(f"{firestore_prefix}_activations"))
    visit(firestore_client.collection(f"{firestore_prefix}_runs"))
    assert {"fp_shards", "fp_journal", "intent_shards", "meta_json", "record_json"} <= {
        part for pair in large for part in pair
    }
    assert large <= exempt, large - exempt
    assert {(e.collection, e.field) for e in INDEX_EXEMPTIONS} == {
        (e.collection, e.field) for e in index_exemptions("cepsync")
    }


@pytest.mark.slow  # starts a second emulator (~3 s)
def test_emulator_stop_kills_the_whole_process_group() -> None:
    emulator = FirestoreEmulator(start_timeout=60)
    emulator.start()
    try:
        assert emulator.startup_seconds is not None
        report(f"\nFirestore emulator started in {emulator.startup_seconds:.2f}s")
        process = emulator._process
        assert process is not None
        group = process.pid
        client = emulator.client()
        try:
            client.collection("probe").document("d").set({"x": 1})
            emulator.reset()
            assert not client.collection("probe").document("d").get().exists
        finally:
            client.close()  # type: ignore[no-untyped-call]  # google-cloud-firestore leaves it unannotated
    finally:
        emulator.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # signal 0: does any process of the group remain?
