"""The deployed shape, end to end: functions-framework serving main.py against local emulators.

Per test, ``functions-framework`` runs main.py as a subprocess (its own process group, stopped
after the test) with the environment a deployment gives it: ``FIRESTORE_EMULATOR_HOST``
(state), ``PUBSUB_EMULATOR_HOST`` (continuations), ``BIGQUERY_EMULATOR_HOST`` and
``BIGQUERY_STORAGE_EMULATOR_HOST`` (the segment), activation YAML files in
``CEPSYNC_ACTIVATIONS_DIR``, and the Batch keys as environment variables. The Batch API is the
simulator in a thread of the test process. Requests are Pub/Sub-shaped CloudEvents (binary
mode: ``ce-*`` headers, body ``{"message": {...}, "subscription": ...}``) or HTTP POSTs.

Emulators come from the fixtures in fixtures_pubsub.py, fixtures_firestore.py and
fixtures_bigquery.py; each FAILS the session if it cannot start (never a skip).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.function import FAILED_PERMANENTLY_EVENT
from sync.state.firestore import FirestoreStateStore
from tests.support.bigquery_emulator import BigQueryEmulator, RecordingProxy
from tests.support.engine_support import API_KEY, PROJECT_KEY
from tests.support.firestore_emulator import FirestoreEmulator
from tests.support.fixtures_pubsub import PubSubChannel
from tests.support.pubsub_emulator import EventarcRelay, PubSubEmulator

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_FRAMEWORK = Path(sys.executable).parent / "functions-framework"
READY_TIMEOUT_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 120.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SMALL_ROWS = 300
LARGE_ROWS = 1600  # 8 batches of 200 on /profiles/update
# More rows than one 4 MiB gRPC message holds: the emulator sends them in one ~6 MB message.
WIDE_ROWS = 100_000
QUOTA_MESSAGE = "Quota exceeded: Your project exceeded quota for concurrent queries."


# --- the function under functions-framework ------------------------------------------------------


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FunctionServer:
    """``functions-framework --target=NAME --signature-type=TYPE`` on a free port, in its own session."""

    def __init__(self, target: str, signature_type: str, env: dict[str, str], log_path: Path) -> None:
        self.target = target
        self.signature_type = signature_type
        self.env = env
        self.log_path = log_path
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(FUNCTIONS_FRAMEWORK),
                    f"--target={self.target}",
                    f"--signature-type={self.signature_type}",
                    f"--source={REPO_ROOT / 'main.py'}",
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                ],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # gunicorn forks a worker: stop the whole group
            )
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if self._process.poll() is not None:
                pytest.fail(f"functions-framework exited with code {self._process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"functions-framework did not listen within {READY_TIMEOUT_SECONDS:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # a straggling gunicorn worker
            os.killpg(process.pid, signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def json_logs(self) -> list[dict[str, Any]]:
        """Every structured (JSON) line the function wrote."""
        entries = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    entries.append(json.loads(line))
        return entries

    def post(self, body: bytes, headers: dict[str, str]) -> Response:
        request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)  # noqa: S310
        return self._send(request)

    def get(self) -> Response:
        return self._send(urllib.request.Request(self.url, method="GET"))  # noqa: S310

    def _send(self, request: urllib.request.Request) -> Response:
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as answer:  # noqa: S310
                return Response(answer.status, answer.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, error.read())

    def post_pubsub_event(
        self, event_id: str, push_body: dict[str, Any], *, traceparent: str | None = None
    ) -> Response:
        """A Pub/Sub ``messagePublished`` CloudEvent in binary mode, as Eventarc delivers it."""
        headers = {
            "Content-Type": "application/json",
            "ce-id": event_id,
            "ce-specversion": "1.0",
            "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
            "ce-source": "//pubsub.googleapis.com/projects/test-proj/topics/cepsync-sync",
            "ce-time": "2026-11-29T02:00:00Z",
        }
        if traceparent is not None:
            headers["ce-traceparent"] = traceparent
        return self.post(json.dumps(push_body).encode(), headers)


def push_body(payload: Any, message_id: str) -> dict[str, Any]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return {
        "message": {"data": base64.b64encode(data).decode(), "messageId": message_id, "attributes": {}},
        "subscription": "projects/test-proj/subscriptions/cepsync-sync",
    }


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY})) as running:
        yield running


@pytest.fixture
def batch(simulator: SimulatorThread) -> BatchSimulator:
    simulator.simulator.reset()
    return simulator.simulator


@pytest.fixture(scope="module")
def segment_dataset(bq_emulator: BigQueryEmulator) -> Iterator[str]:
    """Segment tables in the BigQuery emulator: ``small``, ``large`` and ``wide`` (100k) people."""
    client = bq_emulator.client()
    dataset = client.create_dataset(f"fn_{uuid.uuid4().hex[:10]}")
    for table, rows in (("small", SMALL_ROWS), ("large", LARGE_ROWS), ("wide", WIDE_ROWS)):
        digits = len(str(rows))  # c00007 for the small tables, c000007 for 100,000 rows
        client.query_and_wait(
            f"CREATE TABLE `{dataset.dataset_id}.{table}` AS "
            f"SELECT CONCAT('c', LPAD(CAST(n AS STRING), {max(digits, 5)}, '0')) AS customer_id, "
            "CONCAT('person', CAST(n AS STRING), '@example.com') AS email, "
            "CONCAT('Name', CAST(n AS STRING)) AS first_name, n AS points "
            f"FROM UNNEST(GENERATE_ARRAY(1, {rows})) AS n"
        )
    yield dataset.dataset_id
    client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)
    client.close()  # type: ignore[no-untyped-call]


@dataclass
class Deployment:
    """What a deployed function sees, and how to start it."""

    activations_dir: Path
    env: dict[str, str]
    tmp_path: Path
    servers: list[FunctionServer]

    def write_activation(self, name: str, **overrides: Any) -> None:
        config: dict[str, Any] = {
            "name": name,
            "source": {"type": "bigquery", "query": "SELECT 1"},
            "destination": {
                "api_key_env": "BATCH_REST_API_KEY",
                "project_key_env": "BATCH_PROJECT_KEY",
                "base_url": "http://127.0.0.1:1",
                "endpoint": "update",
                "max_attempts": 3,
            },
            "run_type": "full_then_delta",
            "mapping": {"custom_id": "customer_id", "email": "email"},
            "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "points"}],
            "journal": {"flush_every_profiles": 200, "flush_every_seconds": 1},
        }
        for key, value in overrides.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
        (self.activations_dir / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")

    def start(self, target: str, signature_type: str, **env: str) -> FunctionServer:
        server = FunctionServer(
            target, signature_type, {**self.env, **env}, self.tmp_path / f"function-{len(self.servers)}.log"
        )
        self.servers.append(server)
        server.start()
        return server


@pytest.fixture
def deployment(
    tmp_path: Path,
    pubsub_emulator: PubSubEmulator,
    firestore_emulator: FirestoreEmulator,
    firestore_prefix: str,
    bq_emulator: BigQueryEmulator,
) -> Iterator[Deployment]:
    activations = tmp_path / "activations"
    activations.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.endswith("_EMULATOR_HOST") and not key.startswith(("CEPSYNC_", "GOOGLE_"))
    }
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        GOOGLE_CLOUD_PROJECT=firestore_emulator.project,
        FIRESTORE_EMULATOR_HOST=firestore_emulator.host,
        PUBSUB_EMULATOR_HOST=pubsub_emulator.host,
        BIGQUERY_EMULATOR_HOST=bq_emulator.rest_url,
        BIGQUERY_STORAGE_EMULATOR_HOST=bq_emulator.grpc_address,
        CEPSYNC_ACTIVATIONS_DIR=str(activations),
        CEPSYNC_STATE="firestore",
        CEPSYNC_FIRESTORE_PREFIX=firestore_prefix,
        BATCH_REST_API_KEY=API_KEY,
        BATCH_PROJECT_KEY=PROJECT_KEY,
        # One worker, few threads: 2 cores run the emulators too.
        WORKERS="1",
        THREADS="2",
    )
    deployed = Deployment(activations, env, tmp_path, [])
    try:
        yield deployed
    finally:
        for server in deployed.servers:
            server.stop()


@pytest.fixture
def state(make_firestore_store: Callable[..., FirestoreStateStore]) -> FirestoreStateStore:
    """The state store the function writes to (same emulator, same prefix), as `cepsync history` reads it."""
    return make_firestore_store()


def bigquery_source(bq_emulator: BigQueryEmulator, dataset: str, table: str) -> dict[str, Any]:
    return {
        "type": "bigquery",
        "project": bq_emulator.project,
        "query": f"SELECT customer_id, email, first_name, points FROM `{dataset}.{table}`",
    }


def log_lines(server: FunctionServer, message: str) -> list[dict[str, Any]]:
    return [entry for entry in server.json_logs() if entry.get("message") == message]


# --- tests --------------------------------------------------------------------------------------


def test_a_pubsub_event_syncs_bigquery_to_batch_once_and_a_redelivery_is_a_duplicate(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
) -> None:
    deployment.write_activation(
        "fn_small",
        source=bigquery_source(bq_emulator, segment_dataset, "small"),
        destination={"base_url": simulator.base_url},
    )
    server = deployment.start("pubsub_sync", "cloudevent")
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

    answer = server.post_pubsub_event("evt-1", push_body({"activation": "fn_small"}, "evt-1"), traceparent=traceparent)
    assert answer.status == 200, server.log_tail()

    # Batch holds every row of the BigQuery segment, mapped.
    profiles = batch.profiles(PROJECT_KEY)
    assert len(profiles) == SMALL_ROWS
    assert profiles["c00007"] == {"$email_address": "person7@example.com", "firstname": "Name7", "points": 7}
    stats = batch.stats()
    assert (stats["profiles_applied"], stats["max_updates_per_custom_id"]) == (SMALL_ROWS, 1)

    # The run record and the fingerprints landed in the Firestore emulator.
    [record] = state.list_runs("fn_small")
    assert (record["status"], record["trigger_id"]) == ("succeeded", "evt-1")
    assert record["counts"]["acknowledged"] == SMALL_ROWS
    assert record["source"]["engine"] == "bigquery"
    assert record["source"]["rows"] == SMALL_ROWS
    assert record["source"]["read_path"] == "storage_api"
    assert state.find_run_by_trigger("fn_small", "evt-1")["run_id"] == record["run_id"]  # type: ignore[index]
    assert len(state.load_fingerprints("fn_small")) == SMALL_ROWS

    # Pub/Sub redelivers the same event: nothing is sent or committed again.
    again = server.post_pubsub_event("evt-1", push_body({"activation": "fn_small"}, "evt-1"))
    assert again.status == 200, server.log_tail()
    assert batch.stats()["profiles_received"] == stats["profiles_received"]
    assert [run["run_id"] for run in state.list_runs("fn_small")] == [record["run_id"]]
    finished = log_lines(server, "invocation finished")
    assert [entry["status"] for entry in finished] == ["succeeded", "duplicate_trigger"]
    assert finished[1]["duplicate_of"] == record["run_id"]

    # Structured logs Cloud Logging understands: severity, labels, the trace of the event.
    first = finished[0]
    assert first["severity"] == "INFO"
    assert first["logging.googleapis.com/labels"] == {"activation": "fn_small", "run_id": record["run_id"]}
    assert first["logging.googleapis.com/trace"] == f"projects/test-proj/traces/{TRACE_ID}"
    assert first["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert "logging.googleapis.com/trace" not in finished[1]  # the redelivery carried no traceparent

    # A malformed message and an unknown activation are acknowledged (2xx), logged, not retried.
    assert server.post_pubsub_event("evt-2", push_body(b"not json", "evt-2")).status == 200
    assert server.post_pubsub_event("evt-3", push_body({"activation": "nobody"}, "evt-3")).status == 200
    errors = [entry for entry in server.json_logs() if entry.get("severity") == "ERROR"]
    assert [entry["message"] for entry in errors] == [
        "malformed message acknowledged, not retried",
        "configuration error: acknowledged, not retried",
    ]
    assert errors[0]["message_id"] == "evt-2"
    assert len(state.list_runs("fn_small")) == 1

    # The Batch keys never reach a log line.
    text = server.log_text()
    assert API_KEY not in text
    assert PROJECT_KEY not in text


def test_a_long_full_load_hands_over_through_pubsub_and_sends_each_profile_once(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
    pubsub_channel: PubSubChannel,
) -> None:
    deployment.write_activation(
        "fn_large",
        source=bigquery_source(bq_emulator, segment_dataset, "large"),
        destination={"base_url": simulator.base_url, "concurrency": 1},
    )
    # Each batch of 200 takes >= 0.8 s, so 8 batches never fit the 4 s sending window of an
    # 8 s budget: the pass is cut and completes across invocations. The engine stops launching
    # at budget - margin and lets a request run until budget - margin/2, so the margin is set
    # well above twice the latency: a request cut by that deadline may still be applied by
    # Batch, and its resend would (rightly, at-least-once) count as a second update.
    batch.faults.update({"latency_ms": 800})
    server = deployment.start(
        "pubsub_sync",
        "cloudevent",
        CEPSYNC_TIME_BUDGET_SECONDS="8",
        CEPSYNC_BUDGET_MARGIN_SECONDS="4",
        CEPSYNC_CONTINUATION_TOPIC=pubsub_channel.topic,
    )
    emulator = pubsub_channel.emulator

    assert server.post_pubsub_event("root-1", push_body({"activation": "fn_large"}, "root-1")).status == 200
    [first] = state.list_runs("fn_large")
    assert first["status"] == "incomplete", server.log_tail()
    assert first["trigger_id"] == "root-1"
    assert 0 < first["counts"]["acknowledged"] < LARGE_ROWS
    root = first["run_id"]

    hops = 0
    latest = first
    while latest["status"] == "incomplete":
        hops += 1
        assert hops <= 8, "the pass did not complete within 8 continuations"
        handover = latest["handover"]
        assert handover["topic"] == pubsub_channel.topic
        assert handover["continuation_of"] == root
        messages = emulator.pull(pubsub_channel.subscription, timeout=15)
        assert [message.message_id for message in messages] == [handover["message_id"]]
        [message] = messages
        assert message.json() == {"activation": "fn_large", "full": False, "continuation_of": root}
        assert message.attributes == {"activation": "fn_large", "continuation_of": root}
        emulator.acknowledge(pubsub_channel.subscription, [message.ack_id])
        answer = server.post_pubsub_event(message.message_id, message.push_body(pubsub_channel.subscription))
        assert answer.status == 200, server.log_tail()
        latest = state.list_runs("fn_large")[0]
        assert latest["trigger_id"] == message.message_id
        assert latest["continuation_of"] == root

    assert latest["status"] == "succeeded", server.log_tail()
    assert hops >= 1
    stats = batch.stats()
    assert stats["max_updates_per_custom_id"] == 1
    assert stats["profiles_applied"] == LARGE_ROWS
    assert len(batch.profiles(PROJECT_KEY)) == LARGE_ROWS
    assert len(state.load_fingerprints("fn_large")) == LARGE_ROWS
    assert state.load_meta("fn_large").continuation is None
    assert sum(run["counts"]["acknowledged"] for run in state.list_runs("fn_large")) == LARGE_ROWS
    # The finished pass published nothing more.
    assert emulator.pull(pubsub_channel.subscription, timeout=1.0) == []


def test_the_http_entry_point_runs_and_answers_the_summary(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
) -> None:
    deployment.write_activation(
        "fn_http",
        source=bigquery_source(bq_emulator, segment_dataset, "small"),
        destination={"base_url": simulator.base_url},
    )
    server = deployment.start("http_sync", "http")

    assert server.get().status == 405
    refused = server.post(b"not json", {"Content-Type": "application/json"})
    assert (refused.status, refused.json()["status"]) == (400, "bad_request")

    headers = {
        "Content-Type": "application/json",
        "X-CloudScheduler-JobName": "cepsync-fn-http",
        "X-CloudScheduler-ScheduleTime": "2026-11-29T02:00:00Z",
        "X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1",
    }
    answer = server.post(json.dumps({"activation": "fn_http", "full": True}).encode(), headers)
    assert answer.status == 200, server.log_tail()
    summary = answer.json()
    assert summary["status"] == "succeeded"
    assert summary["trigger_id"] == "scheduler:cepsync-fn-http@2026-11-29T02:00:00Z"
    assert summary["counts"]["acknowledged"] == SMALL_ROWS
    assert len(batch.profiles(PROJECT_KEY)) == SMALL_ROWS
    [record] = state.list_runs("fn_http")
    assert record["run_id"] == summary["run_id"]
    [finished] = log_lines(server, "invocation finished")
    assert finished["logging.googleapis.com/trace"] == f"projects/test-proj/traces/{TRACE_ID}"
    assert finished["logging.googleapis.com/spanId"] == "0000000000000001"

    # Cloud Scheduler retries the same slot: answered as a duplicate, nothing resent.
    received = batch.stats()["profiles_received"]
    retry = server.post(json.dumps({"activation": "fn_http", "full": True}).encode(), headers)
    assert (retry.status, retry.json()["status"]) == (200, "duplicate_trigger")
    assert batch.stats()["profiles_received"] == received


def test_the_function_keeps_batchs_pace_on_update_in_mirror_mode_with_eight_requests_in_flight(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
) -> None:
    # The deployed shape that once failed: mirror mode on /profiles/update at Batch's rate,
    # 8 requests in flight, each noting intents and committing while the lease is renewed.
    # Every append rewrote one Firestore document then, and the run died of contention.
    client = bq_emulator.client()
    people = (
        "SELECT CONCAT('c', LPAD(CAST(n AS STRING), 5, '0')) AS customer_id, "
        "CONCAT('person', CAST(n AS STRING), '@example.com') AS email, "
        "CONCAT('Name', CAST(n AS STRING)) AS first_name, {points} AS points "
        "FROM UNNEST(GENERATE_ARRAY({first}, {last})) AS n"
    )
    client.query_and_wait(
        f"CREATE TABLE `{segment_dataset}.mirror_day1` AS " + people.format(points="n", first=1, last=5_000)
    )
    # Day 2: c00001..c00050 left, c05001..c05050 joined, every 100th customer scored a point.
    client.query_and_wait(
        f"CREATE TABLE `{segment_dataset}.mirror_day2` AS "
        + people.format(points="IF(MOD(n, 100) = 0, n + 1, n)", first=51, last=5_050)
    )
    client.close()  # type: ignore[no-untyped-call]
    server = deployment.start("http_sync", "http")
    results = []
    for table in ("mirror_day1", "mirror_day2"):
        deployment.write_activation(
            "fn_mirror",
            source=bigquery_source(bq_emulator, segment_dataset, table),
            destination={"base_url": simulator.base_url, "concurrency": 8},
            sync_mode="mirror",
        )
        answer = server.post(json.dumps({"activation": "fn_mirror"}).encode(), {"Content-Type": "application/json"})
        assert answer.status == 200, server.log_tail()
        results.append(answer.json())
    first, second = results
    assert (first["status"], first["counts"]["acknowledged"]) == ("succeeded", 5_000)
    assert second["status"] == "succeeded"
    assert (second["counts"]["new"], second["counts"]["changed"], second["counts"]["removed"]) == (50, 50, 50)
    held = {custom_id: attributes for custom_id, attributes in batch.profiles(PROJECT_KEY).items() if attributes}
    assert set(held) == {f"c{n:05d}" for n in range(51, 5_051)}
    assert held["c00100"]["points"] == 101
    assert held["c00101"]["points"] == 101
    assert set(state.load_fingerprints("fn_mirror")) == set(held)
    assert state.load_intents("fn_mirror") == set()
    for record in state.list_runs("fn_mirror"):
        assert record["state_ops"]["backend"] == "firestore"
        assert record["state_ops"]["contention_retries"] == 0


# --- bounded redeliveries: Pub/Sub pushing to the function, as Eventarc does --------------------


@dataclass
class PushedTopic:
    """A topic whose push subscription reaches the function through an Eventarc-like relay."""

    emulator: PubSubEmulator
    topic: str
    subscription: str
    relay: EventarcRelay

    def publish(self, payload: dict[str, Any]) -> str:
        return self.emulator.publish(self.topic, json.dumps(payload).encode())


@contextlib.contextmanager
def pushed_topic(
    emulator: PubSubEmulator, server: FunctionServer, *, ack_deadline_seconds: int = 60
) -> Iterator[PushedTopic]:
    suffix = uuid.uuid4().hex[:12]
    relay = EventarcRelay(server.url)
    topic = emulator.create_topic(f"cepsync-push-{suffix}")
    # A short backoff (1 s doubling to 2 s) instead of Eventarc's 10 s to 600 s keeps the test short.
    subscription = emulator.create_push_subscription(
        f"cepsync-push-{suffix}", topic, relay.url, ack_deadline_seconds=ack_deadline_seconds
    )
    try:
        yield PushedTopic(emulator, topic, subscription, relay)
    finally:
        emulator.delete_subscription(subscription)
        relay.close()


@pytest.fixture
def quota_proxy(bq_proxy: RecordingProxy, deployment: Deployment) -> RecordingProxy:
    """The function reaches BigQuery's REST API through the recording proxy (Storage Read stays direct)."""
    deployment.env["BIGQUERY_EMULATOR_HOST"] = bq_proxy.url
    return bq_proxy


