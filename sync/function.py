"""The Cloud Function runtime: settings, message parsing, one run, continuation hand-over.

``main.py`` stays thin (functions-framework decorators only) and calls :func:`handle_pubsub`
or :func:`handle_http`. Everything here runs without the framework, so it is tested directly.

Triggers and idempotency:

* **Pub/Sub** (``google.cloud.pubsub.topic.v1.messagePublished``): the CloudEvent id is the
  Pub/Sub message id and stays the same on every redelivery, so it is the run's idempotency
  key (``RunOptions.trigger_id``): the engine answers ``duplicate_trigger`` to a second delivery
  of a message whose run finished, and commits nothing.
* **HTTP** (manual, or Cloud Scheduler with OIDC for the 60-minute limit): Cloud Scheduler
  sends ``X-CloudScheduler-JobName`` and ``X-CloudScheduler-ScheduleTime``, identical on each
  retry of one scheduled slot, so they make the key; a caller may send ``Idempotency-Key``.

Retry policy: Pub/Sub redelivers an event when the function raises (with backoff, for up to
the topic's retention). We raise only when a redelivery can help: a run the engine marked
``retryable`` (a transient warehouse or Batch outage), an unexpected failure outside the run
(the state store unreachable), or a continuation that could not be published. A malformed
message, a bad config, a tripped guard, refused Batch credentials, a held lease or a duplicate
delivery are logged and acknowledged: a redelivery would only repeat the same answer until
the message expires (a retry storm, and the logs drowned in it).

Bounded redeliveries: "retryable" is a guess, and a cause that is transient in principle (a
quota exhausted for the day, an outage) can outlast any useful number of attempts. So every
Pub/Sub delivery is counted per activation and message id in the state store
(:meth:`sync.state.base.StateStore.record_delivery_attempt`) before the run. When delivery
``CEPSYNC_MAX_DELIVERY_ATTEMPTS`` (default 5) would be retried again, the function instead
records the run as ``failed_permanently`` (with the last error and the attempt count),
acknowledges the message, and logs one ERROR line whose message is
:data:`FAILED_PERMANENTLY_EVENT`, for alerting. A later delivery of the same message is
answered ``duplicate_trigger`` without running. Continuations are messages like any other and
are bounded the same way. If the state store itself is unreachable nothing can be counted,
and the event is redelivered until the store answers or Pub/Sub drops the message.

Time budget: an event-triggered function is killed at 540 s, an HTTP one at 3600 s
(docs/how-a-run-works.md, "Time budget and continuations"). The engine stops launching batches
``CEPSYNC_BUDGET_MARGIN_SECONDS`` before ``CEPSYNC_TIME_BUDGET_SECONDS`` (counted from the start
of the invocation), flushes, checkpoints and releases the lease; this module then publishes a
continuation message ``{"activation": NAME, "continuation_of": ROOT_RUN_ID}`` to
``CEPSYNC_CONTINUATION_TOPIC`` and the next invocation resumes from the checkpoint. A
continuation whose pass has already ended is a no-op, and a continuation that made no progress
does not hand over again (a budget too small to send one batch would otherwise loop forever).

Secrets: the Batch keys come from environment variables (Secret Manager mounts them); they are
read only by :func:`sync.runtime.build_client`, which registers them with the log scrubber.
Nothing here logs a value read from the environment other than settings.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from sync.config import ACTIVATION_NAME, Activation, load_activations
from sync.engine import Clock, Run, RunOptions, new_run_id
from sync.errors import ConfigError
from sync.logs import configure_logging
from sync.plan import GUARD_NAMES, check_guard_names
from sync.runlog import log_run_end
from sync.runtime import BigQueryEmulatorEndpoints, build_client, open_source_from_env, open_store
from sync.sources.base import Source
from sync.state.base import StateStore

log = structlog.get_logger("cepsync.function")

# Cloud Functions (2nd gen) kill an event-triggered invocation at 540 s and an HTTP one at
# 3600 s. The defaults leave room for the final flush, compaction and run record after the
# engine stops launching batches (budget - margin), and for the continuation publish.
DEFAULT_EVENT_BUDGET_SECONDS = 480.0
DEFAULT_HTTP_BUDGET_SECONDS = 3300.0
DEFAULT_BUDGET_MARGIN_SECONDS = 30.0
DEFAULT_LEASE_TTL_SECONDS = 180.0
# A bounded wait for the continuation publish: past it the invocation fails and Pub/Sub
# redelivers the event, whose duplicate run then publishes the hand-over again.
PUBLISH_TIMEOUT_SECONDS = 30.0
# Pub/Sub topic ids: 3-255 characters, start with a letter (cloud.google.com/pubsub/docs/create-topic).
_TOPIC_ID = r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}"
_TOPIC_PATH = re.compile(rf"^projects/[^/\s]+/topics/{_TOPIC_ID}$")
_TOPIC_NAME = re.compile(rf"^{_TOPIC_ID}$")
# Run ids are made by sync.engine.new_run_id: 20261129T020304Z-3f9a1c.
_RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
# W3C Trace Context (www.w3.org/TR/trace-context/#traceparent-header): version-traceid-parentid-flags.
_TRACEPARENT = re.compile(
    r"^(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
)
# X-Cloud-Trace-Context (cloud.google.com/trace/docs/trace-context): TRACE_ID/SPAN_ID;o=OPTIONS,
# where SPAN_ID is a *decimal* 64-bit integer and both the span and the options are optional.
_CLOUD_TRACE = re.compile(r"^(?P<trace>[0-9a-fA-F]{32})(?:/(?P<span>\d{1,20}))?(?:;o=(?P<options>\d+))?$")
# Trigger ids end up in document ids and log labels: keep them short and printable.
_MAX_TRIGGER_ID = 200
# Pub/Sub deliveries of one message before it is acknowledged as failed_permanently. With the
# Eventarc subscription's backoff (10 s doubling up to 600 s) five attempts span about 2.5 min.
DEFAULT_MAX_DELIVERY_ATTEMPTS = 5
_MAX_DELIVERY_ATTEMPTS_LIMIT = 100
# The message of the one ERROR line logged when a message's attempts are exhausted: stable,
# documented in infra/README.md; log-based alerts match on it.
FAILED_PERMANENTLY_EVENT = "run_failed_permanently"


class RetryableRunError(RuntimeError):
    """Raised to the framework so that Pub/Sub redelivers the event (with its backoff)."""


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Runtime settings from the environment, built once per invocation at the entry point.

    Attributes:
        activations_dir: Directory of activation YAML files deployed with the function
            (``CEPSYNC_ACTIVATIONS_DIR``; default ``activations/`` beside the package).
        state_url: State store URL (``CEPSYNC_STATE``: ``firestore`` builds
            ``firestore://PROJECT/DATABASE?prefix=P`` from ``GOOGLE_CLOUD_PROJECT``,
            ``CEPSYNC_FIRESTORE_DATABASE`` and ``CEPSYNC_FIRESTORE_PREFIX``; any other value
            is used as a URL, see :func:`sync.runtime.open_store`).
        project: ``GOOGLE_CLOUD_PROJECT`` (trace links, bare topic names), or None.
        time_budget_seconds: ``CEPSYNC_TIME_BUDGET_SECONDS``, counted from the start of the
            invocation (default 480 for events, 3300 for HTTP).
        budget_margin_seconds: ``CEPSYNC_BUDGET_MARGIN_SECONDS``: no batch is launched after
            ``budget - margin`` (default 30, at most half the budget).
        lease_ttl_seconds: ``CEPSYNC_LEASE_TTL_SECONDS`` (default 180).
        continuation_topic: ``CEPSYNC_CONTINUATION_TOPIC`` as ``projects/P/topics/T`` (a bare
            topic name is resolved in ``project``), or None: no hand-over, the next scheduled
            run continues from the checkpoint.
        bigquery_emulator: Local BigQuery emulator endpoints, or None (the real API with
            Application Default Credentials).
        max_delivery_attempts: ``CEPSYNC_MAX_DELIVERY_ATTEMPTS`` (default 5, 1-100): Pub/Sub
            deliveries of one message before a retryable failure becomes ``failed_permanently``.
    """

    activations_dir: Path
    state_url: str
    project: str | None
    time_budget_seconds: float
    budget_margin_seconds: float
    lease_ttl_seconds: float
    continuation_topic: str | None
    bigquery_emulator: BigQueryEmulatorEndpoints | None = None
    max_delivery_attempts: int = DEFAULT_MAX_DELIVERY_ATTEMPTS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, http: bool = False) -> Settings:
        """Read and check every setting; a bad one is a ConfigError naming the variable."""
        env: Mapping[str, str] = os.environ if environ is None else environ
        project = env.get("GOOGLE_CLOUD_PROJECT") or None
        state = env.get("CEPSYNC_STATE", "firestore")
        if state == "firestore":
            database = env.get("CEPSYNC_FIRESTORE_DATABASE") or "(default)"
            prefix = env.get("CEPSYNC_FIRESTORE_PREFIX") or "cepsync"
            state = f"firestore://{project or ''}/{database}?prefix={prefix}"
        default_budget = DEFAULT_HTTP_BUDGET_SECONDS if http else DEFAULT_EVENT_BUDGET_SECONDS
        budget = _positive_number(env, "CEPSYNC_TIME_BUDGET_SECONDS", default_budget)
        margin_given = "CEPSYNC_BUDGET_MARGIN_SECONDS" in env
        margin = _positive_number(env, "CEPSYNC_BUDGET_MARGIN_SECONDS", DEFAULT_BUDGET_MARGIN_SECONDS)
        if not margin_given:
            # A small budget (tests, a short HTTP timeout) keeps half of it for sending.
            margin = min(margin, budget / 2)
        elif margin >= budget:
            raise ConfigError(
                f"must be below CEPSYNC_TIME_BUDGET_SECONDS ({budget:g}): no batch could ever be sent",
                field="CEPSYNC_BUDGET_MARGIN_SECONDS",
            )
        ttl = _positive_number(env, "CEPSYNC_LEASE_TTL_SECONDS", DEFAULT_LEASE_TTL_SECONDS)
        default_dir = Path(__file__).resolve().parent.parent / "activations"
        return cls(
            activations_dir=Path(env.get("CEPSYNC_ACTIVATIONS_DIR") or default_dir),
            state_url=state,
            project=project,
            time_budget_seconds=budget,
            budget_margin_seconds=margin,
            lease_ttl_seconds=ttl,
            continuation_topic=_topic_path(env.get("CEPSYNC_CONTINUATION_TOPIC") or None, project),
            bigquery_emulator=BigQueryEmulatorEndpoints.from_env(env),
            max_delivery_attempts=_attempts(env, "CEPSYNC_MAX_DELIVERY_ATTEMPTS", DEFAULT_MAX_DELIVERY_ATTEMPTS),
        )


