"""The official Pub/Sub emulator (Google Cloud CLI) for tests, with a small REST client.

The process handling (own process group, scratch gcloud config) is in ``gcloud_emulator``;
``gcloud beta emulators pubsub start`` lives in the beta track on this CLI release. The test
side talks to the emulator over its REST API with the standard library, so no
``PUBSUB_EMULATOR_HOST`` is ever set in the test process (it would silently redirect every
Pub/Sub client created later). The code under test gets the variable in its own process.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.gcloud_emulator import DEFAULT_PROJECT, EmulatorError, GcloudEmulator

__all__ = ["DEFAULT_PROJECT", "Delivery", "EmulatorError", "EventarcRelay", "PubSubEmulator", "PulledMessage"]


@dataclass(frozen=True)
class PulledMessage:
    """One message pulled from a subscription."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: dict[str, str]
    publish_time: str

    def json(self) -> Any:
        return json.loads(self.data)

    def push_body(self, subscription: str) -> dict[str, Any]:
        """The body Eventarc/Pub/Sub push delivers for this message (a CloudEvent's ``data``)."""
        return {
            "message": {
                "data": base64.b64encode(self.data).decode(),
                "attributes": self.attributes,
                "messageId": self.message_id,
                "message_id": self.message_id,
                "publishTime": self.publish_time,
                "publish_time": self.publish_time,
            },
            "subscription": subscription,
        }


class PubSubEmulator(GcloudEmulator):
    """One Pub/Sub emulator process group on 127.0.0.1, with a small REST client."""

    label = "Pub/Sub"
    host_variable = "PUBSUB_EMULATOR_HOST"

    def command(self, gcloud: str, workdir: Path) -> list[str]:
        data = workdir / "data"
        data.mkdir(exist_ok=True)  # gcloud writes env.yaml there and does not create it
        return [
            gcloud,
            "beta",
            "emulators",
            "pubsub",
            "start",
            f"--host-port={self.host}",
            f"--project={self.project}",
            f"--data-dir={data}",
        ]

    # -- REST API ----------------------------------------------------------------------------

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        return f"projects/{self.project}/subscriptions/{subscription}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"http://{self.host}/v1/{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - 127.0.0.1
                text = response.read()
        except urllib.error.HTTPError as error:
            raise EmulatorError(f"{method} {path} answered HTTP {error.code}: {error.read()[:500]!r}") from None
        except OSError as error:
            raise EmulatorError(f"{method} {path} failed: {error}\n{self.log_tail()}") from None
        result: dict[str, Any] = json.loads(text) if text.strip() else {}
        return result

    def create_topic(self, topic: str) -> str:
        """Create a topic; return its path ``projects/P/topics/T``."""
        path = self.topic_path(topic)
        self._call("PUT", path, {})
        return path

    def create_subscription(self, subscription: str, topic: str, *, ack_deadline_seconds: int = 10) -> str:
        """Create a pull subscription on ``topic`` (a name or a path); return its path."""
        topic_path = topic if topic.startswith("projects/") else self.topic_path(topic)
        path = self.subscription_path(subscription)
        self._call("PUT", path, {"topic": topic_path, "ackDeadlineSeconds": ack_deadline_seconds})
        return path

    def create_push_subscription(
        self,
        subscription: str,
        topic: str,
        endpoint: str,
        *,
        ack_deadline_seconds: int = 60,
        minimum_backoff: str = "1s",
        maximum_backoff: str = "2s",
    ) -> str:
        """A push subscription, as Eventarc creates for a function, with a short retry backoff.

        The emulator pushes until the endpoint answers 2xx, waiting ``minimum_backoff`` doubling
        up to ``maximum_backoff`` between attempts (Eventarc's own: 10 s to 600 s). A push that
        takes longer than ``ack_deadline_seconds`` counts as failed.
        """
        topic_path = topic if topic.startswith("projects/") else self.topic_path(topic)
        path = self.subscription_path(subscription)
        self._call(
            "PUT",
            path,
            {
                "topic": topic_path,
                "ackDeadlineSeconds": ack_deadline_seconds,
                "pushConfig": {"pushEndpoint": endpoint},
                "retryPolicy": {"minimumBackoff": minimum_backoff, "maximumBackoff": maximum_backoff},
            },
        )
        return path

    def delete_subscription(self, subscription: str) -> None:
        path = subscription if subscription.startswith("projects/") else self.subscription_path(subscription)
        self._call("DELETE", path)

    def publish(self, topic: str, data: bytes, attributes: dict[str, str] | None = None) -> str:
        """Publish one message; return its message id."""
        topic_path = topic if topic.startswith("projects/") else self.topic_path(topic)
        message: dict[str, Any] = {"data": base64.b64encode(data).decode()}
        if attributes:
            message["attributes"] = attributes
        answer = self._call("POST", f"{topic_path}:publish", {"messages": [message]})
        return str(answer["messageIds"][0])

    def pull(self, subscription: str, *, max_messages: int = 10, timeout: float = 10.0) -> list[PulledMessage]:
        """Pull up to ``max_messages``, waiting at most ``timeout`` seconds for the first one.

        Returns an empty list if nothing arrived in time (the caller decides whether that fails).
        """
        path = subscription if subscription.startswith("projects/") else self.subscription_path(subscription)
        deadline = time.monotonic() + timeout
        while True:
            answer = self._call("POST", f"{path}:pull", {"maxMessages": max_messages, "returnImmediately": True})
            received = answer.get("receivedMessages") or []
            if received or time.monotonic() > deadline:
                return [
                    PulledMessage(
                        ack_id=item["ackId"],
                        message_id=item["message"]["messageId"],
                        data=base64.b64decode(item["message"].get("data", "")),
                        attributes=dict(item["message"].get("attributes") or {}),
                        publish_time=item["message"].get("publishTime", ""),
                    )
                    for item in received
                ]
            time.sleep(0.1)

    def acknowledge(self, subscription: str, ack_ids: list[str]) -> None:
        path = subscription if subscription.startswith("projects/") else self.subscription_path(subscription)
        self._call("POST", f"{path}:acknowledge", {"ackIds": ack_ids})


