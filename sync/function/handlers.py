"""One invocation: parse what arrived, run once, hand over if needed, answer (see the package docstring).

:func:`handle_pubsub` and :func:`handle_http` are what ``main.py`` calls. A run's record gives
the answer (:func:`outcome_for`); an error raised outside the engine's run is classified by
its family (:func:`sync.record.status_of_error`, :func:`sync.record.is_retryable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus

from sync.config import Activation
from sync.config_file import load_activations
from sync.engine import Run
from sync.errors import ConfigError, RetryableRunError, SyncError
from sync.function.handover import continuation_wanted, finish_hand_over_of_duplicate, hand_over
from sync.function.messages import (
    MessageTooLarge,
    SyncRequest,
    TriggerHeaders,
    bounded_id,
    decode_pubsub_data,
    parse_json,
)
from sync.function.settings import Settings
from sync.function.trace import Headers, TraceContext, trace_from_headers
from sync.logs import bind_context, clear_context, get_logger
from sync.record import RETRY_HTTP_STATUS, RunRecord, RunStatus, http_status_of, is_retryable, status_of_error
from sync.runlog import log_run_end
from sync.runs import Clock, RunOptions, RunResult, new_run_id
from sync.runtime import build_client, open_differ, open_source, open_store
from sync.sources.base import Source
from sync.state.base import StateStore

log = get_logger("cepsync.function")

# The message of the one ERROR line logged when a message's attempts are exhausted: stable,
# documented in infra/README.md; log-based alerts match on it.
FAILED_PERMANENTLY_EVENT = "run_failed_permanently"
# Every status http_sync can answer with; docs/function.md lists each with its HTTP status.
ANSWERED_STATUSES = (
    RunStatus.SUCCEEDED,
    RunStatus.SUCCEEDED_WITH_REJECTIONS,
    RunStatus.DUPLICATE_TRIGGER,
    RunStatus.CONTINUATION_STALE,
    RunStatus.FAILED_PERMANENTLY,
    RunStatus.INCOMPLETE,
    RunStatus.BAD_REQUEST,
    RunStatus.SKIPPED_LEASE_HELD,
    RunStatus.ABORTED_BY_GUARD,
    RunStatus.CONFIG_ERROR,
    RunStatus.FAILED,
    RunStatus.AUTH_ERROR,
    RunStatus.PARTIAL,
)
# The record keys an answer's body carries.
_BODY_KEYS = ("run_id", "activation", "status", "trigger_id", "counts", "error", "duplicate_of", "handover")


@dataclass(frozen=True)
class InvocationOutcome:
    """What one invocation answers: an HTTP status, a JSON summary, and whether to retry."""

    http_status: int
    body: dict[str, object]
    retry: bool = False


@dataclass(frozen=True)
class Answer:
    """An invocation answered without a run: a delivery past its last attempt, a stale continuation."""

    activation: str
    status: RunStatus
    trigger_id: str | None
    duplicate_of: str | None = None
    continuation_of: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The answer's JSON form (the body of the invocation's answer)."""
        data: dict[str, object] = {"activation": self.activation, "status": self.status.value}
        data["trigger_id"] = self.trigger_id
        if self.status is RunStatus.DUPLICATE_TRIGGER:
            data["duplicate_of"] = self.duplicate_of
        if self.continuation_of is not None:
            data["continuation_of"] = self.continuation_of
        return data


def outcome_for(record: Mapping[str, object]) -> InvocationOutcome:
    """Map a run record (its JSON form) to the answer: only a failure the engine marked retryable is retried."""
    retry = RunStatus.of(record.get("status")) is RunStatus.FAILED and bool(record.get("retryable"))
    body = {key: record.get(key) for key in _BODY_KEYS if record.get(key) is not None}
    return InvocationOutcome(RETRY_HTTP_STATUS if retry else http_status_of(record.get("status")), body, retry)


def _refusal(status: RunStatus, error: ConfigError, *, http_status: int | None = None) -> InvocationOutcome:
    """The answer to a request refused before any run: never retried."""
    return InvocationOutcome(http_status or status.http_status, {"status": status.value, "error": str(error)})


def _refusal_status(error: ConfigError) -> int | None:
    """413 for a body over the size bound, else the status's own (400)."""
    return HTTPStatus.REQUEST_ENTITY_TOO_LARGE if isinstance(error, MessageTooLarge) else None


# --- the two triggers ---------------------------------------------------------------------------