def _attempts(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_DELIVERY_ATTEMPTS_LIMIT:
        raise ConfigError(
            f"must be a whole number of attempts from 1 to {_MAX_DELIVERY_ATTEMPTS_LIMIT}, got {raw[:20]!r}", field=name
        )
    return int(raw)


def _positive_number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"must be a number of seconds, got {raw[:20]!r}", field=name) from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"must be a positive number of seconds, got {raw[:20]!r}", field=name)
    return value


def _topic_path(value: str | None, project: str | None) -> str | None:
    if value is None:
        return None
    if _TOPIC_PATH.match(value):
        return value
    if _TOPIC_NAME.match(value):
        if project is None:
            raise ConfigError(
                "a bare topic name needs GOOGLE_CLOUD_PROJECT; or give projects/PROJECT/topics/TOPIC",
                field="CEPSYNC_CONTINUATION_TOPIC",
            )
        return f"projects/{project}/topics/{value}"
    raise ConfigError("must be projects/PROJECT/topics/TOPIC or a topic name", field="CEPSYNC_CONTINUATION_TOPIC")


def configure_runtime_logging(environ: Mapping[str, str] | None = None) -> None:
    """JSON logs on stderr for Cloud Logging, at ``CEPSYNC_LOG_LEVEL`` (default info).

    An unknown level falls back to info (and says so) instead of failing the import of
    ``main.py``, which would take every trigger down with it.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    level = (env.get("CEPSYNC_LOG_LEVEL") or "info").lower()
    known = level.upper() in logging.getLevelNamesMapping()
    configure_logging(json=True, level=level if known else "info")
    if not known:
        log.warning("unknown CEPSYNC_LOG_LEVEL, using info", level=level[:20])


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncRequest:
    """What a message asks for: ``{"activation": NAME, "full": false}``.

    ``continuation_of`` is set only by :func:`publish_continuation`: the root run id of the
    pass being continued.
    """

    activation: str
    full: bool = False
    continuation_of: str | None = None
    # Guards approved for this run only (the CLI's --allow), carried into its continuations.
    allow: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: Any) -> SyncRequest:
        """Validate a decoded message; every error is a ConfigError naming the key."""
        if not isinstance(data, dict):
            raise ConfigError('the message must be a JSON object like {"activation": "NAME", "full": false}')
        unknown = sorted(str(key)[:40] for key in data if key not in ("activation", "full", "continuation_of", "allow"))
        if unknown:
            raise ConfigError(f"unknown key(s) in the message: {', '.join(unknown)}")
        name = data.get("activation")
        if not isinstance(name, str):
            raise ConfigError("missing or not a string", field="activation")
        if not ACTIVATION_NAME.match(name):
            raise ConfigError(f"{name[:70]!r} is not an activation name ([a-z0-9][a-z0-9_-]*)", field="activation")
        full = data.get("full", False)
        if not isinstance(full, bool):
            raise ConfigError("must be true or false", field="full")
        continuation_of = data.get("continuation_of")
        if continuation_of is not None and not (isinstance(continuation_of, str) and _RUN_ID.match(continuation_of)):
            raise ConfigError("must be a run id such as 20261129T020304Z-3f9a1c", field="continuation_of")
        return cls(name, full, continuation_of, _allow_list(data.get("allow", [])))

    def as_message(self) -> dict[str, Any]:
        """The JSON object a message carries for this request."""
        message: dict[str, Any] = {"activation": self.activation, "full": self.full}
        if self.continuation_of is not None:
            message["continuation_of"] = self.continuation_of
        if self.allow:
            message["allow"] = list(self.allow)
        return message


def _allow_list(value: Any) -> tuple[str, ...]:
    """The guards a message approves for one run: a list of guard names."""
    known = ", ".join(GUARD_NAMES)
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ConfigError(f'must be a list of guard names, such as ["changed_percent"] (known: {known})', field="allow")
    return check_guard_names(value, field="allow")


def decode_pubsub_data(envelope: Any) -> Any:
    """The JSON payload of a Pub/Sub CloudEvent body ``{"message": {"data": BASE64}, ...}``.

    Raises:
        ConfigError: no ``message.data``, not base64, not UTF-8 or not JSON (never retried).
    """
    message = envelope.get("message") if isinstance(envelope, dict) else None
    raw = message.get("data") if isinstance(message, dict) else None
    if not isinstance(raw, str) or not raw:
        raise ConfigError("the CloudEvent carries no Pub/Sub message data (expected message.data, base64)")
    try:
        text = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ConfigError("the Pub/Sub message data is not base64-encoded UTF-8") from None
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"the Pub/Sub message data is not JSON ({len(text)} characters)") from None


# --- tracing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceContext:
    """The trace an invocation belongs to, as Cloud Logging wants it on each log line."""

    trace_id: str
    span_id: str | None = None
    sampled: bool | None = None

    @classmethod
    def from_traceparent(cls, value: str | None) -> TraceContext | None:
        """W3C ``traceparent``: ``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``."""
        text = value.strip().lower() if value else ""
        match = _TRACEPARENT.match(text)
        if match is None or match["version"] == "ff":  # ff is forbidden by the spec
            return None
        if set(match["trace"]) == {"0"} or set(match["span"]) == {"0"}:  # all-zero ids are invalid
            return None
        if match["version"] == "00" and len(text) != 55:  # version 00 has no extra fields
            return None
        return cls(match["trace"], match["span"], bool(int(match["flags"], 16) & 1))

    @classmethod
    def from_cloud_trace_context(cls, value: str | None) -> TraceContext | None:
        """``X-Cloud-Trace-Context``: ``TRACE_ID/SPAN_ID;o=1`` (span id in decimal)."""
        match = _CLOUD_TRACE.match(value.strip()) if value else None
        if match is None or set(match["trace"]) == {"0"}:
            return None
        span = match["span"]
        span_hex = None
        if span is not None and 0 < int(span) < 2**64:
            span_hex = f"{int(span):016x}"  # Cloud Logging's spanId is 16 hex characters
        options = match["options"]
        return cls(match["trace"].lower(), span_hex, None if options is None else bool(int(options) & 1))

    def log_fields(self, project: str | None) -> dict[str, Any]:
        """Context fields for structlog; :mod:`sync.logs` turns ``trace`` into Cloud Logging's key.

        Cloud Logging links a line to a trace only by the full resource name, so without a
        project there is nothing useful to add.
        """
        if project is None:
            return {}
        fields: dict[str, Any] = {"trace": f"projects/{project}/traces/{self.trace_id}"}
        if self.span_id is not None:
            fields["logging.googleapis.com/spanId"] = self.span_id
        if self.sampled is not None:
            fields["logging.googleapis.com/trace_sampled"] = self.sampled
        return fields


class Headers(Protocol):
    """The part of a request's headers used here (werkzeug's ``EnvironHeaders`` fits)."""

    def get(self, key: str) -> str | None: ...


def trace_from_headers(headers: Headers) -> TraceContext | None:
    """W3C ``traceparent`` first (sent by Cloud Run and OpenTelemetry), else ``X-Cloud-Trace-Context``."""
    return TraceContext.from_traceparent(headers.get("traceparent")) or TraceContext.from_cloud_trace_context(
        headers.get("X-Cloud-Trace-Context")
    )


def http_trigger_id(headers: Headers) -> str | None:
    """The idempotency key of an HTTP trigger, or None (every request is a new run).

    Cloud Scheduler sends the same job name and schedule time on every retry of one slot.
    """
    job = headers.get("X-CloudScheduler-JobName")
    slot = headers.get("X-CloudScheduler-ScheduleTime")
    if job and slot:
        return _bounded_id(f"scheduler:{job}@{slot}")
    key = headers.get("Idempotency-Key")
    return _bounded_id(f"http:{key}") if key else None


def _bounded_id(value: str) -> str:
    printable = "".join(ch for ch in value if ch.isprintable())
    return printable[:_MAX_TRIGGER_ID]


# --- outcomes -------------------------------------------------------------------------------


# HTTP status per run status (Pub/Sub ignores it; only a raise makes Pub/Sub retry).
HTTP_STATUS: Mapping[str, int] = {
    "succeeded": 200,
    "succeeded_with_rejections": 200,
    "duplicate_trigger": 200,
    "continuation_stale": 200,
    # Accepted: the pass goes on in a continuation invocation.
    "incomplete": 202,
    "skipped_lease_held": 409,
    "aborted_by_guard": 412,
    "config_error": 422,
    "bad_request": 400,
    # Batch refused our REST API key or failed some profiles: an upstream problem, not the
    # caller's (a 401 here would read as "your OIDC token was refused").
    "auth_error": 502,
    "partial": 502,
    "failed": 500,
    # Acknowledged on purpose: the message's delivery attempts are exhausted (Pub/Sub only).
    "failed_permanently": 200,
}


@dataclass(frozen=True)
class InvocationOutcome:
    """What one invocation answers: an HTTP status, a JSON summary, and whether to retry."""

    http_status: int
    body: dict[str, Any]
    retry: bool = False


def outcome_for(record: Mapping[str, Any]) -> InvocationOutcome:
    """Map a run record to the answer: only a failure the engine marked retryable is retried."""
    status = str(record.get("status"))
    retry = status == "failed" and bool(record.get("retryable"))
    body = {
        key: record.get(key)
        for key in ("run_id", "activation", "status", "trigger_id", "counts", "error", "duplicate_of", "handover")
        if record.get(key) is not None
    }
    return InvocationOutcome(503 if retry else HTTP_STATUS.get(status, 500), body, retry)


# --- one invocation -------------------------------------------------------------------------


@dataclass
class _Invocation:
    settings: Settings
    environ: Mapping[str, str]
    trigger: str
    trigger_id: str | None
    started: float
    count_deliveries: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Set by _run once known: the store, the activation and this delivery's attempt number.
    store: StateStore | None = None
    activation: str | None = None
    continuation_of: str | None = None
    attempt: int | None = None


def handle_pubsub(
    data: Any, *, event_id: str, traceparent: str | None = None, environ: Mapping[str, str] | None = None
) -> InvocationOutcome:
    """Run what a Pub/Sub CloudEvent asks; raise :class:`RetryableRunError` only if a retry can help.

    Args:
        data: The CloudEvent data: ``{"message": {"data": BASE64, "messageId": ...}, "subscription": ...}``.
        event_id: The CloudEvent id (the Pub/Sub message id), used as the idempotency key.
        traceparent: The CloudEvent ``traceparent`` extension, if any.
        environ: Settings source (default ``os.environ``).
    """
    started = time.monotonic()
    environ = os.environ if environ is None else environ
    trigger_id = _bounded_id(event_id)
    _bind_context(TraceContext.from_traceparent(traceparent), environ, trigger="pubsub", trigger_id=trigger_id)
    try:
        payload = decode_pubsub_data(data)
        request = SyncRequest.parse(payload)
    except ConfigError as error:
        # A malformed message can never succeed: acknowledge it, with a reason in the logs.
        log.error("malformed message acknowledged, not retried", error=str(error), message_id=trigger_id)
        return InvocationOutcome(HTTP_STATUS["bad_request"], {"status": "bad_request", "error": str(error)})
    outcome = _invoke(
        request, environ, trigger="pubsub", trigger_id=trigger_id, http=False, started=started, count_deliveries=True
    )
    if outcome.retry:
        raise RetryableRunError(
            f"activation '{request.activation}': {outcome.body.get('error') or 'failed'}; redelivery may succeed"
        )
    return outcome


def handle_http(
    method: str, body: Any, headers: Headers, *, environ: Mapping[str, str] | None = None
) -> InvocationOutcome:
    """Run what an HTTP POST asks (same JSON as the Pub/Sub message); never raises for a run failure."""
    started = time.monotonic()
    environ = os.environ if environ is None else environ
    trigger_id = http_trigger_id(headers)
    _bind_context(trace_from_headers(headers), environ, trigger="http", trigger_id=trigger_id)
    if method != "POST":
        return InvocationOutcome(405, {"status": "bad_request", "error": 'use POST with {"activation": NAME}'})
    try:
        request = SyncRequest.parse(body)
    except ConfigError as error:
        log.error("malformed request refused", error=str(error))
        return InvocationOutcome(HTTP_STATUS["bad_request"], {"status": "bad_request", "error": str(error)})
    return _invoke(request, environ, trigger="http", trigger_id=trigger_id, http=True, started=started)


def _bind_context(
    trace: TraceContext | None, environ: Mapping[str, str], *, trigger: str, trigger_id: str | None
) -> None:
    # Gunicorn reuses threads across requests: start every invocation from a clean context.
    structlog.contextvars.clear_contextvars()
    fields: dict[str, Any] = {"trigger": trigger, "trigger_id": trigger_id}
    if trace is not None:
        fields.update(trace.log_fields(environ.get("GOOGLE_CLOUD_PROJECT") or None))
    structlog.contextvars.bind_contextvars(**fields)


def _invoke(
    request: SyncRequest,
    environ: Mapping[str, str],
    *,
    trigger: str,
    trigger_id: str | None,
    http: bool,
    started: float,
    count_deliveries: bool = False,
) -> InvocationOutcome:
    structlog.contextvars.bind_contextvars(activation=request.activation)
    try:
        settings = Settings.from_env(environ, http=http)
    except ConfigError as error:
        log.error("configuration error: acknowledged, not retried", error=str(error))
        return InvocationOutcome(HTTP_STATUS["config_error"], {"status": "config_error", "error": str(error)})
    invocation = _Invocation(settings, environ, trigger, trigger_id, started, count_deliveries)
    record: dict[str, Any] | None = None
    try:
        try:
            record = _run(request, invocation)
        except ConfigError as error:
            log.error("configuration error: acknowledged, not retried", error=str(error))
            return InvocationOutcome(HTTP_STATUS["config_error"], {"status": "config_error", "error": str(error)})
        except RetryableRunError as error:
            log.error("invocation failed", error=str(error), delivery_attempt=invocation.attempt)
            outcome = InvocationOutcome(
                503, {"activation": request.activation, "status": "failed", "error": str(error)}, True
            )
        except Exception as error:
            # Outside the run (state store unreachable, a client library failure): transient as far
            # as we can tell, and a redelivery is safe (lease, acknowledged-only commits).
            log.exception("invocation failed unexpectedly", delivery_attempt=invocation.attempt)
            outcome = InvocationOutcome(
                503,
                {"activation": request.activation, "status": "failed", "error": f"unexpected {type(error).__name__}"},
                True,
            )
        else:
            outcome = outcome_for(record)
        if outcome.retry and _attempts_exhausted(invocation):
            # Inside the try: the store is still open.
            record = _fail_permanently(record if record is not None else _edge_record(invocation, outcome), invocation)
            outcome = outcome_for(record)
    finally:
        for close in reversed(invocation.closers):
            with contextlib.suppress(Exception):  # closing must not hide the outcome
                close()
    if record is None:  # failed outside the run (logged above); a redelivery may help
        return outcome
    log_run_end(record)
    context = {"delivery_attempt": invocation.attempt} if invocation.attempt is not None else {}
    log_method = log.info if outcome.http_status < 400 else log.warning if not outcome.retry else log.error
    if record.get("status") == "failed_permanently":
        log_method = log.warning  # the one ERROR line for it is FAILED_PERMANENTLY_EVENT
    log_method(
        "invocation finished",
        run_id=record.get("run_id"),
        **context,
        **{k: v for k, v in outcome.body.items() if k != "run_id"},
    )
    return outcome


def _attempts_exhausted(invocation: _Invocation) -> bool:
    return invocation.attempt is not None and invocation.attempt >= invocation.settings.max_delivery_attempts


def _edge_record(invocation: _Invocation, outcome: InvocationOutcome) -> dict[str, Any]:
    """A run record for a failure outside the engine's run (it saved none): same keys as the engine's."""
    now = datetime.now(UTC)
    return {
        "run_id": new_run_id(Clock()),
        "activation": invocation.activation,
        "trigger": {"kind": invocation.trigger, "id": invocation.trigger_id},
        "trigger_id": invocation.trigger_id,
        "continuation_of": invocation.continuation_of,
        "started_at": now.isoformat(),
        "ended_at": now.isoformat(),
        "status": "failed",
        "retryable": True,
        "full": False,
        "endpoint": None,
        "mapping_version": None,
        "lease_token": None,
        "counts": {},
        "rejected_by_reason": {},
        "dropped_attributes_by_reason": {},
        "rejected_samples": [],
        "guards": [],
        "timings": {},
        "checkpoint": None,
        "source": {},
        # The activation may not even have loaded: no config to show.
        "config": {},
        "error": str(outcome.body.get("error") or "failed"),
    }


def _fail_permanently(record: dict[str, Any], invocation: _Invocation) -> dict[str, Any]:
    """Record the last attempt's run as ``failed_permanently`` so Pub/Sub stops redelivering it."""
    assert invocation.store is not None  # set before any attempt is counted
    assert invocation.attempt is not None
    maximum = invocation.settings.max_delivery_attempts
    record["status"] = "failed_permanently"
    # Not retryable any more: a late redelivery is answered as a duplicate of this run.
    record["retryable"] = False
    record["delivery"] = {"attempt": invocation.attempt, "max_attempts": maximum}
    record["error"] = (
        f"gave up after {invocation.attempt} deliveries of message {invocation.trigger_id} "
        f"(CEPSYNC_MAX_DELIVERY_ATTEMPTS={maximum}); last error: {record.get('error') or 'unknown'}"
    )
    invocation.store.save_run(record)
    log.error(
        FAILED_PERMANENTLY_EVENT,
        run_id=record["run_id"],
        delivery_attempt=invocation.attempt,
        max_delivery_attempts=maximum,
        error=record["error"],
    )
    return record


