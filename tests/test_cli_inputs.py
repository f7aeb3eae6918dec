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