def test_a_failure_that_keeps_repeating_is_acknowledged_after_n_deliveries_with_one_record(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
    pubsub_emulator: PubSubEmulator,
    quota_proxy: RecordingProxy,
) -> None:
    deployment.write_activation(
        "fn_quota",
        source=bigquery_source(bq_emulator, segment_dataset, "small"),
        destination={"base_url": simulator.base_url},
    )
    # Every getQueryResults answers a quota error: transient by nature, but it never clears.
    quota_proxy.inject("GET", "/queries/", status=403, reason="quotaExceeded", message=QUOTA_MESSAGE, times=10_000)
    server = deployment.start("pubsub_sync", "cloudevent", CEPSYNC_MAX_DELIVERY_ATTEMPTS="3")

    with pushed_topic(pubsub_emulator, server) as pushed:
        started = time.monotonic()
        message_id = pushed.publish({"activation": "fn_quota"})
        deliveries = pushed.relay.wait_for_acknowledgement(message_id, timeout=150)
        elapsed = time.monotonic() - started
        time.sleep(4)  # twice the longest backoff: a further redelivery would have arrived by now
        deliveries = pushed.relay.deliveries_of(message_id)
    print(f"\npermanent error: {len(deliveries)} deliveries, acknowledged after {elapsed:.1f}s")

    # Two failures asked for a redelivery (500); the third was acknowledged, and nothing came after.
    assert [delivery.status for delivery in deliveries] == [500, 500, 200], server.log_tail()
    assert state.delivery_attempts("fn_quota", message_id) == 3
    runs = state.list_runs("fn_quota")
    assert [run["status"] for run in runs] == ["failed_permanently", "failed", "failed"]
    final = runs[0]
    assert final["trigger_id"] == message_id
    assert final["delivery"] == {"attempt": 3, "max_attempts": 3}
    assert final["retryable"] is False
    assert f"gave up after 3 deliveries of message {message_id}" in final["error"]
    assert QUOTA_MESSAGE in final["error"]
    assert batch.stats()["profiles_received"] == 0

    # Exactly one ERROR line alerting can match, naming the run and the attempts.
    [alert] = [entry for entry in server.json_logs() if entry.get("message") == FAILED_PERMANENTLY_EVENT]
    assert alert["severity"] == "ERROR"
    assert alert["logging.googleapis.com/labels"] == {"activation": "fn_quota", "run_id": final["run_id"]}
    assert (alert["delivery_attempt"], alert["max_delivery_attempts"]) == (3, 3)

    # A late redelivery (a lost acknowledgement) is not run again.
    quota_proxy.reset()
    again = server.post_pubsub_event(message_id, push_body({"activation": "fn_quota"}, message_id))
    assert again.status == 200
    assert [run["status"] for run in state.list_runs("fn_quota")] == ["failed_permanently", "failed", "failed"]
    assert log_lines(server, "invocation finished")[-1]["status"] == "duplicate_trigger"
    assert batch.stats()["profiles_received"] == 0