def _run(request: SyncRequest, invocation: _Invocation) -> dict[str, Any]:
    """Load the activation, check the continuation is still wanted, run once, hand over if needed."""
    settings = invocation.settings
    activations = load_activations(settings.activations_dir)
    activation = activations.get(request.activation)
    if activation is None:
        raise ConfigError(
            f"no activation named {request.activation!r} (known: {', '.join(sorted(activations)) or 'none'})",
            source=str(settings.activations_dir),
        )
    store = open_store(settings.state_url)
    invocation.closers.append(store.close)
    invocation.store = store
    invocation.activation = activation.name
    invocation.continuation_of = request.continuation_of
    if invocation.count_deliveries and invocation.trigger_id:
        attempt = store.record_delivery_attempt(activation.name, invocation.trigger_id, datetime.now(UTC))
        invocation.attempt = attempt
        if attempt > settings.max_delivery_attempts:
            # Acknowledged before as failed_permanently (an acknowledgement can be lost): never rerun it.
            previous = store.find_run_by_trigger(activation.name, invocation.trigger_id)
            log.warning("delivery after the attempts were exhausted: acknowledged, not run", delivery_attempt=attempt)
            return {
                "activation": activation.name,
                "status": "duplicate_trigger",
                "trigger_id": invocation.trigger_id,
                "duplicate_of": previous["run_id"] if previous is not None else None,
            }
    if request.continuation_of is not None and not _continuation_wanted(
        store, activation.name, request.continuation_of
    ):
        log.info("continuation of a pass that already ended: nothing to do", continuation_of=request.continuation_of)
        return {
            "activation": activation.name,
            "status": "continuation_stale",
            "trigger_id": invocation.trigger_id,
            "continuation_of": request.continuation_of,
        }
    # Credentials before the source: a missing secret is a config error before any read.
    client = build_client(activation, dict(invocation.environ))
    source = open_segment_source(activation, invocation.environ, invocation.closers)
    # The budget counts from the start of the invocation, not from the engine's start.
    elapsed = time.monotonic() - invocation.started
    options = RunOptions(
        trigger=invocation.trigger,
        trigger_id=invocation.trigger_id,
        full=request.full,
        lease_ttl_seconds=settings.lease_ttl_seconds,
        time_budget_seconds=max(settings.time_budget_seconds - elapsed, 0.0),
        budget_margin_seconds=settings.budget_margin_seconds,
        continuation_of=request.continuation_of,
        allow_guards=request.allow,
    )
    result = asyncio.run(Run(activation, source=source, store=store, client=client, options=options).execute())
    record = result.record
    if result.needs_continuation:
        _hand_over(record, request, settings, store)
    elif result.status == "duplicate_trigger":
        _finish_hand_over_of_duplicate(record, settings, store)
    return record


