"""Bad input gets a clear answer: every command's help, markup-safe rendering, option checks.

Each test here once failed (issue 8): the CLI crashed with a traceback, accepted a bad value
silently, or printed something misleading. Everything is real: DuckDB and SQLite files,
the HTTP simulator, the CLI through typer's runner.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from engine_support import API_KEY, ENV, PROJECT_KEY, people, write_segment
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from sync import cli
from sync.batch.simulator import BatchSimulator, SimulatorThread
from sync.cli import app
from sync.errors import ConfigError

runner = CliRunner()

COMMANDS = ["run", "plan", "validate", "history", "reset", "schema", "simulator", "demo"]


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY})) as running:
        yield running


def activation_config(base_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "inputs",
        "source": {"type": "duckdb", "database": "segment.duckdb", "table": "people"},
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": base_url,
        },
        "mapping": {"custom_id": "customer_id", "email": "email"},
        "attributes": [{"column": "first_name"}],
    }
    config.update(overrides)
    return config


@pytest.fixture
def activation_file(tmp_path: Path, simulator: SimulatorThread) -> Path:
    write_segment(tmp_path / "segment.duckdb", people(10))
    path = tmp_path / "inputs.yaml"
    path.write_text(yaml.safe_dump(activation_config(simulator.base_url)), encoding="utf-8")
    return path


def invoke(*args: str, env: dict[str, str] | None = None, columns: int = 200) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={**ENV, "COLUMNS": str(columns), **(env or {})})
    return result.exit_code, result.output


def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def flat(text: str) -> str:
    return " ".join(text.split())


# -- 1. every --help works ---------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_working_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert result.exception is None


def test_state_help_shows_the_firestore_url_shape() -> None:
    code, output = invoke("run", "--help")
    assert code == 0
    assert "firestore://" in output


# -- 2. nothing from data, config or the environment is rich markup ---------------------------

MARKUP_LIKE = ["[/oops]@@", "[retired] john", "[b]bold[/b]", "[/nope]", ":smile:", "a\\", "[link=x]y[/link]"]


def test_markup_in_row_values_is_printed_verbatim_by_run_and_plan(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    rows = people(4)
    rows[0]["email"] = "[/oops]@@"  # invalid: rejected, shown in the sample table
    rows[1]["first_name"] = "[retired] john"
    rows[2]["first_name"] = "[b]bold[/b]"
    write_segment(tmp_path / "segment.duckdb", rows)
    state = state_url(tmp_path)
    code, output = invoke("plan", str(activation_file), "--state", state, "--sample", "10")
    assert code == 0, output
    assert "[/oops]@@" in output
    assert "[retired] john" in output
    assert "[b]bold[/b]" in output
    code, output = invoke("run", str(activation_file), "--state", state)
    assert code == 0, output
    assert "[/oops]@@" in output
    runs = json.loads(invoke("history", "inputs", "--state", state, "--json")[1])
    code, output = invoke("history", "inputs", "--state", state, "--run", runs[0]["run_id"])
    assert code == 0, output
    assert "[/oops]@@" in output


def test_a_column_named_like_markup_is_printed_by_validate(tmp_path: Path, simulator: SimulatorThread) -> None:
    import duckdb

    with duckdb.connect(str(tmp_path / "segment.duckdb")) as connection:
        connection.execute("CREATE TABLE people AS SELECT 'c1' AS customer_id, 'x' AS \"[/nope]\"")
    config = activation_config(simulator.base_url, attributes=[{"column": "[/nope]", "name": "nope"}])
    config["mapping"] = {"custom_id": "customer_id"}
    path = tmp_path / "markup.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, output = invoke("validate", str(path))
    assert code == 0, output
    assert "[/nope]=string" in output


def test_a_config_error_keeps_the_brackets_of_its_message(tmp_path: Path, simulator: SimulatorThread) -> None:
    path = tmp_path / "badname.yaml"
    path.write_text(yaml.safe_dump(activation_config(simulator.base_url, name="Bad Name")), encoding="utf-8")
    code, output = invoke("validate", str(path))
    assert code == 2
    assert "[a-z0-9][a-z0-9_-]*" in output


printable = st.text(st.characters(codec="utf-8").filter(str.isprintable), min_size=1, max_size=40)


def _capture() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=2_000, color_system=None, legacy_windows=False), buffer


def _record(value: str) -> dict[str, Any]:
    return {
        "activation": value,
        "run_id": value,
        "status": "succeeded_with_rejections",
        "counts": {"rows": 3, "new": 1, "rejected": 1, "sent": 1, "acknowledged": 1},
        "endpoint": "update",
        "timings": {"total_seconds": 1.0, "wire_seconds": 0.5},
        "mapping_version": {"explanation": value},
        "rejected_by_reason": {value: 1},
        "dropped_attributes_by_reason": {value: 2},
        "rejected_samples": [
            {"row": 1, "custom_id": value, "issues": [{"field": value, "reason": value, "detail": value}]}
        ],
        "guards": [{"guard": "removed_percent", "tripped": True, "overridden": False, "detail": value}],
        "error": value,
    }


@settings(max_examples=200, deadline=None)
@given(printable)
def test_print_record_prints_any_printable_string_verbatim(value: str) -> None:
    out, out_buffer = _capture()
    err, err_buffer = _capture()
    cli.print_record(_record(value), out=out, err=err)
    printed = out_buffer.getvalue()
    # The activation line, the mapping explanation, the reasons, the sample table, the guard.
    assert printed.count(value) >= 6, printed
    assert value in err_buffer.getvalue()


@settings(max_examples=200, deadline=None)
@given(printable)
def test_plan_sample_prints_any_printable_string_verbatim(value: str) -> None:
    out, buffer = _capture()
    cli.print_plan_sample([{"custom_id": value, "kind": "new", "attributes": {"a": value}}], [value], out=out)
    printed = buffer.getvalue()
    assert printed.count(value) >= 2
    assert json.dumps({"a": value}, ensure_ascii=False) in printed


@settings(max_examples=200, deadline=None)
@given(printable, printable)
def test_validate_lines_print_any_printable_string_verbatim(name: str, column: str) -> None:
    from sync.config import AttributeType

    out, buffer = _capture()
    cli.print_check(out, f"config: activation '{name}' is valid")
    cli.print_source_check(out, 1, {column: AttributeType.STRING})
    printed = buffer.getvalue()
    assert f"activation '{name}' is valid" in printed
    assert f"{column}=string" in printed


@settings(max_examples=200, deadline=None)
@given(printable)
def test_errors_print_any_printable_string_verbatim(value: str) -> None:
    err, buffer = _capture()
    cli.print_error(ConfigError(value, source=value, field=value), err=err)
    assert buffer.getvalue().count(value) >= 3