def test_a_transient_error_that_clears_on_the_third_delivery_succeeds(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
    pubsub_emulator: PubSubEmulator,
    quota_proxy: RecordingProxy,
) -> None:
    deployment.write_activation(
        "fn_flaky",
        source=bigquery_source(bq_emulator, segment_dataset, "small"),
        destination={"base_url": simulator.base_url},
    )
    quota_proxy.inject("GET", "/queries/", status=403, reason="quotaExceeded", message=QUOTA_MESSAGE, times=2)
    server = deployment.start("pubsub_sync", "cloudevent")  # the default bound, 5 deliveries

    with pushed_topic(pubsub_emulator, server) as pushed:
        started = time.monotonic()
        message_id = pushed.publish({"activation": "fn_flaky"})
        deliveries = pushed.relay.wait_for_acknowledgement(message_id, timeout=150)
        elapsed = time.monotonic() - started
    print(f"\ntransient error: {len(deliveries)} deliveries, succeeded after {elapsed:.1f}s")

    assert [delivery.status for delivery in deliveries] == [500, 500, 200], server.log_tail()
    runs = state.list_runs("fn_flaky")
    assert [run["status"] for run in runs] == ["succeeded", "failed", "failed"]
    assert all(run["trigger_id"] == message_id for run in runs)
    assert runs[1]["retryable"] is True
    assert QUOTA_MESSAGE in runs[1]["error"]
    assert runs[0]["counts"]["acknowledged"] == SMALL_ROWS
    assert len(batch.profiles(PROJECT_KEY)) == SMALL_ROWS
    assert batch.stats()["max_updates_per_custom_id"] == 1
    assert state.delivery_attempts("fn_flaky", message_id) == 3
    assert [entry for entry in server.json_logs() if entry.get("message") == FAILED_PERMANENTLY_EVENT] == []


