"""The null policy (``on_null``) and the removal policy (``on_remove``): config, then whole runs.

Runs go through the real HTTP simulator with SQLite state (and, for ``on_remove: keep``,
Firestore state on its emulator too). What Batch holds is read back from the simulator; what
the state remembers, from the store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sync.config import Activation, NullPolicy, RemovalPolicy, mapping_version
from sync.config_file import json_schema, parse_activation
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.engine import Run, RunOptions, RunResult
from sync.errors import ConfigError
from sync.sources.duckdb import DuckDBSource
from sync.state.base import StateStore
from sync.state.firestore import FirestoreStateStore
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    PROJECT_KEY,
    make_activation,
    make_client,
    people,
    run_once,
    stored_ids,
    write_segment,
)


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=True)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "nulls",
        "source": {"type": "duckdb", "database": "segment.duckdb", "table": "people"},
        "destination": {"api_key_env": "BATCH_REST_API_KEY", "project_key_env": "BATCH_PROJECT_KEY"},
        "mapping": {"custom_id": "customer_id", "email": "email", "phone": "phone"},
        "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "points"}],
    }
    config.update(overrides)
    return config


def config_error(config: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_activation(config, source="nulls.yaml")
    return caught.value


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"on_null": "erase"}, "on_null", "'clear' or 'keep'"),
        (
            {"attributes": [{"column": "points", "on_null": "sometimes"}]},
            "attributes.0.on_null",
            "'clear' or 'keep'",
        ),
        (
            {"mapping": {"custom_id": "customer_id", "email": "email", "on_null": {"mail": "keep"}}},
            "mapping.on_null",
            "'mail' is not a native field; give one of email, phone, language",
        ),
        (
            {"mapping": {"custom_id": "customer_id", "email": "email", "on_null": {"language": "keep"}}},
            "mapping.on_null.language",
            "mapping.language is not mapped",
        ),
        (
            {"mapping": {"custom_id": "customer_id", "on_null": {"email": "forget"}}},
            "mapping.on_null.email",
            "'clear' or 'keep'",
        ),
        ({"on_remove": "keep"}, "on_remove", "applies to sync_mode 'mirror' only"),
        (
            {"sync_mode": "mirror", "on_remove": "ignore"},
            "on_remove",
            "'clear' or 'keep'",
        ),
    ],
)
def test_a_bad_policy_is_a_config_error_naming_the_file_and_the_field(
    overrides: dict[str, Any], field: str, words: str
) -> None:
    error = config_error(base_config(**overrides))
    assert error.source == "nulls.yaml"
    assert error.field == field
    assert words in str(error)


def test_policies_load_with_their_defaults_and_overrides() -> None:
    plain = parse_activation(base_config(), source="nulls.yaml")
    assert plain.on_null is NullPolicy.CLEAR
    assert plain.on_remove is None
    assert plain.kept_null_keys() == []

    mirror = parse_activation(base_config(sync_mode="mirror"), source="nulls.yaml")
    assert mirror.removal_policy is RemovalPolicy.CLEAR
    kept = parse_activation(base_config(sync_mode="mirror", on_remove="keep"), source="nulls.yaml")
    assert kept.removal_policy is RemovalPolicy.KEEP

    mixed = parse_activation(
        base_config(
            on_null="keep",
            mapping={"custom_id": "customer_id", "email": "email", "phone": "phone", "on_null": {"email": "clear"}},
            attributes=[{"column": "first_name", "name": "firstname"}, {"column": "points", "on_null": "clear"}],
        ),
        source="nulls.yaml",
    )
    # The activation keeps by default; email and points say clear.
    assert mixed.kept_null_keys() == ["$phone_number", "firstname"]


def test_the_mapping_version_moves_with_the_kept_keys_only() -> None:
    plain = parse_activation(base_config(), source="nulls.yaml")
    spelled_out = parse_activation(
        base_config(
            on_null="clear",
            mapping={"custom_id": "customer_id", "email": "email", "phone": "phone", "on_null": {"email": "clear"}},
            attributes=[{"column": "first_name", "name": "firstname", "on_null": "clear"}, {"column": "points"}],
            sync_mode="mirror",
            on_remove="keep",
        ),
        source="nulls.yaml",
    )
    # Nothing kept, and on_remove changes no payload: the version of an activation without policies.
    assert mapping_version(spelled_out) == mapping_version(plain)
    per_attribute = parse_activation(
        base_config(
            attributes=[{"column": "first_name", "name": "firstname", "on_null": "keep"}, {"column": "points"}]
        ),
        source="nulls.yaml",
    )
    by_default = parse_activation(
        base_config(
            on_null="keep",
            mapping={"custom_id": "customer_id", "email": "email", "phone": "phone"},
            attributes=[{"column": "first_name", "name": "firstname"}, {"column": "points"}],
        ),
        source="nulls.yaml",
    )
    assert mapping_version(per_attribute) != mapping_version(plain)
    assert mapping_version(by_default) not in (mapping_version(plain), mapping_version(per_attribute))


def test_the_json_schema_shows_the_policies() -> None:
    schema = json_schema()
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert "keep" in str(properties["on_null"]) or "NullPolicy" in str(properties["on_null"])
    assert "on_remove" in properties
    definitions = schema["$defs"]
    assert isinstance(definitions, dict)
    assert definitions["NullPolicy"]["enum"] == ["clear", "keep"]
    assert definitions["RemovalPolicy"]["enum"] == ["clear", "keep"]
    assert "on_null" in definitions["CustomAttributeConfig"]["properties"]
    native = definitions["MappingConfig"]["properties"]["on_null"]
    assert native["propertyNames"]["enum"][:2] == ["email", "phone"]


# --- runs: on_null ------------------------------------------------------------------------------

MODES = [("full_then_delta", "upsert"), ("full_then_delta", "mirror"), ("full_only", "upsert")]


def profile(simulator: BatchSimulator, custom_id: str) -> dict[str, Any]:
    return simulator.profiles(PROJECT_KEY)[custom_id]


@pytest.mark.parametrize(("run_type", "sync_mode"), MODES)
async def test_a_kept_attribute_keeps_batchs_value_and_a_cleared_one_is_erased(
    sim: tuple[BatchSimulator, str], tmp_path: Path, run_type: str, sync_mode: str
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(20)
    write_segment(segment, rows)
    activation = make_activation(
        tmp_path,
        url,
        run_type=run_type,
        sync_mode=sync_mode,
        attributes=[{"column": "first_name", "name": "firstname", "on_null": "keep"}, {"column": "points"}],
        guards={"max_changed_percent": 100},
    )
    first = await run_once(activation, state)
    assert first.status == "succeeded", first.record.get("error")
    assert profile(simulator, "c00003")["firstname"] == "Name3"

    # v -> null: the kept attribute stays as Batch holds it, the cleared one is erased.
    rows[3].update(first_name=None, points=None)
    write_segment(segment, rows)
    second = await run_once(activation, state)
    assert second.status == "succeeded", second.record.get("error")
    assert profile(simulator, "c00003")["firstname"] == "Name3"
    assert "points" not in profile(simulator, "c00003")
    if run_type == "full_then_delta":
        assert second.record["counts"]["changed"] == 1
    stable = await run_once(activation, state)
    if run_type == "full_then_delta":
        # What was stored for the kept null ("absent") is what the row still maps to: nothing to send.
        assert stable.record["counts"]["sent"] == 0
    assert profile(simulator, "c00003")["firstname"] == "Name3"

    # null -> v: sent; v -> null again: kept again.
    rows[3].update(first_name="Back", points=3)
    write_segment(segment, rows)
    await run_once(activation, state)
    assert profile(simulator, "c00003")["firstname"] == "Back"
    assert profile(simulator, "c00003")["points"] == 3
    rows[3].update(first_name=None)
    write_segment(segment, rows)
    await run_once(activation, state)
    assert profile(simulator, "c00003")["firstname"] == "Back"
    assert profile(simulator, "c00003")["points"] == 3


@pytest.mark.parametrize(("run_type", "sync_mode"), MODES)
async def test_a_field_override_beats_the_activation_default(
    sim: tuple[BatchSimulator, str], tmp_path: Path, run_type: str, sync_mode: str
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(
        tmp_path,
        url,
        run_type=run_type,
        sync_mode=sync_mode,
        on_null="keep",
        mapping={"on_null": {"email": "clear"}},
        attributes=[{"column": "first_name", "name": "firstname"}, {"column": "points", "on_null": "clear"}],
    )
    await run_once(activation, state)
    rows[4].update(email=None, phone=None, first_name=None, points=None)
    write_segment(segment, rows)
    result = await run_once(activation, state)
    assert result.status == "succeeded", result.record.get("error")
    held = profile(simulator, "c00004")
    # Kept by the activation's default: the phone (a native) and firstname.
    assert held["$phone_number"] == "+33612340004"
    assert held["firstname"] == "Name4"
    # Cleared by their own override: the email (mapping.on_null) and points (attributes[].on_null).
    assert "$email_address" not in held
    assert "points" not in held


async def app_writes(base_url: str, custom_id: str, attributes: dict[str, Any]) -> None:
    """What the app's SDK (or another tool) writes to a profile: straight to the simulator's API."""
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Batch-Project": PROJECT_KEY}
    item = {"identifiers": {"custom_id": custom_id}, "attributes": attributes}
    url = f"{base_url}/2.11/profiles/update"
    async with aiohttp.ClientSession() as session, session.post(url, json=[item], headers=headers) as response:
        assert response.status == 202, await response.text()


async def test_a_new_row_with_kept_nulls_leaves_what_the_app_wrote(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    await app_writes(url, "c00000", {"$language": "fr", "firstname": "From the app", "points": 7})
    write_segment(segment, [{**people(1)[0], "email": None, "phone": None, "first_name": None, "points": None}])
    activation = make_activation(
        tmp_path,
        url,
        on_null="keep",
        attributes=[{"column": "first_name", "name": "firstname"}, {"column": "points", "on_null": "clear"}],
    )
    result = await run_once(activation, state)
    assert result.record["counts"]["acknowledged"] == 1
    # firstname is kept (the activation's default), points cleared (its own override).
    assert profile(simulator, "c00000") == {"$language": "fr", "firstname": "From the app"}


async def test_turning_a_kept_attribute_to_clear_erases_what_batch_kept(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """A kept null is stored as "absent", not as null: switching to clear sends the null it now means."""
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    keep = [{"column": "first_name", "name": "firstname", "on_null": "keep"}, {"column": "points"}]
    activation = make_activation(tmp_path, url, attributes=keep, guards={"max_changed_percent": 100})
    await run_once(activation, state)
    rows[2]["first_name"] = None
    write_segment(segment, rows)
    await run_once(activation, state)
    assert profile(simulator, "c00002")["firstname"] == "Name2"

    cleared = make_activation(tmp_path, url, guards={"max_changed_percent": 100})
    switched = await run_once(cleared, state)
    assert switched.record["mapping_version"]["changed"] is True
    # Only the row whose kept null now means "erase" is sent.
    assert switched.record["counts"]["changed"] == 1
    assert "firstname" not in profile(simulator, "c00002")


async def test_a_kept_attribute_that_turns_invalid_is_dropped_like_a_null_and_batch_keeps_it(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(
        tmp_path, url, on_invalid_value="drop_attribute", mapping={"on_null": {"email": "keep"}}
    )
    await run_once(activation, state)
    rows[6]["email"] = "not an address"
    write_segment(segment, rows)
    dropped = await run_once(activation, state)
    assert dropped.record["dropped_attributes_by_reason"] == {"invalid_email": 1}
    assert profile(simulator, "c00006")["$email_address"] == "person6@example.com"
    # Dropped and kept-null both leave Batch's value alone: from one to the other is no change.
    rows[6]["email"] = None
    write_segment(segment, rows)
    after = await run_once(activation, state)
    assert after.record["counts"]["sent"] == 0
    assert after.record["counts"]["refreshed"] == 1
    assert profile(simulator, "c00006")["$email_address"] == "person6@example.com"


# --- runs: on_remove ------------------------------------------------------------------------------


async def run_with(store: StateStore, activation: Activation) -> RunResult:
    source = DuckDBSource(activation.source, activation=activation.name)  # type: ignore[arg-type]
    try:
        run = Run(activation, source=source, store=store, client=make_client(activation), options=RunOptions())
        return await run.execute()
    finally:
        source.close()


async def assert_on_remove_keep_forgets(store: StateStore, tmp_path: Path, url: str, simulator: BatchSimulator) -> None:
    rows = people(30)
    write_segment(tmp_path / "segment.duckdb", rows)
    activation = make_activation(tmp_path, url, sync_mode="mirror", on_remove="keep")
    first = await run_with(store, activation)
    assert first.status == "succeeded", first.record.get("error")
    before = profile(simulator, "c00003")

    # An id an earlier run noted and never committed (a crash): mirror owns it, so it is "synced".
    lease = store.acquire_lease("test_people", "planting", ttl_seconds=30, now=datetime.now(UTC))
    store.record_intents(lease, ["c09999"])
    store.release_lease(lease)

    rows[3]["active"] = False
    write_segment(tmp_path / "segment.duckdb", rows)
    received = simulator.stats()["profiles_received"]
    second = await run_with(store, activation)
    assert second.status == "succeeded", second.record.get("error")
    counts = second.record["counts"]
    assert counts["removed"] == 2
    assert counts["forgotten"] == 2
    assert counts["sent"] == 0
    assert simulator.stats()["profiles_received"] == received  # nothing sent for them
    assert profile(simulator, "c00003") == before  # Batch holds what it held
    assert "c00003" not in set(store.load_fingerprints("test_people"))
    # The earlier run's intent went with it (else the next run would see it as unconfirmed).
    assert "c09999" not in store.load_intents("test_people")

    third = await run_with(store, activation)
    assert third.record["counts"]["removed"] == 0
    assert "unconfirmed" not in third.record["counts"]
    # Back in the segment: synced as new.
    rows[3]["active"] = True
    rows[3]["points"] = 333
    write_segment(tmp_path / "segment.duckdb", rows)
    back = await run_with(store, activation)
    assert back.record["counts"]["new"] == 1
    assert profile(simulator, "c00003")["points"] == 333


async def test_on_remove_keep_sends_nothing_and_forgets_the_profile_in_sqlite(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        await assert_on_remove_keep_forgets(store, tmp_path, url, simulator)
    finally:
        store.close()


@pytest.mark.emulator
async def test_on_remove_keep_sends_nothing_and_forgets_the_profile_in_firestore(
    tmp_path: Path, make_firestore_store: Callable[..., FirestoreStateStore]
) -> None:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=True)) as running:
        await assert_on_remove_keep_forgets(make_firestore_store(), tmp_path, running.base_url, running.simulator)


async def test_on_remove_clear_still_clears_kept_attributes(sim: tuple[BatchSimulator, str], tmp_path: Path) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, sync_mode="mirror", on_null="keep", on_remove="clear")
    await run_once(activation, state)
    rows[1]["active"] = False
    write_segment(segment, rows)
    result = await run_once(activation, state)
    assert result.record["counts"]["removed"] == 1
    assert "forgotten" not in result.record["counts"]
    assert simulator.profile_records(PROJECT_KEY)["c00001"]["attributes"] == {}
    assert "c00001" not in stored_ids(state)


async def test_a_removal_batch_refused_is_forgotten_not_held_under_on_remove_keep(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows = people(10)
    write_segment(segment, rows)
    clearing = make_activation(tmp_path, url, sync_mode="mirror")
    await run_once(clearing, state)
    rows[5]["active"] = False
    write_segment(segment, rows)
    simulator.faults.reject_custom_ids = {"c00005"}
    refused = await run_once(clearing, state)
    assert refused.record["counts"]["rejected_by_batch"] == 1
    held = await run_once(clearing, state)
    assert held.record["counts"]["refused_unchanged"] == 1

    keeping = make_activation(tmp_path, url, sync_mode="mirror", on_remove="keep")
    forgotten = await run_once(keeping, state)
    assert forgotten.record["counts"]["forgotten"] == 1
    assert forgotten.record["counts"].get("refused_unchanged", 0) == 0
    store = SQLiteStateStore(state)
    try:
        assert "c00005" not in store.load_refusals("test_people")
        assert "c00005" not in set(store.load_fingerprints("test_people"))
    finally:
        store.close()
    assert profile(simulator, "c00005")["firstname"] == "Name5"