def open_segment_source(
    activation: Activation, environ: Mapping[str, str], closers: list[Callable[[], None]]
) -> Source:
    """The activation's source; a BigQuery source goes to the emulator when one is configured.

    Appends to ``closers`` what must be closed after the run.
    """
    source = open_source_from_env(activation, environ)
    closers.append(source.close)
    return source


# --- continuation hand-over -----------------------------------------------------------------


def _continuation_wanted(store: StateStore, activation: str, root_run_id: str) -> bool:
    """True while the activation's checkpoint still belongs to the pass ``root_run_id`` started.

    A continuation delivered twice, or published twice after a failed invocation, must not
    start a fresh pass (for a ``full_only`` activation that would resend every profile).
    """
    continuation = store.load_meta(activation).continuation
    return continuation is not None and continuation.get("run_id") == root_run_id


def handover_skip_reason(record: Mapping[str, Any], request: SyncRequest, topic: str | None) -> str | None:
    """Why an ``incomplete`` run must not publish a continuation, or None when it should.

    A continuation that acknowledged nothing within its budget would hand over to another
    that does the same (reading the segment alone takes the budget): stop the chain and say
    so; the next scheduled run resumes from the checkpoint. A root run always hands over once.
    """
    if topic is None:
        return "no CEPSYNC_CONTINUATION_TOPIC: the next scheduled run continues from the checkpoint"
    acknowledged = int((record.get("counts") or {}).get("acknowledged", 0))
    if request.continuation_of is not None and acknowledged == 0:
        return (
            "this continuation acknowledged no profile within its time budget; handing over again would loop. "
            "Raise CEPSYNC_TIME_BUDGET_SECONDS; the next scheduled run continues from the checkpoint"
        )
    return None


