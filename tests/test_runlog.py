"""The run-end log line is an API: Terraform's metrics and alerts read these exact fields.

The lines tested here are the ones the Cloud Function really writes (its Pub/Sub handler,
JSON logging as on Cloud Functions, real DuckDB + SQLite + Batch simulator). Changing a
golden field below means a new event version and a Terraform change: see docs/run-end-log.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.runlog import (
    ERROR_EVENT_TYPE,
    RUN_END_EVENT,
    outcome,
    run_end_entry,
    run_end_fields,
    severity,
    stage_seconds,
)
from tests.support.engine_support import API_KEY, PROJECT_KEY
from tests.support.report_support import function_run_end_lines

GOLDEN_RUN_FIELDS = {
    "schema_version": int,
    "activation": str,
    "run_id": str,
    "status": str,
    "outcome": str,
    "trigger": (str, type(None)),
    "trigger_id": (str, type(None)),
    "continuation_of": (str, type(None)),
    "started_at": (str, type(None)),
    "ended_at": (str, type(None)),
    "duration_seconds": float,
    "run_type": (str, type(None)),
    "sync_mode": (str, type(None)),
    "full": bool,
    "endpoint": (str, type(None)),
    "mapping_changed": bool,
    "profiles": dict,
    "rejected_share": float,
    "stages_seconds": dict,
    "guards_tripped": list,
    "error": (str, type(None)),
}
GOLDEN_PROFILE_FIELDS = {
    "rows",
    "new",
    "changed",
    "unchanged",
    "removed",
    "rejected",
    "rejected_by_batch",
    "sent",
    "acknowledged",
    "failed",
}


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as simulator:
        yield function_run_end_lines(tmp_path_factory.mktemp("runlog"), simulator)


def test_the_function_writes_one_run_end_line_per_run(lines: list[dict[str, Any]]) -> None:
    assert [line["run"]["status"] for line in lines] == ["succeeded_with_rejections", "auth_error"]
    assert RUN_END_EVENT == "run_end.v1"
    assert all(line["cepsync_event"] == "run_end.v1" for line in lines)


def test_the_run_object_has_exactly_the_golden_fields_and_types(lines: list[dict[str, Any]]) -> None:
    for line in lines:
        run = line["run"]
        assert set(run) == set(GOLDEN_RUN_FIELDS)
        for name, kind in GOLDEN_RUN_FIELDS.items():
            assert isinstance(run[name], kind), (name, run[name])
        assert set(run["profiles"]) == GOLDEN_PROFILE_FIELDS
        assert all(type(value) is int for value in run["profiles"].values())
        assert run["schema_version"] == 1


def test_values_follow_the_run_record(lines: list[dict[str, Any]]) -> None:
    ok, refused = lines
    assert ok["run"]["activation"] == "fn_metrics"
    assert ok["run"]["trigger"] == "pubsub"
    assert ok["run"]["trigger_id"] == "evt-ok"
    assert ok["run"]["outcome"] == "success"
    # 300 rows: 3 bad e-mails and 1 bad phone rejected by us, c00007 refused by Batch.
    assert ok["run"]["profiles"]["rows"] == 300
    assert ok["run"]["profiles"]["rejected"] == 4
    assert ok["run"]["profiles"]["rejected_by_batch"] == 1
    assert ok["run"]["profiles"]["acknowledged"] == 295
    assert ok["run"]["rejected_share"] == round(5 / 300, 4)
    assert ok["run"]["duration_seconds"] > 0
    assert refused["run"]["outcome"] == "failure"
    assert "401" in refused["run"]["error"]


def test_cloud_logging_fields_severity_and_labels(lines: list[dict[str, Any]]) -> None:
    ok, refused = lines
    assert ok["severity"] == "INFO"
    assert refused["severity"] == "ERROR"
    for line in lines:
        labels = line["logging.googleapis.com/labels"]
        assert labels == {"activation": "fn_metrics", "run_id": line["run"]["run_id"]}
        assert line["message"].startswith(f"cepsync run {line['run']['status']}: activation fn_metrics")


def test_failures_carry_the_error_reporting_fields(lines: list[dict[str, Any]]) -> None:
    ok, refused = lines
    assert "@type" not in ok
    assert refused["@type"] == ERROR_EVENT_TYPE
    assert refused["serviceContext"]["service"] == "cepsync"
    assert refused["context"]["reportLocation"]["functionName"] == "run.auth_error"
    assert "401" in refused["message"]


def test_no_secret_in_any_line(lines: list[dict[str, Any]]) -> None:
    text = repr(lines)
    assert API_KEY not in text
    assert PROJECT_KEY not in text


@pytest.mark.parametrize(
    ("status", "expected_outcome", "expected_severity"),
    [
        ("succeeded", "success", "info"),
        ("succeeded_with_rejections", "success", "info"),
        ("planned", "other", "info"),
        ("duplicate_trigger", "other", "info"),
        ("skipped_lease_held", "other", "warning"),
        ("incomplete", "other", "warning"),
        ("aborted_by_guard", "failure", "warning"),
        ("interrupted", "failure", "warning"),
        ("abandoned", "failure", "warning"),
        ("failed", "failure", "error"),
        ("failed_permanently", "failure", "error"),
        ("auth_error", "failure", "error"),
        ("config_error", "failure", "error"),
        ("partial", "failure", "error"),
    ],
)
def test_every_status_has_an_outcome_and_a_severity(status: str, expected_outcome: str, expected_severity: str) -> None:
    assert outcome(status) == expected_outcome
    assert severity(status) == expected_severity


def test_a_record_from_an_early_stop_still_has_every_field() -> None:
    record = {"run_id": "20261129T020304Z-3f9a1c", "activation": "vip", "status": "config_error", "counts": {}}
    fields = run_end_fields(record)
    assert set(fields) == set(GOLDEN_RUN_FIELDS)
    assert fields["profiles"] == dict.fromkeys(GOLDEN_PROFILE_FIELDS, 0)
    assert (fields["rejected_share"], fields["duration_seconds"], fields["trigger"]) == (0.0, 0.0, None)
    assert run_end_entry(record)["@type"] == ERROR_EVENT_TYPE


def test_stage_timings_known_first_in_pipeline_order_then_others() -> None:
    stages = {"send": 2.0, "zeta": 1, "read": 1.5, "batch_wait": 0.25, "hash_and_diff": 0.1, "x": "?"}
    record = {"timings": {"stages": stages}}
    assert list(stage_seconds(record).items()) == [
        ("read", 1.5),
        ("hash_and_diff", 0.1),
        ("send", 2.0),
        ("batch_wait", 0.25),
        ("zeta", 1.0),
    ]
    assert stage_seconds({"timings": {"read_and_plan_seconds": 3}}) == {}


def test_guards_tripped_lists_only_guards_that_stopped_the_run() -> None:
    record = {
        "status": "aborted_by_guard",
        "guards": [
            {"guard": "removed_percent", "tripped": True, "overridden": False, "detail": ""},
            {"guard": "changed_percent", "tripped": True, "overridden": True, "detail": ""},
            {"guard": "empty_segment", "tripped": False, "overridden": False, "detail": ""},
        ],
    }
    assert run_end_fields(record)["guards_tripped"] == ["removed_percent"]


def test_the_cli_run_command_writes_the_line_too(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from sync.cli import app
    from tests.support.engine_support import ENV, people, write_segment

    write_segment(tmp_path / "segment.duckdb", people(5))
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as simulator:
        config = {
            "name": "cli_metrics",
            "source": {"type": "duckdb", "database": "segment.duckdb", "table": "people"},
            "destination": {"api_key_env": "BATCH_REST_API_KEY", "project_key_env": "BATCH_PROJECT_KEY"},
            "mapping": {"custom_id": "customer_id"},
        }
        config["destination"]["base_url"] = simulator.base_url  # type: ignore[index]
        path = tmp_path / "cli_metrics.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        state = f"sqlite:///{tmp_path / 'state.db'}"
        env = {**ENV, "BATCH_REST_API_KEY": "wrong-key-000000", "COLUMNS": "200"}
        result = CliRunner().invoke(app, ["run", str(path), "--state", state], env=env)
    # The CLI logs at warning level: a failed run's end line shows, a successful one's doesn't.
    assert result.exit_code == 4, result.output
    assert "cepsync run auth_error: activation cli_metrics" in result.output
    assert "cepsync_event=run_end.v1" in result.output
