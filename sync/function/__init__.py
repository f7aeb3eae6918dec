"""The Cloud Function runtime: settings, message parsing, one run, continuation hand-over.

``main.py`` stays thin (functions-framework decorators only) and calls :func:`handle_pubsub`
or :func:`handle_http`. Everything here runs without the framework, so it is tested directly.

Modules:

* :mod:`~sync.function.settings`: the environment, as a pydantic-settings model (:class:`Settings`);
* :mod:`~sync.function.messages`: the request, the Pub/Sub envelope, the HTTP trigger headers;
* :mod:`~sync.function.trace`: the trace context of the log lines (W3C and Cloud Trace headers);
* :mod:`~sync.function.handover`: the continuation published to the next invocation;
* :mod:`~sync.function.handlers`: one invocation, from what arrived to the answer.

Answers: a run's status (:class:`sync.record.RunStatus`) carries its HTTP status; a failure
the engine marked retryable answers 503. An error raised outside the engine's run is
classified by its family (:mod:`sync.errors`): a config error is acknowledged, a transient or
unforeseen one is retried.

Triggers and idempotency:

* **Pub/Sub** (``google.cloud.pubsub.topic.v1.messagePublished``): the CloudEvent id is the
  Pub/Sub message id and stays the same on every redelivery, so it is the run's idempotency
  key (``RunOptions.trigger_id``): the engine answers ``duplicate_trigger`` to a second delivery
  of a message whose run finished, and commits nothing.
* **HTTP** (manual, or Cloud Scheduler with OIDC for the 60-minute limit): Cloud Scheduler
  sends ``X-CloudScheduler-JobName`` and ``X-CloudScheduler-ScheduleTime``, identical on each
  retry of one scheduled slot, so they make the key; a caller may send ``Idempotency-Key``.
  A request with a key runs again unless the key's earlier run succeeded
  (``RunOptions.rerun_unless_succeeded``), and the key is bound to the request's digest
  (:meth:`sync.state.base.StateStore.record_trigger_request`): another body is a 422. Long or
  unprintable keys are hashed whole (:func:`~sync.function.messages.bounded_id`).

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
of the invocation), flushes, checkpoints and releases the lease; :mod:`~sync.function.handover` publishes a
continuation message ``{"activation": NAME, "continuation_of": ROOT_RUN_ID}`` to
``CEPSYNC_CONTINUATION_TOPIC`` and the next invocation resumes from the checkpoint. A
continuation whose pass has already ended is a no-op, and a continuation that made no progress
does not hand over again (a budget too small to send one batch would otherwise loop forever).

Secrets: the Batch keys come from environment variables (Secret Manager mounts them); they are
read only by :func:`sync.runtime.build_client`, which registers them with the redactor (:mod:`sync.redact`).
Nothing here logs a value read from the environment other than settings.
"""

from __future__ import annotations

from sync.bigquery_clients import BigQueryEmulatorEndpoints
from sync.errors import RetryableRunError
from sync.function.handlers import (
    ANSWERED_STATUSES,
    FAILED_PERMANENTLY_EVENT,
    InvocationOutcome,
    handle_http,
    handle_pubsub,
    open_segment_source,
    outcome_for,
)
from sync.function.handover import PUBLISH_TIMEOUT_SECONDS, handover_skip_reason, publish_continuation
from sync.function.messages import (
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    PubSubEnvelope,
    SyncRequest,
    TriggerHeaders,
    decode_pubsub_data,
    http_trigger_id,
    parse_json,
)
from sync.function.settings import (
    DEFAULT_BUDGET_MARGIN_SECONDS,
    DEFAULT_EVENT_BUDGET_SECONDS,
    DEFAULT_HTTP_BUDGET_SECONDS,
    DEFAULT_LEASE_TTL_SECONDS,
    DEFAULT_MAX_DELIVERY_ATTEMPTS,
    Settings,
    configure_runtime_logging,
)
from sync.function.trace import Headers, TraceContext, trace_from_headers

__all__ = [
    "ANSWERED_STATUSES",
    "DEFAULT_BUDGET_MARGIN_SECONDS",
    "DEFAULT_EVENT_BUDGET_SECONDS",
    "DEFAULT_HTTP_BUDGET_SECONDS",
    "DEFAULT_LEASE_TTL_SECONDS",
    "DEFAULT_MAX_DELIVERY_ATTEMPTS",
    "FAILED_PERMANENTLY_EVENT",
    "MAX_MESSAGE_BYTES",
    "PUBLISH_TIMEOUT_SECONDS",
    "BigQueryEmulatorEndpoints",
    "Headers",
    "InvocationOutcome",
    "MessageTooLarge",
    "PubSubEnvelope",
    "RetryableRunError",
    "Settings",
    "SyncRequest",
    "TraceContext",
    "TriggerHeaders",
    "configure_runtime_logging",
    "decode_pubsub_data",
    "handle_http",
    "handle_pubsub",
    "handover_skip_reason",
    "http_trigger_id",
    "open_segment_source",
    "outcome_for",
    "parse_json",
    "publish_continuation",
    "trace_from_headers",
]
