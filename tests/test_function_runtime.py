"""The function package's own pieces: settings model, message models, trace parsing, error families.

test_function_entry.py checks the behaviour the function always had; this file checks what the
package split added or made explicit (pydantic-settings over os.environ, empty variables, the
default activations directory, models that ignore Pub/Sub's own keys, case-insensitive
headers, and errors outside the run answered by their family).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from werkzeug.datastructures import Headers as WerkzeugHeaders

import sync.function.handlers as handlers
from sync.errors import BatchContractError, ConfigError, LeaseHeld
from sync.function import (
    DEFAULT_EVENT_BUDGET_SECONDS,
    PubSubEnvelope,
    RetryableRunError,
    Settings,
    TraceContext,
    TriggerHeaders,
    handle_http,
    handle_pubsub,
    http_trigger_id,
    trace_from_headers,
)
from sync.function.settings import DEFAULT_ACTIVATIONS_DIR
from sync.record import RunStatus

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


# --- settings -----------------------------------------------------------------------------------


def test_settings_read_the_process_environment_when_given_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEPSYNC_STATE", "sqlite:///from-env.db")
    monkeypatch.setenv("CEPSYNC_LEASE_TTL_SECONDS", "42")
    settings = Settings.from_env()
    assert (settings.state_url, settings.lease_ttl_seconds) == ("sqlite:///from-env.db", 42)
    monkeypatch.setenv("CEPSYNC_LEASE_TTL_SECONDS", "never")
    with pytest.raises(
        ConfigError, match=r"field 'CEPSYNC_LEASE_TTL_SECONDS': must be a number of seconds, got 'never'"
    ):
        Settings.from_env()


def test_a_given_mapping_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEPSYNC_TIME_BUDGET_SECONDS", "soon")
    assert Settings.from_env({}).time_budget_seconds == DEFAULT_EVENT_BUDGET_SECONDS


def test_an_empty_variable_counts_as_unset() -> None:
    settings = Settings.from_env(
        {
            "CEPSYNC_STATE": "",
            "CEPSYNC_TIME_BUDGET_SECONDS": "",
            "CEPSYNC_BUDGET_MARGIN_SECONDS": "",
            "CEPSYNC_CONTINUATION_TOPIC": "",
            "CEPSYNC_MAX_DELIVERY_ATTEMPTS": "",
            "GOOGLE_CLOUD_PROJECT": "",
        }
    )
    assert settings.state_url == "firestore:///(default)?prefix=cepsync"
    assert (settings.time_budget_seconds, settings.budget_margin_seconds) == (DEFAULT_EVENT_BUDGET_SECONDS, 30)
    assert (settings.continuation_topic, settings.max_delivery_attempts, settings.project) == (None, 5, None)


def test_the_default_activations_directory_sits_beside_the_sync_package() -> None:
    assert DEFAULT_ACTIVATIONS_DIR == REPO_ROOT / "activations"
    assert Settings.from_env({}).activations_dir == REPO_ROOT / "activations"


def test_a_bad_value_is_quoted_shortened() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"CEPSYNC_MAX_DELIVERY_ATTEMPTS": "x" * 100})
    assert str(refused.value).endswith(f"got {'x' * 20!r}")


# --- messages -----------------------------------------------------------------------------------


def test_the_pubsub_envelope_ignores_pubsubs_own_keys() -> None:
    envelope = PubSubEnvelope.model_validate(
        {
            "message": {"data": "e30=", "messageId": "1", "publishTime": "2026-11-29T02:00:00Z", "attributes": {}},
            "subscription": "projects/p/subscriptions/s",
            "deliveryAttempt": 2,
        }
    )
    assert envelope.payload() == {}


def test_trigger_headers_are_read_from_case_insensitive_request_headers() -> None:
    headers = WerkzeugHeaders(
        {"x-cloudscheduler-jobname": "cepsync-vip", "x-cloudscheduler-scheduletime": "2026-11-29T02:00:00Z"}
    )
    assert http_trigger_id(headers) == "scheduler:cepsync-vip@2026-11-29T02:00:00Z"
    assert TriggerHeaders.read(WerkzeugHeaders({"idempotency-key": "key"})).trigger_id() == "http:key"
    # An unprintable character is hashed with the key, not dropped: "k\x00ey" is not "key".
    hashed = TriggerHeaders.read(WerkzeugHeaders({"idempotency-key": "k\x00ey"})).trigger_id()
    assert hashed == "http:sha256:" + hashlib.sha256(b"k\x00ey").hexdigest()
    # Half a Scheduler pair is not a Scheduler trigger: the idempotency key, if any, decides.
    assert http_trigger_id({"X-CloudScheduler-JobName": "j", "Idempotency-Key": "k"}) == "http:k"


# --- traces -------------------------------------------------------------------------------------


def test_a_traceparent_is_read_case_and_space_insensitively() -> None:
    expected = TraceContext(TRACE_ID, "00f067aa0ba902b7", True)
    assert TraceContext.from_traceparent(f"  00-{TRACE_ID.upper()}-00F067AA0BA902B7-01 ") == expected
    # A later version may add fields after the flags (the specification says to read the first four).
    assert TraceContext.from_traceparent(f"01-{TRACE_ID}-00f067aa0ba902b7-01-more") == expected
    assert TraceContext.from_traceparent(f"01-{TRACE_ID}-00f067aa0ba902b7-01more") is None


def test_an_invalid_traceparent_falls_back_to_the_cloud_header() -> None:
    headers = {"traceparent": "garbage", "X-Cloud-Trace-Context": f"{TRACE_ID}/7;o=1"}
    assert trace_from_headers(headers) == TraceContext(TRACE_ID, "0000000000000007", True)


# --- errors outside the run, by family ----------------------------------------------------------


def _environ(tmp_path: Path) -> dict[str, str]:
    activations = tmp_path / "activations"
    activations.mkdir(parents=True)
    (activations / "fam.yaml").write_text(
        "name: fam\n"
        "source: {type: duckdb, database: ../segment.duckdb, query: SELECT 1 AS id}\n"
        "destination: {api_key_env: K, project_key_env: P}\n"
        "mapping: {custom_id: id}\n",
        encoding="utf-8",
    )
    return {"CEPSYNC_STATE": f"sqlite:///{tmp_path / 'state.db'}", "CEPSYNC_ACTIVATIONS_DIR": str(activations)}


@pytest.mark.parametrize(
    ("error", "http_status", "status", "retry"),
    [
        (BatchContractError("activation 'fam': Batch refused the request shape"), 500, "failed", False),
        (LeaseHeld("activation 'fam': held by another run"), 409, "skipped_lease_held", False),
        (OSError("state store unreachable"), 503, "failed", True),
    ],
)
def test_an_error_outside_the_run_is_answered_by_its_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, http_status: int, status: str, retry: bool
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(handlers, "build_client", fail)
    outcome = handle_http("POST", {"activation": "fam"}, {}, environ=_environ(tmp_path))
    assert (outcome.http_status, outcome.body["status"], outcome.retry) == (http_status, status, retry)
    assert outcome.body["activation"] == "fam"
    if isinstance(error, OSError):
        assert outcome.body["error"] == "unexpected OSError"
        with pytest.raises(RetryableRunError, match="redelivery may succeed"):
            handle_pubsub(
                {"message": {"data": "eyJhY3RpdmF0aW9uIjogImZhbSJ9"}}, event_id="e1", environ=_environ(tmp_path / "p")
            )
    else:
        assert outcome.body["error"] == str(error)
    assert RunStatus.of(outcome.body["status"]) is not None