@dataclass(frozen=True)
class Delivery:
    """One push the relay forwarded: which message, the function's answer, when (monotonic)."""

    message_id: str
    status: int
    at: float


class EventarcRelay:
    """What Eventarc does between a Pub/Sub push subscription and a CloudEvent function.

    The emulator pushes the classic JSON body (``{"message": {...}, "subscription": ...}``);
    functions-framework's CloudEvent signature wants a CloudEvent. The relay, a real HTTP
    server on 127.0.0.1, forwards each push in binary mode (``ce-id`` = the message id,
    ``ce-type`` = ``google.cloud.pubsub.topic.v1.messagePublished``, the push body as data) and
    answers the emulator with the function's own status, so a 2xx acknowledges and anything
    else makes Pub/Sub redeliver. Every delivery is recorded.
    """

    def __init__(self, target_url: str, *, timeout: float = 300.0) -> None:
        self.target_url = target_url
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                message_id = str(json.loads(body)["message"]["messageId"])
                headers = {
                    "Content-Type": "application/json",
                    "ce-id": message_id,
                    "ce-specversion": "1.0",
                    "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
                    "ce-source": "//pubsub.googleapis.com/projects/test-proj/topics/relay",
                }
                request = urllib.request.Request(relay.target_url, data=body, method="POST", headers=headers)  # noqa: S310
                try:
                    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - 127.0.0.1
                        status = answer.status
                except urllib.error.HTTPError as error:
                    status = error.code
                except OSError:
                    status = 502
                with relay._lock:
                    relay.deliveries.append(Delivery(message_id, status, time.monotonic()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="eventarc-relay", daemon=True)
        self._thread.start()

    def wait_for_acknowledgement(self, message_id: str, *, timeout: float) -> list[Delivery]:
        """Wait until the function answered 2xx to ``message_id``; return its deliveries so far."""
        deadline = time.monotonic() + timeout
        while True:
            mine = self.deliveries_of(message_id)
            if any(200 <= delivery.status < 300 for delivery in mine):
                return mine
            if time.monotonic() > deadline:
                raise AssertionError(f"message {message_id} not acknowledged within {timeout:.0f}s: {mine}")
            time.sleep(0.05)

    def deliveries_of(self, message_id: str) -> list[Delivery]:
        with self._lock:
            return [delivery for delivery in self.deliveries if delivery.message_id == message_id]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
