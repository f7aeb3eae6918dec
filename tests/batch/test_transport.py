"""The transport the profile and audience clients share: one retry loop, one outage count, one registry.

Against the real simulator (sync/dev/simulator.py) on 127.0.0.1 and a port nothing listens
on; time is faked only where the transport lets it be injected (backoff sleep, jitter, the
deadline clock, the limiter clock).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import structlog

from sync.batch.audiences import BUDGET, BURST_IDS, IDS_PER_SECOND, AudienceCallFailed, AudienceClient
from sync.batch.client import BatchClient
from sync.batch.endpoint import Endpoint
from sync.batch.ratelimit import RATE_HEADROOM, RateLimiterRegistry
from sync.batch.transport import RATE_LIMITED_ATTEMPTS_FACTOR, UNREACHABLE_AFTER_ATTEMPTS
from sync.config import Credentials
from sync.dev.simulator import BatchSimulator
from sync.errors import BatchAuthError, BatchUnreachable
from tests.batch.test_client import (
    API_KEY,
    API_KEY_ENV,
    PROJECT_KEY,
    PROJECT_KEY_ENV,
    FakeTime,
    destination,
    make_client,
    profiles,
)

AUDIENCE = "vip_members"
WRONG_KEY = "wrong-key-SECRET-abcdefghijkl"


async def _simulator(*, rate_limit: bool) -> AsyncIterator[tuple[BatchSimulator, str]]:
    sim = BatchSimulator(credentials={PROJECT_KEY: API_KEY}, rate_limit=rate_limit)
    base_url = await sim.start()
    yield sim, base_url
    await sim.stop()


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[BatchSimulator, str]]:
    async for running in _simulator(rate_limit=True):
        yield running


@pytest.fixture
async def unpaced_simulator() -> AsyncIterator[tuple[BatchSimulator, str]]:
    """A simulator that never answers 429: the client's own pacing runs on a fake clock here."""
    async for running in _simulator(rate_limit=False):
        yield running


async def test_an_audience_call_is_retried_with_the_profile_calls_backoff(
    simulator: tuple[BatchSimulator, str],
) -> None:
    sim, base_url = simulator
    sim.audiences.faults.update({"fail_next": 2, "fail_status": 503})
    time = FakeTime()
    client = make_client(base_url, time=time)
    async with client:
        api = AudienceClient(client.transport, AUDIENCE)
        with structlog.testing.capture_logs() as logs:
            token = await api.create("VIP members", deadline=None)
        view = await api.view(token, deadline=None)

    assert token is not None
    assert view is not None
    assert view.name == AUDIENCE
    # Full jitter at 0.5: half of 1 s, then half of 2 s; the same backoff as a profile request.
    assert time.sleeps == [0.5, 1.0]
    retries = [entry for entry in logs if entry["event"] == "batch_audience_retry"]
    assert [(entry["action"], entry["status"], entry["attempt"]) for entry in retries] == [
        ("create", 503, 1),
        ("create", 503, 2),
    ]
    assert retries[0]["problem"].startswith("HTTP 503 (MAINTENANCE_ERROR")
    assert (api.stats.calls, api.stats.attempts, api.stats.rate_limited) == (2, 4, 0)
    assert api.stats.wait_seconds == pytest.approx(1.5)


async def test_an_audience_call_out_of_attempts_says_which_call_and_why(
    simulator: tuple[BatchSimulator, str],
) -> None:
    sim, base_url = simulator
    client = make_client(base_url, max_attempts=3)
    async with client:
        api = AudienceClient(client.transport, AUDIENCE)
        sim.audiences.faults.update({"fail_next": 3, "fail_status": 503})
        with pytest.raises(AudienceCallFailed) as failed:
            await api.view(deadline=None)
        assert str(failed.value).startswith(
            f"audience view of {AUDIENCE!r}: 3 attempts failed (last: HTTP 503 (MAINTENANCE_ERROR"
        )
        # 429s spend their own, larger budget, as for profiles.
        limit = RATE_LIMITED_ATTEMPTS_FACTOR * 3
        sim.audiences.faults.update({"fail_next": limit, "fail_status": 429})
        with pytest.raises(AudienceCallFailed) as limited:
            await api.view(deadline=None)
        assert str(limited.value).startswith(
            f"audience view of {AUDIENCE!r}: rate limited {limit} times (last: HTTP 429"
        )
    assert (api.stats.calls, api.stats.attempts, api.stats.rate_limited) == (2, 3 + limit, limit)


