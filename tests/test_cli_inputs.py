"""Bad input gets a clear answer: every command's help, markup-safe rendering, option checks.

Each test here once failed (issue 8): the CLI crashed with a traceback, accepted a bad value
silently, or printed something misleading. Everything is real: DuckDB and SQLite files,
the HTTP simulator, the CLI through typer's runner.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from sync import cli
from sync.cli import app
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.errors import ConfigError
from tests.support.engine_support import API_KEY, ENV, PROJECT_KEY, people, write_segment

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


def invoke(*args: str, env: dict[str, str | None] | None = None, columns: int = 200) -> tuple[int, str]:
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


# -- 8. source errors are config errors (exit 2) ----------------------------------------------


def _with_source(tmp_path: Path, base_url: str, source: dict[str, Any]) -> Path:
    config = activation_config(base_url, source={"type": "duckdb", "database": "segment.duckdb", **source})
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("source", "field", "words"),
    [
        ({"query": "SELEC * FROM people"}, "source.query", "syntax error"),
        ({"table": "no_such_table"}, "source.table", "no_such_table"),
        ({"query": "SELECT * FROM missing_table"}, "source.query", "missing_table"),
        ({"database": "not_duckdb.txt", "table": "people"}, "source.database", "not_duckdb.txt"),
        ({"database": "a_directory", "table": "people"}, "source.database", "a_directory"),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan", "validate"])
def test_source_errors_exit_2_naming_the_field(
    tmp_path: Path,
    simulator: SimulatorThread,
    command: str,
    source: dict[str, Any],
    field: str,
    words: str,
) -> None:
    write_segment(tmp_path / "segment.duckdb", people(3))
    (tmp_path / "not_duckdb.txt").write_text("hello, I am not a database\n" * 100)
    (tmp_path / "a_directory").mkdir()
    path = _with_source(tmp_path, simulator.base_url, source)
    args = [command, str(path)] + ([] if command == "validate" else ["--state", state_url(tmp_path)])
    code, output = invoke(*args)
    assert code == 2, output
    text = flat(output)
    assert field in text
    assert words in text
    assert "source.yaml" in text
    assert simulator.simulator.stats()["profiles_received"] == 0


# -- 9. state-store failures are clear errors, and a corrupt store is never overwritten --------


@pytest.mark.parametrize("command", ["run", "plan", "history", "reset"])
def test_a_state_path_through_a_file_is_a_config_error(tmp_path: Path, activation_file: Path, command: str) -> None:
    (tmp_path / "plain_file").write_text("x")
    state = f"sqlite:///{tmp_path / 'plain_file' / 'state.db'}"
    target = "inputs" if command in ("history", "reset") else str(activation_file)
    code, output = invoke(command, target, "--state", state, *(["--yes"] if command == "reset" else []))
    assert code == 2, output
    assert "plain_file" in flat(output)


@pytest.mark.parametrize("command", ["run", "plan", "history", "reset"])
def test_a_directory_as_state_is_a_config_error(tmp_path: Path, activation_file: Path, command: str) -> None:
    (tmp_path / "state_dir").mkdir()
    target = "inputs" if command in ("history", "reset") else str(activation_file)
    extra = ["--yes"] if command == "reset" else []
    code, output = invoke(command, target, "--state", f"sqlite:///{tmp_path / 'state_dir'}", *extra)
    assert code == 2, output
    assert "is a directory" in flat(output)


def _corrupt_files(tmp_path: Path) -> dict[str, bytes]:
    from sync.state.sqlite import SQLiteStateStore

    good = tmp_path / "good.db"
    with SQLiteStateStore(good):
        pass
    whole = good.read_bytes()
    # A page-sized file whose header is SQLite's but whose schema page is garbage.
    malformed = whole[:100] + bytes(range(256)) * ((len(whole) - 100) // 256 + 1)
    return {"random": bytes(range(256)) * 64, "malformed": malformed[: len(whole)]}


@pytest.mark.parametrize("kind", ["random", "malformed"])
@pytest.mark.parametrize("command", ["run", "plan", "history", "reset"])
def test_a_corrupt_state_file_is_refused_and_left_untouched(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str, kind: str
) -> None:
    content = _corrupt_files(tmp_path)[kind]
    state_file = tmp_path / "corrupt.db"
    state_file.write_bytes(content)
    target = "inputs" if command in ("history", "reset") else str(activation_file)
    extra = ["--yes"] if command == "reset" else []
    code, output = invoke(command, target, "--state", f"sqlite:///{state_file}", *extra)
    assert code == 2, output
    text = flat(output)
    assert "corrupt.db" in text
    assert "not a usable SQLite state database" in text
    assert state_file.read_bytes() == content
    assert simulator.simulator.stats()["profiles_received"] == 0


def test_a_read_only_state_directory_is_a_config_error(tmp_path: Path, activation_file: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("this user writes into read-only directories (root): nothing to refuse")
        code, output = invoke("run", str(activation_file), "--state", f"sqlite:///{locked / 'state.db'}")
        assert code == 2, output
        assert "locked" in flat(output)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "plan", "history", "reset"])
def test_an_unknown_state_scheme_is_a_config_error_for_every_command(
    tmp_path: Path, activation_file: Path, command: str
) -> None:
    target = "inputs" if command in ("history", "reset") else str(activation_file)
    extra = ["--yes"] if command == "reset" else []
    code, output = invoke(command, target, "--state", "postgres://db/state", *extra)
    assert code == 2, output
    assert "unknown state URL scheme 'postgres'" in flat(output)


def test_firestore_state_without_credentials_is_a_config_error(tmp_path: Path, activation_file: Path) -> None:
    env: dict[str, str | None] = {
        "HOME": str(tmp_path),  # no gcloud application-default credentials here
        "GOOGLE_APPLICATION_CREDENTIALS": None,
        "FIRESTORE_EMULATOR_HOST": None,
        "NO_GCE_CHECK": "True",  # not on Google Cloud: do not probe the metadata server
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
    }
    code, output = invoke("history", "inputs", "--state", "firestore://some-project", env=env)
    assert code == 2, output
    assert "credentials" in flat(output)


def test_the_functions_state_word_firestore_is_understood(tmp_path: Path) -> None:
    env: dict[str, str | None] = {
        "HOME": str(tmp_path),
        "GOOGLE_APPLICATION_CREDENTIALS": None,
        "FIRESTORE_EMULATOR_HOST": None,
        "NO_GCE_CHECK": "True",
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "GOOGLE_CLOUD_PROJECT": "some-project",
        "CEPSYNC_STATE": "firestore",
    }
    code, output = invoke("history", "inputs", env=env)
    assert code == 2, output
    assert "unknown state URL scheme" not in output
    assert "credentials" in flat(output)


# -- 10. one default state location, and commands that only read never create state ------------


def test_the_default_state_is_the_same_from_any_directory(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_home = tmp_path / "xdg-state"
    env = {"XDG_STATE_HOME": str(state_home), "CEPSYNC_STATE": ""}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, output = invoke("run", str(activation_file), env=env)
    assert code == 0, output
    assert (state_home / "cepsync" / "state.db").is_file()
    monkeypatch.chdir(elsewhere)
    code, output = invoke("plan", str(activation_file), "--json", env=env)
    assert code == 0, output
    planned = json.loads(output)
    assert planned["counts"]["unchanged"] == 10
    assert planned["counts"]["new"] == 0
    assert not (elsewhere / ".cepsync").exists()


def test_plan_and_history_do_not_create_state(tmp_path: Path, activation_file: Path) -> None:
    state_file = tmp_path / "nowhere" / "state.db"
    state = f"sqlite:///{state_file}"
    code, output = invoke("plan", str(activation_file), "--state", state, "--json")
    assert code == 0, output
    assert json.loads(output)["counts"]["new"] == 10
    assert not state_file.exists()
    assert not state_file.parent.exists()
    code, output = invoke("history", "inputs", "--state", state)
    assert code == 2, output
    assert "no state" in flat(output)
    assert not state_file.parent.exists()


def test_history_and_reset_of_an_unknown_activation_say_so(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    state = state_url(tmp_path)
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    code, output = invoke("history", "no_such_activation", "--state", state)
    assert code == 2, output
    assert "no runs of activation 'no_such_activation'" in flat(output)
    code, output = invoke("reset", "no_such_activation", "--state", state, "--yes")
    assert code == 2, output
    assert "nothing to forget" in flat(output)
    code, output = invoke("reset", "inputs", "--state", state, "--yes")
    assert code == 0, output


# -- 11. --rejects is checked before the run -----------------------------------------------------


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize(("target", "words"), [("a_dir", "is a directory"), ("missing/rejects.jsonl", "missing")])
def test_a_rejects_path_that_cannot_be_written_fails_before_the_run(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str, target: str, words: str
) -> None:
    (tmp_path / "a_dir").mkdir()
    state_file = tmp_path / "state.db"
    code, output = invoke(
        command, str(activation_file), "--state", f"sqlite:///{state_file}", "--rejects", str(tmp_path / target)
    )
    assert code == 2, output
    text = flat(output)
    assert "--rejects" in text
    assert words in text
    assert simulator.simulator.stats()["profiles_received"] == 0
    assert not state_file.exists()  # refused before anything was opened


# -- 12. options are checked at parse time -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["run", "--time-budget", "-5"], "--time-budget"),
        (["run", "--time-budget", "20"], "30"),
        (["run", "--time-budget", "30"], "30"),
        (["run", "--lease-ttl", "0"], "--lease-ttl"),
        (["run", "--lease-ttl", "-1"], "--lease-ttl"),
        (["plan", "--sample", "-1"], "--sample"),
    ],
)
def test_out_of_range_options_are_refused(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, args: list[str], words: str
) -> None:
    state_file = tmp_path / "state.db"
    code, output = invoke(args[0], str(activation_file), "--state", f"sqlite:///{state_file}", *args[1:])
    assert code == 2, output
    assert words in flat(output)
    assert simulator.simulator.stats()["profiles_received"] == 0
    assert not state_file.exists()


def test_a_budget_too_small_to_send_says_why() -> None:
    code, output = invoke("run", "x.yaml", "--time-budget", "20")
    assert code == 2
    assert "never send" in flat(output)


def test_history_limit_must_be_positive(tmp_path: Path) -> None:
    code, output = invoke("history", "inputs", "--state", state_url(tmp_path), "--limit", "-1")
    assert code == 2, output
    assert "--limit" in flat(output)


def test_plan_sample_zero_shows_no_sample(tmp_path: Path, activation_file: Path) -> None:
    code, output = invoke("plan", str(activation_file), "--state", state_url(tmp_path), "--sample", "0")
    assert code == 0, output
    assert "new c0000" not in output


# -- 13. --json: one JSON object on stdout for every outcome ------------------------------------


def _json_stdout(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, list(args), env={**ENV, "COLUMNS": "200", **(env or {})})
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_json_reports_a_yaml_error_as_one_object(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    code, outcome = _json_stdout(command, str(bad), "--state", state_url(tmp_path), "--json")
    assert code == 2
    assert outcome["status"] == "config_error"
    assert outcome["exit_code"] == 2
    assert "broken.yaml" in outcome["error"]


@pytest.mark.parametrize("command", ["run", "plan"])
def test_json_reports_a_config_error_after_loading_as_one_object(
    tmp_path: Path, activation_file: Path, command: str
) -> None:
    code, outcome = _json_stdout(command, str(activation_file), "--state", "postgres://x", "--json")
    assert code == 2
    assert outcome == {
        "activation": "inputs",
        "status": "config_error",
        "exit_code": 2,
        "error": outcome["error"],
    }
    assert "postgres" in outcome["error"]


def test_json_reports_an_unknown_guard_and_missing_credentials(tmp_path: Path, activation_file: Path) -> None:
    code, outcome = _json_stdout(
        "run", str(activation_file), "--state", state_url(tmp_path), "--allow", "nope", "--json"
    )
    assert (code, outcome["status"]) == (2, "config_error")
    assert "unknown guard" in outcome["error"]
    code, outcome = _json_stdout(
        "run", str(activation_file), "--state", state_url(tmp_path), "--json", env={"BATCH_REST_API_KEY": None}
    )
    assert (code, outcome["status"]) == (2, "config_error")
    assert "BATCH_REST_API_KEY" in outcome["error"]


def test_json_reports_a_guard_and_bad_credentials_with_the_run_record(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    code, outcome = _json_stdout(
        "run", str(activation_file), "--state", state_url(tmp_path), "--json", env={"BATCH_REST_API_KEY": "wrong-key"}
    )
    assert code == 4
    assert outcome["status"] == "auth_error"
    assert outcome["activation"] == "inputs"


# -- 6. validate: only a 2xx answer means Batch accepted the credentials ------------------------


def test_validate_reports_a_404_instead_of_accepting(tmp_path: Path, simulator: SimulatorThread) -> None:
    write_segment(tmp_path / "segment.duckdb", people(3))
    path = tmp_path / "extra_path.yaml"
    path.write_text(yaml.safe_dump(activation_config(f"{simulator.base_url}/extra")), encoding="utf-8")
    code, output = invoke("validate", str(path))
    assert code == 2, output
    text = flat(output)
    assert "accepted" not in text
    assert "Batch answered 404" in text
    assert "destination.base_url" in text


# -- 21. URLs and commands in the demo are never wrapped ----------------------------------------


def test_demo_prints_urls_and_commands_whole_at_80_columns(tmp_path: Path) -> None:
    directory = tmp_path / ("a-rather-long-directory-name-" * 3) / "demo"
    code, output = invoke("demo", "--dir", str(directory), "--rows", "60", columns=80)
    assert code == 0, output
    lines = output.splitlines()
    command = f"cepsync history vip_customers --state sqlite:///{directory / 'state.db'}"
    assert len(command) > 80
    assert any(command in line for line in lines), output
    assert any(str(directory / "vip_customers.yaml") in line for line in lines)
    assert any(str(directory / "segment.duckdb") in line and "http://127.0.0.1:" in line for line in lines)


# -- 16, 17. the summary says what each number and each time is ---------------------------------


def _printed(record: dict[str, Any]) -> str:
    out, buffer = _capture()
    err, _ = _capture()
    cli.print_record(record, out=out, err=err)
    return buffer.getvalue()


def _row(printed: str, label: str) -> str:
    [line] = [line for line in printed.splitlines() if f" {label} " in line]
    return " ".join(line.replace("│", " ").split())


def test_the_summary_separates_attempted_acknowledged_refused_and_failed() -> None:
    record = {
        "activation": "a",
        "run_id": "r",
        "status": "partial",
        "counts": {
            "rows": 4000,
            "new": 4000,
            "sent": 4000,
            "acknowledged": 3000,
            "rejected_by_batch": 10,
            "failed": 990,
        },
        "endpoint": "update",
    }
    printed = _printed(record)
    assert _row(printed, "attempted (sent to Batch)").endswith("4,000")
    assert _row(printed, "acknowledged by Batch").endswith("3,000")
    assert _row(printed, "refused by Batch").endswith("10")
    assert _row(printed, "failed (resent next run)").endswith("990")
    # No bare "sent" count that could be read as "delivered".
    assert not any(line.split("│")[1].strip() == "sent" for line in printed.splitlines() if "│" in line)


def test_full_runs_say_unchanged_rows_are_sent_anyway() -> None:
    record = {
        "activation": "a",
        "run_id": "r",
        "status": "succeeded",
        "full": True,
        "counts": {"rows": 400, "unchanged": 400, "sent": 400, "acknowledged": 400},
        "endpoint": "update",
    }
    assert _row(_printed(record), "unchanged (sent anyway: --full)").endswith("400")


def test_no_endpoint_is_named_when_nothing_was_sent() -> None:
    record = {
        "activation": "a",
        "run_id": "r",
        "status": "succeeded",
        "counts": {"rows": 40, "unchanged": 40, "sent": 0, "acknowledged": 0},
        "endpoint": "update",
        "timings": {"total_seconds": 1.5},
    }
    printed = _printed(record)
    assert "/profiles/" not in printed
    record["counts"]["sent"] = 3
    assert "sent to /profiles/update" in _printed(record)


def test_each_time_says_what_it_is() -> None:
    record = {
        "activation": "a",
        "run_id": "r",
        "status": "succeeded",
        "counts": {"sent": 10},
        "endpoint": "update",
        "timings": {"total_seconds": 2.0, "read_and_plan_seconds": 0.5, "wire_seconds": 6.0, "wait_seconds": 1.25},
    }
    printed = flat(_printed(record))
    assert "run took 2.00 s" in printed
    assert "reading and planning 0.50 s" in printed
    assert "6.00 s in requests to Batch (summed over concurrent requests)" in printed
    assert "1.25 s waiting for rate limits and retries (summed)" in printed
    assert "waiting on Batch" not in printed


def test_dropped_attributes_are_counted_by_reason() -> None:
    record = {
        "activation": "a",
        "run_id": "r",
        "status": "succeeded",
        "counts": {"rows": 10},
        "dropped_attributes_by_reason": {"invalid_email": 3, "string_too_long": 1},
    }
    printed = flat(_printed(record))
    assert "attributes dropped (rows sent without them): invalid_email ×3, string_too_long ×1" in printed


def test_a_real_drop_attribute_run_shows_the_dropped_count(tmp_path: Path, simulator: SimulatorThread) -> None:
    rows = people(5)
    rows[0]["email"] = "not-an-email"
    write_segment(tmp_path / "segment.duckdb", rows)
    config = activation_config(simulator.base_url, on_invalid_value="drop_attribute")
    path = tmp_path / "drop.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, output = invoke("run", str(path), "--state", state_url(tmp_path))
    assert code == 0, output
    assert "attributes dropped (rows sent without them): invalid_email ×1" in flat(output)


# -- 20. a first run on an empty segment says so ------------------------------------------------


def test_a_first_run_on_an_empty_segment_warns(tmp_path: Path, simulator: SimulatorThread) -> None:
    write_segment(tmp_path / "segment.duckdb", [])
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump(activation_config(simulator.base_url)), encoding="utf-8")
    code, output = invoke("run", str(path), "--state", state_url(tmp_path))
    assert code == 0, output
    assert "warning: the segment returned no rows and this activation has synced nothing yet" in flat(output)
    code, record = _json_stdout("plan", str(path), "--state", state_url(tmp_path), "--json")
    assert code == 0
    assert record["warnings"] == [
        "the segment returned no rows and this activation has synced nothing yet: check source.query "
        "(or source.table) if profiles were expected"
    ]


# --- issue 19, items 1-6: warehouse values ---
# One value a warehouse produces every day never fails a whole run: it is read, or its row
# is rejected with a reason naming the row and the column, and the other rows are sent.


def _values_activation(
    tmp_path: Path,
    base_url: str,
    *statements: str,
    attributes: list[dict[str, Any]],
    mapping: dict[str, str] | None = None,
    query: str | None = None,
) -> Path:
    """An activation over a DuckDB table ``seg`` (or ``query``) built by ``statements``."""
    import duckdb

    database = tmp_path / "values.duckdb"
    with duckdb.connect(str(database)) as connection:
        for statement in statements:
            connection.execute(statement)
    source: dict[str, Any] = {"type": "duckdb", "database": str(database)}
    source.update({"query": query} if query is not None else {"table": "seg"})
    config = activation_config(base_url, name="values", source=source, attributes=attributes)
    config["mapping"] = mapping or {"custom_id": "id"}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_19_1_timestamps_of_every_precision_are_read_and_cut_to_the_millisecond(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    path = _values_activation(
        tmp_path,
        simulator.base_url,
        "CREATE TABLE seg AS SELECT 'a' AS id, '2024-01-02 03:04:05.123456789'::TIMESTAMP_NS AS ns, "
        "'2024-01-02 03:04:05'::TIMESTAMP_S AS s, '2024-01-02 03:04:05.5'::TIMESTAMP_MS AS ms, "
        "'2024-01-02 03:04:05.999999'::TIMESTAMPTZ AS tz",
        attributes=[{"column": "ns"}, {"column": "s"}, {"column": "ms"}, {"column": "tz"}],
    )
    code, output = invoke("run", str(path), "--state", state_url(tmp_path))
    assert code == 0, output
    assert "Install pandas" not in output
    assert "Traceback" not in output
    assert simulator.simulator.profiles(PROJECT_KEY)["a"] == {
        "ns": "2024-01-02T03:04:05.123Z",
        "s": "2024-01-02T03:04:05Z",
        "ms": "2024-01-02T03:04:05.500Z",
        "tz": "2024-01-02T03:04:05.999Z",
    }


def test_19_2_an_infinite_date_rejects_its_row_invalid_date_and_the_others_are_sent(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    path = _values_activation(
        tmp_path,
        simulator.base_url,
        "CREATE TABLE seg (id VARCHAR, seen TIMESTAMP, changed TIMESTAMPTZ, born DATE)",
        "INSERT INTO seg VALUES ('inf', 'infinity', '2024-01-01', '2024-01-01'), "
        "('neg', '2024-01-01', '-infinity', '2024-01-01'), ('day', '2024-01-01', '2024-01-01', 'infinity'), "
        "('ok', '2024-01-01 10:00', '2024-01-01 10:00', '2024-01-01')",
        attributes=[{"column": "seen"}, {"column": "changed"}, {"column": "born"}],
    )
    code, output = invoke("run", str(path), "--state", state_url(tmp_path), "--rejects", str(tmp_path / "r.jsonl"))
    assert code == 0, output
    assert "OverflowError" not in output
    assert "invalid_date ×3" in flat(output)
    rejects = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    found = {(r["custom_id"], issue["field"], issue["reason"]) for r in rejects for issue in r["issues"]}
    assert found == {
        ("inf", "seen", "invalid_date"),
        ("neg", "changed", "invalid_date"),
        ("day", "born", "invalid_date"),
    }
    assert "infinity" in json.dumps(rejects)
    assert set(simulator.simulator.profiles(PROJECT_KEY)) == {"ok"}


def test_19_3_one_ten_megabyte_string_is_rejected_string_too_long_with_the_default_config(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    path = _values_activation(
        tmp_path,
        simulator.base_url,
        "CREATE TABLE seg AS SELECT 'id-' || i AS id, "
        "CASE WHEN i = 7 THEN repeat('x', 10000000) ELSE 'note ' || i END AS note FROM range(50) t(i)",
        attributes=[{"column": "note"}],
    )
    code, output = invoke("run", str(path), "--state", state_url(tmp_path), "--rejects", str(tmp_path / "r.jsonl"))
    assert code == 0, output
    assert "memory_limit" not in output
    assert "string_too_long ×1" in flat(output)
    (reject,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert reject["custom_id"] == "id-7"
    assert reject["issues"][0]["field"] == "note"
    assert "10000000 characters" in reject["issues"][0]["detail"]
    assert len(simulator.simulator.profiles(PROJECT_KEY)) == 49


def test_19_4_decimals_are_sent_exactly_or_refused_never_rounded(tmp_path: Path, simulator: SimulatorThread) -> None:
    path = _values_activation(
        tmp_path,
        simulator.base_url,
        "CREATE TABLE seg (id VARCHAR, amount DECIMAL(38, 9), units DECIMAL(38, 9))",
        "INSERT INTO seg VALUES ('wide', 12345678901234567890123456789.123456789, 1), ('money', 19.99, 42), "
        "('half', 1.5, 2.5)",
        attributes=[{"column": "amount"}, {"column": "units", "type": "integer"}],
    )
    code, output = invoke("validate", str(path))
    assert code == 0, output
    assert "amount=float" in output
    assert "units=integer" in output
    code, output = invoke("run", str(path), "--state", state_url(tmp_path), "--rejects", str(tmp_path / "r.jsonl"))
    assert code == 0, output
    assert "1.2345678901234568e+28" not in json.dumps(simulator.simulator.profiles(PROJECT_KEY))
    assert simulator.simulator.profiles(PROJECT_KEY) == {"money": {"amount": 19.99, "units": 42}}
    rejects = {
        r["custom_id"]: r["issues"]
        for r in map(json.loads, (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines())
    }
    assert [(i["field"], i["reason"]) for i in rejects["wide"]] == [("amount", "inexact_number")]
    assert "12345678901234567890123456789.123456789" in rejects["wide"][0]["detail"]
    assert [(i["field"], i["reason"]) for i in rejects["half"]] == [("units", "invalid_integer")]
    assert "not a whole number" in rejects["half"][0]["detail"]


@pytest.mark.parametrize("command", ["validate", "run", "plan"])
def test_19_5_a_mapped_column_a_join_returns_twice_is_a_config_error_naming_it(
    tmp_path: Path, simulator: SimulatorThread, command: str
) -> None:
    path = _values_activation(
        tmp_path,
        simulator.base_url,
        "CREATE TABLE a AS SELECT 'u1' AS id, 'x@example.com' AS email",
        "CREATE TABLE b AS SELECT 'u1' AS id, 'y@example.com' AS email",
        attributes=[],
        mapping={"custom_id": "id", "email": "email"},
        query="SELECT * FROM a JOIN b USING (id)",
    )
    args = [command, str(path)] + ([] if command == "validate" else ["--state", state_url(tmp_path)])
    code, output = invoke(*args)
    assert code == 2, output
    text = flat(output)
    assert "activation 'values'" in text
    assert "column 'email' is ambiguous" in text
    assert "mapping.email" in text
    assert "Traceback" not in output
    assert simulator.simulator.profiles(PROJECT_KEY) == {}


def test_19_6_a_table_ten_thousand_columns_wide_reads_only_its_mapped_columns(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    columns = ", ".join(f"'filler {i}' AS c{i}" for i in range(10_000))
    path = _values_activation(
        tmp_path,
        simulator.base_url,
        f"CREATE TABLE seg AS SELECT 'id-' || i AS id, 'tier ' || i AS tier, {columns} FROM range(3) t(i)",
        attributes=[{"column": "tier"}, {"column": "c9999"}],
    )
    code, output = invoke("validate", str(path))
    assert code == 0, output
    code, output = invoke("run", str(path), "--state", state_url(tmp_path))
    assert code == 0, output
    assert "Out of Memory" not in output
    assert simulator.simulator.profiles(PROJECT_KEY) == {
        f"id-{i}": {"tier": f"tier {i}", "c9999": "filler 9999"} for i in range(3)
    }


# --- issue 19, items 19-29: CLI, files, front door ---


# Item 21: every float option is a finite number of seconds in its range (inf and nan parse as floats).
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--lease-ttl", "inf"], ["--lease-ttl", "finite"]),
        (["--lease-ttl", "nan"], ["--lease-ttl", "finite"]),
        (["--lease-ttl", "-inf"], ["--lease-ttl", "finite"]),
        (["--lease-ttl", "1e12"], ["--lease-ttl", "out of range", "604800"]),
        (["--time-budget", "nan"], ["--time-budget", "finite"]),
        (["--time-budget", "inf"], ["--time-budget", "finite"]),
        (["--time-budget", "-inf"], ["--time-budget", "finite"]),
    ],
)
def test_issue19_float_options_must_be_finite(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, args: list[str], words: list[str]
) -> None:
    state_file = tmp_path / "state.db"
    code, output = invoke("run", str(activation_file), "--state", f"sqlite:///{state_file}", *args)
    assert code == 2, output
    for word in words:
        assert word in flat(output), word
    assert "Traceback" not in output
    assert simulator.simulator.stats()["profiles_received"] == 0
    assert not state_file.exists()


def test_issue19_demo_rows_must_not_be_negative(tmp_path: Path) -> None:
    code, output = invoke("demo", "--rows", "-5", "--dir", str(tmp_path / "demo"))
    assert code == 2, output
    assert "--rows" in flat(output)
    assert not (tmp_path / "demo").exists()


# Item 22: the simulator's start-up errors are one line each, exit 2.
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], ["--port", "70000", "0 to 65535"]),
        (["--port", "-1"], ["--port", "0 to 65535"]),
        (["--host", "999.1.1.1"], ["--host", "999.1.1.1", "does not resolve"]),
        (["--host", "8.8.8.8"], ["--host", "8.8.8.8", "not an address of this machine"]),
    ],
)
def test_issue19_simulator_start_up_errors_are_one_line(args: list[str], words: list[str]) -> None:
    code, output = invoke("simulator", *args, "--port", "0") if "--port" not in args else invoke("simulator", *args)
    assert code == 2, output
    assert "Traceback" not in output
    assert output.startswith("error:")
    for word in words:
        assert word in flat(output), word


def test_issue19_simulator_on_a_port_in_use_says_so() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = invoke("simulator", "--port", str(port))
    assert code == 2, output
    assert "Traceback" not in output
    text = flat(output)
    assert f"127.0.0.1:{port}" in text
    assert "already in use" in text


# Item 26: `history B --run <a run of A>` names both activations instead of printing A's run.
def test_issue19_history_run_of_another_activation_is_refused(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    state = state_url(tmp_path)
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    run_id = json.loads(invoke("history", "inputs", "--state", state, "--json")[1])[0]["run_id"]
    code, output = invoke("history", "other", "--state", state, "--run", run_id)
    assert code == 2, output
    text = flat(output)
    assert "--run" in text
    assert f"run '{run_id}' is a run of activation 'inputs', not of 'other'" in text
    assert "acknowledged" not in text  # the record itself is not printed
    code, output = invoke("history", "inputs", "--state", state, "--run", run_id, "--format", "json")
    assert code == 0, output
    assert json.loads(output)["run_id"] == run_id


# Items 19 and 20: output paths (--rejects, report -o) are checked before anything runs; never
# the activation or the state file; a write that fails after the run keeps the run recorded.
def _report_target_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    (tmp_path / "a_dir").mkdir(exist_ok=True)
    (tmp_path / "plain").write_text("x")
    return {
        "directory": (tmp_path / "a_dir", ["--out", "is a directory"]),
        "missing folder": (tmp_path / "missing" / "r.html", ["--out", "missing", "create it first"]),
        "through a file": (tmp_path / "plain" / "r.html", ["--out", "not a directory"]),
        "/proc/version": (Path("/proc/version"), ["--out", "cannot write /proc/version"]),
    }


@pytest.mark.parametrize("case", ["directory", "missing folder", "through a file", "/proc/version"])
def test_issue19_report_out_that_cannot_be_written_is_refused_up_front(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, case: str
) -> None:
    if case == "/proc/version" and not Path("/proc/version").is_file():
        pytest.skip("no /proc here")
    state = state_url(tmp_path)
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    target, words = _report_target_cases(tmp_path)[case]
    code, output = invoke("report", "inputs", "--state", state, "-o", str(target))
    assert code == 2, output
    assert "Traceback" not in output
    for word in words:
        assert word in flat(output), word
    assert not (tmp_path / "missing").exists()


def test_issue19_report_in_a_directory_that_cannot_be_written_says_so(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = state_url(tmp_path)
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    monkeypatch.chdir("/proc")  # a working directory nobody, not even root, can create files in
    code, output = invoke("report", "inputs", "--state", state)
    assert code == 2, output
    assert "Traceback" not in output
    assert "cannot write inputs-report.html" in flat(output)


def test_issue19_report_out_on_a_full_disk_is_one_line(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    state = state_url(tmp_path)
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    code, output = invoke("report", "inputs", "--state", state, "-o", "/dev/full")
    assert code == 1, output
    assert "Traceback" not in output
    text = flat(output)
    assert "writing /dev/full failed (No space left on device)" in text
    assert "missing or incomplete" in text


def _with_rejected_rows(tmp_path: Path) -> None:
    rows = people(10)
    rows[0]["email"] = "not-an-email"
    rows[1]["email"] = "also not"
    write_segment(tmp_path / "segment.duckdb", rows)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_issue19_rejects_on_a_full_disk_keeps_the_run_and_says_what_was_lost(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    _with_rejected_rows(tmp_path)
    state = state_url(tmp_path)
    code, output = invoke(command, str(activation_file), "--state", state, "--rejects", "/dev/full")
    assert code == 1, output
    assert "Traceback" not in output
    text = flat(output)
    assert "--rejects: writing /dev/full failed (No space left on device)" in text
    assert "incomplete" in text
    assert "fewer than the 2 lines due" in text
    if command == "run":
        assert simulator.simulator.stats()["profiles_received"] == 8
        runs = json.loads(invoke("history", "inputs", "--state", state, "--json")[1])
        assert [r["status"] for r in runs] == ["succeeded_with_rejections"]
        assert "the run itself is recorded, with a sample of its rejected rows" in text
        assert f"`cepsync history inputs --run {runs[0]['run_id']}`" in text
    else:
        assert "the plan changed nothing" in text


def test_issue19_rejects_that_are_written_are_complete(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    _with_rejected_rows(tmp_path)
    target = tmp_path / "rejects.jsonl"
    code, output = invoke("run", str(activation_file), "--state", state_url(tmp_path), "--rejects", str(target))
    assert code == 0, output
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(line["issues"][0]["reason"] for line in lines) == ["invalid_email", "invalid_email"]


def _aliases(tmp_path: Path, original: Path) -> dict[str, Path]:
    (tmp_path / "link.yaml").symlink_to(original)
    (tmp_path / "hard.yaml").hardlink_to(original)
    (tmp_path / "sub").mkdir()
    return {
        "same path": original,
        "symlink": tmp_path / "link.yaml",
        "hard link": tmp_path / "hard.yaml",
        "relative detour": tmp_path / "sub" / ".." / original.name,
    }


@pytest.mark.parametrize("alias", ["same path", "symlink", "hard link", "relative detour"])
@pytest.mark.parametrize("command", ["run", "plan", "report"])
def test_issue19_an_output_path_that_is_the_activation_is_refused(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str, alias: str
) -> None:
    state = state_url(tmp_path)
    if command == "report":
        assert invoke("run", str(activation_file), "--state", state)[0] == 0
    before = activation_file.read_bytes()
    target = _aliases(tmp_path, activation_file)[alias]
    option = ["-o", str(target)] if command == "report" else ["--rejects", str(target)]
    received = simulator.simulator.stats()["profiles_received"]
    code, output = invoke(command, str(activation_file), "--state", state, *option)
    assert code == 2, output
    text = flat(output)
    assert "is the activation file" in text
    assert "--out" in text if command == "report" else "--rejects" in text
    assert activation_file.read_bytes() == before
    assert simulator.simulator.stats()["profiles_received"] == received


@pytest.mark.parametrize("command", ["run", "plan", "report"])
def test_issue19_an_output_path_that_is_the_state_file_is_refused(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str
) -> None:
    state_file = tmp_path / "state.db"
    state = f"sqlite:///{state_file}"
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    before = state_file.read_bytes()
    option = ["-o", str(state_file)] if command == "report" else ["--rejects", str(state_file)]
    code, output = invoke(command, "inputs" if command == "report" else str(activation_file), "--state", state, *option)
    assert code == 2, output
    assert "is the state database" in flat(output)
    assert state_file.read_bytes() == before


# Item 23: state URLs are parsed (a query is refused, not made part of the file name), and
# the commands that only read open the state read-only: never created, never written.
@pytest.mark.parametrize("command", ["run", "plan", "history", "report", "reset"])
def test_issue19_a_sqlite_state_url_with_a_query_is_refused(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = "inputs" if command in ("history", "report", "reset") else str(activation_file)
    extra = ["--yes"] if command == "reset" else []
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = invoke(command, target, "--state", "sqlite:///x.db?mode=ro", *extra)
    assert code == 2, output
    text = flat(output)
    assert "--state" in text
    assert "no query parameters" in text
    assert "mode=ro" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no 'x.db?mode=ro', no 'x.db'
    assert simulator.simulator.stats()["profiles_received"] == 0


def test_issue19_a_firestore_state_url_with_an_unknown_parameter_is_refused(tmp_path: Path) -> None:
    code, output = invoke("history", "inputs", "--state", "firestore://proj/db?prefix=a&mode=ro")
    assert code == 2, output
    assert "prefix=NAME" in flat(output)
    assert "mode=ro" in flat(output)


@pytest.mark.parametrize("command", ["history", "report", "reset"])
def test_issue19_reading_an_empty_state_file_leaves_it_empty(tmp_path: Path, command: str) -> None:
    # reset too: it has nothing to forget in an empty file, and says so without writing a schema.
    empty = tmp_path / "empty.db"
    empty.touch()
    extra = {"report": ["-o", str(tmp_path / "r.html")], "history": ["--limit", "3"], "reset": ["--yes"]}
    code, output = invoke(command, "inputs", "--state", f"sqlite:///{empty}", *extra[command])
    assert code == 2, output
    text = flat(output)
    assert "no state at" in text
    assert "empty" in text
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


def test_issue19_plan_on_an_empty_state_file_plans_a_first_run_and_writes_nothing(
    tmp_path: Path, activation_file: Path
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    code, output = invoke("plan", str(activation_file), "--state", f"sqlite:///{empty}", "--json")
    assert code == 0, output
    assert json.loads(output)["counts"]["new"] == 10
    assert empty.stat().st_size == 0


def test_issue19_plan_history_and_report_never_write_the_state_file(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread
) -> None:
    state_file = tmp_path / "state.db"
    state = f"sqlite:///{state_file}"
    assert invoke("run", str(activation_file), "--state", state)[0] == 0
    before = state_file.read_bytes()
    modified = state_file.stat().st_mtime_ns
    state_file.chmod(0o444)
    # Another process holds the write lock (a run committing): a command that only reads takes
    # no write lock, so it answers at once; one that opened read-write met "database is locked".
    writer = sqlite3.connect(state_file, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        for args in (
            ["plan", str(activation_file)],
            ["history", "inputs"],
            ["report", "inputs", "-o", str(tmp_path / "r.html")],
        ):
            code, output = invoke(*args, "--state", state)
            assert code == 0, (args, output)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        state_file.chmod(0o644)
    assert state_file.read_bytes() == before
    assert state_file.stat().st_mtime_ns == modified


def test_issue19_history_reads_an_older_schema_without_upgrading_the_file(tmp_path: Path) -> None:
    legacy = Path(__file__).parent / "state" / "legacy_sqlite" / "state_v2.db"
    copy = tmp_path / "state_v2.db"
    copy.write_bytes(legacy.read_bytes())
    code, output = invoke("history", "act", "--state", f"sqlite:///{copy}", "--json")
    assert code == 0, output
    assert [run["run_id"] for run in json.loads(output)] == ["run-v2"]
    assert copy.read_bytes() == legacy.read_bytes()


def test_issue19_a_foreign_sqlite_file_is_not_read_as_state(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
        conn.commit()
    before = foreign.read_bytes()
    code, output = invoke("history", "inputs", "--state", f"sqlite:///{foreign}")
    assert code == 2, output
    assert "not a cepsync state" in flat(output)
    assert foreign.read_bytes() == before


# Item 24: the YAML merge key shares a block between parts of an activation; the loader stays
# strict (a key written twice, '<<' twice, unknown keys).
_MERGED_ACTIVATION = """\
x-batch: &batch
  api_key_env: BATCH_REST_API_KEY
  project_key_env: BATCH_PROJECT_KEY
  base_url: http://127.0.0.1:9
