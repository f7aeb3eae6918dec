"""The MemberStore contract (an activation's Batch audience): mixed into each backend's StateStore suite.

Same rules as :mod:`state_conformance`: a ``store`` fixture yielding a fresh store, clock
values derived from :data:`state_conformance.T0`, and only the protocol's methods.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from state_conformance import ODD_IDS, T0, TTL, at

from sync.errors import LeaseLost
from sync.state.base import StateStore


def ids(*values: str) -> pa.Array:
    return pa.array(list(values), pa.string())


def members_of(store: StateStore, activation: str = "act") -> set[str]:
    loaded = store.load_members(activation)
    values = loaded.ids.to_pylist()
    assert len(values) == len(set(values)), "a member is held twice"
    return set(values)


def unconfirmed_of(store: StateStore, activation: str = "act") -> set[str]:
    return set(store.load_members(activation).unconfirmed.to_pylist())


class MemberStoreContract:
    def test_nothing_is_stored_at_first(self, store: StateStore) -> None:
        loaded = store.load_members("act")
        assert loaded.audience is None
        assert loaded.ids.to_pylist() == []
        assert loaded.unconfirmed.to_pylist() == []

    def test_start_names_the_audience_once(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        assert store.start_members(lease, "VIP_2026") is False  # nothing to forget
        assert store.load_members("act").audience == "VIP_2026"
        store.commit_members(lease, ids("a", "b"), ids())
        assert store.start_members(lease, "VIP_2026") is False
        assert members_of(store) == {"a", "b"}

    def test_commits_add_and_remove_and_readding_keeps_one_copy(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        store.commit_members(lease, ids("a", "b", "c"), ids())
        store.commit_members(lease, ids("d", "a"), ids("b", "never-a-member"))
        assert members_of(store) == {"a", "c", "d"}
        store.commit_members(lease, ids("b"), ids("a"))
        assert members_of(store) == {"b", "c", "d"}

    def test_members_survive_compaction_and_a_new_lease(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        store.commit_members(lease, ids(*[f"m{n:05d}" for n in range(30_000)]), ids())
        store.compact_members(lease)
        store.commit_members(lease, ids("extra"), ids("m00000", "m29999"))
        store.release_lease(lease)
        after = store.acquire_lease("act", "run-b", TTL, at(1))
        store.compact_members(after)
        expected = {f"m{n:05d}" for n in range(1, 29_999)} | {"extra"}
        assert members_of(store) == expected

    def test_another_audience_forgets_the_members_and_the_intents(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "old")
        store.commit_members(lease, ids("a", "b"), ids())
        store.record_member_intents(lease, ids("c"))
        assert store.start_members(lease, "new") is True
        loaded = store.load_members("act")
        assert (loaded.audience, loaded.ids.to_pylist(), loaded.unconfirmed.to_pylist()) == ("new", [], [])

    def test_forget_keeps_the_name(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        store.commit_members(lease, ids("a"), ids())
        store.record_member_intents(lease, ids("b"))
        store.forget_members(lease)
        loaded = store.load_members("act")
        assert (loaded.audience, loaded.ids.to_pylist(), loaded.unconfirmed.to_pylist()) == ("aud", [], [])

    def test_intents_record_retire_clear(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        first = store.record_member_intents(lease, ids("a", "b"))
        second = store.record_member_intents(lease, ids("b", "c"))
        assert unconfirmed_of(store) == {"a", "b", "c"}
        store.retire_member_intents(lease, first)
        # A store may drop the note's own records whole: "b" is still noted by the second note,
        # or cleared with the first; either way "c" stays and "a" is gone.
        assert {"c"} <= unconfirmed_of(store) <= {"b", "c"}
        store.clear_member_intents(lease, ids("b", "c", "never-noted"))
        assert unconfirmed_of(store) == set()
        store.retire_member_intents(lease, second)
        assert unconfirmed_of(store) == set()

    def test_a_note_retired_after_a_compaction_is_forgotten(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        note = store.record_member_intents(lease, ids("x", "y"))
        store.compact_members(lease)
        store.retire_member_intents(lease, note)
        assert unconfirmed_of(store) == set()

    def test_every_write_is_fenced(self, store: StateStore) -> None:
        old = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(old, "aud")
        store.commit_members(old, ids("kept"), ids())
        note = store.record_member_intents(old, ids("noted"))
        store.acquire_lease("act", "run-b", TTL, at(TTL + 1))
        for write in (
            lambda: store.start_members(old, "other"),
            lambda: store.forget_members(old),
            lambda: store.record_member_intents(old, ids("z")),
            lambda: store.retire_member_intents(old, note),
            lambda: store.clear_member_intents(old, ids("noted")),
            lambda: store.commit_members(old, ids("z"), ids("kept")),
            lambda: store.compact_members(old),
        ):
            with pytest.raises(LeaseLost):
                write()
        loaded = store.load_members("act")
        assert (loaded.audience, loaded.ids.to_pylist(), loaded.unconfirmed.to_pylist()) == (
            "aud",
            ["kept"],
            ["noted"],
        )

    def test_odd_ids_round_trip(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        store.commit_members(lease, ids(*ODD_IDS), ids())
        assert members_of(store) == set(ODD_IDS)
        store.commit_members(lease, ids(), ids(*ODD_IDS[::2]))
        assert members_of(store) == set(ODD_IDS[1::2])

    def test_ids_that_are_not_strings_raise_and_write_nothing(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        with pytest.raises(ValueError, match="member ids must be strings"):
            store.commit_members(lease, pa.array([1, 2]), ids())
        with pytest.raises(ValueError, match="member id is null"):
            store.record_member_intents(lease, pa.array(["a", None], pa.string()))
        assert members_of(store) == set()
        assert unconfirmed_of(store) == set()

    def test_activations_are_isolated_and_reset_forgets_members(self, store: StateStore) -> None:
        one = store.acquire_lease("one", "run-a", TTL, T0)
        two = store.acquire_lease("two", "run-a", TTL, T0)
        store.start_members(one, "aud")
        store.start_members(two, "aud")
        store.commit_members(one, ids("a"), ids())
        store.commit_members(two, ids("b"), ids())
        store.record_member_intents(one, ids("c"))
        store.release_lease(one)
        store.reset("one", now=at(1))
        assert store.load_members("one").audience is None
        assert members_of(store, "one") == set()
        assert unconfirmed_of(store, "one") == set()
        assert members_of(store, "two") == {"b"}

    def test_many_members_in_calls_of_ten_thousand(self, store: StateStore) -> None:
        lease = store.acquire_lease("act", "run-a", TTL, T0)
        store.start_members(lease, "aud")
        everyone = [f"user-{n:06d}" for n in range(120_000)]
        for start in range(0, len(everyone), 10_000):
            store.commit_members(lease, ids(*everyone[start : start + 10_000]), ids())
        store.compact_members(lease)
        leaving = everyone[::7]
        store.commit_members(lease, ids(), ids(*leaving[:10_000]))
        store.commit_members(lease, ids(), ids(*leaving[10_000:]))
        assert members_of(store) == set(everyone) - set(leaving)
