"""Cloud Function entry points (functions-framework). Thin: parse, then call sync.function.

Deploy with entry point ``pubsub_sync`` (Pub/Sub / Cloud Scheduler, event trigger) or
``http_sync`` (HTTP, e.g. Cloud Scheduler with OIDC for the 60-minute limit).
"""

from __future__ import annotations

import os
from typing import Any

import functions_framework
from cloudevents.http import CloudEvent
from flask import Request

from sync.errors import ConfigError
from sync.function import decode_pubsub_data, handle
from sync.logs import configure_logging

configure_logging(json=True, level=os.environ.get("CEPSYNC_LOG_LEVEL", "info"))


def _trace(header: str | None) -> str | None:
    # X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=1 → projects/PROJECT/traces/TRACE_ID
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not header or not project:
        return None
    return f"projects/{project}/traces/{header.split('/')[0]}"


@functions_framework.cloud_event
def pubsub_sync(event: CloudEvent) -> None:
    """Pub/Sub ``messagePublished``: data is base64 JSON ``{"activation": NAME, "full": false}``."""
    try:
        payload: Any = decode_pubsub_data(event.data)
    except ConfigError as error:
        # A malformed message can never succeed: log it and acknowledge (no retry storm).
        handle({"error": str(error)}, trigger="pubsub", trigger_id=event["id"])
        return
    handle(payload, trigger="pubsub", trigger_id=event["id"], trace=_trace(event.get("traceparent")))


@functions_framework.http
def http_sync(request: Request) -> tuple[dict[str, Any], int]:
    """HTTP POST with the same JSON body; answers the run summary."""
    if request.method != "POST":
        return {"error": "use POST with a JSON body"}, 405
    payload = request.get_json(silent=True)
    status, body = handle(
        payload,
        trigger="http",
        trigger_id=request.headers.get("X-Request-Id"),
        trace=_trace(request.headers.get("X-Cloud-Trace-Context")),
        http=True,
    )
    return body, status