def test_a_100k_row_segment_reads_through_storage_read_on_the_emulator(
    deployment: Deployment,
    state: FirestoreStateStore,
    batch: BatchSimulator,
    simulator: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    segment_dataset: str,
    pubsub_emulator: PubSubEmulator,
) -> None:
    deployment.write_activation(
        "fn_wide",
        source=bigquery_source(bq_emulator, segment_dataset, "wide"),
        destination={"base_url": simulator.base_url, "endpoint": "mass-update", "rate_limit": False},
        journal={"flush_every_profiles": 50_000, "flush_every_seconds": 30},
    )
    server = deployment.start("pubsub_sync", "cloudevent", CEPSYNC_TIME_BUDGET_SECONDS="240")

    with pushed_topic(pubsub_emulator, server, ack_deadline_seconds=300) as pushed:
        started = time.monotonic()
        message_id = pushed.publish({"activation": "fn_wide"})
        deliveries = pushed.relay.wait_for_acknowledgement(message_id, timeout=300)
        elapsed = time.monotonic() - started
    print(f"\n100k rows: {len(deliveries)} delivery, synced in {elapsed:.1f}s")

    assert [delivery.status for delivery in deliveries] == [200], server.log_tail()
    [record] = state.list_runs("fn_wide")
    assert record["status"] == "succeeded", record.get("error")
    assert record["source"]["read_path"] == "storage_api"
    assert record["source"]["rows"] == WIDE_ROWS
    assert record["counts"]["acknowledged"] == WIDE_ROWS
    assert len(batch.profiles(PROJECT_KEY)) == WIDE_ROWS