def _hand_over(record: dict[str, Any], request: SyncRequest, settings: Settings, store: StateStore) -> None:
    root = request.continuation_of or str(record["run_id"])
    skip = handover_skip_reason(record, request, settings.continuation_topic)
    if skip is not None or settings.continuation_topic is None:
        record["handover"] = {"skipped": skip}
        report = log.warning if settings.continuation_topic is None else log.error
        report("time budget reached, no continuation published", run_id=record["run_id"], reason=skip)
    else:
        message = SyncRequest(activation=str(record["activation"]), continuation_of=root, allow=request.allow)
        message_id = _publish_or_retry(settings.continuation_topic, message, record)
        record["handover"] = {"topic": settings.continuation_topic, "message_id": message_id, "continuation_of": root}
        log.info("continuation published", run_id=record["run_id"], message_id=message_id, continuation_of=root)
    # The engine saved the record already; save the hand-over with it, so a redelivery of this
    # event (answered as a duplicate) knows whether the hand-over happened.
    store.save_run(record)


def _finish_hand_over_of_duplicate(record: dict[str, Any], settings: Settings, store: StateStore) -> None:
    """A redelivered event whose run ended ``incomplete`` before its hand-over was recorded."""
    previous_id = record.get("duplicate_of")
    previous = store.get_run(str(previous_id)) if previous_id else None
    if previous is None or previous.get("status") != "incomplete" or "handover" in previous:
        return
    root = str(previous.get("continuation_of") or previous["run_id"])
    if settings.continuation_topic is None or not _continuation_wanted(store, str(previous["activation"]), root):
        return
    allow = tuple(str(name) for name in previous.get("allow") or ())
    message = SyncRequest(activation=str(previous["activation"]), continuation_of=root, allow=allow)
    message_id = _publish_or_retry(settings.continuation_topic, message, previous)
    previous["handover"] = {"topic": settings.continuation_topic, "message_id": message_id, "continuation_of": root}
    store.save_run(previous)
    record["handover"] = previous["handover"]
    log.info("continuation published for a redelivered event", run_id=previous["run_id"], message_id=message_id)


