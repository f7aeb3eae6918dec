"""The Cloud Function runtime without the framework: settings, parsing, traces, outcomes, runs.

The runs here go through the real stack (DuckDB segment, SQLite state, the HTTP Batch
simulator in a thread) with ``CEPSYNC_STATE`` pointing at SQLite, so the idempotency,
time-budget and continuation logic of sync/function/ is checked in a second or two. The
same paths over functions-framework, Pub/Sub, Firestore and BigQuery emulators are in
test_function_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.errors import ConfigError
from sync.function import (
    DEFAULT_EVENT_BUDGET_SECONDS,
    DEFAULT_HTTP_BUDGET_SECONDS,
    DEFAULT_MAX_DELIVERY_ATTEMPTS,
    FAILED_PERMANENTLY_EVENT,
    MAX_MESSAGE_BYTES,
    BigQueryEmulatorEndpoints,
    InvocationOutcome,
    RetryableRunError,
    Settings,
    SyncRequest,
    TraceContext,
    decode_pubsub_data,
    handle_http,
    handle_pubsub,
    handover_skip_reason,
    http_trigger_id,
    outcome_for,
    parse_json,
    trace_from_headers,
)
from sync.record import RunStatus
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import API_KEY, PROJECT_KEY, people, write_segment
from tests.support.pubsub_emulator import PubSubEmulator

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def envelope(payload: Any) -> dict[str, Any]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return {
        "message": {"data": base64.b64encode(data).decode(), "messageId": "1"},
        "subscription": "projects/test-proj/subscriptions/s",
    }


# --- settings -----------------------------------------------------------------------------------


def test_settings_defaults_build_the_firestore_url_and_the_event_budget() -> None:
    settings = Settings.from_env(
        {"GOOGLE_CLOUD_PROJECT": "acme", "CEPSYNC_FIRESTORE_DATABASE": "cepsync", "CEPSYNC_FIRESTORE_PREFIX": "p1"}
    )
    assert settings.state_url == "firestore://acme/cepsync?prefix=p1"
    assert settings.project == "acme"
    assert settings.time_budget_seconds == DEFAULT_EVENT_BUDGET_SECONDS < 540
    assert settings.budget_margin_seconds == 30
    assert settings.continuation_topic is None
    assert settings.bigquery_emulator is None
    assert settings.activations_dir.name == "activations"


def test_settings_http_budget_is_longer_and_below_the_http_timeout() -> None:
    settings = Settings.from_env({}, http=True)
    assert settings.time_budget_seconds == DEFAULT_HTTP_BUDGET_SECONDS < 3600
    assert settings.state_url == "firestore:///(default)?prefix=cepsync"


def test_settings_take_an_explicit_state_url_dir_budget_and_topic(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "CEPSYNC_STATE": "sqlite:///state.db",
            "CEPSYNC_ACTIVATIONS_DIR": str(tmp_path),
            "CEPSYNC_TIME_BUDGET_SECONDS": "120",
            "CEPSYNC_BUDGET_MARGIN_SECONDS": "10",
            "CEPSYNC_LEASE_TTL_SECONDS": "60",
            "CEPSYNC_CONTINUATION_TOPIC": "projects/acme/topics/cepsync-sync",
        }
    )
    assert settings.state_url == "sqlite:///state.db"
    assert settings.activations_dir == tmp_path
    assert (settings.time_budget_seconds, settings.budget_margin_seconds, settings.lease_ttl_seconds) == (120, 10, 60)
    assert settings.continuation_topic == "projects/acme/topics/cepsync-sync"


def test_a_small_budget_keeps_half_of_itself_for_sending() -> None:
    settings = Settings.from_env({"CEPSYNC_TIME_BUDGET_SECONDS": "8"})
    assert settings.budget_margin_seconds == 4


def test_a_margin_as_large_as_the_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match="CEPSYNC_BUDGET_MARGIN_SECONDS"):
        Settings.from_env({"CEPSYNC_TIME_BUDGET_SECONDS": "20", "CEPSYNC_BUDGET_MARGIN_SECONDS": "20"})


@pytest.mark.parametrize("value", ["soon", "-5", "0", "nan", "inf"])
def test_a_bad_budget_names_its_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="CEPSYNC_TIME_BUDGET_SECONDS"):
        Settings.from_env({"CEPSYNC_TIME_BUDGET_SECONDS": value})


def test_delivery_attempts_default_to_five_and_take_a_whole_number() -> None:
    assert Settings.from_env({}).max_delivery_attempts == DEFAULT_MAX_DELIVERY_ATTEMPTS == 5
    assert Settings.from_env({"CEPSYNC_MAX_DELIVERY_ATTEMPTS": "12"}).max_delivery_attempts == 12


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many", "101"])
def test_a_bad_delivery_attempt_bound_names_its_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="CEPSYNC_MAX_DELIVERY_ATTEMPTS"):
        Settings.from_env({"CEPSYNC_MAX_DELIVERY_ATTEMPTS": value})


def test_a_bare_topic_name_is_resolved_in_the_project() -> None:
    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "acme", "CEPSYNC_CONTINUATION_TOPIC": "cepsync-sync"})
    assert settings.continuation_topic == "projects/acme/topics/cepsync-sync"
    with pytest.raises(ConfigError, match="GOOGLE_CLOUD_PROJECT"):
        Settings.from_env({"CEPSYNC_CONTINUATION_TOPIC": "cepsync-sync"})
    with pytest.raises(ConfigError, match="CEPSYNC_CONTINUATION_TOPIC"):
        Settings.from_env({"CEPSYNC_CONTINUATION_TOPIC": "projects/acme/subscriptions/x"})


def test_bigquery_emulator_endpoints_are_read_only_when_set() -> None:
    settings = Settings.from_env(
        {"BIGQUERY_EMULATOR_HOST": "http://127.0.0.1:9050/", "BIGQUERY_STORAGE_EMULATOR_HOST": "127.0.0.1:9060"}
    )
    assert settings.bigquery_emulator == BigQueryEmulatorEndpoints("http://127.0.0.1:9050", "127.0.0.1:9060")
    assert Settings.from_env({"BIGQUERY_STORAGE_EMULATOR_HOST": "127.0.0.1:9060"}).bigquery_emulator is None
    with pytest.raises(ConfigError, match="BIGQUERY_EMULATOR_HOST"):
        Settings.from_env({"BIGQUERY_EMULATOR_HOST": "127.0.0.1:9050"})


# --- messages -----------------------------------------------------------------------------------


def test_a_request_parses_with_defaults_and_round_trips() -> None:
    assert SyncRequest.parse({"activation": "vip_users"}) == SyncRequest("vip_users", False, None)
    request = SyncRequest.parse({"activation": "vip", "full": True, "continuation_of": "20261129T020304Z-3f9a1c"})
    assert request == SyncRequest("vip", True, "20261129T020304Z-3f9a1c")
    assert SyncRequest.parse(request.as_message()) == request


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (["vip"], "JSON object"),
        ({}, "activation"),
        ({"activation": 3}, "activation"),
        ({"activation": "VIP Users"}, "activation"),
        ({"activation": "vip", "full": "yes"}, "full"),
        ({"activation": "vip", "continuation_of": "../../etc"}, "continuation_of"),
        ({"activation": "vip", "fulll": True}, "fulll"),
    ],
)
def test_a_bad_request_names_what_is_wrong(data: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        SyncRequest.parse(data)


def test_pubsub_data_is_decoded_from_base64_json() -> None:
    assert decode_pubsub_data(envelope({"activation": "vip", "full": False})) == {"activation": "vip", "full": False}


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"subscription": "s"},
        {"message": {"messageId": "1"}},
        {"message": {"data": "@@not base64@@"}},
        envelope(b"\xff\xfe"),
        envelope(b"not json"),
    ],
)
def test_malformed_pubsub_data_is_a_config_error(data: Any) -> None:
    with pytest.raises(ConfigError):
        decode_pubsub_data(data)


# --- traces -------------------------------------------------------------------------------------


def test_traceparent_gives_the_trace_span_and_sampling() -> None:
    trace = TraceContext.from_traceparent(f"00-{TRACE_ID}-00f067aa0ba902b7-01")
    assert trace == TraceContext(TRACE_ID, "00f067aa0ba902b7", True)
    assert trace.log_fields("acme") == {
        "trace": f"projects/acme/traces/{TRACE_ID}",
        "logging.googleapis.com/spanId": "00f067aa0ba902b7",
        "logging.googleapis.com/trace_sampled": True,
    }
    assert trace.log_fields(None) == {}


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        TRACE_ID,  # the X-Cloud-Trace-Context shape is not a traceparent
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str | None) -> None:
    assert TraceContext.from_traceparent(value) is None


def test_cloud_trace_context_span_is_decimal_and_converted_to_hex() -> None:
    assert TraceContext.from_cloud_trace_context(f"{TRACE_ID.upper()}/1;o=1") == TraceContext(
        TRACE_ID, "0000000000000001", True
    )
    assert TraceContext.from_cloud_trace_context(f"{TRACE_ID}/12345678901234567890;o=0") == TraceContext(
        TRACE_ID, f"{12345678901234567890:016x}", False
    )
    assert TraceContext.from_cloud_trace_context(TRACE_ID) == TraceContext(TRACE_ID, None, None)
    assert TraceContext.from_cloud_trace_context(f"00-{TRACE_ID}-00f067aa0ba902b7-01") is None
    assert TraceContext.from_cloud_trace_context("abc/1;o=1") is None


def test_http_headers_prefer_traceparent() -> None:
    both = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-00", "X-Cloud-Trace-Context": f"{'a' * 32}/2;o=1"}
    assert trace_from_headers(both) == TraceContext(TRACE_ID, "00f067aa0ba902b7", False)
    assert trace_from_headers({"X-Cloud-Trace-Context": f"{'a' * 32}/2;o=1"}) == TraceContext(
        "a" * 32, "0000000000000002", True
    )
    assert trace_from_headers({}) is None


def test_http_trigger_ids_come_from_scheduler_or_an_idempotency_key() -> None:
    scheduler = {"X-CloudScheduler-JobName": "cepsync-vip", "X-CloudScheduler-ScheduleTime": "2026-11-29T02:00:00Z"}
    assert http_trigger_id(scheduler) == "scheduler:cepsync-vip@2026-11-29T02:00:00Z"
    assert http_trigger_id({"Idempotency-Key": "abc"}) == "http:abc"
    # Long keys are hashed whole (issue 19 item 17), never cut: they used to collide.
    long_key = "x" * 500
    digest = hashlib.sha256(long_key.encode()).hexdigest()
    assert http_trigger_id({"Idempotency-Key": long_key}) == f"http:sha256:{digest}"
    assert http_trigger_id({"Idempotency-Key": long_key + "y"}) != http_trigger_id({"Idempotency-Key": long_key})
    assert http_trigger_id({}) is None


# --- outcomes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "http_status"),
    [
        ("succeeded", 200),
        ("succeeded_with_rejections", 200),
        ("duplicate_trigger", 200),
        ("incomplete", 202),
        ("skipped_lease_held", 409),
        ("aborted_by_guard", 412),
        ("config_error", 422),
        ("auth_error", 502),
        ("partial", 502),
        ("failed", 500),
        ("failed_permanently", 200),
        ("something_new", 500),
    ],
)
def test_run_statuses_map_to_http_statuses_without_retry(status: str, http_status: int) -> None:
    outcome = outcome_for({"run_id": "r", "activation": "vip", "status": status, "error": None})
    assert outcome == InvocationOutcome(http_status, {"run_id": "r", "activation": "vip", "status": status})


def test_only_a_retryable_failure_is_retried() -> None:
    outcome = outcome_for({"run_id": "r", "status": "failed", "retryable": True, "error": "BigQuery 503"})
    assert (outcome.http_status, outcome.retry, outcome.body["error"]) == (503, True, "BigQuery 503")
    assert not outcome_for({"run_id": "r", "status": "failed", "retryable": False}).retry


def test_a_continuation_that_made_no_progress_does_not_hand_over_again() -> None:
    root = SyncRequest("vip")
    continuation = SyncRequest("vip", continuation_of="20261129T020304Z-3f9a1c")
    idle = {"counts": {"acknowledged": 0}}
    busy = {"counts": {"acknowledged": 200}}
    topic = "projects/acme/topics/t"
    assert handover_skip_reason(idle, root, topic) is None  # a root run always hands over once
    assert handover_skip_reason(busy, continuation, topic) is None
    assert "no profile" in (handover_skip_reason(idle, continuation, topic) or "")
    assert "CEPSYNC_CONTINUATION_TOPIC" in (handover_skip_reason(busy, root, None) or "")


# --- whole invocations (SQLite state, DuckDB segment, simulator) --------------------------------

ACTIVATION = "fn_entry"


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as running:
        yield running


@pytest.fixture
def environ(tmp_path: Path, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    write_segment(tmp_path / "segment.duckdb", people(600))
    activations = tmp_path / "activations"
    activations.mkdir()
    config = {
        "name": ACTIVATION,
        "source": {"type": "duckdb", "database": "../segment.duckdb", "query": "SELECT * FROM people"},
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": simulator.base_url,
            "endpoint": "update",
            "concurrency": 1,
            "max_attempts": 2,
            "rate_limit": False,
        },
        "mapping": {"custom_id": "customer_id", "email": "email"},
        "attributes": [{"column": "points"}],
    }
    (activations / "fn_entry.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return {
        "CEPSYNC_STATE": f"sqlite:///{tmp_path / 'state.db'}",
        "CEPSYNC_ACTIVATIONS_DIR": str(activations),
        "BATCH_REST_API_KEY": API_KEY,
        "BATCH_PROJECT_KEY": PROJECT_KEY,
    }


def runs(environ: dict[str, str]) -> list[dict[str, Any]]:
    store = SQLiteStateStore(environ["CEPSYNC_STATE"].removeprefix("sqlite:///"))
    try:
        return store.list_runs(ACTIVATION, 50)
    finally:
        store.close()


def test_a_redelivered_event_does_not_commit_twice(environ: dict[str, str], simulator: SimulatorThread) -> None:
    first = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-1", environ=environ)
    assert (first.http_status, first.body["status"], first.body["trigger_id"]) == (200, "succeeded", "evt-1")
    received = simulator.simulator.stats()["profiles_received"]
    assert received == 600

    again = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-1", environ=environ)
    assert again.body["status"] == "duplicate_trigger"
    assert again.body["duplicate_of"] == first.body["run_id"]
    assert simulator.simulator.stats()["profiles_received"] == received
    assert [run["run_id"] for run in runs(environ)] == [first.body["run_id"]]


def test_malformed_and_unknown_messages_are_acknowledged_not_retried(environ: dict[str, str]) -> None:
    with structlog.testing.capture_logs() as logs:
        malformed = handle_pubsub(envelope(b"not json"), event_id="evt-2", environ=environ)
        unknown = handle_pubsub(envelope({"activation": "nobody"}), event_id="evt-3", environ=environ)
    assert (malformed.http_status, malformed.retry, malformed.body["status"]) == (400, False, "bad_request")
    assert (unknown.http_status, unknown.retry, unknown.body["status"]) == (422, False, "config_error")
    assert "nobody" in unknown.body["error"]
    assert ACTIVATION in unknown.body["error"]
    assert [entry["log_level"] for entry in logs] == ["error", "error"]
    assert runs(environ) == []


def test_missing_batch_keys_are_a_config_error_before_any_send(
    environ: dict[str, str], simulator: SimulatorThread
) -> None:
    del environ["BATCH_PROJECT_KEY"]
    outcome = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-4", environ=environ)
    assert (outcome.http_status, outcome.body["status"]) == (422, "config_error")
    assert "BATCH_PROJECT_KEY" in outcome.body["error"]
    assert simulator.simulator.stats()["profiles_received"] == 0


def test_the_time_budget_hands_over_and_continuations_finish_the_pass_exactly_once(
    environ: dict[str, str], simulator: SimulatorThread
) -> None:
    # 3 batches of 200 at 400 ms each cannot fit a 0.5 s sending window: the pass is cut.
    environ.update(CEPSYNC_TIME_BUDGET_SECONDS="1.0", CEPSYNC_BUDGET_MARGIN_SECONDS="0.5")
    simulator.simulator.faults.update({"latency_ms": 400})
    first = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-root", environ=environ)
    assert (first.http_status, first.body["status"]) == (202, "incomplete")
    # No topic is configured: the hand-over is skipped, and the record says why.
    assert "CEPSYNC_CONTINUATION_TOPIC" in first.body["handover"]["skipped"]
    root = first.body["run_id"]

    environ["CEPSYNC_TIME_BUDGET_SECONDS"] = "30"
    message = {"activation": ACTIVATION, "continuation_of": root}
    final = handle_pubsub(envelope(message), event_id="evt-cont-1", environ=environ)
    assert final.body["status"] == "succeeded"
    stats = simulator.simulator.stats()
    assert stats["max_updates_per_custom_id"] == 1
    assert len(simulator.simulator.profiles(PROJECT_KEY)) == 600

    # The pass is over: a late duplicate continuation must not start a new one.
    late = handle_pubsub(envelope(message), event_id="evt-cont-2", environ=environ)
    assert (late.http_status, late.body["status"]) == (200, "continuation_stale")
    assert simulator.simulator.stats()["profiles_received"] == stats["profiles_received"]
    assert [run["continuation_of"] for run in runs(environ)] == [root, None]


def test_a_failure_outside_the_run_is_bounded_too_and_leaves_one_record(
    environ: dict[str, str],
    simulator: SimulatorThread,
    pubsub_emulator: PubSubEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The run is cut by its budget and must hand over, but the continuation topic does not
    # exist: publishing fails after the run saved its record, outside the engine.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    environ.update(
        CEPSYNC_TIME_BUDGET_SECONDS="1.0",
        CEPSYNC_BUDGET_MARGIN_SECONDS="0.5",
        CEPSYNC_CONTINUATION_TOPIC=pubsub_emulator.topic_path("no-such-topic"),
        CEPSYNC_MAX_DELIVERY_ATTEMPTS="2",
    )
    simulator.simulator.faults.update({"latency_ms": 400})
    with pytest.raises(RetryableRunError, match=r"publishing to .*no-such-topic failed"):
        handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-h", environ=environ)
    [cut] = runs(environ)
    assert cut["status"] == "incomplete"

    # The redelivery is a duplicate of that run and publishes the hand-over again; it fails
    # again and this was the last attempt: acknowledged, with a record of its own.
    with structlog.testing.capture_logs() as logs:
        last = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-h", environ=environ)
    assert (last.http_status, last.retry, last.body["status"]) == (200, False, "failed_permanently")
    final, previous = runs(environ)
    assert previous["run_id"] == cut["run_id"]
    assert previous["status"] == "incomplete"  # the run that did the work keeps its own record
    assert final["status"] == "failed_permanently"
    assert final["trigger_id"] == "evt-h"
    assert final["delivery"] == {"attempt": 2, "max_attempts": 2}
    assert "no-such-topic" in final["error"]
    # The keys every run record has, so `cepsync history` and alerting read it like any other.
    assert set(cut) - {"run_type", "sync_mode", "journal", "state_ops", "handover", "plan"} <= set(final), set(
        cut
    ) - set(final)
    alerts = [entry for entry in logs if entry["event"] == FAILED_PERMANENTLY_EVENT]
    assert [entry["log_level"] for entry in alerts] == ["error"]

    # Pub/Sub delivers it once more (the acknowledgement was lost): nothing runs or is published.
    received = simulator.simulator.stats()["profiles_received"]
    late = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-h", environ=environ)
    assert (late.body["status"], late.body["duplicate_of"]) == ("duplicate_trigger", final["run_id"])
    assert simulator.simulator.stats()["profiles_received"] == received
    assert len(runs(environ)) == 2


def test_http_checks_the_method_and_body_then_runs(environ: dict[str, str]) -> None:
    assert handle_http("GET", None, {}, environ=environ).http_status == 405
    bad = handle_http("POST", None, {}, environ=environ)
    assert (bad.http_status, bad.body["status"]) == (RunStatus.BAD_REQUEST.http_status, "bad_request")
    headers = {"Idempotency-Key": "manual-1", "X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1"}
    done = handle_http("POST", {"activation": ACTIVATION, "full": True}, headers, environ=environ)
    assert (done.http_status, done.body["status"], done.body["trigger_id"]) == (200, "succeeded", "http:manual-1")
    assert done.body["counts"]["acknowledged"] == 600


# --- approving one run past a guard (issue 8 item 25) ------------------------------------------


def test_a_request_carries_an_allow_list_of_known_guards() -> None:
    request = SyncRequest.parse({"activation": "vip", "allow": ["changed_percent", "removed_percent"]})
    assert request.allow == ("changed_percent", "removed_percent")
    assert SyncRequest.parse(request.as_message()) == request
    assert "allow" not in SyncRequest("vip").as_message()
    with pytest.raises(
        ConfigError, match=r"field 'allow'.*no_such_guard.*empty_segment, removed_percent, changed_percent"
    ):
        SyncRequest.parse({"activation": "vip", "allow": ["no_such_guard"]})
    for bad in ("changed_percent", [3], {"changed_percent": True}):
        with pytest.raises(ConfigError, match="field 'allow'"):
            SyncRequest.parse({"activation": "vip", "allow": bad})


def test_a_tripped_guard_says_how_to_approve_one_run_of_the_function(environ: dict[str, str], tmp_path: Path) -> None:
    first = handle_http("POST", {"activation": ACTIVATION}, {}, environ=environ)
    assert first.body["status"] == "succeeded"
    rows = people(600)
    for row in rows:
        row["points"] += 1
    write_segment(tmp_path / "segment.duckdb", rows)

    refused = handle_http("POST", {"activation": ACTIVATION}, {}, environ=environ)
    assert (refused.http_status, refused.body["status"]) == (412, "aborted_by_guard")
    assert '{"activation": "fn_entry", "allow": ["changed_percent"]}' in refused.body["error"]
    assert "--allow" not in refused.body["error"]

    approved = handle_http("POST", {"activation": ACTIVATION, "allow": ["changed_percent"]}, {}, environ=environ)
    assert (approved.http_status, approved.body["status"]) == (200, "succeeded")
    record = next(run for run in runs(environ) if run["run_id"] == approved.body["run_id"])
    assert record["allow"] == ["changed_percent"]
    assert [g["guard"] for g in record["guards"] if g["overridden"]] == ["changed_percent"]
    assert "allow" not in next(run for run in runs(environ) if run["run_id"] == first.body["run_id"])


# --- issue 19 item 7: Batch keys as Secret Manager mounts them ----------------------------------


def test_a_key_stored_with_a_trailing_newline_runs(environ: dict[str, str], simulator: SimulatorThread) -> None:
    # `echo KEY | gcloud secrets create` stores the newline; the mounted variable ends with it.
    environ.update(BATCH_REST_API_KEY=API_KEY + "\n", BATCH_PROJECT_KEY=PROJECT_KEY + "\r\n")
    outcome = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-key-1", environ=environ)
    assert (outcome.http_status, outcome.body["status"]) == (200, "succeeded")
    assert simulator.simulator.stats()["profiles_received"] == 600


def test_a_key_with_a_control_character_is_a_config_error_naming_the_variable(
    environ: dict[str, str], simulator: SimulatorThread
) -> None:
    environ["BATCH_PROJECT_KEY"] = "proj\x1bkey9q9"
    with structlog.testing.capture_logs() as logs:
        outcome = handle_http("POST", {"activation": ACTIVATION}, {}, environ=environ)
    assert (outcome.http_status, outcome.body["status"], outcome.retry) == (422, "config_error", False)
    error = outcome.body["error"]
    assert "environment variable BATCH_PROJECT_KEY" in error
    assert "a control character (U+001B) at character 5 of 11" in error
    assert "destination.project_key_env" in error
    assert "key9q9" not in json.dumps(outcome.body) + repr(logs)
    assert simulator.simulator.stats()["profiles_received"] == 0


# --- issue 19 item 16: deeply nested or oversized messages are answered, never a 500 ------------

# The case: 100,000 bytes are over the size bound already; 60,000 are under it.
DEEP = b"[" * 100_000
DEEP_SMALL = b"[" * 60_000


@pytest.mark.parametrize(
    ("payload", "http_status", "words"),
    [
        (DEEP, 413, f"the Pub/Sub message data is larger than {MAX_MESSAGE_BYTES:,} bytes"),
        (DEEP_SMALL, 400, "the Pub/Sub message data is JSON nested too deeply (60,000 bytes)"),
        (b'{"activation": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", 400, "nested too deeply"),
        (b" " * (MAX_MESSAGE_BYTES + 1), 413, f"larger than {MAX_MESSAGE_BYTES:,} bytes"),
        (b"\xff\xfe{}", 400, "not UTF-8"),
        (b"", 400, "no Pub/Sub message data"),
    ],
)
def test_an_unreadable_pubsub_message_is_acknowledged_and_logged(
    environ: dict[str, str], payload: bytes, http_status: int, words: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        outcome = handle_pubsub(envelope(payload), event_id="evt-deep", environ=environ)
    # Returned, not raised: Pub/Sub acknowledges it and never redelivers it.
    assert (outcome.http_status, outcome.retry, outcome.body["status"]) == (http_status, False, "bad_request")
    assert words in outcome.body["error"]
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("malformed message acknowledged, not retried", "error")
    ]
    assert runs(environ) == []


@pytest.mark.parametrize(
    ("body", "http_status", "words"),
    [
        (DEEP, 413, f"the request body is larger than {MAX_MESSAGE_BYTES:,} bytes"),
        (DEEP_SMALL, 400, "the request body is JSON nested too deeply (60,000 bytes)"),
        (b'{"activation": "fn_entry", "allow": ' + b"[" * 50_000 + b"}", 400, "nested too deeply"),
        (b"{" * (MAX_MESSAGE_BYTES + 1), 413, f"the request body is larger than {MAX_MESSAGE_BYTES:,} bytes"),
        (b"", 400, "the request body is empty"),
        (b"\xc3\x28", 400, "not UTF-8"),
        (b"not json", 400, "the request body is not JSON"),
    ],
)
def test_an_unreadable_http_body_is_a_400_class_answer(
    environ: dict[str, str], body: bytes, http_status: int, words: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        outcome = handle_http("POST", body, {"Idempotency-Key": "deep-1"}, environ=environ)
    assert (outcome.http_status, outcome.body["status"]) == (http_status, "bad_request")
    assert words in outcome.body["error"]
    assert [entry["log_level"] for entry in logs] == ["error"]
    assert runs(environ) == []


def test_a_raw_http_body_runs_like_a_decoded_one(environ: dict[str, str]) -> None:
    outcome = handle_http("POST", b'{"activation": "fn_entry"}\n', {}, environ=environ)
    assert (outcome.http_status, outcome.body["status"]) == (200, "succeeded")
    assert parse_json(b'{"activation": "a"}', what="x") == {"activation": "a"}


# --- issue 19 item 17: the Idempotency-Key promise -----------------------------------------------


def test_a_retried_request_runs_again_unless_it_succeeded(environ: dict[str, str], simulator: SimulatorThread) -> None:
    headers = {"Idempotency-Key": "nightly-42"}
    simulator.simulator.faults.update({"failure_rate": 1.0, "failure_status": 503})
    failed = handle_http("POST", b'{"activation": "fn_entry"}', headers, environ=environ)
    assert (failed.http_status, failed.body["status"]) == (502, "partial")
    assert failed.body["counts"]["acknowledged"] == 0

    # The documented retry, same key, once Batch is back: it runs and sends everything.
    simulator.simulator.faults.update({"failure_rate": 0.0})
    retried = handle_http("POST", b'{"activation": "fn_entry"}', headers, environ=environ)
    assert (retried.http_status, retried.body["status"]) == (200, "succeeded")
    assert retried.body["run_id"] != failed.body["run_id"]
    assert retried.body["counts"]["acknowledged"] == 600
    assert len(simulator.simulator.profiles(PROJECT_KEY)) == 600

    # Now it succeeded: the same request again is a duplicate and sends nothing.
    received = simulator.simulator.stats()["profiles_received"]
    again = handle_http("POST", b'{"full": false, "activation": "fn_entry"}', headers, environ=environ)
    assert (again.http_status, again.body["status"]) == (200, "duplicate_trigger")
    assert again.body["duplicate_of"] == retried.body["run_id"]
    assert simulator.simulator.stats()["profiles_received"] == received
    assert [run["status"] for run in runs(environ)] == ["succeeded", "partial"]


def test_a_key_reused_with_another_body_is_a_422(environ: dict[str, str], simulator: SimulatorThread) -> None:
    headers = {"Idempotency-Key": "manual-7"}
    first = handle_http("POST", {"activation": ACTIVATION}, headers, environ=environ)
    assert first.body["status"] == "succeeded"
    received = simulator.simulator.stats()["profiles_received"]
    with structlog.testing.capture_logs() as logs:
        reused = handle_http("POST", {"activation": ACTIVATION, "full": True}, headers, environ=environ)
    assert (reused.http_status, reused.retry, reused.body["status"]) == (422, False, "bad_request")
    assert "'http:manual-7' was first sent with another request body" in reused.body["error"]
    assert [entry["log_level"] for entry in logs] == ["error"]
    assert simulator.simulator.stats()["profiles_received"] == received
    assert len(runs(environ)) == 1
    # A key that failed before any run (an unknown activation) is not bound yet.
    other = {"Idempotency-Key": "manual-8"}
    assert handle_http("POST", {"activation": "nobody"}, other, environ=environ).http_status == 422
    fixed = handle_http("POST", {"activation": ACTIVATION}, other, environ=environ)
    assert (fixed.http_status, fixed.body["status"], fixed.body["trigger_id"]) == (200, "succeeded", "http:manual-8")


def test_long_keys_that_differ_past_200_characters_are_two_requests(
    environ: dict[str, str], simulator: SimulatorThread
) -> None:
    prefix = "k" * 250
    first = handle_http("POST", {"activation": ACTIVATION}, {"Idempotency-Key": prefix + "-1"}, environ=environ)
    second = handle_http(
        "POST", {"activation": ACTIVATION, "full": True}, {"Idempotency-Key": prefix + "-2"}, environ=environ
    )
    assert (first.body["status"], second.body["status"]) == ("succeeded", "succeeded")
    assert first.body["trigger_id"].startswith("http:sha256:")
    assert first.body["trigger_id"] != second.body["trigger_id"]
    assert len(first.body["trigger_id"]) <= 200
    assert simulator.simulator.stats()["profiles_received"] == 1200


def test_a_base_url_with_a_password_is_a_config_error_without_the_password(
    environ: dict[str, str], simulator: SimulatorThread
) -> None:
    # Issue 19 item 8: refused when the activations load, before any send.
    path = Path(environ["CEPSYNC_ACTIVATIONS_DIR"]) / "fn_entry.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["destination"]["base_url"] = simulator.base_url.replace("http://", "http://user:pw9q9q@")
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    outcome = handle_pubsub(envelope({"activation": ACTIVATION}), event_id="evt-url", environ=environ)
    assert (outcome.http_status, outcome.retry, outcome.body["status"]) == (422, False, "config_error")
    assert "field 'destination.base_url': must not hold a user name or password" in outcome.body["error"]
    assert "pw9q9q" not in json.dumps(outcome.body)
    assert simulator.simulator.stats()["profiles_received"] == 0
