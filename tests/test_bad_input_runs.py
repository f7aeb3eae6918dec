"""Whole runs on inputs Batch or the mapper refuse (issue 8): real DuckDB, SQLite, simulator."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from sync.dev.simulator import BatchSimulator
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
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
    simulator = BatchSimulator({PROJECT_KEY: "test-rest-api-key-5f1c2d9e8a"}, rate_limit=True)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def received(simulator: BatchSimulator) -> int:
    return int(simulator.stats()["profiles_received"])


async def test_a_dropped_attribute_compares_as_null_not_as_a_missing_key(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """Issue 8 item 15: Batch keeps its value for a dropped key, so compare as if it were null."""
    simulator, url = sim
    segment, state = tmp_path / "segment.duckdb", tmp_path / "state.db"
    rows: list[dict[str, Any]] = people(3)
    rows[0]["email"] = None  # Batch holds null for c00000's email
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, on_invalid_value="drop_attribute", guards={"max_changed_percent": 100})
    first = await run_once(activation, state)
    assert first.status == "succeeded"
    before = received(simulator)

    rows[0]["email"] = "not an email"  # invalid: dropped; Batch would still hold null
    rows[1]["email"] = "also not one"  # invalid: dropped; Batch keeps person1@example.com
    write_segment(segment, rows)
    second = await run_once(activation, state)
    assert second.record["dropped_attributes_by_reason"] == {"invalid_email": 2}
    # c00000: what Batch would hold is unchanged (null stays null): not sent, raw hash refreshed.
    # c00001: its email would become null in our comparison, so it is sent once, without the key.
    assert second.record["counts"]["changed"] == 1
    assert second.record["counts"]["unchanged"] == 2
    assert received(simulator) == before + 1
    held = simulator.profiles(PROJECT_KEY)
    assert held["c00001"]["$email_address"] == "person1@example.com"
    assert held["c00000"].get("$email_address") is None

    third = await run_once(activation, state)
    assert third.record["counts"]["changed"] == 0
    assert received(simulator) == before + 1


async def test_every_dropped_attribute_and_every_duplicate_copy_is_a_rejects_line(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """Issue 8 item 17 (engine half): one --rejects line per dropped attribute, both duplicate copies."""
    _, url = sim
    rows = people(5)
    rows[0]["email"] = "not an email"
    rows[0]["phone"] = "12"
    rows[1]["email"] = "nope"
    rows.append(person(3))  # c00003 twice
    write_segment(tmp_path / "segment.duckdb", rows)
    activation = make_activation(tmp_path, url, on_invalid_value="drop_attribute")
    lines: list[dict[str, Any]] = []
    result = await run_once(activation, tmp_path / "state.db", rejects=lines.append)
    assert result.record["dropped_attributes_by_reason"] == {"invalid_email": 2, "invalid_phone": 1}
    dropped = [line for line in lines if line.get("attribute_dropped")]
    assert sorted((line["custom_id"], line["issues"][0]["field"], line["issues"][0]["reason"]) for line in dropped) == [
        ("c00000", "email", "invalid_email"),
        ("c00000", "phone", "invalid_phone"),
        ("c00001", "email", "invalid_email"),
    ]
    assert all(line["row_sent"] is True and len(line["issues"]) == 1 for line in dropped)
    assert all(line["run_id"] == result.record["run_id"] for line in lines)
    copies = [line for line in lines if line["custom_id"] == "c00003"]
    assert sorted(line["row"] for line in copies) == [4, 6]
    assert all(line["issues"][0]["reason"] == "duplicate_custom_id" for line in copies)


async def test_sent_counts_every_attempted_profile_even_when_batch_refuses_the_key(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """Issue 8 item 16 (engine half): "sent" means attempted; acknowledged/refused/failed apart."""
    _, url = sim
    write_segment(tmp_path / "segment.duckdb", people(30))
    activation = make_activation(tmp_path, url)
    client = make_client(activation, api_key="wrong-key-0000")
    result = await run_once(activation, tmp_path / "state.db", client=client)
    assert result.status == "auth_error"
    counts = result.record["counts"]
    assert counts["sent"] == 30  # one request of 30 left; Batch answered 401
    assert counts["acknowledged"] == 0
    assert counts["rejected_by_batch"] == 0
    assert counts["failed"] == 30


async def test_a_short_lease_does_not_fail_a_clean_rate_limited_run(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """Issue 8 item 22: the renewer extends the lease every ttl/3; a rate-limit wait may count on it."""
    simulator, url = sim
    write_segment(tmp_path / "segment.duckdb", people(3_000))
    # Six requests of 200 in flight at ~290 profiles/s: a request may wait 4.1 s for its turn,
    # more than a 6 s lease has left (after its 1.5 s margin) once a third of it has passed,
    # but less than a full renewed lease minus the margin (4.5 s).
    activation = make_activation(tmp_path, url, destination={"endpoint": "update", "concurrency": 6})
    result = await run_once(activation, tmp_path / "state.db", lease_ttl_seconds=6.0)
    assert result.status == "succeeded", result.record.get("error")
    assert result.record["counts"]["acknowledged"] == 3_000
    assert simulator.stats()["max_updates_per_custom_id"] == 1


async def test_an_unreachable_batch_host_stops_the_run_at_once_with_one_message(tmp_path: Path) -> None:
    """Issue 8 item 19: connection refused on several requests in a row stops the run."""
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_segment(tmp_path / "segment.duckdb", people(4_000))
    activation = make_activation(tmp_path, f"http://127.0.0.1:{port}", destination={"endpoint": "update"})
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        result = await run_once(activation, tmp_path / "state.db")
    assert time.monotonic() - started < 10
    assert (result.status, result.exit_code, result.record["retryable"]) == ("failed", 1, True)
    error = result.record["error"]
    assert f"cannot reach Batch at http://127.0.0.1:{port}" in error
    assert "destination.base_url" in error
    retries = [entry for entry in logs if entry["event"] in ("batch_request_retry", "batch_request_failed")]
    assert len(retries) <= 8, len(retries)
    counts = result.record["counts"]
    assert counts["acknowledged"] == 0
    assert counts["sent"] == counts["failed"] <= 4 * 200  # at most the requests in flight
    assert stored_ids(tmp_path / "state.db") == set()


async def test_a_payload_batch_refused_is_not_resent_until_it_changes(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """Issue 8 item 14: a partial error is remembered per payload; transient failures are not."""
    simulator, url = sim
    state = tmp_path / "state.db"
    rows = people(30)
    write_segment(tmp_path / "segment.duckdb", rows)
    simulator.faults.reject_custom_ids = {"c00005"}
    activation = make_activation(tmp_path, url)
    first = await run_once(activation, state)
    assert first.record["counts"]["rejected_by_batch"] == 1
    before = received(simulator)

    lines: list[dict[str, Any]] = []
    second = await run_once(activation, state, rejects=lines.append)
    assert received(simulator) == before  # nothing sent: Batch would refuse the same payload again
    assert second.status == "succeeded_with_rejections"
    assert second.record["counts"]["refused_unchanged"] == 1
    assert second.record["counts"]["new"] == 0
    assert second.record["rejected_by_reason"] == {"batch_rejected": 1}
    (line,) = lines
    assert line["custom_id"] == "c00005"
    assert line["issues"][0]["reason"] == "batch_rejected"
    assert "simulated rejection" in line["issues"][0]["detail"]
    assert any(s["custom_id"] == "c00005" for s in second.record["rejected_samples"])

    # A changed payload is sent again; once Batch acknowledges it, the refusal is forgotten.
    simulator.faults.reject_custom_ids = set()
    rows[5]["points"] += 1
    write_segment(tmp_path / "segment.duckdb", rows)
    third = await run_once(activation, state)
    assert (third.status, third.record["counts"]["new"], third.record["counts"]["acknowledged"]) == ("succeeded", 1, 1)
    assert "c00005" in stored_ids(state)
    store = SQLiteStateStore(state)
    try:
        assert store.load_refusals("test_people") == {}
    finally:
        store.close()


async def test_full_resends_a_refused_payload_and_transient_failures_retry_every_run(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    state = tmp_path / "state.db"
    write_segment(tmp_path / "segment.duckdb", people(10))
    simulator.faults.reject_custom_ids = {"c00001"}
    activation = make_activation(tmp_path, url)
    await run_once(activation, state)
    simulator.faults.reject_custom_ids = set()
    simulator.faults.update({"fail_next": 1_000, "fail_status": 503})
    write_segment(tmp_path / "segment.duckdb", people(12))  # two new rows meet a Batch outage
    failed = await run_once(activation, state)
    assert (failed.status, failed.record["counts"]["failed"], failed.record["counts"]["refused_unchanged"]) == (
        "partial",
        2,
        1,
    )
    simulator.faults.clear()
    retried = await run_once(activation, state)
    assert retried.record["counts"]["new"] == 2  # a transient failure is retried the next run
    full = await run_once(activation, state, full=True)
    assert full.status == "succeeded"
    assert full.record["counts"]["acknowledged"] == 12  # --full sends the refused payload too
    assert "c00001" in stored_ids(state)
