"""Cloud Function entry points (functions-framework). Thin: hand the request to sync.function.

Deploy with entry point ``pubsub_sync`` (event trigger on ``google.cloud.pubsub.topic.v1.messagePublished``:
Cloud Scheduler → Pub/Sub, and continuation messages) or ``http_sync`` (HTTP, e.g. Cloud
Scheduler with OIDC for the 60-minute limit). Both take ``{"activation": NAME, "full": false}``.
Settings, retry policy and the continuation hand-over are described in :mod:`sync.function`.
"""

from __future__ import annotations

from typing import Any

import functions_framework
from cloudevents.http import CloudEvent
from flask import Request

from sync.function import MAX_MESSAGE_BYTES, configure_runtime_logging, handle_http, handle_pubsub

configure_runtime_logging()


@functions_framework.cloud_event
def pubsub_sync(event: CloudEvent) -> None:
    """Pub/Sub ``messagePublished``: ``message.data`` is base64 JSON ``{"activation": NAME, "full": false}``.

    Returns normally (Pub/Sub acknowledges) unless a redelivery could help, in which case
    :class:`sync.function.RetryableRunError` propagates and the framework answers 500.
    """
    handle_pubsub(event.data, event_id=str(event["id"]), traceparent=event.get("traceparent"))


@functions_framework.http
def http_sync(request: Request) -> tuple[dict[str, Any], int]:
    """HTTP ``POST`` with the same JSON body; answers the run summary and a status code."""
    # The raw body, read up to one byte past the bound: sync.function parses it, bounded in
    # size and depth (Flask's own get_json would answer an HTML 500 to deeply nested JSON).
    outcome = handle_http(request.method, request.stream.read(MAX_MESSAGE_BYTES + 1), request.headers)
    return outcome.body, outcome.http_status
