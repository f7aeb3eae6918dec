"""Whole runs through the real HTTP simulator: the guarantees of ARCHITECTURE.md §3."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from sync.dev.simulator import BatchSimulator
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    PROJECT_KEY,
    make_activation,
    make_client,
    people,
    person,
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


@pytest.fixture
def segment(tmp_path: Path) -> Path:
    return tmp_path / "segment.duckdb"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def held(simulator: BatchSimulator) -> dict[str, dict[str, Any]]:
    """Profiles that hold at least one attribute value (a cleared profile holds none)."""
    return {
        cid: attrs
        for cid, attrs in simulator.profiles(PROJECT_KEY).items()
        if any(v is not None for v in attrs.values())
    }


async def test_full_then_delta_sends_only_what_changed(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    rows = people(300)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url)

    first = await run_once(activation, state)
    assert first.status == "succeeded"
    assert first.record["counts"]["new"] == 300
    assert first.record["counts"]["acknowledged"] == 300
    assert len(held(simulator)) == 300
    assert simulator.profiles(PROJECT_KEY)["c00007"]["firstname"] == "Name7"
    assert simulator.profiles(PROJECT_KEY)["c00007"]["$phone_number"] == "+33612340007"

    rows[7]["points"] = 7_000
    rows[8]["phone"] = "+33 6 12 34 00 08"  # same number, other format: no send
    rows.append(person(900))
    write_segment(segment, rows)
    received_before = simulator.stats()["profiles_received"]
    second = await run_once(activation, state)
    counts = second.record["counts"]
    assert (counts["new"], counts["changed"], counts["unchanged"], counts["refreshed"]) == (1, 1, 299, 1)
    assert simulator.stats()["profiles_received"] - received_before == 2
    assert simulator.profiles(PROJECT_KEY)["c00007"]["points"] == 7_000

    third = await run_once(activation, state)
    assert third.record["counts"]["sent"] == 0
    assert third.record["counts"]["unchanged"] == 301


async def test_full_only_sends_every_valid_row_every_run(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(120))
    activation = make_activation(tmp_path, url, run_type="full_only")
    await run_once(activation, state)
    second = await run_once(activation, state)
    assert second.record["full"] is True
    assert second.record["counts"]["sent"] == 120
    assert simulator.stats()["profiles_received"] == 240


async def test_mirror_clears_what_left_and_only_what_it_synced(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    rows = people(50)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, sync_mode="mirror")
    await run_once(activation, state)
    rows[3]["active"] = False
    rows[4]["email"] = "broken"  # invalid now: rejected, but still in the segment, so never cleared
    write_segment(segment, rows)
    result = await run_once(activation, state)
    assert result.status == "succeeded_with_rejections"
    assert result.record["counts"]["removed"] == 1
    cleared = simulator.profiles(PROJECT_KEY)["c00003"]
    assert all(value is None for value in cleared.values()) or cleared == {}
    assert simulator.profiles(PROJECT_KEY)["c00004"]["$email_address"] == "person4@example.com"
    assert "c00003" not in stored_ids(state)
    assert "c00004" in stored_ids(state)
    assert len(held(simulator)) == 49


async def test_guards_abort_before_anything_is_sent(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    rows = people(40)
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, sync_mode="mirror")
    await run_once(activation, state)
    for row in rows[:20]:
        row["active"] = False
    write_segment(segment, rows)
    received = simulator.stats()["profiles_received"]
    aborted = await run_once(activation, state)
    assert aborted.status == "aborted_by_guard"
    assert aborted.exit_code == 3
    assert "removed_percent" in aborted.record["error"]
    assert "--allow removed_percent" in aborted.record["error"]
    assert simulator.stats()["profiles_received"] == received
    assert len(stored_ids(state)) == 40

    allowed = await run_once(activation, state, allow_guards=("removed_percent",))
    assert allowed.status == "succeeded"
    assert allowed.record["counts"]["removed"] == 20
    assert len(held(simulator)) == 20


async def test_empty_segment_with_state_is_refused(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(10))
    activation = make_activation(tmp_path, url, sync_mode="mirror", guards={"max_removed_percent": 100})
    await run_once(activation, state)
    write_segment(segment, [])
    result = await run_once(activation, state)
    assert result.status == "aborted_by_guard"
    assert "empty_segment" in result.record["error"]
    assert len(held(simulator)) == 10


async def test_partial_errors_are_not_committed_and_are_retried_once_changed(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    rows = people(30)
    write_segment(segment, rows)
    simulator.faults.reject_custom_ids = {"c00005", "c00006"}
    activation = make_activation(tmp_path, url)
    first = await run_once(activation, state)
    assert first.status == "succeeded_with_rejections"
    assert first.record["counts"]["rejected_by_batch"] == 2
    assert first.record["counts"]["acknowledged"] == 28
    assert {"c00005", "c00006"}.isdisjoint(stored_ids(state))
    sample = next(s for s in first.record["rejected_samples"] if s["custom_id"] == "c00005")
    assert sample["issues"][0]["reason"] == "batch_rejected"

    simulator.faults.reject_custom_ids = set()
    unchanged = await run_once(activation, state)  # the refused payloads are not sent again as they are
    assert unchanged.record["counts"]["refused_unchanged"] == 2
    assert unchanged.record["counts"]["sent"] == 0
    for row in rows[5:7]:
        row["points"] += 1
    write_segment(segment, rows)
    second = await run_once(activation, state)
    assert second.record["counts"]["new"] == 2
    assert second.status == "succeeded"
    assert len(stored_ids(state)) == 30


async def test_a_storm_of_429_5xx_and_dropped_connections_loses_nothing(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(600))
    simulator.faults.update({"fail_next": 6, "fail_status": 429, "drop_after_apply": 2, "drop_before_apply": 1})
    activation = make_activation(tmp_path, url, guards={"max_changed_percent": 100})  # round 2 rewrites all
    first = await run_once(activation, state)
    assert first.status == "succeeded", first.record["error"]
    assert first.record["counts"]["acknowledged"] == 600
    stats = simulator.stats()
    assert stats["too_many_requests"] + stats["status_codes"].get("429", 0) >= 6
    assert stats["connections_dropped"] == 3
    assert len(held(simulator)) == 600

    simulator.faults.update({"fail_next": 3, "fail_status": 500, "failure_rate": 0.3, "failure_status": 503})
    rows = people(600)
    for row in rows:
        row["points"] += 1
    write_segment(segment, rows)
    second = await run_once(activation, state)
    assert second.record["counts"]["acknowledged"] + second.record["counts"]["failed"] == 600
    assert simulator.stats()["status_codes"].get("500", 0) == 3
    simulator.faults.clear()
    third = await run_once(activation, state)
    assert third.status == "succeeded"
    assert {attrs["points"] for attrs in held(simulator).values()} == {index + 1 for index in range(600)}


async def test_exhausted_retries_leave_rows_uncommitted_then_converge(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(20))
    simulator.faults.update({"fail_next": 1_000, "fail_status": 503})
    activation = make_activation(tmp_path, url)
    failed = await run_once(activation, state)
    assert failed.status == "partial"
    assert failed.exit_code == 6
    assert failed.record["counts"]["failed"] == 20
    assert "503" in failed.record["error"]
    assert stored_ids(state) == set()  # guarantee 1: nothing acknowledged, nothing stored

    simulator.faults.clear()
    recovered = await run_once(activation, state)
    assert recovered.status == "succeeded"
    assert recovered.record["counts"]["new"] == 20
    assert len(held(simulator)) == 20


async def test_bad_credentials_stop_the_run_without_leaking_them(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    _, url = sim
    write_segment(segment, people(5))
    activation = make_activation(tmp_path, url)
    wrong = "wrong-key-7d3e9a1b2c4f"
    with structlog.testing.capture_logs() as logs:
        result = await run_once(activation, state, client=make_client(activation, api_key=wrong))
    assert result.status == "auth_error"
    assert result.exit_code == 4
    assert "BATCH_REST_API_KEY" in result.record["error"]
    text = repr(result.record) + repr(logs)
    assert wrong not in text
    assert PROJECT_KEY not in text
    stored = SQLiteStateStore(state)
    try:
        saved = stored.list_runs("test_people")
    finally:
        stored.close()
    assert wrong not in repr(saved)
    assert saved[0]["status"] == "auth_error"


async def test_a_config_error_stops_before_any_read_or_lease(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(5))
    activation = make_activation(tmp_path, url, attributes=[{"column": "no_such_column"}])
    result = await run_once(activation, state)
    assert result.status == "config_error"
    assert result.exit_code == 2
    assert "no_such_column" in result.record["error"]
    assert simulator.stats()["profiles_received"] == 0
    store = SQLiteStateStore(state)
    try:
        assert store.list_runs("test_people") == []
    finally:
        store.close()


async def test_overlapping_runs_one_commits_the_other_exits_cleanly(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(100))
    simulator.faults.latency_ms = 150
    activation = make_activation(tmp_path, url)
    first, second = await asyncio.gather(run_once(activation, state), run_once(activation, state))
    statuses = sorted([first.status, second.status])
    assert statuses == ["skipped_lease_held", "succeeded"]
    skipped = first if first.status == "skipped_lease_held" else second
    assert skipped.exit_code == 5
    assert simulator.stats()["profiles_received"] == 100
    assert simulator.stats()["max_updates_per_custom_id"] == 1


async def test_a_redelivered_trigger_does_not_run_twice(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(10))
    activation = make_activation(tmp_path, url, run_type="full_only")
    first = await run_once(activation, state, trigger="pubsub", trigger_id="msg-1")
    again = await run_once(activation, state, trigger="pubsub", trigger_id="msg-1")
    assert first.status == "succeeded"
    assert again.status == "duplicate_trigger"
    assert again.record["duplicate_of"] == first.record["run_id"]
    assert simulator.stats()["profiles_received"] == 10


async def test_a_mapping_change_resends_only_affected_profiles_and_says_why(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    rows = people(10)
    rows[0]["phone"] = "06 12 34 56 78"  # national format: needs a default region
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, on_invalid_value="drop_attribute")
    first = await run_once(activation, state)
    assert first.record["dropped_attributes_by_reason"] == {"invalid_phone": 1}
    assert "$phone_number" not in simulator.profiles(PROJECT_KEY)["c00000"]

    remapped = make_activation(
        tmp_path,
        url,
        on_invalid_value="drop_attribute",
        mapping={"custom_id": "customer_id", "email": "email", "phone": "phone", "default_phone_region": "FR"},
    )
    second = await run_once(remapped, state)
    mapping = second.record["mapping_version"]
    assert mapping["changed"] is True
    assert "mapping changed" in mapping["explanation"]
    assert second.record["counts"]["changed"] == 1
    assert second.record["counts"]["sent"] == 1
    assert simulator.profiles(PROJECT_KEY)["c00000"]["$phone_number"] == "+33612345678"
    third = await run_once(remapped, state)
    assert third.record["mapping_version"]["changed"] is False
    assert third.record["counts"]["sent"] == 0


async def test_time_budget_checkpoints_and_a_continuation_finishes_the_pass(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(1_000))
    simulator.faults.latency_ms = 100
    activation = make_activation(tmp_path, url, run_type="full_only", destination={"concurrency": 1})
    # The deadline of a request is budget - margin/2 and no request starts after budget - margin:
    # a margin well above twice the latency keeps a request from being cut while Batch applies
    # it (its resend would rightly count as a second update under at-least-once delivery).
    first = await run_once(activation, state, time_budget_seconds=1.0, budget_margin_seconds=0.6)
    assert first.status == "incomplete"
    assert first.exit_code == 7
    sent_first = first.record["counts"]["acknowledged"]
    assert 0 < sent_first < 1_000
    simulator.faults.latency_ms = 0
    second = await run_once(activation, state, continuation_of=first.record["run_id"])
    assert second.status == "succeeded"
    assert second.record["counts"]["skipped_by_checkpoint"] == sent_first
    assert second.record["counts"]["acknowledged"] == 1_000 - sent_first
    assert simulator.stats()["max_updates_per_custom_id"] == 1
    assert len(held(simulator)) == 1_000


async def test_run_records_are_kept_with_counts_and_samples(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    _, url = sim
    rows = people(5)
    rows[1]["email"] = "nope"
    rows.append(person(3))  # duplicate id c00003
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url)
    result = await run_once(activation, state, trigger="cli")
    record = result.record
    assert record["counts"]["rejected"] == 3
    assert record["rejected_by_reason"] == {"invalid_email": 1, "duplicate_custom_id": 2}
    reasons = {(s["custom_id"], s["issues"][0]["reason"]) for s in record["rejected_samples"]}
    assert reasons == {("c00001", "invalid_email"), ("c00003", "duplicate_custom_id")}
    assert record["endpoint"] == "update"
    assert record["journal"]["committed"] == 3
    store = SQLiteStateStore(state)
    try:
        assert store.get_run(record["run_id"])["status"] == "succeeded_with_rejections"
    finally:
        store.close()


async def test_a_redelivery_after_a_retryable_failure_runs_again(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(segment, people(10))
    activation = make_activation(tmp_path, url)
    store = SQLiteStateStore(state)
    try:
        store.save_run(
            {
                "run_id": "20260101T000000Z-aaaaaa",
                "activation": "test_people",
                "started_at": "2026-01-01T00:00:00+00:00",
                "trigger_id": "msg-7",
                "status": "failed",
                "retryable": True,
            }
        )
    finally:
        store.close()
    again = await run_once(activation, state, trigger="pubsub", trigger_id="msg-7")
    assert again.status == "succeeded"
    assert simulator.stats()["profiles_received"] == 10


async def test_mapping_in_worker_processes_changes_no_decision(tmp_path: Path) -> None:
    # The same segment, synced once with the mapping in the pipeline's thread and once with
    # two worker processes: same records, same stored fingerprints, same profiles in Batch.
    rows = people(2_500)
    rows[3]["email"] = "nope"
    rows.append(person(7))  # a duplicated id
    outcomes = []
    for workers in (0, 2):
        directory = tmp_path / f"workers-{workers}"
        directory.mkdir()
        simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
        url = await simulator.start()
        try:
            write_segment(directory / "segment.duckdb", rows)
            activation = make_activation(directory, url, run_type="full_only")
            state = directory / "state.db"
            result = await run_once(activation, state, map_workers=workers)
            assert result.status == "succeeded_with_rejections", result.record["error"]
            if workers:
                assert result.record["timings"]["map_workers"] == 2
            store = SQLiteStateStore(state)
            try:
                fingerprints = store.load_fingerprints("test_people")
            finally:
                store.close()
            outcomes.append(
                (
                    result.record["counts"],
                    result.record["rejected_by_reason"],
                    fingerprints,
                    simulator.profiles(PROJECT_KEY),
                )
            )
        finally:
            await simulator.stop()
    counts = [outcome[0] for outcome in outcomes]
    assert counts[0] == counts[1]
    assert outcomes[0][1:] == outcomes[1][1:]
    assert counts[0]["acknowledged"] == 2_498


@pytest.mark.parametrize("mode", ["upsert", "mirror"])
async def test_a_send_batch_applied_without_an_acknowledgement_is_sent_again_even_if_the_row_returns(
    sim: tuple[BatchSimulator, str], segment: Path, state: Path, tmp_path: Path, mode: str
) -> None:
    # Batch applies a change, the answer is lost (a dropped connection here; a crash before
    # the journal flush does the same), so the stored fingerprint still says the old value.
    # When the row comes back to that value, the stored fingerprint matches it: only the
    # intent the lost send left behind says Batch may hold something else.
    simulator, url = sim
    activation = make_activation(
        tmp_path,
        url,
        sync_mode=mode,
        destination={"max_attempts": 1},
        guards={"max_changed_percent": 100, "max_removed_percent": 100},
    )
    write_segment(segment, people(20))
    assert (await run_once(activation, state)).status == "succeeded"

    changed = people(20)
    changed[3]["points"] = 999  # c00003 changes...
    if mode == "mirror":
        del changed[7]  # ...and c00007 leaves (mirror clears it)
    write_segment(segment, changed)
    simulator.faults.update({"drop_after_apply": 10})  # applied, then the answer is lost
    lost = await run_once(activation, state)
    assert lost.record["counts"]["acknowledged"] == 0
    assert held(simulator)["c00003"]["points"] == 999
    if mode == "mirror":
        assert "c00007" not in held(simulator)
    simulator.faults.clear()

    write_segment(segment, people(20))  # every row back to what Batch acknowledged before
    recovered = await run_once(activation, state)
    assert recovered.status == "succeeded", recovered.record["error"]
    assert recovered.record["counts"]["unconfirmed"] == (2 if mode == "mirror" else 1)
    assert held(simulator) == {f"c{n:05d}": held(simulator)[f"c{n:05d}"] for n in range(20)}
    assert held(simulator)["c00003"]["points"] == 3
    assert held(simulator)["c00007"]["points"] == 7
    store = SQLiteStateStore(state)
    try:
        assert store.load_intents(activation.name) == set()
    finally:
        store.close()
    quiet = await run_once(activation, state)
    assert quiet.record["counts"].get("sent", 0) == 0
