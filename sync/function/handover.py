"""The continuation hand-over: a run that used its time budget asks the next invocation to go on.

The engine stops launching batches ``CEPSYNC_BUDGET_MARGIN_SECONDS`` before the budget ends,
flushes, checkpoints and releases the lease; :func:`hand_over` then publishes
``{"activation": NAME, "continuation_of": ROOT_RUN_ID}`` to ``CEPSYNC_CONTINUATION_TOPIC`` and
the next invocation resumes from the checkpoint. A continuation whose pass has already ended
is a no-op (:func:`continuation_wanted`), and a continuation that made no progress does not
hand over again (:func:`handover_skip_reason`): a budget too small to send one batch would
otherwise loop forever. A publish that fails raises :class:`RetryableRunError`, so Pub/Sub
redelivers the event and its duplicate run publishes again
(:func:`finish_hand_over_of_duplicate`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

from sync.errors import RetryableRunError
from sync.function.messages import SyncRequest
from sync.function.settings import Settings
from sync.logs import get_logger
from sync.record import RunRecord, RunStatus
from sync.state.base import StateStore

log = get_logger("cepsync.function")

# A bounded wait for the continuation publish: past it the invocation fails and Pub/Sub
# redelivers the event, whose duplicate run then publishes the hand-over again.
PUBLISH_TIMEOUT_SECONDS = 30.0


def continuation_wanted(store: StateStore, activation: str, root_run_id: str) -> bool:
    """True while the activation's checkpoint still belongs to the pass ``root_run_id`` started.

    A continuation delivered twice, or published twice after a failed invocation, must not
    start a fresh pass (for a ``full_only`` activation that would resend every profile).
    """
    continuation = store.load_meta(activation).continuation
    return continuation is not None and continuation.get("run_id") == root_run_id


def handover_skip_reason(record: Mapping[str, object], request: SyncRequest, topic: str | None) -> str | None:
    """Why an ``incomplete`` run must not publish a continuation, or None when it should.

    A continuation that acknowledged nothing within its budget would hand over to another
    that does the same (reading the segment alone takes the budget): stop the chain and say
    so; the next scheduled run resumes from the checkpoint. A root run always hands over once.
    """
    if topic is None:
        return "no CEPSYNC_CONTINUATION_TOPIC: the next scheduled run continues from the checkpoint"
    counts = record.get("counts")
    acknowledged = counts.get("acknowledged", 0) if isinstance(counts, Mapping) else 0
    if request.continuation_of is not None and acknowledged == 0:
        return (
            "this continuation acknowledged no profile within its time budget; handing over again would loop. "
            "Raise CEPSYNC_TIME_BUDGET_SECONDS; the next scheduled run continues from the checkpoint"
        )
    return None


def hand_over(run: RunRecord, request: SyncRequest, settings: Settings, store: StateStore) -> None:
    """Publish the continuation of an ``incomplete`` run (or record why not) and save it in its record."""
    root = request.continuation_of or run.run_id
    topic = settings.continuation_topic
    skip = handover_skip_reason({"counts": run.counts}, request, topic)
    if skip is not None or topic is None:
        run.extra["handover"] = {"skipped": skip}
        report = log.warning if topic is None else log.error
        report("time budget reached, no continuation published", run_id=run.run_id, reason=skip)
    else:
        message = SyncRequest(activation=run.activation, continuation_of=root, allow=request.allow)
        message_id = _publish_or_retry(topic, message, run.activation, run.run_id)
        run.extra["handover"] = {"topic": topic, "message_id": message_id, "continuation_of": root}
        log.info("continuation published", run_id=run.run_id, message_id=message_id, continuation_of=root)
    # The engine saved the record already; save the hand-over with it, so a redelivery of this
    # event (answered as a duplicate) knows whether the hand-over happened.
    store.save_run(run.to_dict())


def finish_hand_over_of_duplicate(run: RunRecord, settings: Settings, store: StateStore) -> None:
    """A redelivered event whose run ended ``incomplete`` before its hand-over was recorded."""
    previous = store.get_run(run.duplicate_of) if run.duplicate_of else None
    if previous is None or previous.get("status") != RunStatus.INCOMPLETE or "handover" in previous:
        return
    root = str(previous.get("continuation_of") or previous["run_id"])
    topic = settings.continuation_topic
    if topic is None or not continuation_wanted(store, str(previous["activation"]), root):
        return
    allow = tuple(str(name) for name in previous.get("allow") or ())
    message = SyncRequest(activation=str(previous["activation"]), continuation_of=root, allow=allow)
    message_id = _publish_or_retry(topic, message, str(previous["activation"]), str(previous["run_id"]))
    previous["handover"] = {"topic": topic, "message_id": message_id, "continuation_of": root}
    store.save_run(previous)
    run.extra["handover"] = previous["handover"]
    log.info("continuation published for a redelivered event", run_id=previous["run_id"], message_id=message_id)


def _publish_or_retry(topic: str, message: SyncRequest, activation: str, run_id: str) -> str:
    try:
        return publish_continuation(topic, message)
    except Exception as error:
        # Without the hand-over the pass would stall until the next schedule: fail the
        # invocation so Pub/Sub redelivers it; the duplicate run publishes again.
        raise RetryableRunError(
            f"activation '{activation}': run {run_id} needs a continuation but publishing "
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