# --- issue 19 item 16: what the framework would have answered 500 ------------------------------


def test_deeply_nested_and_oversized_messages_are_answered_and_acknowledged(
    deployment: Deployment, state: FirestoreStateStore
) -> None:
    deployment.write_activation("fn_deep")
    http = deployment.start("http_sync", "http")
    deep = b"[" * 60_000
    for body, status, words in [
        (deep, 400, "nested too deeply"),
        (b"[" * 100_000, 413, "larger than"),
        (b'{"activation": "fn_deep", "allow": ' + deep, 400, "nested too deeply"),
    ]:
        answer = http.post(body, {"Content-Type": "application/json"})
        # JSON, not Flask's HTML 500 page.
        assert (answer.status, answer.json()["status"]) == (status, "bad_request"), http.log_tail()
        assert words in answer.json()["error"]
    assert "Traceback" not in http.log_text()
    assert len(log_lines(http, "malformed request refused")) == 3

    events = deployment.start("pubsub_sync", "cloudevent")
    for message_id, data in [("deep-1", deep), ("deep-2", b"[" * 100_000)]:
        answer = events.post_pubsub_event(message_id, push_body(data, message_id))
        # 2xx: Pub/Sub counts the message delivered and never sends it again.
        assert 200 <= answer.status < 300, events.log_tail()
    assert "Traceback" not in events.log_text()
    assert len(log_lines(events, "malformed message acknowledged, not retried")) == 2
    assert state.list_runs("fn_deep") == []
