"""Whole runs on inputs Batch or the mapper refuse (issue 8): real DuckDB, SQLite, simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from engine_support import PROJECT_KEY, make_activation, people, run_once, write_segment

from sync.batch.simulator import BatchSimulator


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