x-columns: &columns
  custom_id: customer_id
name: inputs
source: {type: duckdb, database: segment.duckdb, table: people}
destination:
  <<: *batch
  base_url: BASE_URL
mapping:
  <<: [*columns, {email: email}]
attributes: [{column: first_name}]
"""


def test_issue19_yaml_merge_keys_are_supported(tmp_path: Path, simulator: SimulatorThread) -> None:
    write_segment(tmp_path / "segment.duckdb", people(10))
    path = tmp_path / "merged.yaml"
    path.write_text(_MERGED_ACTIVATION.replace("BASE_URL", simulator.base_url), encoding="utf-8")
    code, output = invoke("run", str(path), "--state", state_url(tmp_path))
    assert code == 0, output
    # The destination's own base_url won over the merged one (port 9 answers nothing).
    assert simulator.simulator.stats()["profiles_received"] == 10


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            _MERGED_ACTIVATION.replace("  base_url: BASE_URL", "  base_url: http://a\n  base_url: http://b"),
            ["not valid YAML", "'base_url' appears twice"],
        ),
        (
            _MERGED_ACTIVATION.replace("  base_url: BASE_URL", "  base_url: http://a\n  <<: *batch"),
            ["not valid YAML", "merge key '<<' appears twice", "<<: [*a, *b]"],
        ),
        (_MERGED_ACTIVATION.replace("x-columns:", "columns:"), ["columns", "unknown key"]),
        (_MERGED_ACTIVATION.replace("<<: *batch", "<<: *columns\n  <<x: 1"), ["destination"]),
        (
            _MERGED_ACTIVATION.replace("x-columns: &columns\n  custom_id: customer_id", "x-columns: &columns 3"),
            ["not valid YAML", "merging"],
        ),
    ],
    ids=[
        "key twice beside a merge",
        "merge key twice",
        "unknown top-level key",
        "bad merged keys",
        "merge of a scalar",
    ],
)
def test_issue19_yaml_merge_keys_keep_the_loader_strict(
    tmp_path: Path, simulator: SimulatorThread, text: str, words: list[str]
) -> None:
    write_segment(tmp_path / "segment.duckdb", people(3))
    path = tmp_path / "merged.yaml"
    path.write_text(text.replace("BASE_URL", simulator.base_url), encoding="utf-8")
    code, output = invoke("plan", str(path), "--state", state_url(tmp_path))
    assert code == 2, output
    assert "Traceback" not in output
    for word in words:
        assert word in flat(output), word


def test_issue19_the_json_schema_allows_extension_keys() -> None:
    code, output = invoke("schema")
    assert code == 0
    assert json.loads(output)["patternProperties"] == {"^x-": {}}


# Item 28: the README's history command for the demo works after the demo (it exited 2).
REPO_ROOT = Path(__file__).resolve().parent.parent


def test_issue19_the_readmes_demo_history_command_works_after_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    suggested = re.findall(r"^cepsync (history vip_customers[^\n#]*)$", readme, re.MULTILINE)
    assert len(suggested) == 1, suggested
    monkeypatch.chdir(tmp_path)  # `make demo` runs `cepsync demo` from the repository root
    code, output = invoke("demo", "--rows", "200", env={"CEPSYNC_STATE": None, "XDG_STATE_HOME": str(tmp_path / "xdg")})
    assert code == 0, output
    code, output = invoke(
        *shlex.split(suggested[0]), env={"CEPSYNC_STATE": None, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    )
    assert code == 0, output
    assert "runs of vip_customers" in output
    assert len(re.findall(r"^\d{8}T\d{6}Z-", output, re.MULTILINE)) == 2  # day 1 and day 2
    # ...and it is the command the demo prints at its end.
    assert f"cepsync {suggested[0].strip()}" in flat(invoke("demo", "--rows", "200")[1])


# Item 27: `make test` checks the machine first and names each missing prerequisite in one line.
def _bin_without(tmp_path: Path, *absent: str) -> Path:
    import shutil
    import sys

    fake = tmp_path / "bin"
    fake.mkdir()
    wanted = {"python3": sys.executable, "bash": shutil.which("bash"), "id": shutil.which("id")}
    for name in ("uname", "dirname", "chromium", "chromedriver", "apt-get", "java", "gcloud"):
        wanted[name] = shutil.which(name)
    for name, target in wanted.items():
        if target and name not in absent:
            (fake / name).symlink_to(target)
    return fake


@pytest.mark.parametrize(
    ("absent", "words"),
    [
        (("gcloud",), ["make test needs the Google Cloud CLI ('gcloud' on PATH"]),
        (("java",), ["make test needs Java", "Firestore and Pub/Sub emulators"]),
        (("chromium", "apt-get"), ["make test needs headless Chromium and chromedriver"]),
    ],
)
def test_issue19_check_prerequisites_names_what_is_missing(
    tmp_path: Path, absent: tuple[str, ...], words: list[str]
) -> None:
    import subprocess

    fake = _bin_without(tmp_path, *absent)
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "check-prerequisites.sh")],
        env={
            "PATH": str(fake),
            "HOME": str(tmp_path),
            "CEPSYNC_PYTHON313": "/nonexistent",
            # As on a fresh clone: the BigQuery emulator's virtualenv is not installed yet.
            "CEPSYNC_BQ_VENV": str(tmp_path / "no-venv-bq"),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert all(line.startswith("make test needs ") for line in lines), lines
    for word in words:
        assert any(word in line for line in lines), (word, lines)
    # A Python 3.13 nowhere to be found is named too (the BigQuery emulator's virtualenv).
    assert any("Python 3.13" in line and "CEPSYNC_PYTHON313" in line for line in lines), lines


def test_issue19_make_test_checks_prerequisites_before_anything_long() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    for target, script in (("test", "check-prerequisites.sh"), ("test-fast", "check-prerequisites.sh --fast")):
        recipe = re.search(rf"^{target}:[^\n]*\n\t([^\n]*)", makefile, re.MULTILINE)
        assert recipe is not None, target
        assert recipe.group(1).endswith(f"bash scripts/{script}"), recipe.group(1)
        # Nothing is installed before the check: the target has no prerequisites of its own.
        assert re.search(rf"^{target}: ##", makefile, re.MULTILINE), target


# --- issue 19, items 7, 8, 16-18: secrets, URLs, the function ---

# Item 7: a key read from the environment is stripped of the whitespace around it (what
# `echo KEY | gcloud secrets create` stores); anything else a header cannot carry is a config
# error naming the variable, never quoting the key.


@pytest.mark.parametrize("around", ["\n", "\r\n", " ", "\t\n"])
def test_issue19_7_a_key_with_whitespace_around_it_runs_and_validates(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, around: str
) -> None:
    env: dict[str, str | None] = {"BATCH_REST_API_KEY": API_KEY + around, "BATCH_PROJECT_KEY": around + PROJECT_KEY}
    code, output = invoke("validate", str(activation_file), env=env)
    assert code == 0, output
    assert "Batch accepted the credentials" in output
    code, output = invoke("run", str(activation_file), "--state", state_url(tmp_path), env=env)
    assert code == 0, output
    assert simulator.simulator.stats()["profiles_received"] == 10


@pytest.mark.parametrize(
    ("variable", "key", "words"),
    [
        ("BATCH_REST_API_KEY", "zq9\nzq9", "a control character (U+000A) at character 4 of 7"),
        ("BATCH_PROJECT_KEY", "zq9\x07zq9", "a control character (U+0007) at character 4 of 7"),
        ("BATCH_PROJECT_KEY", "zq9\x7fzq9", "a control character (U+007F)"),
        ("BATCH_REST_API_KEY", "zq9 zq9", "a space at character 4 of 7"),
        ("BATCH_REST_API_KEY", "cl\u00e9-zq9zq9", "a non-ASCII character at character 3 of 10"),
        ("BATCH_REST_API_KEY", "\u201czq9zq9\u201d", "a non-ASCII character at character 1 of 8"),
        ("BATCH_PROJECT_KEY", "\n \t", "is empty (or holds only whitespace)"),
    ],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_issue19_7_a_key_a_header_cannot_carry_is_a_config_error_naming_the_variable(
    tmp_path: Path, activation_file: Path, simulator: SimulatorThread, command: str, variable: str, key: str, words: str
) -> None:
    args = ["--state", state_url(tmp_path)] if command == "run" else []
    code, output = invoke(command, str(activation_file), *args, env={variable: key})
    assert code == 2, output
    text = flat(output)
    assert f"environment variable {variable} (Batch credentials)" in text
    assert words in text
    assert "Traceback" not in output
    assert "zq9" not in output  # the key is never quoted
    assert simulator.simulator.stats()["profiles_received"] == 0


# Item 8: a base_url that cannot lead to Batch is refused when the file is loaded, naming
# the file and the field, and never quoting a password.


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://user:hunter2pw@127.0.0.1:8787", "must not hold a user name or password"),
        ("https://:hunter2pw@api.batch.com", "must not hold a user name or password"),
        ("ftp://api.batch.com", "must be an http(s) URL"),
        ("api.batch.com", "must be an http(s) URL"),
        ("https://api.batch.com/?key=hunter2pw", "must not have a query (?...) or a fragment (#...)"),
        ("https://api.batch.com/#hunter2pw", "must not have a query (?...) or a fragment (#...)"),
        ("http://", "has no host"),
        ("http://:8787", "has no host"),
        ("http://127.0.0.1:70000", "has a port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:0", "has a port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:http", "has a port that is not a number from 1 to 65535"),
        ("http://[::1", "an IPv6 host must be written in [brackets]"),
        ("http://bad host.example", "must not contain spaces or control characters"),
        ("http://-bad-.example", "neither a DNS name nor an IP address"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run", "plan"])
def test_issue19_8_a_base_url_that_cannot_lead_to_batch_is_refused_at_load(
    tmp_path: Path, simulator: SimulatorThread, command: str, url: str, words: str
) -> None:
    write_segment(tmp_path / "segment.duckdb", people(3))
    path = tmp_path / "bad_url.yaml"
    path.write_text(yaml.safe_dump(activation_config(url)), encoding="utf-8")
    args = [] if command == "validate" else ["--state", state_url(tmp_path)]
    code, output = invoke(command, str(path), *args)
    assert code == 2, output
    text = flat(output)
    assert f"{path.name}, field 'destination.base_url'" in text
    assert words in text
    assert "hunter2pw" not in output
    assert "Traceback" not in output
    assert not (tmp_path / "state.db").exists() or command == "plan"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8787", "https://api.batch.com/", "http://[::1]:8787", "http://batch_sim:80/v"]
)
def test_issue19_8_ordinary_base_urls_still_load(tmp_path: Path, url: str) -> None:
    from sync.config_file import parse_activation

    activation = parse_activation(activation_config(url), source="inputs.yaml")
    assert activation.destination.base_url == url.rstrip("/")


# Item 18: a Batch host that accepts connections and never answers stops the run within
# seconds as an outage, and loses nothing: the next run sends every profile.


def test_issue19_18_a_batch_host_that_never_answers_fails_fast_and_loses_nothing(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    import time

    from tests.support.silent_server import SilentServer

    write_segment(tmp_path / "segment.duckdb", people(10))
    path = tmp_path / "inputs.yaml"
    with SilentServer() as silent:
        path.write_text(yaml.safe_dump(activation_config(silent.base_url)), encoding="utf-8")
        started = time.monotonic()
        code, output = invoke("run", str(path), "--state", state_url(tmp_path))
        elapsed = time.monotonic() - started
        assert b"POST" not in silent.received
        # validate asks Batch about the keys: the same quick answer, not a 60 s wait.
        started = time.monotonic()
        check_code, check_output = invoke("validate", str(path))
        assert time.monotonic() - started < 30
    assert check_code == 1, check_output
    assert f"Batch at {silent.base_url} does not answer" in flat(check_output)
    assert code == 1, output
    text = flat(output)
    assert f"Batch at {silent.base_url} does not answer" in text
    assert "nothing more was sent" in text
    assert "Traceback" not in output
    assert elapsed < 30, elapsed  # was about 5 minutes, then exit 6 "partial"
    [record] = json.loads(invoke("history", "inputs", "--state", state_url(tmp_path), "--json")[1])
    assert (record["status"], record["retryable"]) == ("failed", True)
    assert record["counts"].get("acknowledged", 0) == 0
    # The next run, against a Batch that answers, sends every profile: none was lost.
    path.write_text(yaml.safe_dump(activation_config(simulator.base_url)), encoding="utf-8")
    code, output = invoke("run", str(path), "--state", state_url(tmp_path))
    assert code == 0, output
    assert simulator.simulator.stats()["profiles_received"] == 10


# Items 16 and 17: the function, called as functions-framework calls it (main.py passes the raw
# body), over a DuckDB segment, SQLite state and the simulator.


@pytest.fixture
def function_env(tmp_path: Path, simulator: SimulatorThread) -> dict[str, str]:
    write_segment(tmp_path / "segment.duckdb", people(10))
    activations = tmp_path / "activations"
    activations.mkdir()
    config = activation_config(simulator.base_url, source={"type": "duckdb", "database": "../segment.duckdb"})
    config["source"]["table"] = "people"
    config["destination"]["max_attempts"] = 1
    (activations / "inputs.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return {**ENV, "CEPSYNC_STATE": state_url(tmp_path), "CEPSYNC_ACTIVATIONS_DIR": str(activations)}


def _pubsub(data: bytes) -> dict[str, Any]:
    import base64

    return {"message": {"data": base64.b64encode(data).decode(), "messageId": "m"}, "subscription": "s"}


@pytest.mark.parametrize(
    ("data", "http_status", "words"),
    [
        (b"[" * 100_000, 413, "the Pub/Sub message data is larger than 65,536 bytes"),
        (b"[" * 60_000, 400, "the Pub/Sub message data is JSON nested too deeply"),
        (b'{"activation": "inputs", "allow": ' + b"[" * 60_000, 400, "nested too deeply"),
    ],
)
def test_issue19_16_a_deeply_nested_pubsub_message_is_acknowledged_not_redelivered(
    function_env: dict[str, str], data: bytes, http_status: int, words: str
) -> None:
    from sync.function import handle_pubsub

    for _ in range(3):  # each redelivery gets the same acknowledged answer: no loop, no 500
        outcome = handle_pubsub(_pubsub(data), event_id="m-deep", environ=function_env)
        assert (outcome.http_status, outcome.retry, outcome.body["status"]) == (http_status, False, "bad_request")
        assert words in outcome.body["error"]


@pytest.mark.parametrize(
    ("body", "http_status", "words"),
    [
        (b"[" * 100_000, 413, "the request body is larger than 65,536 bytes"),
        (b"[" * 60_000, 400, "the request body is JSON nested too deeply"),
        (b'{"activation": ' + b"[" * 60_000, 400, "the request body is JSON nested too deeply"),
    ],
)
def test_issue19_16_a_deeply_nested_http_body_is_a_400_class_json_answer(
    function_env: dict[str, str], body: bytes, http_status: int, words: str
) -> None:
    from sync.function import handle_http

    outcome = handle_http("POST", body, {}, environ=function_env)
    assert (outcome.http_status, outcome.body["status"]) == (http_status, "bad_request")
    assert words in outcome.body["error"]


def test_issue19_17_a_retry_after_a_partial_run_runs_again_and_a_success_is_final(
    function_env: dict[str, str], simulator: SimulatorThread
) -> None:
    from sync.function import handle_http

    key = {"Idempotency-Key": "retry-me"}
    body = b'{"activation": "inputs"}'
    simulator.simulator.faults.update({"failure_rate": 1.0, "failure_status": 503})
    first = handle_http("POST", body, key, environ=function_env)
    assert (first.http_status, first.body["status"]) == (502, "partial")
    simulator.simulator.faults.update({"failure_rate": 0.0})
    retry = handle_http("POST", body, key, environ=function_env)
    assert (retry.http_status, retry.body["status"], retry.body["counts"]["acknowledged"]) == (200, "succeeded", 10)
    again = handle_http("POST", body, key, environ=function_env)
    assert (again.http_status, again.body["status"], again.body["duplicate_of"]) == (
        200,
        "duplicate_trigger",
        retry.body["run_id"],
    )


def test_issue19_17_a_key_reused_with_another_body_is_a_422(function_env: dict[str, str]) -> None:
    from sync.function import handle_http

    key = {"Idempotency-Key": "one-request"}
    assert handle_http("POST", b'{"activation": "inputs"}', key, environ=function_env).http_status == 200
    reused = handle_http("POST", b'{"activation": "inputs", "full": true}', key, environ=function_env)
    assert (reused.http_status, reused.body["status"]) == (422, "bad_request")
    assert "was first sent with another request body" in reused.body["error"]
    # The same request written differently is the same request.
    same = handle_http("POST", b'{ "full": false,\n "activation": "inputs" }', key, environ=function_env)
    assert (same.http_status, same.body["status"]) == (200, "duplicate_trigger")


def test_issue19_17_long_keys_are_hashed_not_cut(function_env: dict[str, str]) -> None:
    from sync.function import handle_http

    long_key = "k" * 300
    first = handle_http("POST", b'{"activation": "inputs"}', {"Idempotency-Key": long_key + "A"}, environ=function_env)
    other = handle_http(
        "POST", b'{"activation": "inputs", "full": true}', {"Idempotency-Key": long_key + "B"}, environ=function_env
    )
    assert first.body["trigger_id"].startswith("http:sha256:")
    assert len(first.body["trigger_id"]) == len("http:sha256:") + 64
    assert (first.body["status"], other.body["status"]) == ("succeeded", "succeeded")  # not a collision


# Item 7, the simulator's side: it reads its keys as a run does, so a key stored with a
# trailing newline is accepted from a client that sends it stripped; a key a header cannot
# carry is one line naming the variable.
def test_issue19_7_the_simulator_strips_its_keys_as_runs_do(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BATCH_REST_API_KEY": API_KEY + "\n", "BATCH_PROJECT_KEY": PROJECT_KEY + "\r\n"}
    command = [sys.executable, "-c", "from sync.cli import app; app()", "simulator", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        write_segment(tmp_path / "segment.duckdb", people(10))
        path = tmp_path / "inputs.yaml"
        path.write_text(yaml.safe_dump(activation_config(f"http://127.0.0.1:{port}")), encoding="utf-8")
        code, output = invoke("validate", str(path))
        assert code == 0, output
        assert "Batch accepted the credentials" in output
    finally:
        process.terminate()
        process.communicate(timeout=30)

    code, output = invoke("simulator", "--port", "0", env={"BATCH_REST_API_KEY": "zq9\x07zq9"})
    assert code == 2, output
    assert "Traceback" not in output
    assert "BATCH_REST_API_KEY" in flat(output)
    assert "control character" in flat(output)
    assert "zq9" not in output


# --- issue 19, items 9-15: warehouse mode ---
# Each case: the command, its exit code and the words its message must contain. The
# emulator cases run the real CLI against the local BigQuery emulator.

NO_GOOGLE_CREDENTIALS: dict[str, str | None] = {
    "GOOGLE_APPLICATION_CREDENTIALS": None,
    "BIGQUERY_EMULATOR_HOST": None,
    "BIGQUERY_STORAGE_EMULATOR_HOST": None,
    "FIRESTORE_EMULATOR_HOST": None,
    "NO_GCE_CHECK": "True",  # not on Google Cloud: do not probe the metadata server
}


def warehouse_config(base_url: str, *, project: str, dataset: str, table: str, **diff: Any) -> dict[str, Any]:
    return activation_config(
        base_url,
        name="wh_inputs",
        source={"type": "bigquery", "project": project, "table": table},
        journal={"flush_every_profiles": 100_000, "flush_every_seconds": 30},
        diff={"mode": "warehouse", "dataset": dataset, **diff},
        attributes=[{"column": "points"}],
    )


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def bq_segment(client: Any, dataset: Any, rows: int) -> str:
    client.query_and_wait(
        f"CREATE OR REPLACE TABLE `{dataset.dataset_id}.seg` AS "
        "SELECT FORMAT('c%08d', n) AS customer_id, CONCAT('p', CAST(n AS STRING), '@example.com') AS email, "
        f"n AS points FROM UNNEST(GENERATE_ARRAY(1, {rows})) AS n"
    )
    return f"{dataset.dataset_id}.seg"


def no_credentials(tmp_path: Path) -> dict[str, str | None]:
    return {**NO_GOOGLE_CREDENTIALS, "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}


# Item 13: a missing Google credential is a config error (exit 2) naming what to set, for
# BigQuery (it exited 1) as for Firestore, from validate, switch-diff and run.
@pytest.mark.parametrize("command", ["validate", "switch-diff", "run"])
def test_bigquery_without_credentials_is_a_config_error(
    tmp_path: Path, simulator: SimulatorThread, command: str
) -> None:
    path = write_yaml(
        tmp_path / "wh.yaml",
        warehouse_config(simulator.base_url, project="cepsync-prod", dataset="cepsync_state", table="crm.seg"),
    )
    extra = ["--to", "warehouse"] if command == "switch-diff" else []
    state = [] if command == "validate" else ["--state", state_url(tmp_path)]
    code, output = invoke(command, str(path), *extra, *state, env=no_credentials(tmp_path))
    assert code == 2, output
    assert "BigQuery needs Google Cloud credentials and none were found" in flat(output)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in flat(output)
    assert "Traceback" not in output


def test_bigquery_with_a_credentials_file_that_is_not_there_names_it(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    path = write_yaml(
        tmp_path / "wh.yaml",
        warehouse_config(simulator.base_url, project="cepsync-prod", dataset="cepsync_state", table="crm.seg"),
    )
    env = {**no_credentials(tmp_path), "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "gone.json")}
    code, output = invoke("validate", str(path), env=env)
    assert code == 2, output
    assert "gone.json" in flat(output)


@pytest.mark.parametrize("command", ["switch-diff", "run"])
def test_firestore_without_credentials_is_the_same_config_error(
    tmp_path: Path, simulator: SimulatorThread, activation_file: Path, command: str
) -> None:
    # validate never opens the state store, so Firestore has no credential to miss there.
    if command == "switch-diff":
        target = write_yaml(
            tmp_path / "wh.yaml",
            warehouse_config(simulator.base_url, project="cepsync-prod", dataset="cepsync_state", table="crm.seg"),
        )
        extra = ["--to", "warehouse"]
    else:
        target, extra = activation_file, []
    code, output = invoke(
        command, str(target), *extra, "--state", "firestore://cepsync-prod", env=no_credentials(tmp_path)
    )
    assert code == 2, output
    assert "Firestore state needs Google Cloud credentials" in flat(output)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in flat(output)


# Item 14: the dataset rule in words.
@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        ("proj.cepsync_state", "the project id 'proj' has 4 characters; a Google Cloud project id has 6 to 30"),
        ("My-Project.state", "the project id 'My-Project' does not start with a lowercase letter"),
        ("my-project.state-1", "the dataset name has a character other than a letter, a digit or an underscore"),
        ("a.b.c", "'dataset' 'a.b.c' has 2 dots: give dataset or project.dataset"),
    ],
)
def test_a_bad_state_dataset_says_the_rule(
    tmp_path: Path, simulator: SimulatorThread, dataset: str, words: str
) -> None:
    path = write_yaml(
        tmp_path / "wh.yaml",
        warehouse_config(simulator.base_url, project="cepsync-prod", dataset=dataset, table="crm.seg"),
    )
    code, output = invoke("validate", str(path))
    assert code == 2, output
    assert words in flat(output)
    assert "[a-z]" not in output  # not the pattern


# Item 9: a mode switch without `cepsync switch-diff` is refused, naming the command (it
# re-sent the whole segment).
@pytest.mark.emulator
def test_a_switch_to_the_warehouse_diff_without_switch_diff_is_refused(
    tmp_path: Path, simulator: SimulatorThread, bq_emulator: Any, bq_client: Any, bq_dataset: Any
) -> None:
    table = bq_segment(bq_client, bq_dataset, 20)
    config = warehouse_config(
        simulator.base_url, project=bq_emulator.project, dataset=bq_dataset.dataset_id, table=table
    )
    warehouse = write_yaml(tmp_path / "wh.yaml", config)
    function = write_yaml(tmp_path / "fn.yaml", {**config, "diff": {"mode": "function"}})
    env: dict[str, str | None] = {"BIGQUERY_EMULATOR_HOST": bq_emulator.rest_url}
    code, output = invoke("run", str(function), "--state", state_url(tmp_path), env=env)
    assert code == 0, output
    code, output = invoke("run", str(warehouse), "--state", state_url(tmp_path), env=env)
    assert code == 2, output
    assert f"cepsync switch-diff {warehouse} --to warehouse --state STATE" in flat(output)
    assert "a run now would send the whole segment again" in flat(output)
    assert simulator.simulator.stats()["profiles_received"] == 20


# Item 10: the state dataset does not exist.
@pytest.mark.emulator
@pytest.mark.parametrize("command", ["run", "plan", "switch-diff"])
def test_a_missing_state_dataset_names_it_and_the_terraform(
    tmp_path: Path, simulator: SimulatorThread, bq_emulator: Any, bq_client: Any, bq_dataset: Any, command: str
) -> None:
    table = bq_segment(bq_client, bq_dataset, 3)
    path = write_yaml(
        tmp_path / "wh.yaml",
        warehouse_config(simulator.base_url, project=bq_emulator.project, dataset="not_made_yet", table=table),
    )
    extra = ["--to", "warehouse"] if command == "switch-diff" else []
    env: dict[str, str | None] = {"BIGQUERY_EMULATOR_HOST": bq_emulator.rest_url}
    code, output = invoke(command, str(path), *extra, "--state", state_url(tmp_path), env=env)
    assert code == 2, output
    assert f"{bq_emulator.project}.not_made_yet that holds the fingerprints does not exist" in flat(output)
    assert "infra/warehouse.tf" in flat(output)
    assert "NotFound" not in output


# Item 11: a fresh state store against a dataset another store used can adopt its fence.
@pytest.mark.emulator
def test_a_fresh_state_store_adopts_the_fence(
    tmp_path: Path, simulator: SimulatorThread, bq_emulator: Any, bq_client: Any, bq_dataset: Any
) -> None:
    table = bq_segment(bq_client, bq_dataset, 10)
    path = write_yaml(
        tmp_path / "wh.yaml",
        warehouse_config(simulator.base_url, project=bq_emulator.project, dataset=bq_dataset.dataset_id, table=table),
    )
    env: dict[str, str | None] = {"BIGQUERY_EMULATOR_HOST": bq_emulator.rest_url}
    old, new = state_url(tmp_path / "old"), state_url(tmp_path / "new")
    for _ in range(5):  # the old store's lease tokens reach 5; the new one's start at 1
        assert invoke("run", str(path), "--state", old, env=env)[0] == 0
    code, output = invoke("run", str(path), "--state", new, env=env)
    assert code != 0
    assert "cepsync adopt-fence" in flat(output)
    code, output = invoke("adopt-fence", str(path), "--state", new, env=env)
    assert code == 2, output
    assert "a run may still be going" in flat(output)
    code, output = invoke("adopt-fence", str(path), "--state", new, "--force", env=env)
    assert code == 0, output
    assert "this state store now owns" in flat(output)
    code, record = _json_stdout("run", str(path), "--state", new, "--json", env=env)
    assert code == 0, record
    assert record["counts"]["sent"] == 0  # the fingerprints were kept: nothing is re-sent


# Item 15: the warehouse diff's statements stay linear on the emulator (10,000 rows did not
# finish in 4 minutes; the diff statement now takes about a second).
@pytest.mark.emulator
def test_a_ten_thousand_row_warehouse_plan_finishes(
    tmp_path: Path, simulator: SimulatorThread, bq_emulator: Any, bq_client: Any, bq_dataset: Any
) -> None:
    import time

    table = bq_segment(bq_client, bq_dataset, 10_000)
    path = write_yaml(
        tmp_path / "wh.yaml",
        warehouse_config(simulator.base_url, project=bq_emulator.project, dataset=bq_dataset.dataset_id, table=table),
    )
    env: dict[str, str | None] = {
        "BIGQUERY_EMULATOR_HOST": bq_emulator.rest_url,
        "BIGQUERY_STORAGE_EMULATOR_HOST": bq_emulator.grpc_address,
    }
    started = time.monotonic()
    code, record = _json_stdout("plan", str(path), "--state", state_url(tmp_path), "--json", env=env)
    assert code == 0, record
    assert record["counts"]["new"] == 10_000
    assert time.monotonic() - started < 90
