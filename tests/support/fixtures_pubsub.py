"""Pytest plugin: Pub/Sub emulator fixtures (load with ``pytest_plugins`` in the root conftest).

* ``pubsub_emulator`` (session): one emulator on a free port, started on first use, stopped
  (whole process group) at session end. If it cannot start the session FAILS with the
  emulator's log tail: a missing emulator must never look like a green run.
* ``pubsub_channel`` (function): a fresh topic and a pull subscription on it, unique to the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.pubsub_emulator import EmulatorError, PubSubEmulator

_STARTUP_KEY = pytest.StashKey[float]()


@dataclass(frozen=True)
class PubSubChannel:
    """A topic and one pull subscription on it (both as full resource paths)."""

    emulator: PubSubEmulator
    topic: str
    subscription: str


@pytest.fixture(scope="session")
def pubsub_emulator(request: pytest.FixtureRequest) -> Iterator[PubSubEmulator]:
    emulator = PubSubEmulator()
    try:
        emulator.start()
    except EmulatorError as exc:
        pytest.fail(f"cannot start the Pub/Sub emulator: {exc}", pytrace=False)
    assert emulator.startup_seconds is not None
    request.config.stash[_STARTUP_KEY] = emulator.startup_seconds
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def pubsub_channel(pubsub_emulator: PubSubEmulator) -> PubSubChannel:
    suffix = uuid.uuid4().hex[:12]
    topic = pubsub_emulator.create_topic(f"cepsync-{suffix}")
    subscription = pubsub_emulator.create_subscription(f"cepsync-{suffix}-pull", topic)
    return PubSubChannel(pubsub_emulator, topic, subscription)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    seconds = config.stash.get(_STARTUP_KEY, None)
    if seconds is not None:
        terminalreporter.write_line(f"Pub/Sub emulator started in {seconds:.2f}s")