def handle_pubsub(
    data: object, *, event_id: str, traceparent: str | None = None, environ: Mapping[str, str] | None = None
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
    trigger_id = bounded_id(event_id)
    _bind_context(TraceContext.from_traceparent(traceparent), environ, trigger="pubsub", trigger_id=trigger_id)
    try:
        request = SyncRequest.parse(decode_pubsub_data(data))
    except ConfigError as error:
        # A malformed message can never succeed: acknowledge it, with a reason in the logs.
        # Parsing comes before delivery counting (the activation is in the message), so a
        # message that raised here would be redelivered for as long as Pub/Sub keeps it.
        log.error("malformed message acknowledged, not retried", error=str(error), message_id=trigger_id)
        return _refusal(RunStatus.BAD_REQUEST, error, http_status=_refusal_status(error))
    except Exception as error:  # the same bytes fail the same way on every redelivery
        log.exception("unreadable message acknowledged, not retried", message_id=trigger_id)
        return _refusal(RunStatus.BAD_REQUEST, ConfigError(f"the message could not be read ({type(error).__name__})"))
    invocation = _Invocation(environ, "pubsub", trigger_id, started, count_deliveries=True)
    outcome = _invoke(request, invocation, http=False)
    if outcome.retry:
        raise RetryableRunError(
            f"activation '{request.activation}': {outcome.body.get('error') or 'failed'}; redelivery may succeed"
        )
    return outcome


def handle_http(
    method: str, body: object, headers: Headers, *, environ: Mapping[str, str] | None = None
) -> InvocationOutcome:
    """Run what an HTTP POST asks (same JSON as the Pub/Sub message); never raises for a run failure.

    Args:
        body: The raw body (``bytes``, at most :data:`MAX_MESSAGE_BYTES` + 1 of them is enough
            to tell it is too large), parsed here; or an already decoded JSON value.
    """
    started = time.monotonic()
    environ = os.environ if environ is None else environ
    trigger_id = TriggerHeaders.read(headers).trigger_id()
    _bind_context(trace_from_headers(headers), environ, trigger="http", trigger_id=trigger_id)
    if method != "POST":
        return InvocationOutcome(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"status": RunStatus.BAD_REQUEST.value, "error": 'use POST with {"activation": NAME}'},
        )
    try:
        data = parse_json(bytes(body), what="the request body") if isinstance(body, bytes | bytearray) else body
        request = SyncRequest.parse(data)
    except ConfigError as error:
        log.error("malformed request refused", error=str(error))
        return _refusal(RunStatus.BAD_REQUEST, error, http_status=_refusal_status(error))
    except Exception as error:  # a body nothing above foresaw: still the caller's to fix, never a 500 page
        log.exception("unreadable request refused")
        return _refusal(RunStatus.BAD_REQUEST, ConfigError(f"the request could not be read ({type(error).__name__})"))
    return _invoke(request, _Invocation(environ, "http", trigger_id, started), http=True)


def _bind_context(
    trace: TraceContext | None, environ: Mapping[str, str], *, trigger: str, trigger_id: str | None
) -> None:
    # Gunicorn reuses threads across requests: start every invocation from a clean context.
    clear_context()
    fields: dict[str, object] = {"trigger": trigger, "trigger_id": trigger_id}
    if trace is not None:
        fields.update(trace.log_fields(environ.get("GOOGLE_CLOUD_PROJECT") or None))
    bind_context(**fields)


# --- one invocation -----------------------------------------------------------------------------


@dataclass
class _Invocation:
    environ: Mapping[str, str]
    trigger: str
    trigger_id: str | None
    started: float
    count_deliveries: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Set once known: the settings, the store, the activation and this delivery's attempt number.
    settings: Settings | None = None
    store: StateStore | None = None
    activation: str | None = None
    continuation_of: str | None = None
    attempt: int | None = None

    @property
    def max_attempts(self) -> int:
        assert self.settings is not None
        return self.settings.max_delivery_attempts

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):  # closing must not hide the outcome
                close()


def _invoke(request: SyncRequest, invocation: _Invocation, *, http: bool) -> InvocationOutcome:
    bind_context(activation=request.activation)
    try:
        invocation.settings = Settings.from_env(invocation.environ, http=http)
    except ConfigError as error:
        log.error("configuration error: acknowledged, not retried", error=str(error))
        return _refusal(RunStatus.CONFIG_ERROR, error)
    try:
        record, outcome = _attempt(request, invocation)
    finally:
        invocation.close()
    if record is not None:  # None: failed outside the run (logged already)
        _log_end(record, outcome, invocation)
    return outcome


def _attempt(request: SyncRequest, invocation: _Invocation) -> tuple[RunRecord | Answer | None, InvocationOutcome]:
    """Run once; a last delivery that would be retried is recorded as failed_permanently instead."""
    record: RunRecord | Answer | None = None
    try:
        record = _run(request, invocation)
    except Exception as error:
        outcome = _outcome_of_error(error, request, invocation)
    else:
        outcome = outcome_for(record.to_dict())
    if outcome.retry and _attempts_exhausted(invocation):
        # The store is still open: the invocation closes it after this.
        run = record if isinstance(record, RunRecord) else _edge_record(invocation, outcome)
        record = _fail_permanently(run, invocation)
        outcome = outcome_for(record.to_dict())
    return record, outcome


