"""``send: changed_attributes`` in whole runs through the real HTTP simulator.

What the app's SDK writes to a profile (a native like ``$language``, a custom attribute the
app sets, or its own value of an attribute the warehouse also maps) survives a delta that
changed another attribute; first syncs, full passes and ``--full`` still send everything; a
mapping change sends only the new or changed mappings; mirror removals still clear what the
activation owns. The app's writes go to the simulator directly (``write_as_app``), not
through the API, as an SDK's would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sync.attributes import fragment_hashes
from sync.dev.simulator import BatchSimulator
from sync.model import Fingerprint
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import API_KEY, PROJECT_KEY, make_activation, people, run_once, write_segment

CHANGED = {"send": "changed_attributes"}


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=True)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def profile(simulator: BatchSimulator, custom_id: str) -> dict[str, Any]:
    return simulator.profiles(PROJECT_KEY)[custom_id]


def updates(simulator: BatchSimulator, custom_id: str) -> int:
    count: int = simulator.profile_records(PROJECT_KEY)[custom_id]["updates"]
    return count


def stored(state: Path, activation: str = "test_people") -> dict[str, Fingerprint]:
    store = SQLiteStateStore(state)
    try:
        return store.load_fingerprints(activation)
    finally:
        store.close()


def attribute_set(*fragments: str) -> bytes:
    """The packed set the state must hold for a payload of these fragments (``,"key":value``)."""
    import pyarrow as pa

    hashes = fragment_hashes(pa.array(list(fragments), pa.string())).to_pylist()
    return b"".join(value.to_bytes(4, "little") for value in sorted(hashes))


def the_app_writes(simulator: BatchSimulator) -> None:
    # A native and a custom attribute only the app sets, and the app's own value of a mapped one.
    simulator.write_as_app(PROJECT_KEY, "c00001", {"$language": "fr", "theme": "dark", "firstname": "Appy"})
    simulator.write_as_app(PROJECT_KEY, "c00002", {"$timezone": "Europe/Paris"})
    simulator.write_as_app(PROJECT_KEY, "c00003", {"theme": "light"})


@pytest.mark.parametrize("sync_mode", ["upsert", "mirror"])
async def test_what_the_app_wrote_survives_a_delta_that_changed_another_attribute(
    sim: tuple[BatchSimulator, str], tmp_path: Path, sync_mode: str
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(40)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, sync_mode=sync_mode, **CHANGED)
    first = await run_once(activation, state)
    assert first.record["counts"]["new"] == 40
    the_app_writes(simulator)

    rows[1]["points"] = 1_001
    rows[2]["email"] = "changed2@example.com"
    rows[3]["active"] = False  # leaves the segment: mirror clears what the activation owns
    write_segment(segment, rows)
    second = await run_once(activation, state)
    assert second.status == "succeeded"
    assert second.record["counts"]["changed"] == 2

    one = profile(simulator, "c00001")
    assert one["points"] == 1_001
    assert one["firstname"] == "Appy"  # the app's value of a mapped attribute the warehouse did not change
    assert (one["$language"], one["theme"]) == ("fr", "dark")
    assert one["$email_address"] == "person1@example.com"
    two = profile(simulator, "c00002")
    assert (two["$email_address"], two["$timezone"], two["firstname"]) == (
        "changed2@example.com",
        "Europe/Paris",
        "Name2",
    )
    three = profile(simulator, "c00003")
    assert three["theme"] == "light"  # never the activation's: a removal does not touch it
    if sync_mode == "mirror":
        assert second.record["counts"]["removed"] == 1
        assert not any(key in three for key in ("$email_address", "$phone_number", "firstname", "points"))
    else:
        assert three["firstname"] == "Name3"

    # What the state holds after the ack is the whole mapped payload's set, not the body sent.
    fingerprint = stored(state)["c00001"]
    assert fingerprint.attributes == attribute_set(
        ',"$email_address":"person1@example.com"',
        ',"$phone_number":"+33612340001"',
        ',"firstname":"Name1"',
        ',"points":1001',
    )
    assert (sync_mode == "mirror") is ("c00003" not in stored(state))
    # Nothing moved since: nothing is sent, and what the app wrote stays.
    third = await run_once(activation, state)
    assert third.record["counts"]["sent"] == 0
    assert profile(simulator, "c00001")["firstname"] == "Appy"


async def test_whole_profile_sending_overwrites_what_the_app_wrote(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    # The default, for contrast: the whole mapped payload goes, the app's firstname is lost.
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url)
    await run_once(activation, state)
    the_app_writes(simulator)
    rows[1]["points"] = 1_001
    write_segment(segment, rows)
    await run_once(activation, state)
    assert profile(simulator, "c00001")["firstname"] == "Name1"
    assert profile(simulator, "c00001")["$language"] == "fr"  # never mapped: never sent
    assert stored(state)["c00001"].attributes is None  # no sets kept without the option


async def test_full_passes_send_everything(sim: tuple[BatchSimulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    write_segment(segment, people(10))
    activation = make_activation(tmp_path, url, **CHANGED)
    await run_once(activation, state)
    the_app_writes(simulator)
    forced = await run_once(activation, state, full=True)
    assert forced.record["counts"]["sent"] == 10
    assert profile(simulator, "c00001")["firstname"] == "Name1"
    assert profile(simulator, "c00001")["$language"] == "fr"

    full_only = make_activation(tmp_path, url, run_type="full_only", **CHANGED)
    simulator.write_as_app(PROJECT_KEY, "c00004", {"firstname": "Appy"})
    result = await run_once(full_only, tmp_path / "full_only.db")
    assert result.record["counts"]["sent"] == 10
    assert profile(simulator, "c00004")["firstname"] == "Name4"


async def test_a_mapping_change_sends_only_the_new_or_changed_mappings(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    write_segment(segment, people(20))
    activation = make_activation(tmp_path, url, **CHANGED)
    await run_once(activation, state)
    the_app_writes(simulator)
    before = updates(simulator, "c00005")

    # A new attribute, and points now sent under another name.
    remapped = make_activation(
        tmp_path,
        url,
        attributes=[
            {"column": "first_name", "name": "firstname"},
            {"column": "points", "name": "score"},
            {"column": "active", "name": "is_active"},
        ],
        **CHANGED,
    )
    result = await run_once(remapped, state, allow_guards=("changed_percent",))
    assert result.status == "succeeded"
    assert result.record["counts"]["changed"] == 20
    assert result.record["mapping_version"]["changed"] is True
    assert "only the new or changed attributes" in result.record["mapping_version"]["explanation"]
    one = profile(simulator, "c00001")
    assert (one["score"], one["is_active"]) == (1, True)
    assert one["firstname"] == "Appy"  # unchanged mapping, unchanged value: not sent
    assert one["points"] == 1  # no longer mapped: Batch keeps it, as with whole payloads
    assert updates(simulator, "c00005") == before + 1


async def test_a_mapping_that_drops_an_attribute_sends_nothing(sim: tuple[BatchSimulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    write_segment(segment, people(20))
    await run_once(make_activation(tmp_path, url, **CHANGED), state)
    received = simulator.stats()["profiles_received"]
    fewer = make_activation(tmp_path, url, attributes=[{"column": "first_name", "name": "firstname"}], **CHANGED)
    result = await run_once(fewer, state)
    counts = result.record["counts"]
    # Every payload moved (points left it), but Batch holds every attribute it still has.
    assert (counts["changed"], counts["refreshed"], counts["sent"]) == (0, 20, 0)
    assert simulator.stats()["profiles_received"] == received
    assert stored(state)["c00001"].attributes == attribute_set(
        ',"$email_address":"person1@example.com"', ',"$phone_number":"+33612340001"', ',"firstname":"Name1"'
    )
    again = await run_once(fewer, state)
    assert again.record["counts"]["skipped_unmapped"] == 20


async def test_switching_the_option_on_sends_each_changed_profile_whole_once(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    await run_once(make_activation(tmp_path, url), state)
    assert all(fingerprint.attributes is None for fingerprint in stored(state).values())
    activation = make_activation(tmp_path, url, **CHANGED)
    the_app_writes(simulator)

    rows[1]["points"] = 2
    write_segment(segment, rows)
    await run_once(activation, state)
    # No set stored yet: the first change is sent whole (and its set kept from then on).
    assert profile(simulator, "c00001")["firstname"] == "Name1"
    assert stored(state)["c00001"].attributes is not None
    assert stored(state)["c00002"].attributes is None  # unchanged: not even mapped

    simulator.write_as_app(PROJECT_KEY, "c00001", {"firstname": "Appy"})
    rows[1]["points"] = 3
    write_segment(segment, rows)
    await run_once(activation, state)
    assert profile(simulator, "c00001")["points"] == 3
    assert profile(simulator, "c00001")["firstname"] == "Appy"


async def test_a_dropped_attribute_is_left_to_batch_until_it_is_valid(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, on_invalid_value="drop_attribute", **CHANGED)
    await run_once(activation, state)
    simulator.write_as_app(PROJECT_KEY, "c00001", {"firstname": "Appy"})

    rows[1]["phone"] = "12"  # invalid: dropped, Batch keeps the number it has
    rows[1]["points"] = 50
    write_segment(segment, rows)
    result = await run_once(activation, state)
    assert result.record["counts"]["changed"] == 1
    one = profile(simulator, "c00001")
    assert (one["points"], one["$phone_number"], one["firstname"]) == (50, "+33612340001", "Appy")

    rows[1]["phone"] = "+33612349999"
    write_segment(segment, rows)
    await run_once(activation, state)
    one = profile(simulator, "c00001")
    assert (one["points"], one["$phone_number"], one["firstname"]) == (50, "+33612349999", "Appy")


async def test_a_refused_change_is_remembered_and_the_next_change_goes_through(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, **CHANGED)
    await run_once(activation, state)
    acknowledged = stored(state)["c00002"]
    simulator.write_as_app(PROJECT_KEY, "c00002", {"firstname": "Appy"})

    simulator.faults.update({"item_errors": {"value": 1.0}})  # Batch refuses the value sent
    rows[2]["points"] = 20
    write_segment(segment, rows)
    refused = await run_once(activation, state)
    assert refused.record["counts"]["rejected_by_batch"] == 1
    assert profile(simulator, "c00002")["points"] == 2
    assert stored(state)["c00002"] == acknowledged  # a refusal moves no fingerprint, no set
    again = await run_once(activation, state)
    assert (again.record["counts"]["refused_unchanged"], again.record["counts"]["sent"]) == (1, 0)

    simulator.faults.clear()
    rows[2]["points"] = 21
    write_segment(segment, rows)
    fixed = await run_once(activation, state)
    assert fixed.record["counts"]["changed"] == 1
    assert (profile(simulator, "c00002")["points"], profile(simulator, "c00002")["firstname"]) == (21, "Appy")


async def test_a_kept_null_is_a_refresh_and_batch_keeps_its_value(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, on_null="keep", **CHANGED)
    await run_once(activation, state)
    received = simulator.stats()["profiles_received"]
    rows[3]["first_name"] = None  # kept: never sent as null
    write_segment(segment, rows)
    result = await run_once(activation, state)
    counts = result.record["counts"]
    assert (counts["changed"], counts["refreshed"], counts["sent"]) == (0, 1, 0)
    assert simulator.stats()["profiles_received"] == received
    assert profile(simulator, "c00003")["firstname"] == "Name3"
    rows[3]["points"] = 30
    write_segment(segment, rows)
    await run_once(activation, state)
    assert (profile(simulator, "c00003")["points"], profile(simulator, "c00003")["firstname"]) == (30, "Name3")
