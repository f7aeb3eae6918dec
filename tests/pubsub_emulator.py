"""Start, use and stop the official Pub/Sub emulator (Google Cloud CLI) for tests.

Why it is done this way (ARCHITECTURE.md §7, the same quirks as the Firestore emulator):

* ``gcloud beta emulators pubsub start`` (the command lives in the beta track on this CLI
  release) is a Python wrapper that runs a Java server. Killing the wrapper leaves the Java
  child alive and holding the port, so the emulator is started with ``start_new_session=True``
  (``setsid``) and stopped by signalling the whole process group.
* A scratch ``CLOUDSDK_CONFIG`` keeps the run away from the user's gcloud configuration, and
  ``CLOUDSDK_CORE_DISABLE_PROMPTS=1`` makes sure nothing waits for a keyboard.
* The test side talks to the emulator over its REST API with the standard library, so no
  ``PUBSUB_EMULATOR_HOST`` is ever set in the test process (it would silently redirect every
  Pub/Sub client created later). The code under test gets the variable in its own process.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

DEFAULT_PROJECT: Final = "test-proj"
_LOG_TAIL_BYTES: Final = 4000


class EmulatorError(RuntimeError):
    """The emulator could not start or refused a request (the message carries its log tail)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


class PubSubEmulator:
    """One Pub/Sub emulator process group on 127.0.0.1, with a small REST client.

    Args:
        project: The project id the emulator serves (any string works).
        start_timeout: Seconds to wait for the emulator to answer before giving up.
    """

    def __init__(self, project: str = DEFAULT_PROJECT, *, start_timeout: float = 60.0) -> None:
        self.project = project
        self.start_timeout = start_timeout
        self.port = 0
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the value for ``PUBSUB_EMULATOR_HOST``."""
        return f"127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        """The last few KB of the emulator's combined stdout/stderr."""
        if self._log_path is None or not self._log_path.exists():
            return "(no emulator log)"
        return self._log_path.read_bytes()[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the emulator and wait until it answers.

        Raises:
            EmulatorError: gcloud is missing, the process exited, or it did not answer
                within ``start_timeout`` (the process group is stopped first).
        """
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise EmulatorError("the Google Cloud CLI ('gcloud') is not on PATH; it ships the Pub/Sub emulator")
        self._workdir = Path(tempfile.mkdtemp(prefix="cepsync-pubsub-emulator-"))
        self._log_path = self._workdir / "emulator.log"
        config_dir = self._workdir / "gcloud-config"
        config_dir.mkdir()
        (self._workdir / "data").mkdir()  # gcloud writes env.yaml there and does not create it
        env = dict(os.environ)
        env.update(CLOUDSDK_CONFIG=str(config_dir), CLOUDSDK_CORE_DISABLE_PROMPTS="1")
        env.pop("PUBSUB_EMULATOR_HOST", None)
        self.port = _free_port()
        started = time.monotonic()
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    gcloud,
                    "beta",
                    "emulators",
                    "pubsub",
                    "start",
                    f"--host-port={self.host}",
                    f"--project={self.project}",
                    f"--data-dir={self._workdir / 'data'}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._workdir,
                start_new_session=True,  # own process group: stop() must reach the Java child
            )
        # Registered now, so an interpreter exit still stops the Java server.
        atexit.register(self.stop)
        deadline = started + self.start_timeout
        while True:
            if self._process.poll() is not None:
                code, tail = self._process.returncode, self.log_tail()
                self.stop()
                raise EmulatorError(f"Pub/Sub emulator exited with code {code} before answering:\n{tail}")
            if self._answers():
                self.startup_seconds = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise EmulatorError(
                    f"Pub/Sub emulator did not answer on {self.host} within {self.start_timeout:.0f}s:\n{tail}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the whole process group (gcloud and its Java child); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            # The leader is gone; make sure no straggler (the Java server) keeps the port.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        atexit.unregister(self.stop)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._log_path = None

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