def _outcome_of_error(error: Exception, request: SyncRequest, invocation: _Invocation) -> InvocationOutcome:
    """The answer to an error raised outside the engine's run, by its family.

    A config error is acknowledged; a transient error, or one we did not foresee (the state
    store unreachable, a client library failure), is retried: a redelivery is safe (lease,
    acknowledged-only commits).
    """
    status = status_of_error(error)
    if isinstance(error, IdempotencyKeyReused):
        log.error("idempotency key reused with another request: refused", error=str(error))
        return _refusal(RunStatus.BAD_REQUEST, error, http_status=HTTPStatus.UNPROCESSABLE_ENTITY)
    if isinstance(error, ConfigError):
        log.error("configuration error: acknowledged, not retried", error=str(error))
        return _refusal(status, error)
    retry = is_retryable(error)
    if isinstance(error, SyncError):
        log.error("invocation failed", error=str(error), delivery_attempt=invocation.attempt)
        text = str(error)
    else:
        log.exception("invocation failed unexpectedly", delivery_attempt=invocation.attempt)
        text = f"unexpected {type(error).__name__}"
    body: dict[str, object] = {"activation": request.activation, "status": status.value, "error": text}
    return InvocationOutcome(RETRY_HTTP_STATUS if retry else status.http_status, body, retry)


def _log_end(record: RunRecord | Answer, outcome: InvocationOutcome, invocation: _Invocation) -> None:
    if isinstance(record, RunRecord):  # an answer without a run writes no run-end line
        log_run_end(record.to_dict())
    context = {"delivery_attempt": invocation.attempt} if invocation.attempt is not None else {}
    log_method = log.info if outcome.http_status < 400 else log.warning if not outcome.retry else log.error
    if record.status is RunStatus.FAILED_PERMANENTLY:
        log_method = log.warning  # the one ERROR line for it is FAILED_PERMANENTLY_EVENT
    log_method(
        "invocation finished",
        run_id=record.run_id if isinstance(record, RunRecord) else None,
        **context,
        **{key: value for key, value in outcome.body.items() if key != "run_id"},
    )


def _attempts_exhausted(invocation: _Invocation) -> bool:
    return invocation.attempt is not None and invocation.attempt >= invocation.max_attempts


def _edge_record(invocation: _Invocation, outcome: InvocationOutcome) -> RunRecord:
    """A run record for a failure outside the engine's run (it saved none): the engine's record type."""
    now = datetime.now(UTC).isoformat()
    return RunRecord(
        run_id=new_run_id(Clock()),
        activation=invocation.activation or "",
        started_at=now,
        ended_at=now,
        # The activation may not even have loaded: no run type, mode or config to show.
        run_type=None,
        sync_mode=None,
        trigger={"kind": invocation.trigger, "id": invocation.trigger_id},
        trigger_id=invocation.trigger_id,
        continuation_of=invocation.continuation_of,
        status=RunStatus.FAILED,
        retryable=True,
        error=str(outcome.body.get("error") or "failed"),
    )


def _fail_permanently(run: RunRecord, invocation: _Invocation) -> RunRecord:
    """Record the last attempt's run as ``failed_permanently`` so Pub/Sub stops redelivering it."""
    assert invocation.store is not None  # set before any attempt is counted
    assert invocation.attempt is not None
    maximum = invocation.max_attempts
    run.status = RunStatus.FAILED_PERMANENTLY
    # Not retryable any more: a late redelivery is answered as a duplicate of this run.
    run.retryable = False
    run.extra["delivery"] = {"attempt": invocation.attempt, "max_attempts": maximum}
    run.error = (
        f"gave up after {invocation.attempt} deliveries of message {invocation.trigger_id} "
        f"(CEPSYNC_MAX_DELIVERY_ATTEMPTS={maximum}); last error: {run.error or 'unknown'}"
    )
    invocation.store.save_run(run.to_dict())
    log.error(
        FAILED_PERMANENTLY_EVENT,
        run_id=run.run_id,
        delivery_attempt=invocation.attempt,
        max_delivery_attempts=maximum,
        error=run.error,
    )
    return run


# --- the run ------------------------------------------------------------------------------------


