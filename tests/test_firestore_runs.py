"""Whole runs with Firestore state at Batch's pace: the production path, on the emulator.

The unit-level store tests (tests/state/) prove the StateStore contract one call at a time;
these prove what a run does to Firestore when it sends at full speed: several requests in
flight, each one's mirror intents and each flush's fingerprints appended while the lease
renewal rewrites the lease. A design where every append rewrites one shared document fails
here (Firestore sustains about one write per second per document, and its server libraries
lock what a transaction reads), which is how the Cloud path once regressed unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sync.batch.client import BatchClient
from sync.batch.ratelimit import RateLimiterRegistry
from sync.config import Activation, Credentials
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.engine import Run, RunOptions, RunResult
from sync.sources.duckdb import DuckDBSource
from sync.state.firestore import FirestoreStateStore
from tests.support.engine_support import API_KEY, PROJECT_KEY, make_activation, people, person, write_segment

pytestmark = pytest.mark.emulator

MakeStore = Callable[..., FirestoreStateStore]


@pytest.fixture
def paced_simulator() -> Iterator[SimulatorThread]:
    # Batch's own limits: /update 300 profiles/s with a burst of 1,000.
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=True)) as running:
        yield running


def paced_client(activation: Activation) -> BatchClient:
    """The production client: real backoff, real pacing (a registry of its own per test)."""
    return BatchClient(
        activation.destination,
        Credentials(API_KEY, PROJECT_KEY),
        activation=activation.name,
        limiters=RateLimiterRegistry(),
    )


async def run_on(store: FirestoreStateStore, activation: Activation, **options: object) -> RunResult:
    source = DuckDBSource(activation.source, activation=activation.name)  # type: ignore[arg-type]
    try:
        run = Run(
            activation, source=source, store=store, client=paced_client(activation), options=RunOptions(**options)
        )
        return await run.execute()
    finally:
        source.close()


async def test_mirror_on_update_with_eight_requests_in_flight_and_a_renewing_lease(
    tmp_path: Path, paced_simulator: SimulatorThread, make_firestore_store: MakeStore
) -> None:
    rows = 3_000
    write_segment(tmp_path / "segment.duckdb", people(rows))
    activation = make_activation(
        tmp_path,
        paced_simulator.base_url,
        sync_mode="mirror",
        destination={"endpoint": "update", "concurrency": 8, "max_attempts": 6},
        journal={"flush_every_profiles": 200, "flush_every_seconds": 1},
        guards={"max_removed_percent": 100, "max_changed_percent": 100},
    )
    store = make_firestore_store()
    # A 12 s lease is renewed every 4 s while the requests' appends go on (a shorter one would cut
    # the rate-limit waits of 8 requests in flight: no request may outlive the lease).
    first = await run_on(store, activation, lease_ttl_seconds=12.0)
    assert first.record["status"] == "succeeded", first.record.get("error")
    assert first.record["counts"]["acknowledged"] == rows
    ops = first.record["state_ops"]
    assert ops["backend"] == "firestore"
    assert ops["contention_retries"] == 0
    assert ops["writes"] > 0
    assert len(store.load_fingerprints(activation.name)) == rows
    assert store.load_intents(activation.name) == set()

    # A delta: 10 % changed, 5 % left (mirror clears them), 5 % joined.
    changed = [person(n, points=n + 1) if n % 10 == 0 else person(n) for n in range(150, rows)]
    write_segment(tmp_path / "segment.duckdb", changed + people(150, start=rows))
    second = await run_on(store, activation, lease_ttl_seconds=12.0)
    assert second.record["status"] == "succeeded", second.record.get("error")
    counts = second.record["counts"]
    assert (counts["new"], counts["changed"], counts["removed"]) == (150, 285, 150)
    held = paced_simulator.simulator.profiles(PROJECT_KEY)
    segment = {row["customer_id"]: row["points"] for row in changed + people(150, start=rows)}
    assert {custom_id: attributes.get("points") for custom_id, attributes in held.items() if attributes} == segment
    assert set(store.load_fingerprints(activation.name)) == {f"c{n:05d}" for n in range(150, rows + 150)}
    assert store.load_intents(activation.name) == set()


async def test_a_huge_description_and_parameter_list_leave_a_record_that_fits_a_document(
    tmp_path: Path, paced_simulator: SimulatorThread, make_firestore_store: MakeStore
) -> None:
    # Every run copies the activation's config into its record; a Firestore document holds
    # at most 1 MiB. A 5 MB description is kept as its start, length and hash.
    write_segment(tmp_path / "segment.duckdb", people(20))
    description = "long story " * 500_000
    activation = make_activation(tmp_path, paced_simulator.base_url, description=description)
    store = make_firestore_store()
    result = await run_on(store, activation)
    assert result.record["status"] == "succeeded", result.record.get("error")
    stored = store.get_run(result.record["run_id"])
    assert stored is not None
    kept = stored["config"]["description"]
    assert kept.startswith("long story long story")
    assert f"cut: {len(description):,} characters, sha256 " in kept
    assert len(kept) < 1_200
    assert stored["counts"]["acknowledged"] == 20
