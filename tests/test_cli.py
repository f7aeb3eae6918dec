"""The `cepsync` command line, through typer's runner, against the HTTP simulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sync.cli import app
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import API_KEY, ENV, PROJECT_KEY, people, write_segment

runner = CliRunner()


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY})) as running:
        yield running


@pytest.fixture
def activation_file(tmp_path: Path, simulator: SimulatorThread) -> Path:
    write_segment(tmp_path / "segment.duckdb", people(40))
    config = {
        "name": "cli_people",
        "source": {"type": "duckdb", "database": "segment.duckdb", "table": "people"},
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": simulator.base_url,
        },
        "sync_mode": "mirror",
        "mapping": {"custom_id": "customer_id", "email": "email"},
        "attributes": [{"column": "points"}],
    }
    path = tmp_path / "cli_people.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={**ENV, "COLUMNS": "200", **(env or {})})
    return result.exit_code, result.output


def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_schema_prints_the_json_schema() -> None:
    code, output = invoke("schema")
    assert code == 0
    assert json.loads(output)["title"] == "cepsync activation"


def test_validate_checks_config_source_and_credentials(activation_file: Path) -> None:
    code, output = invoke("validate", str(activation_file))
    assert code == 0, output
    assert "config: activation 'cli_people' is valid" in output
    assert "points=integer" in output
    assert "Batch accepted the credentials" in output

    code, output = invoke("validate", str(activation_file), env={"BATCH_REST_API_KEY": "wrong-key-123456"})
    assert code == 4
    assert "wrong-key-123456" not in output


def test_config_errors_exit_2_naming_file_and_field(tmp_path: Path, activation_file: Path) -> None:
    data = yaml.safe_load(activation_file.read_text())
    data["attributes"] = [{"column": "points", "name": "Points"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, output = invoke("run", str(bad), "--state", state_url(tmp_path))
    assert code == 2
    assert "bad.yaml" in output
    assert "attributes.0.name" in output

    code, output = invoke("run", str(activation_file), "--state", state_url(tmp_path), "--allow", "everything")
    assert code == 2
    assert "unknown guard" in output


def test_missing_credentials_are_a_config_error(tmp_path: Path, activation_file: Path) -> None:
    result = runner.invoke(
        app, ["run", str(activation_file), "--state", state_url(tmp_path)], env={"BATCH_REST_API_KEY": ""}
    )
    assert result.exit_code == 2
    assert "BATCH_REST_API_KEY" in result.output


def test_run_plan_history_reset(tmp_path: Path, activation_file: Path, simulator: SimulatorThread) -> None:
    state = state_url(tmp_path)
    code, output = invoke("run", str(activation_file), "--state", state)
    assert code == 0, output
    assert "acknowledged by Batch" in output
    assert len(simulator.simulator.profiles(PROJECT_KEY)) == 40

    write_segment(tmp_path / "segment.duckdb", [*people(39), {**people(1, start=39)[0], "points": 999}])
    code, output = invoke("plan", str(activation_file), "--state", state, "--json")
    assert code == 0, output
    planned = json.loads(output)
    assert planned["status"] == "planned"
    assert planned["counts"]["changed"] == 1
    assert planned["sample_changes"][0]["custom_id"] == "c00039"
    assert planned["sample_changes"][0]["attributes"]["points"] == 999
    assert simulator.simulator.profiles(PROJECT_KEY)["c00039"]["points"] == 39  # nothing sent

    code, output = invoke("history", "cli_people", "--state", state, "--json")
    runs = json.loads(output)
    assert [r["status"] for r in runs] == ["succeeded"]  # the plan left no record

    code, output = invoke("run", str(activation_file), "--state", state, "--json")
    assert code == 0
    assert json.loads(output)["counts"]["changed"] == 1

    code, output = invoke("history", str(activation_file), "--state", state)
    assert code == 0
    rows = [line for line in output.splitlines() if line.startswith("20")]  # run ids start with the year
    assert len(rows) == 2
    assert all(line.split()[1] == "ok" for line in rows), output  # "ok" is the table's short "succeeded"
    run_id = runs[0]["run_id"]
    code, output = invoke("history", "cli_people", "--state", state, "--run", run_id)
    assert code == 0
    assert run_id in output
    code, output = invoke("history", "cli_people", "--state", state, "--run", "nope")
    assert code == 2

    code, output = invoke("reset", "cli_people", "--state", state, "--yes")
    assert code == 0
    code, output = invoke("run", str(activation_file), "--state", state, "--json")
    assert json.loads(output)["counts"]["new"] == 40


def test_a_held_lease_exits_5_and_sends_nothing(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        store.acquire_lease("cli_people", "someone-else", 600, datetime.now(UTC))
    finally:
        store.close()
    code, output = invoke("run", str(activation_file), "--state", state_url(tmp_path))
    assert code == 5, output
    assert simulator.simulator.stats()["profiles_received"] == 0


def test_a_tripped_guard_exits_3(tmp_path: Path, activation_file: Path) -> None:
    state = state_url(tmp_path)
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    write_segment(tmp_path / "segment.duckdb", people(10))
    code, output = invoke("run", str(activation_file), "--state", state)
    assert code == 3
    assert "removed_percent" in output
    code, output = invoke("run", str(activation_file), "--state", state, "--allow", "removed_percent")
    assert code == 0, output


def test_demo_runs_a_real_sync_and_checks_convergence(tmp_path: Path) -> None:
    code, output = invoke("demo", "--dir", str(tmp_path / "demo"), "--rows", "300")
    assert code == 0, output
    assert "Day 1: first run (full load)" in output
    assert "Day 2: delta run (mirror)" in output
    assert "✓ Batch holds data for exactly the segment's" in output
    assert "invalid_phone" in output


def test_a_column_missing_from_the_source_names_file_field_and_activation(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    data = yaml.safe_load(activation_file.read_text())
    data["attributes"] = [{"column": "pointz"}]
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, output = invoke("run", str(bad), "--state", state_url(tmp_path))
    assert code == 2
    flat = " ".join(output.split())
    assert "typo.yaml" in flat
    assert "attributes.0.column" in flat
    assert "'pointz' is not in the segment" in flat
    assert simulator.simulator.stats()["profiles_received"] == 0


def test_rejects_file_lists_every_rejected_row(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    rows = people(40)
    for row in rows[:30]:
        row["email"] = "not-an-email"
    rows.append({**rows[35]})  # a duplicate id
    write_segment(tmp_path / "segment.duckdb", rows)
    simulator.simulator.faults.reject_custom_ids = {"c00031"}
    rejects = tmp_path / "rejects.jsonl"
    code, output = invoke("run", str(activation_file), "--state", state_url(tmp_path), "--rejects", str(rejects))
    assert code == 0, output
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    reasons = [(line["custom_id"], line["issues"][0]["reason"]) for line in lines]
    # All 30 invalid rows (the run record keeps a sample), both copies of the duplicated id
    # (each copy is its own rejected row), and the row Batch refused.
    assert len(reasons) == 33
    assert reasons.count(("c00035", "duplicate_custom_id")) == 2
    assert ("c00031", "batch_rejected") in reasons
    assert {line["activation"] for line in lines} == {"cli_people"}
    assert lines[0]["row"] == 1
    assert lines[0]["issues"][0]["field"] == "email"