def _publish_or_retry(topic: str, message: SyncRequest, record: Mapping[str, Any]) -> str:
    try:
        return publish_continuation(topic, message)
    except Exception as error:
        # Without the hand-over the pass would stall until the next schedule: fail the
        # invocation so Pub/Sub redelivers it; the duplicate run publishes again.
        raise RetryableRunError(
            f"activation '{record['activation']}': run {record['run_id']} needs a continuation but publishing "
            f"to {topic} failed ({type(error).__name__})"
        ) from error


def publish_continuation(topic: str, message: SyncRequest, *, timeout: float = PUBLISH_TIMEOUT_SECONDS) -> str:
    """Publish ``message`` to ``topic`` (``projects/P/topics/T``) and return its message id.

    The client honours ``PUBSUB_EMULATOR_HOST``. Retries are bounded by ``timeout``: the
    library's default retries a publish for minutes, past the function's own deadline.
    """
    from google.api_core import exceptions as api_exceptions
    from google.api_core import retry as api_retry
    from google.cloud.pubsub_v1 import PublisherClient

    # The codes the Pub/Sub client library itself retries a publish on.
    retry = api_retry.Retry(
        predicate=api_retry.if_exception_type(
            api_exceptions.Aborted,
            api_exceptions.Cancelled,
            api_exceptions.DeadlineExceeded,
            api_exceptions.InternalServerError,
            api_exceptions.ResourceExhausted,
            api_exceptions.ServiceUnavailable,
            api_exceptions.Unknown,
        ),
        initial=0.2,
        maximum=5.0,
        multiplier=2.0,
        timeout=timeout,
    )
    publisher = PublisherClient()
    try:
        data = json.dumps(message.as_message(), separators=(",", ":")).encode()
        attributes = {"activation": message.activation}
        if message.continuation_of is not None:
            attributes["continuation_of"] = message.continuation_of
        future = publisher.publish(topic, data, retry=retry, timeout=timeout, **attributes)
        return str(future.result(timeout=timeout + 5.0))
    finally:
        with contextlib.suppress(Exception):  # nothing is pending once result() returned or failed
            publisher.stop()
        with contextlib.suppress(Exception):
            publisher.transport.close()
