"""The Cloud Function runtime: settings, message parsing, one run, continuation hand-over.

``main.py`` stays thin (functions-framework decorators only) and calls :func:`handle`.
Everything here is testable without the framework.

Retry policy: Pub/Sub retries an event when the function raises. We raise only when a
retry can help (an unexpected or transient failure). A bad config, a tripped guard,
refused credentials, a held lease or a duplicate delivery are answered and logged, not
retried: retrying them would only repeat the same answer until the message expires.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sync.config import Activation, load_activations
from sync.engine import Run, RunOptions, RunResult
from sync.errors import ConfigError, SyncError
from sync.runtime import build_client, open_source, open_store

log = structlog.get_logger("cepsync.function")


@dataclass(frozen=True)
class Settings:
    """Runtime settings from the environment, built once per invocation at the entry point."""

    activations_dir: Path
    state_url: str
    time_budget_seconds: float
    continuation_topic: str | None
    lease_ttl_seconds: float

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, *, http: bool = False) -> Settings:
        env = os.environ if environ is None else environ
        state = env.get("CEPSYNC_STATE", "firestore")
        if state == "firestore":
            project = env.get("GOOGLE_CLOUD_PROJECT", "")
            database = env.get("CEPSYNC_FIRESTORE_DATABASE", "(default)")
            prefix = env.get("CEPSYNC_FIRESTORE_PREFIX", "cepsync")
            state = f"firestore://{project}/{database}?prefix={prefix}"
        # An event-triggered function is killed at 540 s, an HTTP one at 3600 s.
        default_budget = "3300" if http else "480"
        try:
            budget = float(env.get("CEPSYNC_TIME_BUDGET_SECONDS", default_budget))
            ttl = float(env.get("CEPSYNC_LEASE_TTL_SECONDS", "180"))
        except ValueError as error:
            raise ConfigError(f"bad number in settings: {error}", field="CEPSYNC_TIME_BUDGET_SECONDS") from None
        default_dir = Path(__file__).resolve().parent.parent / "activations"
        return cls(
            activations_dir=Path(env.get("CEPSYNC_ACTIVATIONS_DIR", str(default_dir))),
            state_url=state,
            time_budget_seconds=budget,
            continuation_topic=env.get("CEPSYNC_CONTINUATION_TOPIC") or None,
            lease_ttl_seconds=ttl,
        )


@dataclass(frozen=True)
class SyncRequest:
    activation: str
    full: bool = False
    continuation_of: str | None = None

    @classmethod
    def parse(cls, data: Any) -> SyncRequest:
        if not isinstance(data, dict) or not isinstance(data.get("activation"), str):
            raise ConfigError('the message must be a JSON object like {"activation": "NAME", "full": false}')
        unknown = set(data) - {"activation", "full", "continuation_of"}
        if unknown:
            raise ConfigError(f"unknown key(s) in the message: {sorted(unknown)}")
        full = data.get("full", False)
        if not isinstance(full, bool):
            raise ConfigError("'full' must be true or false")
        continuation_of = data.get("continuation_of")
        return cls(data["activation"], full, continuation_of if isinstance(continuation_of, str) else None)


def decode_pubsub_data(envelope: Any) -> Any:
    """The JSON payload of a Pub/Sub CloudEvent body ``{"message": {"data": base64}}``."""
    try:
        raw = envelope["message"]["data"]
        return json.loads(base64.b64decode(raw, validate=True))
    except (KeyError, TypeError, binascii.Error, ValueError, UnicodeDecodeError):
        raise ConfigError("the Pub/Sub message data is not base64-encoded JSON") from None


class RetryableRunError(RuntimeError):
    """Raised to the framework so Pub/Sub redelivers the event (with its backoff)."""


def run_request(
    request: SyncRequest,
    *,
    settings: Settings,
    trigger: str,
    trigger_id: str | None,
    trace: str | None = None,
) -> RunResult:
    """Load the named activation, run it once under the time budget, hand over if needed."""
    activations = load_activations(settings.activations_dir)
    activation = activations.get(request.activation)
    if activation is None:
        raise ConfigError(
            f"no activation named {request.activation!r} in {settings.activations_dir} "
            f"(known: {', '.join(sorted(activations)) or 'none'})"
        )
    structlog.contextvars.bind_contextvars(activation=activation.name, trace=trace)
    options = RunOptions(
        trigger=trigger,
        trigger_id=trigger_id,
        full=request.full,
        lease_ttl_seconds=settings.lease_ttl_seconds,
        time_budget_seconds=settings.time_budget_seconds,
        continuation_of=request.continuation_of,
    )
    result = _run(activation, settings, options)
    if result.needs_continuation:
        publish_continuation(settings, activation, result)
    return result


def _run(activation: Activation, settings: Settings, options: RunOptions) -> RunResult:
    client = build_client(activation)
    source = open_source(activation)
    store = open_store(settings.state_url)
    try:
        return asyncio.run(Run(activation, source=source, store=store, client=client, options=options).execute())
    finally:
        source.close()
        store.close()


def publish_continuation(settings: Settings, activation: Activation, result: RunResult) -> None:
    """Ask for another invocation to finish the pass (the checkpoint is in state already)."""
    if settings.continuation_topic is None:
        log.warning("time budget reached and no CEPSYNC_CONTINUATION_TOPIC: the next scheduled run continues")
        return
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    message = {
        "activation": activation.name,
        "continuation_of": result.record.get("continuation_of") or result.record["run_id"],
    }
    future = publisher.publish(settings.continuation_topic, json.dumps(message).encode())
    message_id = future.result(timeout=30)
    result.record["continuation_message_id"] = message_id
    log.info("continuation published", topic=settings.continuation_topic, message_id=message_id)


def summarise(result: RunResult) -> dict[str, Any]:
    record = result.record
    return {
        "run_id": record["run_id"],
        "activation": record["activation"],
        "status": record["status"],
        "counts": record.get("counts", {}),
        "error": record.get("error"),
    }


def handle(
    payload: Any, *, trigger: str, trigger_id: str | None, trace: str | None = None, http: bool = False
) -> tuple[int, dict[str, Any]]:
    """Run what a message asks and say how it went as (HTTP-like status, summary).

    Raises :class:`RetryableRunError` only when a redelivery could succeed.
    """
    structlog.contextvars.clear_contextvars()
    try:
        settings = Settings.from_env(http=http)
        request = SyncRequest.parse(payload)
        result = run_request(request, settings=settings, trigger=trigger, trigger_id=trigger_id, trace=trace)
    except ConfigError as error:
        log.error("config error: not retried", error=str(error))
        return 422, {"status": "config_error", "error": str(error)}
    except SyncError as error:
        log.error("run failed", error=str(error))
        return 500, {"status": "failed", "error": str(error)}
    summary = summarise(result)
    log.info("run finished", **{key: summary[key] for key in ("run_id", "status", "counts")})
    if result.status == "failed" and result.record.get("retryable"):
        raise RetryableRunError(f"activation '{result.record['activation']}' failed, retry may help: {summary['error']}")
    status = {
        "skipped_lease_held": 409,
        "config_error": 422,
        "aborted_by_guard": 412,
        "auth_error": 401,
        "failed": 500,
    }.get(result.status, 200)
    return status, summary