def _run(request: SyncRequest, invocation: _Invocation) -> RunRecord | Answer:
    """Load the activation, check the delivery and the continuation are still wanted, run once, hand over."""
    assert invocation.settings is not None
    settings = invocation.settings
    activation = _load_activation(request, settings)
    store = _open_store(invocation, settings)
    invocation.activation = activation.name
    invocation.continuation_of = request.continuation_of
    _check_key_reuse(request, invocation, store)
    answer = _given_up_delivery(activation, invocation, store) or _stale_continuation(
        activation, request, invocation, store
    )
    if answer is not None:
        return answer
    result = _execute(activation, request, invocation, store)
    if result.needs_continuation:
        hand_over(result.run, request, settings, store)
    elif result.run.status is RunStatus.DUPLICATE_TRIGGER:
        finish_hand_over_of_duplicate(result.run, settings, store)
    return result.run


def _load_activation(request: SyncRequest, settings: Settings) -> Activation:
    activations = load_activations(settings.activations_dir)
    activation = activations.get(request.activation)
    if activation is None:
        raise ConfigError(
            f"no activation named {request.activation!r} (known: {', '.join(sorted(activations)) or 'none'})",
            source=str(settings.activations_dir),
        )
    return activation


def _open_store(invocation: _Invocation, settings: Settings) -> StateStore:
    """The state store, closed with the invocation."""
    store = open_store(settings.state_url)
    invocation.closers.append(store.close)
    invocation.store = store
    return store


class IdempotencyKeyReused(ConfigError):
    """An HTTP idempotency key sent again with another request (answered 422, never run)."""


def _check_key_reuse(request: SyncRequest, invocation: _Invocation, store: StateStore) -> None:
    """Bind an HTTP trigger's key to its request; a key that came with another request is refused.

    Raises:
        IdempotencyKeyReused: the key (``Idempotency-Key``, or Cloud Scheduler's job and slot)
            was first used with a request whose digest differs.
    """
    if invocation.trigger != "http" or not invocation.trigger_id:
        return
    digest = request.digest()
    if store.record_trigger_request(invocation.trigger_id, digest, datetime.now(UTC)) != digest:
        raise IdempotencyKeyReused(
            f"the idempotency key {invocation.trigger_id[:80]!r} was first sent with another request body: "
            "a key names one request; send a new Idempotency-Key for a different one"
        )


def _given_up_delivery(activation: Activation, invocation: _Invocation, store: StateStore) -> Answer | None:
    """Count this Pub/Sub delivery; past the last allowed one, the answer without running."""
    if not (invocation.count_deliveries and invocation.trigger_id):
        return None
    attempt = store.record_delivery_attempt(activation.name, invocation.trigger_id, datetime.now(UTC))
    invocation.attempt = attempt
    if attempt <= invocation.max_attempts:
        return None
    # Acknowledged before as failed_permanently (an acknowledgement can be lost): never rerun it.
    previous = store.find_run_by_trigger(activation.name, invocation.trigger_id)
    log.warning("delivery after the attempts were exhausted: acknowledged, not run", delivery_attempt=attempt)
    return Answer(
        activation.name,
        RunStatus.DUPLICATE_TRIGGER,
        invocation.trigger_id,
        duplicate_of=str(previous["run_id"]) if previous is not None else None,
    )


def _stale_continuation(
    activation: Activation, request: SyncRequest, invocation: _Invocation, store: StateStore
) -> Answer | None:
    """A continuation of a pass that already ended: the answer without running."""
    if request.continuation_of is None or continuation_wanted(store, activation.name, request.continuation_of):
        return None
    log.info("continuation of a pass that already ended: nothing to do", continuation_of=request.continuation_of)
    return Answer(
        activation.name, RunStatus.CONTINUATION_STALE, invocation.trigger_id, continuation_of=request.continuation_of
    )


def _execute(activation: Activation, request: SyncRequest, invocation: _Invocation, store: StateStore) -> RunResult:
    """The engine's run, with the time left of the invocation's budget."""
    assert invocation.settings is not None
    settings = invocation.settings
    # Credentials before the source: a missing secret is a config error before any read.
    client = build_client(activation, dict(invocation.environ))
    source = open_segment_source(activation, settings, invocation.closers)
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
        # An HTTP caller retries a request whose answer it did not get, or that failed: only
        # a success is final (docs/function.md, "Idempotency").
        rerun_unless_succeeded=invocation.trigger == "http",
    )
    differ = open_differ(activation, store, source, invocation.environ)
    invocation.closers.append(differ.close)
    run = Run(activation, source=source, store=store, client=client, differ=differ, options=options)
    return asyncio.run(run.execute())


def open_segment_source(activation: Activation, settings: Settings, closers: list[Callable[[], None]]) -> Source:
    """The activation's source; a BigQuery source goes to the emulator when one is configured.

    Appends to ``closers`` what must be closed after the run.
    """
    source = open_source(activation, bigquery_emulator=settings.bigquery_emulator, default_project=settings.project)
    closers.append(source.close)
    return source
