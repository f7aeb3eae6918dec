"""Issue 18: only a refusal of the value is remembered; other per-item errors never lose an update.

Whole runs through the real HTTP simulator, whose ``item_errors`` fault answers per-item
errors of each kind (docs/batch-api.md, "Per-item errors"): ``value`` (decided by the payload, so
it comes back for the same payload), ``server``, ``unknown`` (a category we do not know) and
``none`` (no category). Before the fix, every one of them was remembered as a refusal, and
the profile was never sent again while its payload stayed the same.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sync.batch.item_errors import VALUE_CATEGORIES
from sync.cli import app
from sync.config import Activation
from sync.dev.simulator import BatchSimulator
from sync.model import PERSISTENT_AFTER_RUNS, Refusal, RefusalKind
from sync.report.history import history_csv, persistent_notes
from sync.report.html import render_report
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    ENV,
    PROJECT_KEY,
    make_activation,
    people,
    run_once,
    stored_ids,
    write_segment,
)

ACTIVATION = "test_people"
NOT_ABOUT_THE_VALUE = ["server", "unknown", "none"]


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False, seed=18)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def entries(state: Path) -> dict[str, Refusal]:
    store = SQLiteStateStore(state)
    try:
        return store.load_refusals(ACTIVATION)
    finally:
        store.close()


def records(state: Path) -> list[dict[str, Any]]:
    store = SQLiteStateStore(state)
    try:
        return store.list_runs(ACTIVATION, 50)
    finally:
        store.close()


def received(simulator: BatchSimulator) -> int:
    return int(simulator.stats()["profiles_received"])


async def synced_then_changed(
    directory: Path, url: str, *, count: int, changed: int
) -> tuple[Path, list[dict[str, Any]], Activation]:
    """A segment synced once, then its first ``changed`` rows changed: the next run sends those."""
    state = directory / "state.db"
    rows = people(count)
    write_segment(directory / "segment.duckdb", rows)
    activation = make_activation(directory, url, destination={"max_attempts": 2})
    await run_once(activation, state)
    for row in rows[:changed]:
        row["points"] += 100
    write_segment(directory / "segment.duckdb", rows)
    return state, rows, activation


def held_ids(simulator: BatchSimulator) -> set[str]:
    """Profiles holding at least one value (mirror clears a profile by setting every attribute to null)."""
    return {cid for cid, attrs in simulator.profiles(PROJECT_KEY).items() if any(v is not None for v in attrs.values())}


def holds_the_segment(simulator: BatchSimulator, rows: list[dict[str, Any]]) -> bool:
    """Batch holds every row of the segment with its latest values."""
    held = simulator.profiles(PROJECT_KEY)
    return all(
        held.get(row["customer_id"], {}).get("points") == row["points"]
        and held[row["customer_id"]].get("firstname") == row["first_name"]
        for row in rows
    )


async def test_item_errors_are_retried_within_the_run_until_they_clear(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    rows = people(300)
    write_segment(tmp_path / "segment.duckdb", rows)
    simulator.faults.update({"item_errors": {"server": 0.1, "unknown": 0.1, "none": 0.1}})
    activation = make_activation(tmp_path, url, destination={"max_attempts": 10})
    result = await run_once(activation, tmp_path / "state.db")

    counts = result.record["counts"]
    injected = simulator.stats()["item_errors"]
    assert result.status == "succeeded", result.record["error"]
    assert (counts["acknowledged"], counts["failed"], counts["rejected_by_batch"]) == (300, 0, 0)
    # Every injected error was resent, alone, within the run: nothing left for the next one.
    assert counts["item_errors_retried"] == injected["server"] + injected["unknown"] + injected["none"] > 30
    assert received(simulator) == 300 + counts["item_errors_retried"]
    assert holds_the_segment(simulator, rows)
    assert len(stored_ids(tmp_path / "state.db")) == 300
    assert entries(tmp_path / "state.db") == {}


@pytest.mark.parametrize("kind", NOT_ABOUT_THE_VALUE)
async def test_an_item_error_not_about_the_value_is_sent_again_by_the_next_run(
    sim: tuple[BatchSimulator, str], tmp_path: Path, kind: str
) -> None:
    """The bug of issue 18: this profile was remembered as refused and never sent again."""
    simulator, url = sim
    state, rows, activation = await synced_then_changed(tmp_path, url, count=20, changed=5)

    simulator.faults.update({"item_errors": {kind: 1.0}})  # every item, every attempt
    failing = await run_once(activation, state)
    counts = failing.record["counts"]
    assert failing.status == "partial"
    assert (counts["changed"], counts["failed"], counts["failed_by_item_error"]) == (5, 5, 5)
    assert (counts["rejected_by_batch"], counts["persistent"], counts["item_errors_retried"]) == (0, 0, 5)
    assert failing.record["rejected_by_reason"] == {"batch_item_error": 5}
    sample = next(s for s in failing.record["rejected_samples"] if s["custom_id"] == "c00000")
    assert sample["issues"][0]["reason"] == "batch_item_error"
    assert "simulated: " in sample["issues"][0]["detail"]
    assert "sent again next run" in sample["issues"][0]["detail"]
    kept = entries(state)
    assert set(kept) == {f"c{n:05d}" for n in range(5)}
    assert all(entry.kind is RefusalKind.ITEM_ERROR and entry.runs == 1 for entry in kept.values())
    assert not any(entry.remembered for entry in kept.values())

    simulator.faults.clear()
    before = received(simulator)
    repaired = await run_once(activation, state)
    assert repaired.status == "succeeded"
    assert repaired.record["counts"]["changed"] == 5
    assert repaired.record["counts"].get("refused_unchanged", 0) == 0
    assert received(simulator) - before == 5
    assert holds_the_segment(simulator, rows)
    assert entries(state) == {}  # acknowledged: forgotten


async def test_an_item_error_becomes_persistent_after_the_bound_with_batchs_reason_in_history(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    state, rows, activation = await synced_then_changed(tmp_path, url, count=12, changed=1)
    simulator.faults.update({"item_errors": {"server": 1.0}})

    for run in range(1, PERSISTENT_AFTER_RUNS):
        result = await run_once(activation, state)
        assert (result.status, result.record["counts"]["persistent"]) == ("partial", 0)
        assert entries(state)["c00000"].runs == run
    reached = await run_once(activation, state)
    assert reached.status == "partial"
    assert (reached.record["counts"]["failed_by_item_error"], reached.record["counts"]["persistent"]) == (1, 1)
    assert reached.record["rejected_by_reason"] == {"batch_persistent_error": 1}
    entry = entries(state)["c00000"]
    assert (entry.persistent, entry.reason) == (True, "server: simulated: internal error")

    # Remembered now: the same payload is not sent again, and the run says why.
    before = received(simulator)
    lines: list[dict[str, Any]] = []
    quiet = await run_once(activation, state, rejects=lines.append)
    assert received(simulator) == before
    assert quiet.status == "succeeded_with_rejections"
    assert quiet.record["counts"]["persistent_unchanged"] == 1
    assert [(line["custom_id"], line["issues"][0]["reason"]) for line in lines] == [
        ("c00000", "batch_persistent_error")
    ]
    assert "server: simulated: internal error" in lines[0]["issues"][0]["detail"]

    output = (
        CliRunner()
        .invoke(app, ["history", ACTIVATION, "--state", f"sqlite:///{state}"], env={**ENV, "COLUMNS": "200"})
        .output
    )
    assert f"{quiet.record['run_id']}: persistent Batch errors: 1 still persistent, not resent" in output
    assert f"{reached.record['run_id']}: persistent Batch errors: 1 became persistent" in output
    assert "c00000: Batch: server: simulated: internal error" in output

    # A changed payload is sent, and its count starts again from one run.
    rows[0]["points"] += 1
    write_segment(tmp_path / "segment.duckdb", rows)
    changed = await run_once(activation, state)
    assert changed.record["counts"]["changed"] == 1
    assert (entries(state)["c00000"].runs, entries(state)["c00000"].remembered) == (1, False)
    simulator.faults.clear()
    converged = await run_once(activation, state)
    assert converged.status == "succeeded"
    assert holds_the_segment(simulator, rows)
    assert entries(state) == {}


@pytest.mark.parametrize(
    ("fault", "runs", "held_back"),
    [
        pytest.param({"value": 0.25}, 1, "refused_unchanged", id="value-refusal"),
        pytest.param({"none": 1.0}, PERSISTENT_AFTER_RUNS, "persistent_unchanged", id="persistent-item-error"),
    ],
)
async def test_a_remembered_payload_is_not_resent_unchanged_and_full_resends_it(
    sim: tuple[BatchSimulator, str], tmp_path: Path, fault: dict[str, float], runs: int, held_back: str
) -> None:
    simulator, url = sim
    state = tmp_path / "state.db"
    rows = people(40)
    write_segment(tmp_path / "segment.duckdb", rows)
    activation = make_activation(tmp_path, url, destination={"max_attempts": 1})
    simulator.faults.update({"item_errors": fault})
    for _ in range(runs):
        await run_once(activation, state)
    remembered = entries(state)
    assert remembered
    assert all(entry.remembered for entry in remembered.values())
    if "value" in fault:  # decided by the payload: exactly those the simulator refused, never retried
        assert len(remembered) == simulator.stats()["item_errors"]["value"]
        assert simulator.stats()["profiles_received"] == 40

    simulator.faults.clear()
    before = received(simulator)
    quiet = await run_once(activation, state)
    assert received(simulator) == before  # the same payloads: Batch would not apply them either
    assert quiet.record["counts"][held_back] == len(remembered)
    assert quiet.status == "succeeded_with_rejections"

    full = await run_once(activation, state, full=True)
    assert (full.status, full.record["counts"]["acknowledged"]) == ("succeeded", 40)
    assert holds_the_segment(simulator, rows)
    assert entries(state) == {}


async def test_runs_under_every_kind_of_item_error_converge_once_they_clear(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """A small campaign: changing rows, mirror removals, item errors of every kind, then one clean run."""
    simulator, url = sim
    state = tmp_path / "state.db"
    rows = people(400)
    activation = make_activation(
        tmp_path, url, sync_mode="mirror", destination={"max_attempts": 2}, guards={"max_changed_percent": 100}
    )
    simulator.faults.update({"item_errors": {"value": 0.02, "server": 0.2, "unknown": 0.1, "none": 0.1}})
    for round_number in range(4):
        for row in rows[round_number::3]:
            row["points"] += 1
        write_segment(tmp_path / "segment.duckdb", rows[: 400 - 10 * round_number])
        await run_once(activation, state)
    assert simulator.stats()["item_errors"]["server"] > 0

    simulator.faults.clear()
    final_rows = rows[: 400 - 30]
    write_segment(tmp_path / "segment.duckdb", final_rows)
    clean = await run_once(activation, state)  # an ordinary run, not --full
    assert clean.status in ("succeeded", "succeeded_with_rejections"), clean.record["error"]
    # Only what Batch refused stays out: value refusals (Batch would refuse them again), and a
    # payload that failed PERSISTENT_AFTER_RUNS runs in a row (docs/batch-api.md, "Persistent
    # errors"), which the seeded faults produce or not depending on the order the requests
    # went in. Every other row is there, and no failure seen in fewer runs is left.
    left = entries(state)
    refused = {cid for cid, entry in left.items() if entry.remembered}
    assert refused == set(left)
    assert all(entry.kind is RefusalKind.VALUE or entry.persistent for entry in left.values())
    assert any(entry.kind is RefusalKind.VALUE for entry in left.values())
    assert len(refused) < 30
    counts = clean.record["counts"]
    assert counts["refused_unchanged"] + counts["persistent_unchanged"] == len(refused)
    assert holds_the_segment(simulator, [row for row in final_rows if row["customer_id"] not in refused])
    assert held_ids(simulator) - refused == {row["customer_id"] for row in final_rows} - refused

    final = await run_once(activation, state, full=True)  # --full sends the refused payloads too
    assert final.status == "succeeded", final.record["error"]
    assert held_ids(simulator) == {row["customer_id"] for row in final_rows}
    assert holds_the_segment(simulator, final_rows)


async def test_the_report_shows_refusals_failures_and_persistent_errors_apart(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    state = tmp_path / "state.db"
    write_segment(tmp_path / "segment.duckdb", people(3))
    activation = make_activation(tmp_path, url, destination={"max_attempts": 1})
    simulator.faults.update({"item_errors": {"none": 1.0}})
    for _ in range(PERSISTENT_AFTER_RUNS - 1):
        await run_once(activation, state)
    simulator.faults.update({"reject_custom_ids": ["c00001"]})  # a value refusal beside them
    await run_once(activation, state)
    page = render_report(ACTIVATION, records(state), state_kind="sqlite")
    table = page[page.index('id="reasons-batch"') :]
    table = table[: table.index("</table>")]
    assert 'data-reason="batch_persistent_error"' in table
    assert 'data-reason="batch_rejected"' in table
    assert "simulated: no category" in table
    assert "simulated rejection" in table
    assert "of which persistent (remembered)" in page


def test_records_from_before_item_errors_were_told_apart_still_read() -> None:
    old = {
        "run_id": "20261101T000000Z-0a0b0c",
        "activation": ACTIVATION,
        "started_at": "2026-11-01T00:00:00+00:00",
        "status": "succeeded_with_rejections",
        "counts": {"rows": 10, "sent": 10, "acknowledged": 8, "rejected_by_batch": 2, "failed": 0},
        "rejected_by_reason": {"batch_rejected": 2},
        "rejected_samples": [
            {
                "row": None,
                "custom_id": "c1",
                "issues": [{"field": "(profile)", "reason": "batch_rejected", "detail": "x"}],
            }
        ],
    }
    page = render_report(ACTIVATION, [old], state_kind="sqlite")
    assert 'data-reason="batch_rejected"' in page
    assert "value refused by Batch (remembered)" in page
    assert persistent_notes([old]) == []
    rows = list(csv.DictReader(io.StringIO(history_csv([old]))))
    assert (rows[0]["rejected_by_batch"], rows[0]["persistent"], rows[0]["failed_by_item_error"]) == ("2", "", "")


def test_the_docs_state_the_rule_and_the_bound_the_code_uses() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "batch-api.md").read_text(encoding="utf-8")
    section = docs[docs.index("## Per-item errors: value refusals and failures") :]
    assert f"in {PERSISTENT_AFTER_RUNS} runs in a row (`PERSISTENT_AFTER_RUNS`" in section
    for category in sorted(VALUE_CATEGORIES):
        assert f"`{category}`" in section[: section.index("**Anything else is not**")]


def intents(state: Path) -> set[str]:
    store = SQLiteStateStore(state)
    try:
        return store.load_intents(ACTIVATION)
    finally:
        store.close()


@pytest.mark.parametrize("refused_as", ["clear", "update"])
async def test_a_refused_send_settles_its_intent_and_a_refused_clear_is_remembered(
    sim: tuple[BatchSimulator, str], tmp_path: Path, refused_as: str
) -> None:
    # Found by the fault campaign (seed 363823): a mirror clear Batch refused left its intent
    # noted. The profile kept its values at Batch, its row came back with those values, and
    # the "unconfirmed" intent sent it again: a send of what Batch already held. The refused
    # clear itself was sent again by every run while the profile stayed out of the segment.
    simulator, url = sim
    state = tmp_path / "state.db"
    rows = people(30)
    write_segment(tmp_path / "segment.duckdb", rows)
    activation = make_activation(tmp_path, url, sync_mode="mirror")
    await run_once(activation, state)
    target = rows[0]["customer_id"]
    changed = dict(rows[0])
    if refused_as == "clear":
        write_segment(tmp_path / "segment.duckdb", rows[1:])
    else:
        changed["points"] += 1_000
        write_segment(tmp_path / "segment.duckdb", [changed, *rows[1:]])
    simulator.faults.update({"reject_custom_ids": [target]})
    refused = await run_once(activation, state)
    assert refused.record["counts"]["rejected_by_batch"] == 1
    assert target not in intents(state)  # answered: Batch said it did not apply it
    assert entries(state)[target].remembered

    # The same payload again: held back, not sent (Batch would refuse it again).
    before = received(simulator)
    again = await run_once(activation, state)
    assert received(simulator) == before
    assert again.record["counts"]["refused_unchanged"] == 1
    assert again.status == "succeeded_with_rejections"

    # The row comes back as Batch still holds it: nothing to send.
    simulator.faults.clear()
    write_segment(tmp_path / "segment.duckdb", rows)
    back = await run_once(activation, state)
    assert received(simulator) == before
    assert back.record["counts"].get("unconfirmed", 0) == 0
    assert back.status == "succeeded"
    assert holds_the_segment(simulator, rows)
