"""The results tables in DuckDB, written by real runs (DuckDB segment, SQLite state, the HTTP
simulator): a full run with rejections and Batch refusals, a delta, a guard abort and a failed
run, then queried. Also: values only on opt-in, a results file that cannot be written leaves
the sync committed, and many rejections stream through the spool's file.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from rich.console import Console

from sync.cli import print_record
from sync.dev.simulator import BatchSimulator
from sync.results import schema
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    PROJECT_KEY,
    make_activation,
    people,
    person,
    run_once,
    stored_ids,
    write_segment,
)


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def query(database: Path, sql: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(database), read_only=True) as connection:
        cursor = connection.execute(sql)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def bad_rows() -> list[dict[str, Any]]:
    """Three rows we reject: a bad email, a bad phone, no custom id."""
    return [
        person(900, email="not-an-address: secret@"),
        person(901, phone="call me maybe"),
        person(902, customer_id=None),
    ]


async def test_full_delta_guard_abort_and_failed_runs_each_write_their_rows(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    segment = tmp_path / "segment.duckdb"
    state = tmp_path / "state.db"
    rows = people(60)
    write_segment(segment, rows + bad_rows())
    simulator.faults.update({"reject_custom_ids": ["c00007"]})
    activation = make_activation(tmp_path, url, sync_mode="mirror", results={})

    full = await run_once(activation, state)
    assert full.status == "succeeded_with_rejections"
    assert full.record["results"]["backend"] == "duckdb"
    assert full.record["results"]["rejections_written"] == 4
    assert "results_error" not in full.record

    rows[3] = person(3, first_name="Changed")
    write_segment(segment, rows + bad_rows())
    delta = await run_once(activation, state)
    assert delta.record["counts"]["changed"] == 1

    write_segment(segment, rows[:10])  # 50 of 60 synced profiles leave: over max_removed_percent
    aborted = await run_once(activation, state)
    assert aborted.status == "aborted_by_guard"

    # Batch's host refuses every connection: the run stops as failed (README, "Exit codes").
    unreachable = make_activation(
        tmp_path,
        f"http://127.0.0.1:{_closed_port()}",
        sync_mode="mirror",
        results={},
        destination={"max_attempts": 6},
    )
    write_segment(segment, [*rows, person(60)])
    failed = await run_once(unreachable, state)
    assert failed.status == "failed"

    runs = query(segment, "SELECT * FROM cepsync_runs ORDER BY started_at")
    assert [r["run_id"] for r in runs] == [r.record["run_id"] for r in (full, delta, aborted, failed)]
    assert [r["status"] for r in runs] == [
        "succeeded_with_rejections",
        "succeeded_with_rejections",
        "aborted_by_guard",
        "failed",
    ]
    first = runs[0]
    assert first["activation"] == "test_people"
    assert first["n_rows"] == 63
    assert first["n_new"] == 60
    assert first["n_rejected"] == 3
    assert first["n_acknowledged"] == 59
    assert first["n_rejected_by_batch"] == 1
    assert [r["full_pass"] for r in runs[:2]] == [full.record["full"], delta.record["full"]]
    assert json.loads(first["rejected_by_reason"]) == full.record["rejected_by_reason"]
    assert first["rejections_written"] == 4
    assert runs[2]["guard_tripped"] is True
    assert "removed_percent" in runs[2]["error"]
    assert runs[3]["retryable"] is True
    assert runs[3]["error"]
    assert json.loads(first["record"])["run_id"] == first["run_id"]
    assert "rejected_samples" not in json.loads(first["record"])  # they quote values

    rejections = query(
        segment,
        "SELECT run_id, segment_row, custom_id, reason, field, detail, batch_reason, value, from_batch "
        "FROM cepsync_rejections ORDER BY run_id, reason",
    )
    of_full = [r for r in rejections if r["run_id"] == full.record["run_id"]]
    assert {(r["custom_id"], r["reason"]) for r in of_full} == {
        ("c00900", "invalid_email"),
        ("c00901", "invalid_phone"),
        (None, "missing_custom_id"),
        ("c00007", "batch_rejected"),
    }
    batch = next(r for r in of_full if r["from_batch"])
    assert batch["batch_reason"] == "simulated rejection"
    assert batch["segment_row"] is None
    email = next(r for r in of_full if r["reason"] == "invalid_email")
    assert email["field"] == "email"
    assert email["detail"] == "not a valid email address"
    assert email["value"] is None
    assert "secret" not in json.dumps(rejections, default=str)
    # The delta meets the same bad rows again (they were never stored), and the refused
    # payload is listed as refused before, unchanged.
    of_delta = [r for r in rejections if r["run_id"] == delta.record["run_id"]]
    assert len(of_delta) == 4
    # The guard abort read only valid rows; the failed run lists the payload Batch refused before.
    of_failed = [(r["custom_id"], r["reason"]) for r in rejections if r["run_id"] == failed.record["run_id"]]
    assert of_failed == [("c00007", "batch_rejected")]
    assert {r["run_id"] for r in rejections} == {full.record["run_id"], delta.record["run_id"], failed.record["run_id"]}

    # The sync state is the engine's, untouched by the results.
    assert "c00000" in stored_ids(state)
    saved = SQLiteStateStore(state)
    try:
        assert saved.list_runs("test_people", 1)[0]["results"]["rejections_written"] == 1
    finally:
        saved.close()


async def test_values_are_written_only_when_the_activation_opts_in(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    _, url = sim
    segment = tmp_path / "segment.duckdb"
    results = tmp_path / "results.duckdb"
    write_segment(segment, people(5) + bad_rows())
    activation = make_activation(tmp_path, url, results={"database": str(results), "include_values": True})
    record = (await run_once(activation, tmp_path / "state.db")).record
    assert record["results"]["database"] == str(results)
    rows = query(results, "SELECT reason, detail, value FROM cepsync_rejections ORDER BY reason")
    by_reason = {r["reason"]: r for r in rows}
    assert by_reason["invalid_email"]["value"] == "'not-an-address: secret@'"
    assert by_reason["invalid_email"]["detail"] == "not a valid email address: 'not-an-address: secret@'"
    assert by_reason["missing_custom_id"]["value"] is None
    runs = query(results, "SELECT record FROM cepsync_runs")
    assert "rejected_samples" in json.loads(runs[0]["record"])
    # The segment file is left alone: the results went to the named file.
    assert query(segment, "SELECT count(*) AS n FROM information_schema.tables WHERE table_name LIKE 'cepsync%'") == [
        {"n": 0}
    ]


async def test_a_results_file_that_cannot_be_written_leaves_the_sync_committed(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = sim
    write_segment(tmp_path / "segment.duckdb", people(20) + bad_rows())
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file")
    activation = make_activation(tmp_path, url, results={"database": str(blocker / "results.duckdb")})
    result = await run_once(activation, tmp_path / "state.db")
    assert result.status == "succeeded_with_rejections"
    assert result.exit_code == 0
    assert "results" not in result.record
    assert result.record["results_error"].startswith("the results tables were not written: ")
    assert len(stored_ids(tmp_path / "state.db")) == 20
    assert len(simulator.profiles(PROJECT_KEY)) == 20
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        assert "results_error" in store.list_runs("test_people", 1)[0]
    finally:
        store.close()
    # What `cepsync run` prints says so too, beside the counts.
    shown = io.StringIO()
    print_record(result.record, out=Console(file=shown, width=300), err=Console(file=io.StringIO()))
    assert "results: the results tables were not written: " in shown.getvalue()


async def test_many_rejections_stream_through_the_spool_and_the_cap_counts_the_rest(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    _, url = sim
    segment = tmp_path / "segment.duckdb"
    rows = [person(index, email=f"bad-{index}") for index in range(schema.SPOOL_GROUP_ROWS * 2 + 500)]
    write_segment(segment, rows)
    activation = make_activation(tmp_path, url, results={"max_rejection_rows": schema.SPOOL_GROUP_ROWS * 2})
    record = (await run_once(activation, tmp_path / "state.db")).record
    assert record["counts"]["rejected"] == len(rows)
    assert record["results"]["rejections_written"] == schema.SPOOL_GROUP_ROWS * 2
    assert record["results"]["rejections_not_written"] == 500
    (counted,) = query(segment, "SELECT count(*) AS n, count(DISTINCT custom_id) AS ids FROM cepsync_rejections")
    assert counted == {"n": schema.SPOOL_GROUP_ROWS * 2, "ids": schema.SPOOL_GROUP_ROWS * 2}
    (run,) = query(segment, "SELECT rejections_written, rejections_not_written FROM cepsync_runs")
    assert run == {"rejections_written": schema.SPOOL_GROUP_ROWS * 2, "rejections_not_written": 500}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_rejects_stream_still_reaches_the_callers_file_line_for_line(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    _, url = sim
    segment = tmp_path / "segment.duckdb"
    write_segment(segment, [*people(8), *bad_rows(), person(903, customer_id="c00001")])  # and a duplicate id
    lines: list[dict[str, Any]] = []
    activation = make_activation(tmp_path, url, results={})
    record = (await run_once(activation, tmp_path / "state.db", rejects=lines.append)).record
    written = query(segment, "SELECT custom_id, reason, segment_row FROM cepsync_rejections ORDER BY segment_row")
    assert record["results"]["rejections_written"] == len(lines) == len(written) == 5
    assert [(r["custom_id"], r["issues"][0]["reason"], r["row"]) for r in sorted(lines, key=lambda r: r["row"])] == [
        (w["custom_id"], w["reason"], w["segment_row"]) for w in written
    ]