async def test_an_audience_call_gives_up_at_the_deadline_before_a_backoff(
    simulator: tuple[BatchSimulator, str],
) -> None:
    sim, base_url = simulator
    time = FakeTime()
    sim.audiences.faults.update({"fail_next": 1, "fail_status": 500})
    client = make_client(base_url, time=time, random=lambda: 1.0)
    async with client:
        api = AudienceClient(client.transport, AUDIENCE)
        with pytest.raises(AudienceCallFailed) as failed:
            await api.view(deadline=time.now + 0.5)  # the 1 s backoff would end after it
    assert str(failed.value) == (
        f"audience view of {AUDIENCE!r}: deadline reached after 1 attempt(s), no time left for a 1.00 s backoff "
        "(last: HTTP 500 (SERVER_ERROR: Unexpected error))"
    )
    assert time.sleeps == []


async def test_profile_and_audience_calls_count_one_outage_together(unused_tcp_port: int) -> None:
    """Connect failures of any call of the activation add up: the run stops after five, whoever made them."""
    client = make_client(f"http://127.0.0.1:{unused_tcp_port}", max_attempts=3)
    async with client:
        outcome = await client.send(Endpoint.UPDATE, profiles(1))
        assert outcome.failed == ["user-0"]
        api = AudienceClient(client.transport, AUDIENCE)
        with pytest.raises(BatchUnreachable) as stopped:
            await api.view(deadline=None)
    # Three failed profile attempts, then the audience view's second attempt is the fifth in a row.
    assert outcome.attempts == 3
    assert api.stats.attempts == UNREACHABLE_AFTER_ATTEMPTS - 3
    assert f"{UNREACHABLE_AFTER_ATTEMPTS} attempts in a row could not connect" in str(stopped.value)
    assert "audiences/view?name=vip_members" in str(stopped.value)


async def test_audience_updates_take_ids_from_the_clients_registry_shared_by_activations(
    unpaced_simulator: tuple[BatchSimulator, str],
) -> None:
    _, base_url = unpaced_simulator
    time = FakeTime()
    registry = RateLimiterRegistry(clock=time.clock, sleep=time.sleep)
    first = make_client(base_url, time=time, limiters=registry, rate_limit=True, activation="first")
    second = make_client(base_url, time=time, limiters=registry, rate_limit=True, activation="second")
    ids = [f"member-{i:05d}" for i in range(10_000)]
    async with first, second:
        one = AudienceClient(first.transport, AUDIENCE)
        two = AudienceClient(second.transport, AUDIENCE)
        await one.create("VIP members", deadline=None)
        await one.update(ids, [], deadline=None)
        assert registry.shared(PROJECT_KEY, BUDGET).available() == BURST_IDS - 10_000
        await two.update([], ids, deadline=None)
        await two.update(ids[:5_000], [], deadline=None)

    # The bucket of two full calls is spent by the first two, whichever activation made them;
    # the third waits for its 5,000 ids.
    rate = IDS_PER_SECOND * RATE_HEADROOM
    assert time.sleeps == [pytest.approx(5_000 / rate)]
    assert one.stats.wait_seconds == 0.0
    assert two.stats.wait_seconds == pytest.approx(5_000 / rate)
    # Views and creates take no ids; the profile endpoints' buckets are untouched.
    assert registry.get(PROJECT_KEY, Endpoint.UPDATE).available() == Endpoint.UPDATE.burst


async def test_an_audience_call_refused_for_its_keys_stops_at_once_and_names_the_keys(
    simulator: tuple[BatchSimulator, str],
) -> None:
    _, base_url = simulator
    client = BatchClient(destination(base_url), Credentials(WRONG_KEY, PROJECT_KEY), activation="vip-segment")
    async with client:
        api = AudienceClient(client.transport, AUDIENCE)
        with pytest.raises(BatchAuthError) as refused:
            await api.view(deadline=None)
    message = str(refused.value)
    assert message.startswith("activation 'vip-segment': Batch answered 401 on audiences/view")
    assert f"check the REST API key (env {API_KEY_ENV}) and the project key (env {PROJECT_KEY_ENV})" in message
    assert WRONG_KEY not in message
    assert api.stats.attempts == 1
