"""`cepsync history`: the 80-column table, CSV and JSON, run as a real subprocess."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import subprocess
import sys

import pytest

from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.report.history import abbreviate, short_duration, short_status
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import API_KEY, PROJECT_KEY
from tests.support.report_support import NAME, SCRIPT_ID, History, build_history

BIG_RUN_ID = "20991231T235959Z-abcdef"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    directory = tmp_path_factory.mktemp("history")
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as simulator:
        built = build_history(directory, simulator)
    # A run as a million-profile activation records it, with markup in its error.
    big = copy.deepcopy(built.records[0])
    big.update(run_id=BIG_RUN_ID, started_at="2099-12-31T23:59:59+00:00", status="partial")
    big["counts"].update(new=1_234_567, changed=45_678, removed=999, acknowledged=12_345_678, failed=7)
    big["error"] = f"=HYPERLINK(0) [bold]{SCRIPT_ID}[/bold]"
    big["timings"]["total_seconds"] = 4_000.0
    store = SQLiteStateStore(built.state)
    try:
        store.save_run(big)
    finally:
        store.close()
    return built


def cepsync(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm-256color"}
    return subprocess.run(
        [sys.executable, "-m", "sync.cli", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_the_table_fits_80_columns_with_run_ids_whole(history: History) -> None:
    result = cepsync("history", NAME, "--state", history.state_url, "--limit", "20")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    run_ids = [BIG_RUN_ID, *(record["run_id"] for record in history.records)]
    rows = [line for line in lines if line[:23] in run_ids]
    assert [line[:23] for line in rows] == run_ids  # every id whole, newest first
    big = rows[0].split()
    # run, status, new, chg, rem, rej, ack, fail, time
    assert big == [BIG_RUN_ID, "partial", "1.2M", "46k", "999", "3", "12M", "7", "67m"]
    statuses = [line.split()[1] for line in rows[1:]]
    assert statuses == ["ok,", "guard", "auth", "partial", "ok", "ok,"]


def test_json_keeps_full_records_and_csv_one_row_per_run(history: History) -> None:
    result = cepsync("history", NAME, "--state", history.state_url, "--format", "json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["run_id"] for r in records[1:]] == [r["run_id"] for r in history.records]
    assert records[0]["counts"]["new"] == 1_234_567

    result = cepsync("history", NAME, "--state", history.state_url, "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["status"] for row in rows[1:]] == [r["status"] for r in history.records]
    assert rows[0]["new"] == "1234567"
    assert rows[0]["duration_seconds"] == "4000.0"
    # A formula-looking cell is quoted so a spreadsheet shows it as text.
    assert rows[0]["error"].startswith("'=HYPERLINK")


def test_markup_in_records_is_printed_as_text(history: History) -> None:
    odd = copy.deepcopy(history.records[0])
    odd.update(run_id="20991231T235958Z-000000", started_at="2099-12-31T23:59:58+00:00", status="[b]odd[/b]")
    store = SQLiteStateStore(history.state)
    try:
        store.save_run(odd)
    finally:
        store.close()
    result = cepsync("history", NAME, "--state", history.state_url, "--limit", "3")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("20991231T235958Z-000000"))
    assert row.split()[1] == "[b]odd[/b]"


def test_an_unknown_format_is_a_usage_error(history: History) -> None:
    result = cepsync("history", NAME, "--state", history.state_url, "--format", "xml")
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (999, "999"), (1_000, "1.0k"), (1_234, "1.2k"), (9_949, "9.9k"), (9_950, "10k"), (45_678, "46k"),
     (999_499, "999k"), (999_500, "1.0M"), (1_234_567, "1.2M"), (12_345_678, "12M"), (5 * 10**9, "5.0G"),
     (None, ""), (True, "")],
)  # fmt: skip
def test_counts_are_abbreviated_to_four_characters(value: object, text: str) -> None:
    assert abbreviate(value) == text
    assert len(text) <= 4


def test_durations_and_statuses_are_short() -> None:
    assert [short_duration(s) for s in (0.44, 42, 252, 2_520, 7_200, 108_000)] == [
        "0.4s", "42s", "4.2m", "42m", "2.0h", "30h"
    ]  # fmt: skip
    assert short_duration(None) == ""
    assert short_status("succeeded_with_rejections") == "ok, rejects"
    assert short_status("a_status_from_the_future") == "a_status_fr…"
