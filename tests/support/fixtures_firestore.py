"""Pytest plugin: Firestore emulator fixtures (load with ``pytest_plugins`` in the root conftest).

* ``firestore_emulator`` (session): one emulator on a free port, started on first use,
  stopped (whole process group) at session end. If it cannot start the session FAILS
  with the emulator's log tail: a missing emulator must never look like a green run.
* ``firestore_client`` (session): a real ``google.cloud.firestore.Client`` on it.
* ``firestore_prefix`` (function): a collection prefix unique to the test, so tests never
  see each other's documents without paying for a full reset.
* ``make_firestore_store`` (function): builds ``FirestoreStateStore`` instances on that
  prefix; ``new_client=True`` gives a separate client (a second "function instance").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from google.cloud import firestore

from sync.state.firestore import FirestoreStateStore
from tests.support.firestore_emulator import EmulatorError, FirestoreEmulator

_STARTUP_KEY = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def firestore_emulator(request: pytest.FixtureRequest) -> Iterator[FirestoreEmulator]:
    emulator = FirestoreEmulator()
    try:
        emulator.start()
    except EmulatorError as exc:
        pytest.fail(f"cannot start the Firestore emulator: {exc}", pytrace=False)
    assert emulator.startup_seconds is not None
    request.config.stash[_STARTUP_KEY] = emulator.startup_seconds
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def firestore_client(firestore_emulator: FirestoreEmulator) -> Iterator[firestore.Client]:
    client = firestore_emulator.client()
    try:
        yield client
    finally:
        client.close()  # type: ignore[no-untyped-call]  # google-cloud-firestore leaves it unannotated


@pytest.fixture
def firestore_prefix() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


@pytest.fixture
def make_firestore_store(
    firestore_emulator: FirestoreEmulator, firestore_client: firestore.Client, firestore_prefix: str
) -> Iterator[Callable[..., FirestoreStateStore]]:
    stores: list[FirestoreStateStore] = []

    def make(
        *, new_client: bool = False, target_shard_bytes: int = 700_000, contention_timeout: float = 60.0
    ) -> FirestoreStateStore:
        client = firestore_emulator.client() if new_client else firestore_client
        store = FirestoreStateStore(
            client,
            prefix=firestore_prefix,
            target_shard_bytes=target_shard_bytes,
            close_client=new_client,
            contention_timeout=contention_timeout,
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    seconds = config.stash.get(_STARTUP_KEY, None)
    if seconds is not None:
        terminalreporter.write_line(f"Firestore emulator started in {seconds:.2f}s")
