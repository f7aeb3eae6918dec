"""The StateStore contract: every backend's test module subclasses :class:`StateStoreContract`.

A subclass provides one pytest fixture, ``store``, yielding a fresh, empty store::

    class TestSQLiteStateStore(StateStoreContract):
        @pytest.fixture
        def store(self, tmp_path: Path) -> Iterator[StateStore]:
            s = SQLiteStateStore(tmp_path / "state.db")
            yield s
            s.close()

The tests use only the :class:`sync.state.base.StateStore` protocol and clock values
derived from the fixed :data:`T0` (never the wall clock), so the same suite proves the
same guarantees for SQLite and Firestore: fencing (guarantees 1 and 4), durable intents
(guarantee 7), and state that a reset or another activation cannot disturb.

Lease semantics pinned here: a lease is held while ``now < expires_at``; every
acquisition increments the token and tokens never go backwards (not after a release,
not after a reset); a released lease is no longer ours (fenced writes raise LeaseLost).
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from sync.differ import FINGERPRINT_SCHEMA, JOURNAL_SCHEMA
from sync.errors import LeaseHeld, LeaseLost
from sync.model import PERSISTENT_AFTER_RUNS, ActivationMeta, Fingerprint, JournalEntry, Lease, Refusal, RefusalKind
from sync.state.base import StateStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = 60.0
U64_MAX = 2**64 - 1
# reset() judges lease expiry by the wall clock (the protocol gives it no `now`), so the
# test that needs a lease to be *held* during a reset uses a TTL that outlives any
# plausible wall clock rather than reading the clock.
CENTURY = 100 * 366 * 24 * 3600.0

ODD_IDS = (
    "émilie.dupont@example.com",
    "用户-42",
    "emoji-🎉-id",
    "a/b/c",
    "/leading/slash",
    "trailing/",
    ".",
    "..",
    "...dots...",
    "__reserved__",
    "with space",
    "tab\tand\nnewline",
    "quote'\"backslash\\",
    "x" * 1024,
    "é" * 1024,
)


def at(seconds: float) -> datetime:
    """T0 plus an offset: the only clock the contract uses."""
    return T0 + timedelta(seconds=seconds)


def fp(n: int) -> Fingerprint:
    """A distinct, deterministic fingerprint per n."""
    return Fingerprint(raw=(n * 0x9E3779B97F4A7C15) % 2**64, payload=(n * 0xC2B2AE3D27D4EB4F + 1) % 2**64)


def attribute_set(*hashes: int) -> bytes:
    """An attribute set as sync.attributes packs one: sorted 32-bit hashes, 4 little-endian bytes each."""
    return b"".join(value.to_bytes(4, "little") for value in sorted(hashes))


def entries(*pairs: tuple[str, Fingerprint | None]) -> list[JournalEntry]:
    return [JournalEntry(custom_id, fingerprint) for custom_id, fingerprint in pairs]


def run_record(run_id: str, activation: str, started_at: str, trigger_id: str | None = None) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "activation": activation,
        "started_at": started_at,
        "trigger_id": trigger_id,
        "status": "succeeded",
        "counts": {"new": 3, "changed": 1, "rejected": 0},
        "rejected_samples": [{"custom_id": "u-1", "reason": "invalid_email", "detail": "nope@"}],
    }


class StateStoreContract:
    """Behaviour every :class:`StateStore` backend must show. Subclasses provide ``store``."""

    # -- lease: acquire --------------------------------------------------------------------

    def test_is_a_state_store(self, store: StateStore) -> None:
        assert isinstance(store, StateStore)

    def test_acquire_returns_a_lease_for_the_caller(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        assert lease.activation == "act"
        assert lease.owner == "run-a"
        assert lease.token >= 1
        assert lease.expires_at == at(TTL)

    def test_second_owner_is_refused_while_the_lease_is_held(self, store: StateStore) -> None:
        store.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(LeaseHeld) as excinfo:
            store.acquire_lease("act", "run-b", TTL, at(TTL - 1))
        message = str(excinfo.value)
        assert "act" in message
        assert "run-a" in message

    def test_lease_is_held_until_strictly_before_expiry(self, store: StateStore) -> None:
        first = store.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(LeaseHeld):
            store.acquire_lease("act", "run-b", TTL, first.expires_at - timedelta(microseconds=1))
        second = store.acquire_lease("act", "run-b", TTL, first.expires_at)
        assert second.owner == "run-b"

    def test_expired_lease_is_taken_over_with_a_higher_token(self, store: StateStore) -> None:
        first = store.acquire_lease("act", "run-a", TTL, T0)
        second = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        assert second.token > first.token
        assert second.owner == "run-b"
        assert second.expires_at == at(2 * TTL + 1)

    def test_same_owner_reacquiring_an_unexpired_lease_increments_the_token(self, store: StateStore) -> None:
        first = store.acquire_lease("act", "run-a", TTL, T0)
        again = store.acquire_lease("act", "run-a", TTL, at(5))
        assert again.token > first.token
        assert again.expires_at == at(5 + TTL)
        # The re-acquisition superseded the first lease: it may no longer write.
        with pytest.raises(LeaseLost):
            store.commit(first, entries(("u1", fp(1))), at(6))
        store.commit(again, entries(("u1", fp(1))), at(6))
        assert store.load_fingerprints("act") == {"u1": fp(1)}

    def test_tokens_never_go_backwards_across_release_and_reset(self, store: StateStore) -> None:
        tokens = []
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        tokens.append(lease.token)
        store.release_lease(lease)
        lease = store.acquire_lease("act", "run-b", TTL, at(1))
        tokens.append(lease.token)
        store.commit(lease, entries(("u1", fp(1))), at(2))
        store.release_lease(lease)
        store.reset("act")
        lease = store.acquire_lease("act", "run-c", TTL, at(3))
        tokens.append(lease.token)
        lease = store.acquire_lease("act", "run-d", TTL, at(3 + TTL))  # expired takeover
        tokens.append(lease.token)
        assert tokens == sorted(set(tokens)), tokens
        assert store.load_fingerprints("act") == {}

    # -- lease: renew and release ----------------------------------------------------------

    def test_renew_extends_the_expiry_and_keeps_the_token(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        renewed = store.renew_lease(lease, TTL, at(50))
        assert renewed.token == lease.token
        assert renewed.owner == "run-a"
        assert renewed.expires_at == at(50 + TTL)
        # Past the original expiry but inside the renewed one: still held.
        with pytest.raises(LeaseHeld):
            store.acquire_lease("act", "run-b", TTL, at(TTL + 10))
        store.commit(renewed, entries(("u1", fp(1))), at(TTL + 10))
        assert store.load_fingerprints("act") == {"u1": fp(1)}

    def test_renew_of_a_superseded_lease_raises_lease_lost(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        new = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.renew_lease(old, TTL, at(TTL + 2))
        # The failed renewal did not disturb the new holder.
        with pytest.raises(LeaseHeld):
            store.acquire_lease("act", "run-c", TTL, at(TTL + 3))
        store.commit(new, entries(("u1", fp(1))), at(TTL + 3))

    def test_renew_of_a_released_lease_raises_lease_lost(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.release_lease(lease)
        with pytest.raises(LeaseLost):
            store.renew_lease(lease, TTL, at(1))

    def test_release_lets_another_owner_in_before_expiry(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.release_lease(lease)
        other = store.acquire_lease("act", "run-b", TTL, at(1))
        assert other.token > lease.token

    def test_release_of_a_superseded_lease_changes_nothing(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        current = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        store.release_lease(old)
        with pytest.raises(LeaseHeld):
            store.acquire_lease("act", "run-c", TTL, at(TTL + 2))
        store.commit(current, entries(("u1", fp(1))), at(TTL + 2))
        assert store.load_fingerprints("act") == {"u1": fp(1)}

    def test_release_twice_is_harmless(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.release_lease(lease)
        store.release_lease(lease)
        assert store.acquire_lease("act", "run-b", TTL, at(1)).owner == "run-b"

    # -- fencing ---------------------------------------------------------------------------

    def test_stale_token_commit_raises_and_writes_nothing(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(old, entries(("u1", fp(1)), ("u2", fp(2))), at(1))
        store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        # From the old run's point of view its lease has not expired yet (its clock says
        # 10 s): the store must still refuse, because the token was superseded.
        assert old.expires_at > at(10)
        with pytest.raises(LeaseLost):
            store.commit(old, entries(("u1", None), ("u2", fp(22)), ("u3", fp(3))), at(10))
        assert store.load_fingerprints("act") == {"u1": fp(1), "u2": fp(2)}

    def test_stale_token_empty_commit_and_compact_raise(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.commit(old, [], at(TTL + 2))
        with pytest.raises(LeaseLost):
            store.compact(old, at(TTL + 2))

    def test_commit_after_release_raises(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.release_lease(lease)
        with pytest.raises(LeaseLost):
            store.commit(lease, entries(("u1", fp(1))), at(1))
        assert store.load_fingerprints("act") == {}

    def test_commit_with_a_lease_never_granted_raises(self, store: StateStore) -> None:
        forged = Lease(activation="act", owner="run-x", token=1, expires_at=at(TTL))
        with pytest.raises(LeaseLost):
            store.commit(forged, entries(("u1", fp(1))), T0)
        granted = store.acquire_lease("act", "run-a", TTL, T0)
        impostor = Lease(activation="act", owner="run-x", token=granted.token, expires_at=granted.expires_at)
        with pytest.raises(LeaseLost):
            store.commit(impostor, entries(("u1", fp(1))), at(1))
        assert store.load_fingerprints("act") == {}

    def test_expired_but_not_taken_over_lease_may_still_commit(self, store: StateStore) -> None:
        # The token fences, not the clock: nobody took the lease, so nobody else wrote.
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(TTL + 30))
        store.compact(lease, at(TTL + 31))
        assert store.load_fingerprints("act") == {"u1": fp(1)}

    # -- fingerprints ------------------------------------------------------------------------

    def test_unknown_activation_has_no_fingerprints(self, store: StateStore) -> None:
        assert store.load_fingerprints("never-seen") == {}

    def test_commit_round_trip_with_overwrites_and_deletes(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1)), ("u2", fp(2)), ("u3", fp(3))), at(1))
        store.compact(lease, at(2))
        assert store.load_fingerprints("act") == {"u1": fp(1), "u2": fp(2), "u3": fp(3)}
        store.commit(lease, entries(("u1", fp(11)), ("u3", None), ("u4", fp(4)), ("ghost", None)), at(3))
        assert store.load_fingerprints("act") == {"u1": fp(11), "u2": fp(2), "u4": fp(4)}
        store.compact(lease, at(4))
        assert store.load_fingerprints("act") == {"u1": fp(11), "u2": fp(2), "u4": fp(4)}

    def test_loaded_fingerprints_include_uncompacted_commits(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        for n in range(5):
            store.commit(lease, entries((f"u{n}", fp(n))), at(1 + n))
        assert store.load_fingerprints("act") == {f"u{n}": fp(n) for n in range(5)}

    def test_last_entry_for_an_id_in_one_batch_wins(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1)), ("u1", fp(2)), ("u2", fp(5)), ("u2", None)), at(1))
        assert store.load_fingerprints("act") == {"u1": fp(2)}
        store.commit(lease, entries(("u1", None), ("u1", fp(9))), at(2))
        assert store.load_fingerprints("act") == {"u1": fp(9)}

    def test_delete_then_recreate_across_commits(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        store.commit(lease, entries(("u1", None)), at(2))
        assert store.load_fingerprints("act") == {}
        store.commit(lease, entries(("u1", fp(7))), at(3))
        store.compact(lease, at(4))
        assert store.load_fingerprints("act") == {"u1": fp(7)}

    def test_unsigned_64_bit_extremes_round_trip(self, store: StateStore) -> None:
        values = (0, 1, 2**63 - 1, 2**63, 2**63 + 1, U64_MAX - 1, U64_MAX)
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        committed = {
            f"u-{i}-{j}": Fingerprint(raw=raw, payload=payload)
            for i, raw in enumerate(values)
            for j, payload in enumerate(values)
        }
        store.commit(lease, [JournalEntry(k, v) for k, v in committed.items()], at(1))
        loaded = store.load_fingerprints("act")
        assert loaded == committed
        assert all(0 <= f.raw <= U64_MAX and 0 <= f.payload <= U64_MAX for f in loaded.values())
        store.compact(lease, at(2))
        assert store.load_fingerprints("act") == committed

    def test_hundred_thousand_fingerprints_in_chunks_round_trip(self, store: StateStore) -> None:
        rnd = random.Random(20260101)
        committed = {f"user-{n:06d}": Fingerprint(rnd.getrandbits(64), rnd.getrandbits(64)) for n in range(100_000)}
        items = [JournalEntry(k, v) for k, v in committed.items()]
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        for start in range(0, len(items), 10_000):
            store.commit(lease, items[start : start + 10_000], at(1))
        store.compact(lease, at(2))
        loaded = store.load_fingerprints("act")
        assert len(loaded) == len(committed)
        assert loaded == committed

    def test_the_arrow_table_holds_the_same_fingerprints_as_the_dict(self, store: StateStore) -> None:
        # What a run loads (sync.diff joins it in DuckDB) must be exactly what the store holds:
        # before and after compaction, with deletions, u64 extremes and non-ASCII ids.
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        assert store.load_fingerprint_table("act").num_rows == 0
        store.commit(lease, entries(("u1", fp(1)), ("é-2", Fingerprint(U64_MAX, 0)), ("u3", fp(3))), at(1))
        store.compact(lease, at(2))
        store.commit(lease, entries(("u3", None), ("u4", Fingerprint(2**63, 5)), ("u1", fp(11))), at(3))
        for _ in range(2):
            table = store.load_fingerprint_table("act")
            assert table.schema.equals(FINGERPRINT_SCHEMA)
            as_dict = dict(
                zip(
                    table.column("custom_id").to_pylist(),
                    map(Fingerprint, table.column("raw").to_pylist(), table.column("payload").to_pylist()),
                    strict=True,
                )
            )
            assert len(as_dict) == table.num_rows
            assert (
                as_dict
                == store.load_fingerprints("act")
                == {
                    "u1": fp(11),
                    "é-2": Fingerprint(U64_MAX, 0),
                    "u4": Fingerprint(2**63, 5),
                }
            )
            store.compact(lease, at(4))

    def test_a_journal_left_unfolded_loads_as_the_folded_state_run_after_run(self, store: StateStore) -> None:
        # compact(when_due=True) may leave a delta's journal for a later run to fold (a
        # store decides when it is due); whatever it decides, every load is the state as
        # if each journal had been folded at once, through deltas that change, delete,
        # re-create and repeat ids, and until a full compaction folds what is left.
        rnd = random.Random(20261207)
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        expected = {f"user-{n:05d}": Fingerprint(rnd.getrandbits(64), rnd.getrandbits(64)) for n in range(20_000)}
        store.commit(lease, [JournalEntry(k, v) for k, v in expected.items()], at(1))
        store.compact(lease, at(2), when_due=True)
        ids = sorted(expected)
        for run in range(6):
            # ~0.7 % of the state a run: far below any share worth a fold on its own.
            changed = rnd.sample(ids, 100)
            gone = rnd.sample(ids, 30)
            batch = [JournalEntry(k, Fingerprint(rnd.getrandbits(64), run)) for k in changed]
            batch += [JournalEntry(k, None) for k in gone]
            batch += [JournalEntry(f"new-{run}-{n}", fp(run * 100 + n)) for n in range(10)]
            for entry in batch:
                if entry.fingerprint is None:
                    expected.pop(entry.custom_id, None)
                else:
                    expected[entry.custom_id] = entry.fingerprint
            store.commit(lease, batch[: len(batch) // 2], at(3 + run))
            store.commit(lease, batch[len(batch) // 2 :], at(3 + run))
            store.compact(lease, at(3 + run), when_due=True)
            table = store.load_fingerprint_table("act")
            assert table.schema.equals(FINGERPRINT_SCHEMA)
            assert table.num_rows == len(expected)
            assert store.load_fingerprints("act") == expected
        store.compact(lease, at(20))
        assert store.load_fingerprints("act") == expected

    # -- attribute sets (send: changed_attributes) ------------------------------------------

    def test_attribute_sets_round_trip_beside_fingerprints(self, store: StateStore) -> None:
        # A set, an empty set (a payload without attributes) and none kept, side by side,
        # through commits, a compaction, and a later entry that changes or forgets the set.
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        sets = {
            "u1": attribute_set(1, 2, 3),
            "u2": b"",
            "u3": None,
            "é-4": attribute_set(0, 2**32 - 1),
        }
        committed = {custom_id: fp(n)._replace(attributes=sets[custom_id]) for n, custom_id in enumerate(sets)}
        store.commit(lease, [JournalEntry(k, v) for k, v in committed.items()], at(1))
        assert store.load_fingerprints("act") == committed
        store.compact(lease, at(2))
        assert store.load_fingerprints("act") == committed
        later = {"u1": fp(11), "u3": fp(13)._replace(attributes=attribute_set(7)), "u2": None}
        store.commit(lease, [JournalEntry(k, v) for k, v in later.items()], at(3))
        expected = {"u1": fp(11), "u3": later["u3"], "é-4": committed["é-4"]}
        for _ in range(2):
            assert store.load_fingerprints("act") == expected
            table = store.load_fingerprint_table("act")
            assert table.schema.equals(FINGERPRINT_SCHEMA)
            held = dict(zip(table.column("custom_id").to_pylist(), table.column("attributes").to_pylist(), strict=True))
            assert held == {"u1": None, "u3": attribute_set(7), "é-4": attribute_set(0, 2**32 - 1)}
            store.compact(lease, at(4))

    def test_a_journal_table_with_attribute_sets_commits_as_the_sender_writes_it(self, store: StateStore) -> None:
        # The sender commits JOURNAL_SCHEMA tables (sync.plan.ProfileRows.journal), not entries.
        rnd = random.Random(7)
        ids = [f"user-{n:05d}" for n in range(3_000)]
        sets = [attribute_set(*(rnd.getrandbits(32) for _ in range(n % 25))) if n % 7 else None for n in range(3_000)]
        table = pa.table(
            [
                pa.array(ids, pa.string()),
                pa.array([fp(n).raw for n in range(3_000)], pa.uint64()),
                pa.array([fp(n).payload for n in range(3_000)], pa.uint64()),
                pa.array(sets, pa.binary()),
                pa.array([True] * 3_000, pa.bool_()),
            ],
            schema=JOURNAL_SCHEMA,
        )
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, table, at(1))
        store.compact(lease, at(2))
        loaded = store.load_fingerprints("act")
        assert loaded == {ids[n]: fp(n)._replace(attributes=sets[n]) for n in range(3_000)}

    def test_large_attribute_sets_of_many_profiles_survive_compaction(self, store: StateStore) -> None:
        # 50 attributes a profile (4 bytes each, incompressible hashes) for 20,000 profiles:
        # 4 MB of sets, so a store that cuts documents by size must cut them by it.
        rnd = random.Random(20261207)
        committed = {
            f"user-{n:06d}": Fingerprint(
                rnd.getrandbits(64), rnd.getrandbits(64), attribute_set(*(rnd.getrandbits(32) for _ in range(50)))
            )
            for n in range(20_000)
        }
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        items = [JournalEntry(k, v) for k, v in committed.items()]
        for start in range(0, len(items), 10_000):
            store.commit(lease, items[start : start + 10_000], at(1))
        store.compact(lease, at(2))
        assert store.load_fingerprints("act") == committed

    def test_an_attribute_set_that_is_not_whole_hashes_is_refused_and_writes_nothing(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        with pytest.raises(ValueError, match="attribute set"):
            store.commit(lease, entries(("u1", fp(1)), ("u2", Fingerprint(1, 2, b"\x00\x01\x02"))), at(1))
        assert store.load_fingerprints("act") == {}

    def test_odd_custom_ids_round_trip(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        committed = {custom_id: fp(n) for n, custom_id in enumerate(ODD_IDS)}
        store.commit(lease, [JournalEntry(k, v) for k, v in committed.items()], at(1))
        store.compact(lease, at(2))
        assert store.load_fingerprints("act") == committed
        store.record_intents(lease, ODD_IDS)
        assert store.load_intents("act") == set(ODD_IDS)
        store.commit(lease, entries(("a/b/c", None), ("..", None)), at(3))
        expected = {k: v for k, v in committed.items() if k not in {"a/b/c", ".."}}
        assert store.load_fingerprints("act") == expected

    # -- isolation ----------------------------------------------------------------------------

    def test_activations_are_isolated(self, store: StateStore) -> None:
        lease_a = store.acquire_lease("act-a", "run-1", TTL, T0)
        lease_b = store.acquire_lease("act-b", "run-2", TTL, T0)  # not blocked by act-a's lease
        store.commit(lease_a, entries(("shared-id", fp(1)), ("only-a", fp(2))), at(1))
        store.commit(lease_b, entries(("shared-id", fp(3))), at(1))
        store.record_intents(lease_a, ["intent-a"])
        store.record_intents(lease_b, ["intent-b"])
        store.save_meta(lease_a, ActivationMeta(mapping_version="va", owned_keys={"a"}))
        store.commit(lease_b, entries(("only-a", None)), at(2))  # deleting in b leaves a alone

        assert store.load_fingerprints("act-a") == {"shared-id": fp(1), "only-a": fp(2)}
        assert store.load_fingerprints("act-b") == {"shared-id": fp(3)}
        assert store.load_intents("act-a") == {"intent-a"}
        assert store.load_intents("act-b") == {"intent-b"}
        assert store.load_meta("act-b") == ActivationMeta()

        store.release_lease(lease_a)
        store.reset("act-a")
        assert store.load_fingerprints("act-a") == {}
        assert store.load_fingerprints("act-b") == {"shared-id": fp(3)}
        assert store.load_intents("act-b") == {"intent-b"}

    def test_lease_of_one_activation_cannot_write_another(self, store: StateStore) -> None:
        lease_a = store.acquire_lease("act-a", "run-1", TTL, T0)
        lease_b = store.acquire_lease("act-b", "run-2", TTL, T0)
        # act-a's owner and token, pointed at act-b: act-b's lease row says otherwise.
        forged = Lease(activation="act-b", owner="run-1", token=lease_a.token, expires_at=lease_a.expires_at)
        with pytest.raises(LeaseLost):
            store.commit(forged, entries(("u1", fp(1))), at(1))
        store.commit(lease_a, entries(("u1", fp(1))), at(1))
        store.commit(lease_b, entries(("u2", fp(2))), at(1))
        assert store.load_fingerprints("act-a") == {"u1": fp(1)}
        assert store.load_fingerprints("act-b") == {"u2": fp(2)}

    # -- intents ------------------------------------------------------------------------------

    def test_intents_record_load_clear(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        assert store.load_intents("act") == set()
        store.record_intents(lease, ["u1", "u2", "u3"])
        store.record_intents(lease, (f"u{n}" for n in (3, 4, 4)))  # any iterable; duplicates fine
        assert store.load_intents("act") == {"u1", "u2", "u3", "u4"}
        store.clear_intents(lease, ["u2", "u4", "never-recorded"])
        assert store.load_intents("act") == {"u1", "u3"}
        store.record_intents(lease, [])
        store.clear_intents(lease, [])
        assert store.load_intents("act") == {"u1", "u3"}

    def test_intents_are_fenced(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        store.record_intents(old, ["u1", "u2"])
        new = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.record_intents(old, ["u3"])
        with pytest.raises(LeaseLost):
            store.clear_intents(old, ["u1"])
        assert store.load_intents("act") == {"u1", "u2"}
        store.clear_intents(new, ["u1"])
        assert store.load_intents("act") == {"u2"}

    def test_an_id_recorded_twice_is_gone_after_one_clear(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.record_intents(lease, ["a", "b"])
        store.record_intents(lease, ["c", "a"])
        store.record_intents(lease, ["a"])
        store.clear_intents(lease, ["a"])
        assert store.load_intents("act") == {"b", "c"}
        store.record_intents(lease, ["a"])  # noted again after the clear: back
        assert store.load_intents("act") == {"a", "b", "c"}

    def test_intents_of_odd_ids_clear_one_by_one(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.record_intents(lease, ODD_IDS)
        remaining = set(ODD_IDS)
        for custom_id in sorted(ODD_IDS, key=lambda i: (len(i), i)):
            store.clear_intents(lease, [custom_id])
            remaining.discard(custom_id)
            assert store.load_intents("act") == remaining

    def test_intents_that_are_not_text_raise_and_write_nothing(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.record_intents(lease, ["kept"])
        bad: list[Any] = ["fine", b"bytes"]
        with pytest.raises(ValueError, match="custom_id must be a str"):
            store.record_intents(lease, bad)
        with pytest.raises(ValueError, match="custom_id must be a str"):
            store.clear_intents(lease, ["kept", None])
        with pytest.raises(ValueError, match="not valid UTF-8"):
            store.record_intents(lease, ["\ud800"])
        assert store.load_intents("act") == {"kept"}

    def test_many_intents_in_one_call(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        ids = {f"user-{n:05d}" for n in range(20_000)}
        store.record_intents(lease, sorted(ids))
        assert store.load_intents("act") == ids
        store.clear_intents(lease, sorted(ids)[:10_000])
        assert store.load_intents("act") == set(sorted(ids)[10_000:])

    def test_a_retired_note_forgets_its_intents_and_no_other(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        first = store.record_intents(lease, ["a1", "a2", "a2"])
        second = store.record_intents(lease, ["b1"])
        assert set(first.custom_ids) == {"a1", "a2"}
        store.retire_intents(lease, first)
        assert store.load_intents("act") == {"b1"}
        store.retire_intents(lease, second)
        assert store.load_intents("act") == set()

    def test_retiring_is_fenced_and_works_after_a_compaction(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        early = store.record_intents(old, ["u1", "u2"])
        store.compact(old, at(1))  # the note is folded into the base state now
        store.retire_intents(old, early)
        assert store.load_intents("act") == set()
        late = store.record_intents(old, ["u3"])
        new = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.retire_intents(old, late)
        assert store.load_intents("act") == {"u3"}
        store.retire_intents(new, late)
        assert store.load_intents("act") == set()

    def test_concurrent_appends_from_several_senders_all_land(self, store: StateStore) -> None:
        # What a run does with several requests in flight: each sender notes intents and
        # commits what Batch acknowledged, from its own worker thread, while the lease is
        # renewed; a stale run racing in must change nothing.
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        senders, rounds = 6, 8
        start = threading.Barrier(senders + 1)
        errors: list[BaseException] = []

        def send(sender: int) -> None:
            try:
                start.wait()
                for n in range(rounds):
                    ids = [f"s{sender}-r{n}-{k}" for k in range(25)]
                    store.record_intents(lease, ids)
                    store.commit(lease, [JournalEntry(i, fp(sender * 1000 + n)) for i in ids], at(1))
                    store.clear_intents(lease, ids[:20])
            except BaseException as error:  # reported below, with the sender's stack
                errors.append(error)

        def renew() -> None:
            start.wait()
            for n in range(4):
                store.renew_lease(lease, TTL, at(2 + n))

        threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
        threads.append(threading.Thread(target=renew))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert not any(thread.is_alive() for thread in threads)
        expected = {
            f"s{s}-r{n}-{k}": fp(s * 1000 + n) for s in range(senders) for n in range(rounds) for k in range(25)
        }
        assert store.load_fingerprints("act") == expected
        assert store.load_intents("act") == {
            f"s{s}-r{n}-{k}" for s in range(senders) for n in range(rounds) for k in range(20, 25)
        }
        store.compact(lease, at(10))
        assert store.load_fingerprints("act") == expected

        # A later run takes over; the first one, still going, is fenced out of every append.
        new = store.acquire_lease("act", "run-b", TTL, at(TTL + 20))
        with pytest.raises(LeaseLost):
            store.commit(lease, entries(("s0-r0-0", None)), at(TTL + 21))
        with pytest.raises(LeaseLost):
            store.record_intents(lease, ["late"])
        store.commit(new, entries(("s0-r0-0", fp(7))), at(TTL + 22))
        assert store.load_fingerprints("act")["s0-r0-0"] == fp(7)
        assert "late" not in store.load_intents("act")

    # -- refusals -----------------------------------------------------------------------------

    def test_refusals_record_replace_load_clear(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        assert store.load_refusals("act") == {}
        first = Refusal("u1", U64_MAX, "$email_address", "invalid email")
        store.record_refusals(lease, [first, Refusal("u2", 0, "(profile)", "simulated rejection")])
        newer = Refusal("u1", 7, "firstname", "string too long: 'é\"[/x]'")
        store.record_refusals(lease, [newer])
        assert store.load_refusals("act") == {"u1": newer, "u2": Refusal("u2", 0, "(profile)", "simulated rejection")}
        store.clear_refusals(lease, ["u2", "never-refused"])
        assert store.load_refusals("act") == {"u1": newer}
        store.record_refusals(lease, [])
        store.clear_refusals(lease, [])
        assert store.load_refusals("act") == {"u1": newer}
        assert store.load_refusals("other") == {}

    def test_refusals_take_odd_ids_and_many_at_once(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        refusals = [Refusal(custom_id, n, "f", "r") for n, custom_id in enumerate(ODD_IDS)]
        refusals += [Refusal(f"user-{n:05d}", n, "f", "r") for n in range(1_200)]
        store.record_refusals(lease, refusals)
        assert store.load_refusals("act") == {refusal.custom_id: refusal for refusal in refusals}
        store.clear_refusals(lease, [refusal.custom_id for refusal in refusals[:700]])
        assert store.load_refusals("act") == {refusal.custom_id: refusal for refusal in refusals[700:]}

    def test_refusal_kinds_and_run_counts_round_trip(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        value = Refusal("u1", U64_MAX, "firstname", "too long")
        item_error = Refusal("u2", 5, "(profile)", "server: <b>internal</b> 'error'", RefusalKind.ITEM_ERROR, 2)
        persistent = Refusal("é-3", 0, "(profile)", "no category: ?", RefusalKind.ITEM_ERROR, PERSISTENT_AFTER_RUNS + 4)
        store.record_refusals(lease, [value, item_error, persistent])
        loaded = store.load_refusals("act")
        assert loaded == {"u1": value, "u2": item_error, "é-3": persistent}
        assert (loaded["u1"].remembered, loaded["u2"].remembered, loaded["é-3"].remembered) == (True, False, True)
        assert loaded["é-3"].persistent
        # An entry of one kind is replaced by the other, whole.
        store.record_refusals(lease, [Refusal("u1", 9, "(profile)", "server: x", RefusalKind.ITEM_ERROR, 1)])
        store.record_refusals(lease, [Refusal("u2", 5, "age", "not an int")])
        loaded = store.load_refusals("act")
        assert loaded["u1"] == Refusal("u1", 9, "(profile)", "server: x", RefusalKind.ITEM_ERROR, 1)
        assert loaded["u2"] == Refusal("u2", 5, "age", "not an int", RefusalKind.VALUE, 1)
        store.clear_refusals(lease, ["u1", "é-3"])
        assert set(store.load_refusals("act")) == {"u2"}

    def test_item_errors_become_persistent_after_the_bound_of_runs_in_a_row(self, store: StateStore) -> None:
        """How a run carries an id's entry forward (Refusal.following), through the store, run after run."""

        def one_run(number: int, payload: int) -> Refusal:
            lease = store.acquire_lease("act", f"run-{number}", TTL, at(number * 10))
            prior = store.load_refusals("act").get("u1")
            store.record_refusals(
                lease, [Refusal("u1", payload, "(profile)", "server: busy", RefusalKind.ITEM_ERROR).following(prior)]
            )
            store.release_lease(lease)
            return store.load_refusals("act")["u1"]

        counts = [one_run(n, payload=7).runs for n in range(PERSISTENT_AFTER_RUNS - 1)]
        assert counts == list(range(1, PERSISTENT_AFTER_RUNS))
        assert not store.load_refusals("act")["u1"].remembered  # still sent by the next run
        assert one_run(PERSISTENT_AFTER_RUNS, payload=7).persistent
        # A changed payload starts again at one run, and is sent again.
        changed = one_run(PERSISTENT_AFTER_RUNS + 1, payload=8)
        assert (changed.runs, changed.remembered) == (1, False)
        # An acknowledged send clears the entry.
        lease = store.acquire_lease("act", "run-acknowledged", TTL, at(1_000))
        store.clear_refusals(lease, ["u1"])
        assert store.load_refusals("act") == {}

    def test_refusals_are_fenced_and_reset(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        kept = Refusal("u1", 1, "f", "r")
        store.record_refusals(old, [kept, Refusal("u3", 3, "(profile)", "server: x", RefusalKind.ITEM_ERROR, 2)])
        store.clear_refusals(old, ["u3"])
        new = store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.record_refusals(old, [Refusal("u2", 2, "f", "r")])
        with pytest.raises(LeaseLost):
            store.clear_refusals(old, ["u1"])
        assert store.load_refusals("act") == {"u1": kept}
        store.record_refusals(new, [Refusal("u4", 4, "(profile)", "server: y", RefusalKind.ITEM_ERROR, 1)])
        store.release_lease(new)
        store.reset("act")
        assert store.load_refusals("act") == {}

    # -- meta ---------------------------------------------------------------------------------

    def test_meta_defaults_to_fresh(self, store: StateStore) -> None:
        assert store.load_meta("act") == ActivationMeta()

    def test_meta_round_trip_and_replace(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        meta = ActivationMeta(
            mapping_version="m-3f2a",
            owned_keys={"$email_address", "plan", "signup_date", "tags"},
            last_success_run_id="run-0001",
            continuation={"cursor": "user-0042", "attempt": 2, "nested": {"ids": ["a", "é"]}},
        )
        store.save_meta(lease, meta)
        assert store.load_meta("act") == meta
        replaced = ActivationMeta(mapping_version="m-4", owned_keys={"plan"})
        store.save_meta(lease, replaced)
        loaded = store.load_meta("act")
        assert loaded == replaced
        assert loaded.continuation is None
        assert loaded.last_success_run_id is None

    def test_meta_is_fenced(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        first = ActivationMeta(mapping_version="v1", owned_keys={"a"})
        store.save_meta(old, first)
        store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        with pytest.raises(LeaseLost):
            store.save_meta(old, ActivationMeta(mapping_version="v2"))
        assert store.load_meta("act") == first

    # -- run records --------------------------------------------------------------------------

    def test_runs_save_get_and_replace(self, store: StateStore) -> None:
        record = run_record("run-1", "act", "2026-01-01T00:00:00Z", trigger_id="msg-1")
        assert store.get_run("run-1") is None
        store.save_run(record)
        assert store.get_run("run-1") == record
        updated = {**record, "status": "failed", "error": "LeaseLost"}
        store.save_run(updated)
        assert store.get_run("run-1") == updated
        assert store.list_runs("act") == [updated]

    def test_runs_list_newest_first_with_limit(self, store: StateStore) -> None:
        started = ["2026-01-03T00:00:00Z", "2026-01-01T00:00:00Z", "2026-01-05T00:00:00Z", "2026-01-02T00:00:00Z"]
        for n, started_at in enumerate(started):
            store.save_run(run_record(f"run-{n}", "act", started_at))
        store.save_run(run_record("other-run", "other-act", "2026-02-01T00:00:00Z"))
        listed = store.list_runs("act")
        assert [r["started_at"] for r in listed] == sorted(started, reverse=True)
        assert [r["run_id"] for r in store.list_runs("act", limit=2)] == ["run-2", "run-0"]
        assert [r["run_id"] for r in store.list_runs("other-act")] == ["other-run"]
        assert store.list_runs("never-seen") == []

    def test_find_run_by_trigger(self, store: StateStore) -> None:
        store.save_run(run_record("run-1", "act", "2026-01-01T00:00:00Z", trigger_id="msg-1"))
        store.save_run(run_record("run-2", "act", "2026-01-02T00:00:00Z", trigger_id="msg-2"))
        store.save_run(run_record("run-3", "other", "2026-01-02T00:00:00Z", trigger_id="msg-3"))
        found = store.find_run_by_trigger("act", "msg-2")
        assert found is not None
        assert found["run_id"] == "run-2"
        assert store.find_run_by_trigger("act", "msg-3") is None  # other activation's trigger
        assert store.find_run_by_trigger("act", "msg-unknown") is None

    # -- delivery attempts --------------------------------------------------------------------

    def test_delivery_attempts_count_up_per_activation_and_trigger(self, store: StateStore) -> None:
        assert store.delivery_attempts("act", "msg-1") == 0
        assert [store.record_delivery_attempt("act", "msg-1", at(n)) for n in range(3)] == [1, 2, 3]
        assert store.record_delivery_attempt("act", "msg-2", at(4)) == 1
        assert store.record_delivery_attempt("other", "msg-1", at(5)) == 1  # same message id, other activation
        assert store.delivery_attempts("act", "msg-1") == 3
        assert store.delivery_attempts("act", "msg-2") == 1
        assert store.delivery_attempts("other", "msg-1") == 1
        assert store.delivery_attempts("act", "msg-never") == 0

    def test_delivery_attempts_take_any_trigger_id(self, store: StateStore) -> None:
        for trigger_id in ("scheduler:job/with/slashes@2026-01-01T00:00:00Z", "..", "__x__", "é" * 200):
            assert store.record_delivery_attempt("act", trigger_id, T0) == 1
            assert store.record_delivery_attempt("act", trigger_id, at(1)) == 2
            assert store.delivery_attempts("act", trigger_id) == 2

    def test_concurrent_deliveries_get_distinct_counts(self, store: StateStore) -> None:
        workers = 4
        barrier = threading.Barrier(workers)
        counts: list[int] = []
        lock = threading.Lock()

        def deliver() -> None:
            barrier.wait()
            count = store.record_delivery_attempt("act", "msg-1", T0)
            with lock:
                counts.append(count)

        threads = [threading.Thread(target=deliver) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(counts) == list(range(1, workers + 1))
        assert store.delivery_attempts("act", "msg-1") == workers

    def test_delivery_attempts_survive_a_reset(self, store: StateStore) -> None:
        # A reset forgets sync state, not how often Pub/Sub delivered a message.
        store.record_delivery_attempt("act", "msg-1", T0)
        store.reset("act")
        assert store.record_delivery_attempt("act", "msg-1", at(1)) == 2

    # -- the request of an idempotency key (issue 19 item 17) ------------------------------------

    def test_a_trigger_keeps_the_request_it_first_came_with(self, store: StateStore) -> None:
        assert store.record_trigger_request("http:key-1", "digest-a", T0) == "digest-a"
        assert store.record_trigger_request("http:key-1", "digest-a", at(1)) == "digest-a"
        assert store.record_trigger_request("http:key-1", "digest-b", at(2)) == "digest-a"  # reused: told
        assert store.record_trigger_request("http:key-2", "digest-b", at(3)) == "digest-b"
        # Delivery counts are another record: neither moves the other.
        assert store.delivery_attempts("act", "http:key-1") == 0
        assert store.record_delivery_attempt("act", "http:key-1", at(4)) == 1
        assert store.record_trigger_request("http:key-1", "digest-c", at(5)) == "digest-a"

    def test_a_trigger_request_takes_any_trigger_id(self, store: StateStore) -> None:
        for trigger_id in ("scheduler:job/with/slashes@2026-01-01T00:00:00Z", "..", "__x__", "é" * 200):
            assert store.record_trigger_request(trigger_id, "first", T0) == "first"
            assert store.record_trigger_request(trigger_id, "second", at(1)) == "first"

    def test_concurrent_first_requests_of_a_trigger_agree_on_one(self, store: StateStore) -> None:
        workers = 4
        barrier = threading.Barrier(workers)
        answers: list[tuple[str, str]] = []
        lock = threading.Lock()

        def request(digest: str) -> None:
            barrier.wait()
            stored = store.record_trigger_request("http:race", digest, T0)
            with lock:
                answers.append((digest, stored))

        threads = [threading.Thread(target=request, args=(f"digest-{n}",)) for n in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stored = {answer for _, answer in answers}
        assert len(answers) == workers
        assert len(stored) == 1  # one digest won, and every caller was told which
        assert [digest for digest, answer in answers if digest == answer] == list(stored)

    def test_trigger_requests_survive_a_reset(self, store: StateStore) -> None:
        store.record_trigger_request("http:key-1", "digest-a", T0)
        store.reset("act")
        assert store.record_trigger_request("http:key-1", "digest-b", at(1)) == "digest-a"

    # -- reset --------------------------------------------------------------------------------

    def test_reset_forgets_state_but_keeps_runs(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        store.record_intents(lease, ["u1"])
        store.save_meta(lease, ActivationMeta(mapping_version="v1", owned_keys={"k"}))
        record = run_record("run-a", "act", "2026-01-01T00:00:00Z", trigger_id="msg-1")
        store.save_run(record)
        store.release_lease(lease)

        store.reset("act")

        assert store.load_fingerprints("act") == {}
        assert store.load_intents("act") == set()
        assert store.load_meta("act") == ActivationMeta()
        assert store.get_run("run-a") == record
        assert store.list_runs("act") == [record]
        assert store.find_run_by_trigger("act", "msg-1") == record

    def test_reset_refuses_while_another_run_holds_the_lease(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", CENTURY, T0)
        store.commit(lease, entries(("u1", fp(1))), at(1))
        store.record_intents(lease, ["u1"])
        with pytest.raises(LeaseHeld) as excinfo:
            store.reset("act")
        assert "run-a" in str(excinfo.value)
        assert store.load_fingerprints("act") == {"u1": fp(1)}
        assert store.load_intents("act") == {"u1"}
        # The running sync was not disturbed.
        store.commit(lease, entries(("u2", fp(2))), at(2))
        assert store.load_fingerprints("act") == {"u1": fp(1), "u2": fp(2)}

    def test_reset_of_an_unknown_activation_is_harmless(self, store: StateStore) -> None:
        store.reset("never-seen")
        assert store.load_fingerprints("never-seen") == {}
