"""The official Pub/Sub emulator (Google Cloud CLI) for tests, with a small REST client.

The process handling (own process group, scratch gcloud config) is in ``gcloud_emulator``;
``gcloud beta emulators pubsub start`` lives in the beta track on this CLI release. The test
side talks to the emulator over its REST API with the standard library, so no
``PUBSUB_EMULATOR_HOST`` is ever set in the test process (it would silently redirect every
Pub/Sub client created later). The code under test gets the variable in its own process.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcloud_emulator import DEFAULT_PROJECT, EmulatorError, GcloudEmulator

__all__ = ["DEFAULT_PROJECT", "EmulatorError", "PubSubEmulator", "PulledMessage"]


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
