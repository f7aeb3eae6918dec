"""BatchClient and the profile rate limiter, against real HTTP servers on 127.0.0.1.

Each test scripts a small aiohttp server (statuses, bodies, Retry-After, slow answers,
dropped connections) and drives the real client against it. Time is faked only where the
client lets it be injected (backoff sleep, jitter, the deadline clock, the limiter clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import aiohttp
import pyarrow as pa
import pytest
import structlog
from aiohttp import web

from sync import __version__
from sync.batch.client import (
    BatchClient,
    EncodedProfiles,
    ProfileUpdate,
    Rejection,
    SendOutcome,
    choose_endpoint,
)
from sync.batch.endpoint import Endpoint
from sync.batch.item_errors import is_value_refusal
from sync.batch.ratelimit import (
    PROCESS_LIMITERS,
    RATE_HEADROOM,
    ProfileRateLimiter,
    RateLimiterRegistry,
    RateLimitWaitTooLong,
)
from sync.config import Credentials, DestinationConfig, EndpointPolicy
from sync.dev.simulator import BatchSimulator
from sync.encode import request_body
from sync.errors import BatchAuthError, BatchContractError, BatchUnreachable, ConfigError, TransientError
from sync.fingerprint import canonical_payload
from sync.redact import MASK
from tests.support.silent_server import SilentServer

RATE = 300.0 * RATE_HEADROOM  # the client paces /profiles/update a little under Batch's 300/s

API_KEY = "rest-key-SECRET-0123456789abcdef"
PROJECT_KEY = "project_SECRET0664hxvwffvbpn278gxdy"
API_KEY_ENV = "ACME_BATCH_REST_KEY"
PROJECT_KEY_ENV = "ACME_BATCH_PROJECT_KEY"
SECRETS = (API_KEY, PROJECT_KEY)


# -- a scripted Batch ------------------------------------------------------------------


@dataclass
class Reply:
    """What the scripted server does with one request."""

    status: int = 202
    body: Any = field(default_factory=lambda: {"code": "SUCCESS"})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ScriptedBatch:
    """An HTTP server that answers each request with the next scripted Reply, then `default`."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.default = Reply()
        self.received: list[Received] = []
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path, dict(request.headers), body))
        reply = self.replies.pop(0) if self.replies else self.default
        if reply.delay:
            # Wait for the delay or for shutdown, whichever comes first, so stop() is quick.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
        if reply.drop:
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("scripted drop")
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        return web.Response(status=reply.status, body=data, headers=reply.headers, content_type="application/json")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def batch() -> AsyncIterator[ScriptedBatch]:
    server = ScriptedBatch()
    await server.start()
    yield server
    await server.stop()


class FakeTime:
    """A monotonic clock that only moves when someone sleeps on it; records every sleep."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def destination(base_url: str, **overrides: Any) -> DestinationConfig:
    settings: dict[str, Any] = {
        "api_key_env": API_KEY_ENV,
        "project_key_env": PROJECT_KEY_ENV,
        "base_url": base_url,
        "rate_limit": False,
        "max_attempts": 3,
        "request_timeout_seconds": 5.0,
    }
    settings.update(overrides)
    return DestinationConfig(**settings)


def credentials(project_key: str = PROJECT_KEY) -> Credentials:
    return Credentials(API_KEY, project_key)


def profiles(count: int, prefix: str = "user") -> list[ProfileUpdate]:
    return [ProfileUpdate(f"{prefix}-{i}", {"firstname": f"Name {i}", "points": i}) for i in range(count)]


def make_client(
    base_url: str,
    *,
    time: FakeTime | None = None,
    random: Callable[[], float] = lambda: 0.5,
    limiters: RateLimiterRegistry | None = None,
    session: aiohttp.ClientSession | None = None,
    activation: str = "vip-segment",
    project_key: str = PROJECT_KEY,
    **overrides: Any,
) -> BatchClient:
    fake = time or FakeTime()
    return BatchClient(
        destination(base_url, **overrides),
        credentials(project_key),
        activation=activation,
        session=session,
        limiters=limiters if limiters is not None else RateLimiterRegistry(clock=fake.clock, sleep=fake.sleep),
        sleep=fake.sleep,
        random=random,
        clock=fake.clock,
    )


async def send(client: BatchClient, batch: list[ProfileUpdate], **kwargs: Any) -> SendOutcome:
    async with client:
        return await client.send(Endpoint.UPDATE, batch, **kwargs)


# -- the happy path and the request shape ----------------------------------------------


async def test_success_sends_the_exact_body_and_headers_batch_expects(batch: ScriptedBatch) -> None:
    sent = [
        ProfileUpdate("jane.doe@demobatch.com", {"$email_address": "jane.doe@demobatch.com", "age": 37}),
        ProfileUpdate("élodie", {"firstname": "Élodie", "date(birthdate)": "1989-07-20T00:00:00Z", "gone": None}),
    ]
    outcome = await send(make_client(batch.base_url), sent)

    assert outcome.acknowledged == ["jane.doe@demobatch.com", "élodie"]
    assert (outcome.rejected, outcome.failed, outcome.failure) == ([], [], None)
    assert (outcome.attempts, outcome.rate_limited, outcome.wait_seconds) == (1, 0, 0.0)
    [request] = batch.received
    assert request.method == "POST"
    assert request.path == "/2.11/profiles/update"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["X-Batch-Project"] == PROJECT_KEY
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"cepsync/{__version__}"
    assert request.json() == [
        {
            "identifiers": {"custom_id": "jane.doe@demobatch.com"},
            "attributes": {"$email_address": "jane.doe@demobatch.com", "age": 37},
        },
        {
            "identifiers": {"custom_id": "élodie"},
            "attributes": {"firstname": "Élodie", "date(birthdate)": "1989-07-20T00:00:00Z", "gone": None},
        },
    ]


async def test_mass_update_uses_its_own_path_and_api_version(batch: ScriptedBatch) -> None:
    client = make_client(batch.base_url, api_version="2.6")
    async with client:
        outcome = await client.send(Endpoint.MASS_UPDATE, profiles(500))
    assert len(outcome.acknowledged) == 500
    assert [r.path for r in batch.received] == ["/2.6/profiles/mass-update"]
    assert len(batch.received[0].json()) == 500


async def test_too_many_profiles_is_refused_before_any_request(batch: ScriptedBatch) -> None:
    client = make_client(batch.base_url)
    async with client:
        with pytest.raises(ValueError, match="201 profiles in one request; /profiles/update accepts at most 200"):
            await client.send(Endpoint.UPDATE, profiles(201))
        empty = await client.send(Endpoint.UPDATE, [])
    assert empty == SendOutcome()
    assert batch.received == []


async def test_an_injected_session_is_used_and_left_open(batch: ScriptedBatch) -> None:
    async with aiohttp.ClientSession() as session:
        outcome = await send(make_client(batch.base_url, session=session), profiles(2))
        assert not session.closed
    assert outcome.acknowledged == ["user-0", "user-1"]
    assert len(batch.received) == 1


# -- partial errors --------------------------------------------------------------------


async def test_partial_errors_reject_exactly_the_listed_rows(batch: ScriptedBatch) -> None:
    batch.script(
        Reply(
            body={
                "code": "SUCCESS_WITH_PARTIAL_ERRORS",
                "errors": [
                    {"category": "attribute", "bulk_index": 1, "attribute": "firstname", "reason": "too long"},
                    {"category": "attribute", "bulk_index": 3, "attribute": "age", "reason": "not an int"},
                    {"category": "attribute", "bulk_index": 3, "attribute": "city", "reason": "empty"},
                    {"category": "identifiers", "bulk_index": 4, "reason": "bad custom_id"},
                    {"bulk_index": 5, "reason": "out of range"},
                    {"bulk_index": -1, "reason": "negative"},
                    {"bulk_index": True, "reason": "a boolean is not an index"},
                    {"bulk_index": "2", "reason": "a string is not an index"},
                    {"reason": "no index at all"},
                    "not even an object",
                ],
            }
        )
    )
    with structlog.testing.capture_logs() as logs:
        outcome = await send(make_client(batch.base_url), profiles(5))

    assert outcome.acknowledged == ["user-0", "user-2"]
    assert outcome.rejected == [
        Rejection("user-1", "too long", "firstname", "attribute"),
        Rejection("user-3", "not an int; empty", "age,city", "attribute"),
        Rejection("user-4", "bad custom_id", None, "identifiers"),
    ]
    assert outcome.failed == []
    ignored = [entry for entry in logs if entry["event"] == "batch_partial_error_ignored"]
    assert len(ignored) == 6
    assert all(entry["log_level"] == "warning" for entry in ignored)
    assert "out of range" in ignored[0]["error"]


async def test_partial_errors_without_a_readable_list_acknowledge_the_request(batch: ScriptedBatch) -> None:
    batch.script(Reply(body={"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": "garbled"}))
    with structlog.testing.capture_logs() as logs:
        outcome = await send(make_client(batch.base_url), profiles(3))
    assert outcome.acknowledged == ["user-0", "user-1", "user-2"]
    assert outcome.rejected == []
    assert [e["event"] for e in logs] == ["batch_partial_errors_unreadable"]


def partial(*errors: dict[str, Any]) -> Reply:
    return Reply(body={"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": list(errors)})


def assert_partition(outcome: SendOutcome, sent: list[ProfileUpdate]) -> None:
    """SendOutcome's invariant: every profile in exactly one of acknowledged, rejected, failed."""
    placed = [*outcome.acknowledged, *(r.custom_id for r in outcome.rejected), *outcome.failed]
    assert sorted(placed) == sorted(p.custom_id for p in sent)
    assert {r.custom_id for r in outcome.item_failures} <= set(outcome.failed)


@pytest.mark.parametrize(
    ("entry", "value"),
    [
        pytest.param({"category": "attribute", "attribute": "firstname"}, True, id="batch-example"),
        pytest.param({"category": "attribute"}, True, id="attribute-category"),
        pytest.param({"category": "attributes"}, True, id="attributes-plural"),
        pytest.param({"category": "identifiers"}, True, id="identifiers"),
        pytest.param({"category": "identifier"}, True, id="identifier-singular"),
        pytest.param({"category": "event"}, True, id="event"),
        pytest.param({"category": "Events "}, True, id="case-and-spaces"),
        pytest.param({"category": "server", "attribute": "age"}, True, id="names-an-attribute"),
        pytest.param({"category": "server"}, False, id="server"),
        pytest.param({"category": "simulated_unknown"}, False, id="unknown-category"),
        pytest.param({}, False, id="no-category"),
        pytest.param({"category": None}, False, id="null-category"),
        pytest.param({"category": ["attribute"]}, False, id="category-not-a-string"),
        pytest.param({"category": "server", "attribute": ""}, False, id="empty-attribute"),
        pytest.param({"category": "server", "attribute": 3}, False, id="attribute-not-a-string"),
    ],
)
def test_only_errors_about_the_data_are_value_refusals(entry: dict[str, Any], value: bool) -> None:
    assert is_value_refusal({"bulk_index": 0, "reason": "r", **entry}) is value


async def test_a_per_item_error_not_about_the_value_resends_only_that_item(batch: ScriptedBatch) -> None:
    sent = profiles(4)
    batch.script(
        partial(
            {"category": "server", "bulk_index": 1, "reason": "internal"},
            {"category": "attribute", "bulk_index": 2, "attribute": "points", "reason": "too big"},
            {"bulk_index": 3, "reason": "no category"},
        )
    )
    time = FakeTime()
    with structlog.testing.capture_logs() as logs:
        outcome = await send(make_client(batch.base_url, time=time), sent)

    assert outcome.acknowledged == ["user-0", "user-1", "user-3"]
    assert outcome.rejected == [Rejection("user-2", "too big", "points", "attribute")]
    assert (outcome.failed, outcome.item_failures, outcome.failure) == ([], [], None)
    assert (outcome.attempts, outcome.item_retries, outcome.rate_limited) == (2, 2, 0)
    assert_partition(outcome, sent)
    # The retry carries exactly the two items, byte for byte as first sent, after a full-jitter backoff.
    first, retry = (request.json() for request in batch.received)
    assert retry == [first[1], first[3]]
    assert time.sleeps == [0.5]
    [line] = [e for e in logs if e["event"] == "batch_request_retry"]
    assert (line["status"], line["profiles"]) == (202, 2)
    assert "first: server: internal" in line["problem"]


async def test_item_errors_that_keep_coming_fail_only_those_rows_with_batchs_reason(batch: ScriptedBatch) -> None:
    sent = profiles(3)
    batch.script(partial({"category": "server", "bulk_index": 0, "reason": "boom"}, {"bulk_index": 2, "reason": "?"}))
    # On the resend, user-0 is index 0 and user-2 index 1: both fail again, then again.
    batch.default = partial({"category": "server", "bulk_index": 0, "reason": "boom"}, {"bulk_index": 1, "reason": "?"})
    time = FakeTime()
    outcome = await send(make_client(batch.base_url, time=time, max_attempts=3), sent)

    assert outcome.acknowledged == ["user-1"]
    assert outcome.rejected == []
    assert outcome.failed == ["user-0", "user-2"]
    assert outcome.item_failures == [Rejection("user-0", "boom", None, "server"), Rejection("user-2", "?", None, None)]
    assert outcome.failure == (
        "3 attempts failed (last: 2 profiles answered with a per-item error not about the value (first: server: boom))"
    )
    assert (outcome.attempts, outcome.item_retries) == (3, 4)
    assert [len(r.json()) for r in batch.received] == [3, 2, 2]
    assert len(time.sleeps) == 2
    assert_partition(outcome, sent)


async def test_a_429_on_a_resend_does_not_consume_an_attempt(batch: ScriptedBatch) -> None:
    batch.script(
        partial({"category": "server", "bulk_index": 1, "reason": "busy"}),
        Reply(429),
        Reply(429),
        Reply(),
    )
    outcome = await send(make_client(batch.base_url, max_attempts=2), profiles(2))
    assert outcome.acknowledged == ["user-0", "user-1"]
    assert (outcome.attempts, outcome.rate_limited, outcome.item_retries) == (4, 2, 1)
    assert [len(r.json()) for r in batch.received] == [2, 1, 1, 1]


async def test_a_request_failure_after_an_item_error_fails_the_rest_with_the_item_error_kept(
    batch: ScriptedBatch,
) -> None:
    sent = profiles(3)
    batch.script(partial({"category": "simulated_unknown", "bulk_index": 2, "reason": "odd"}), Reply(503))
    outcome = await send(make_client(batch.base_url, max_attempts=2), sent)
    assert outcome.acknowledged == ["user-0", "user-1"]
    assert outcome.failed == ["user-2"]
    assert outcome.item_failures == [Rejection("user-2", "odd", None, "simulated_unknown")]
    assert outcome.failure is not None
    assert "HTTP 503" in outcome.failure
    assert_partition(outcome, sent)


async def test_the_deadline_stops_item_retries_and_keeps_what_was_acknowledged(batch: ScriptedBatch) -> None:
    sent = profiles(2)
    batch.default = partial({"category": "server", "bulk_index": 0, "reason": "later"})
    time = FakeTime()
    outcome = await send(
        make_client(batch.base_url, time=time, random=lambda: 1.0, max_attempts=10), sent, deadline=time.now + 2.5
    )
    # Waits of 1 s and... the next 2 s would pass the deadline (1 s + 2 s > 2.5 s).
    assert time.sleeps == [1.0]
    assert outcome.acknowledged == ["user-1"]
    assert outcome.failed == ["user-0"]
    assert outcome.failure is not None
    assert outcome.failure.startswith("deadline reached after 2 attempt(s)")
    assert_partition(outcome, sent)


async def test_a_resend_pays_the_rate_limiter_for_its_own_rows_only(batch: ScriptedBatch) -> None:
    time = FakeTime()
    registry = RateLimiterRegistry(clock=time.clock, sleep=time.sleep)
    client = make_client(batch.base_url, time=time, limiters=registry, rate_limit=True)
    batch.script(partial({"category": "server", "bulk_index": 7, "reason": "x"}))
    async with client:
        outcome = await client.send(Endpoint.UPDATE, profiles(200))
    assert len(outcome.acknowledged) == 200
    # The bucket started full (1,000): 200 for the request, 1 for the resend; 0.5 s of
    # backoff refilled 0.5 * RATE tokens meanwhile.
    assert registry.get(PROJECT_KEY, Endpoint.UPDATE).available() == pytest.approx(min(1_000, 1_000 - 201 + 0.5 * RATE))


async def test_an_encoded_request_is_cut_at_its_item_boundaries(batch: ScriptedBatch) -> None:
    ids = ["a", 'quo"te', "é→✓"]
    bodies = [canonical_payload({"firstname": name}) for name in ("Ann", "Bob", "Élodie")]
    body = request_body(pa.array(ids, pa.string()), pa.array([b.decode() for b in bodies], pa.string()))
    batch.script(partial({"category": "server", "bulk_index": 2, "reason": "x"}, {"bulk_index": 1, "reason": "y"}))
    client = make_client(batch.base_url)
    async with client:
        outcome = await client.send(Endpoint.UPDATE, EncodedProfiles(ids, body.payload, body.ends))
    assert outcome.acknowledged == ["a", 'quo"te', "é→✓"]
    assert batch.received[1].json() == [
        {"identifiers": {"custom_id": 'quo"te'}, "attributes": {"firstname": "Bob"}},
        {"identifiers": {"custom_id": "é→✓"}, "attributes": {"firstname": "Élodie"}},
    ]


@pytest.mark.parametrize(
    "body",
    [{"code": "SOMETHING_NEW"}, b"<html>gateway</html>", ["SUCCESS"], {"status": "ok"}],
    ids=["unknown-code", "not-json", "json-list", "no-code"],
)
async def test_a_202_with_an_unknown_body_is_transient(batch: ScriptedBatch, body: Any) -> None:
    batch.script(Reply(body=body))
    outcome = await send(make_client(batch.base_url), profiles(2))
    assert outcome.acknowledged == ["user-0", "user-1"]
    assert outcome.attempts == 2

    batch.script(Reply(body=body), Reply(body=body))
    outcome = await send(make_client(batch.base_url, max_attempts=2), profiles(2))
    assert outcome.acknowledged == []
    assert outcome.failed == ["user-0", "user-1"]
    assert outcome.failure is not None
    assert "HTTP 202 with an unrecognised body" in outcome.failure


# -- transient errors, retries and backoff ---------------------------------------------


async def test_a_429_storm_does_not_consume_ordinary_attempts(batch: ScriptedBatch) -> None:
    batch.script(*[Reply(429, {"error_code": "TOO_MANY_REQUESTS"}) for _ in range(6)], Reply(503), Reply())
    time = FakeTime()
    outcome = await send(make_client(batch.base_url, time=time, max_attempts=2), profiles(3))

    assert outcome.acknowledged == ["user-0", "user-1", "user-2"]
    assert outcome.failed == []
    assert (outcome.attempts, outcome.rate_limited) == (8, 6)
    assert len(time.sleeps) == 7
    assert outcome.wait_seconds == pytest.approx(sum(time.sleeps))


async def test_429s_have_their_own_cap(batch: ScriptedBatch) -> None:
    batch.default = Reply(429)
    outcome = await send(make_client(batch.base_url, max_attempts=2), profiles(2))
    assert outcome.failed == ["user-0", "user-1"]
    assert (outcome.attempts, outcome.rate_limited) == (8, 8)
    assert outcome.failure is not None
    assert outcome.failure.startswith("rate limited 8 times (last: HTTP 429")


async def test_5xx_exhaustion_fails_the_rows_with_the_last_reason(batch: ScriptedBatch) -> None:
    batch.script(
        Reply(500, {"error_code": "SERVER_ERROR"}),
        Reply(502, b"bad gateway"),
        Reply(503, {"error_code": "MAINTENANCE_ERROR", "error_message": "Batch's services are under maintenance"}),
    )
    time = FakeTime()
    with structlog.testing.capture_logs() as logs:
        outcome = await send(make_client(batch.base_url, time=time, max_attempts=3), profiles(4))

    assert outcome.acknowledged == []
    assert outcome.failed == ["user-0", "user-1", "user-2", "user-3"]
    assert outcome.failure == (
        "3 attempts failed (last: HTTP 503 (MAINTENANCE_ERROR: Batch's services are under maintenance))"
    )
    assert (outcome.attempts, outcome.rate_limited) == (3, 0)
    assert len(batch.received) == 3
    retries = [e for e in logs if e["event"] == "batch_request_retry"]
    assert [(e["status"], e["attempt"]) for e in retries] == [(500, 1), (502, 2)]
    assert [e["wait_seconds"] for e in retries] == [0.5, 1.0]
    assert all(e["log_level"] == "warning" for e in retries)


async def test_504_then_success(batch: ScriptedBatch) -> None:
    batch.script(Reply(504, b""))
    outcome = await send(make_client(batch.base_url), profiles(1))
    assert outcome.acknowledged == ["user-0"]
    assert outcome.attempts == 2


async def test_a_timeout_is_retried(batch: ScriptedBatch) -> None:
    batch.script(Reply(delay=5.0))
    outcome = await send(make_client(batch.base_url, request_timeout_seconds=0.2), profiles(2))
    assert outcome.acknowledged == ["user-0", "user-1"]
    assert outcome.attempts == 2
    assert len(batch.received) == 2


async def test_timeouts_until_exhaustion_say_so(batch: ScriptedBatch) -> None:
    batch.default = Reply(delay=5.0)
    outcome = await send(make_client(batch.base_url, request_timeout_seconds=0.1, max_attempts=2), profiles(1))
    assert outcome.failed == ["user-0"]
    assert outcome.failure == "2 attempts failed (last: request timed out)"


async def test_a_dropped_connection_is_retried(batch: ScriptedBatch) -> None:
    batch.script(Reply(drop=True), Reply(drop=True))
    outcome = await send(make_client(batch.base_url), profiles(2))
    assert outcome.acknowledged == ["user-0", "user-1"]
    assert outcome.attempts == 3
    assert len(batch.received) == 3


async def test_an_unreachable_server_fails_the_rows(unused_tcp_port: int) -> None:
    outcome = await send(make_client(f"http://127.0.0.1:{unused_tcp_port}", max_attempts=2), profiles(1))
    assert outcome.failed == ["user-0"]
    assert outcome.failure is not None
    assert "ClientConnectorError" in outcome.failure


async def test_retry_after_is_honoured(batch: ScriptedBatch) -> None:
    batch.script(
        Reply(429, headers={"Retry-After": "7"}),
        Reply(503, headers={"Retry-After": "2.5"}),
        Reply(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # not seconds: ignored
        Reply(429, headers={"Retry-After": "100000"}),  # clipped
    )
    time = FakeTime()
    outcome = await send(make_client(batch.base_url, time=time, random=lambda: 0.25, max_attempts=5), profiles(1))
    assert outcome.acknowledged == ["user-0"]
    # The third wait is full jitter for attempt 3: 0.25 * min(30, 1 * 2^2).
    assert time.sleeps == [7.0, 2.5, 1.0, 300.0]
    assert outcome.wait_seconds == pytest.approx(310.5)


@pytest.mark.parametrize(
    ("jitter", "expected"),
    [
        (0.0, [0.0] * 7),
        (0.5, [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]),
        (0.999, [0.999, 1.998, 3.996, 7.992, 15.984, 29.97, 29.97]),
    ],
)
async def test_full_jitter_stays_within_the_exponential_ceiling(
    batch: ScriptedBatch, jitter: float, expected: list[float]
) -> None:
    batch.default = Reply(500)
    time = FakeTime()
    outcome = await send(make_client(batch.base_url, time=time, random=lambda: jitter, max_attempts=8), profiles(1))
    assert outcome.attempts == 8
    assert time.sleeps == pytest.approx(expected)
    ceilings = [min(30.0, 2.0**k) for k in range(7)]
    assert all(0.0 <= wait <= ceiling for wait, ceiling in zip(time.sleeps, ceilings, strict=True))


async def test_the_deadline_stops_retries_before_a_wait_would_pass_it(batch: ScriptedBatch) -> None:
    batch.default = Reply(503)
    time = FakeTime()
    outcome = await send(
        make_client(batch.base_url, time=time, random=lambda: 1.0, max_attempts=10),
        profiles(2),
        deadline=time.now + 5.0,
    )
    # Waits of 1 s and 2 s fit; the next (4 s) would end at +7 s, after the deadline.
    assert time.sleeps == [1.0, 2.0]
    assert time.now <= 1_005.0
    assert outcome.attempts == 3
    assert outcome.failed == ["user-0", "user-1"]
    assert outcome.failure is not None
    assert outcome.failure.startswith("deadline reached after 3 attempt(s), no time left for a 4.00 s backoff")
    assert "HTTP 503" in outcome.failure


async def test_a_passed_deadline_sends_nothing(batch: ScriptedBatch) -> None:
    time = FakeTime()
    outcome = await send(make_client(batch.base_url, time=time), profiles(2), deadline=time.now - 1.0)
    assert outcome.failed == ["user-0", "user-1"]
    assert outcome.attempts == 0
    assert batch.received == []


# -- terminal errors -------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors_name_the_env_vars_and_never_the_secrets(batch: ScriptedBatch, status: int) -> None:
    batch.default = Reply(
        status,
        {"error_code": "AUTHENTICATION_INVALID", "error_message": f"key {API_KEY} not valid for {PROJECT_KEY}"},
    )
    with pytest.raises(BatchAuthError) as raised:
        await send(make_client(batch.base_url), profiles(1))
    message = str(raised.value)
    assert message.startswith(f"activation 'vip-segment': Batch answered {status} on /profiles/update")
    assert "AUTHENTICATION_INVALID" in message
    assert f"(env {API_KEY_ENV})" in message
    assert f"(env {PROJECT_KEY_ENV})" in message
    assert not any(secret in message for secret in SECRETS)
    assert len(batch.received) == 1  # never retried


async def test_400_is_a_contract_error_with_batchs_error_code(batch: ScriptedBatch) -> None:
    batch.default = Reply(400, {"error_code": "MISSING_PARAMETER", "error_message": "identifiers is required"})
    with pytest.raises(BatchContractError) as raised:
        await send(make_client(batch.base_url), profiles(3))
    assert str(raised.value) == (
        "activation 'vip-segment': Batch answered 400 to a request of 3 profiles on /profiles/update "
        "(MISSING_PARAMETER: identifiers is required)"
    )
    assert len(batch.received) == 1


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, b"Not Found", "(body: Not Found)"),
        (413, b"x" * 5000, "(body: " + "x" * 300 + "...)"),
        (422, {"error_message": "m" * 1000}, "(" + "m" * 300 + ")"),
        (400, b"", "on /profiles/update"),
        (200, {"code": "SUCCESS"}, '(body: {"code": "SUCCESS"})'),
        (501, b"", "Batch answered 501 to a request of 1 profile on /profiles/update"),
    ],
    ids=["404-text", "413-long", "422-long-message", "400-empty", "200-unexpected", "501"],
)
async def test_other_statuses_are_contract_errors_that_never_choke_on_the_body(
    batch: ScriptedBatch, status: int, body: Any, expected: str
) -> None:
    batch.default = Reply(status, body)
    with pytest.raises(BatchContractError) as raised:
        await send(make_client(batch.base_url), profiles(1))
    assert str(raised.value).endswith(expected)
    assert f"Batch answered {status}" in str(raised.value)


# -- check_credentials -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_check_credentials_accepts_a_2xx_answer(batch: ScriptedBatch, status: int) -> None:
    batch.default = Reply(status)
    client = make_client(batch.base_url)
    async with client:
        await client.check_credentials()
    [request] = batch.received
    assert request.path == "/2.11/profiles/update"
    assert request.body == b"[]"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("status", [400, 404, 405, 301])
async def test_check_credentials_reports_any_other_answer_as_a_config_error(batch: ScriptedBatch, status: int) -> None:
    batch.default = Reply(status, {"error_code": "ROUTE_NOT_FOUND", "error_message": "no such route"})
    client = make_client(batch.base_url)
    async with client:
        with pytest.raises(ConfigError) as raised:
            await client.check_credentials()
    assert f"Batch answered {status}" in str(raised.value)
    assert "ROUTE_NOT_FOUND" in str(raised.value)
    assert "destination.base_url" in str(raised.value)


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_check_credentials_cannot_tell_on_a_transient_answer(batch: ScriptedBatch, status: int) -> None:
    batch.default = Reply(status)
    client = make_client(batch.base_url)
    async with client:
        with pytest.raises(TransientError, match=f"Batch answered {status}"):
            await client.check_credentials()


async def test_check_credentials_raises_on_401(batch: ScriptedBatch) -> None:
    batch.default = Reply(401)
    client = make_client(batch.base_url)
    async with client:
        with pytest.raises(BatchAuthError, match=API_KEY_ENV):
            await client.check_credentials()


# -- secrets never leak ----------------------------------------------------------------


async def test_no_error_path_leaks_a_secret(batch: ScriptedBatch, unused_tcp_port: int) -> None:
    echo = {"error_code": f"E_{API_KEY}", "error_message": f"{PROJECT_KEY} / Bearer {API_KEY}"}
    texts: list[str] = []
    time = FakeTime()

    with structlog.testing.capture_logs() as logs:
        for status in (400, 401, 403, 404, 413):
            batch.default = Reply(status, echo)
            with pytest.raises((BatchAuthError, BatchContractError)) as raised:
                await send(make_client(batch.base_url, time=time), profiles(1))
            texts.append(str(raised.value))
            texts.append(repr(raised.value))

        failing = [
            Reply(500, echo),
            Reply(429, echo),
            Reply(202, {"code": f"NEW_{API_KEY}"}),
            Reply(202, {"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": [{"bulk_index": 9, "reason": API_KEY}]}),
            Reply(delay=5.0),
            Reply(drop=True),
        ]
        for reply in failing:
            batch.default = reply
            outcome = await send(
                make_client(batch.base_url, time=time, request_timeout_seconds=0.1, max_attempts=1), profiles(1)
            )
            texts.append(repr(outcome))

        batch.default = Reply(
            202,
            {"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": [{"bulk_index": 0, "attribute": "a", "reason": API_KEY}]},
        )
        outcome = await send(make_client(batch.base_url, time=time), profiles(1))
        assert len(outcome.rejected) == 1
        texts.append(repr(outcome))

        # A per-item error that is not about the value is retried, then failed with Batch's reason.
        batch.default = Reply(
            202, {"code": "SUCCESS_WITH_PARTIAL_ERRORS", "errors": [{"bulk_index": 0, "reason": API_KEY}]}
        )
        outcome = await send(make_client(batch.base_url, time=time), profiles(1))
        assert len(outcome.item_failures) == 1
        texts.append(repr(outcome))

        outcome = await send(make_client(f"http://127.0.0.1:{unused_tcp_port}", time=time, max_attempts=1), profiles(1))
        texts.append(repr(outcome))

        client = make_client(f"http://127.0.0.1:{unused_tcp_port}", time=time)
        async with client:
            with pytest.raises(TransientError) as unreachable:
                await client.check_credentials()
        texts.append(str(unreachable.value))
        texts.extend([repr(client), repr(credentials()), repr(RateLimiterRegistry())])

        limited = make_client(batch.base_url, time=time, rate_limit=True)
        batch.default = Reply()
        async with limited:
            for _ in range(5):
                await limited.send(Endpoint.UPDATE, profiles(200), deadline=time.now + 0.1)
            outcome = await limited.send(Endpoint.UPDATE, profiles(200), deadline=time.now + 0.1)
        assert outcome.failure is not None
        assert outcome.failure.startswith(f"deadline reached: sending 200 profiles needs a {200 / RATE:.2f} s wait")
        texts.append(repr(outcome))

    texts.extend(repr(entry) for entry in logs)
    assert len(texts) > 20
    assert any("**********" in text for text in texts)  # the echoed secrets were seen, and scrubbed
    assert any(MASK in text for text in texts)  # ... by the shared redactor (sync.redact)
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text


# -- choose_endpoint and Endpoint limits -----------------------------------------------


@pytest.mark.parametrize(
    ("policy", "count", "threshold", "expected"),
    [
        (EndpointPolicy.AUTO, 0, 10_000, Endpoint.UPDATE),
        (EndpointPolicy.AUTO, 9_999, 10_000, Endpoint.UPDATE),
        (EndpointPolicy.AUTO, 10_000, 10_000, Endpoint.MASS_UPDATE),
        (EndpointPolicy.AUTO, 2_000_000, 10_000, Endpoint.MASS_UPDATE),
        (EndpointPolicy.AUTO, 50, 50, Endpoint.MASS_UPDATE),
        (EndpointPolicy.UPDATE, 5_000_000, 10_000, Endpoint.UPDATE),
        (EndpointPolicy.MASS_UPDATE, 1, 10_000, Endpoint.MASS_UPDATE),
        (EndpointPolicy.MASS_UPDATE, 0, 10_000, Endpoint.MASS_UPDATE),
    ],
)
def test_choose_endpoint(policy: EndpointPolicy, count: int, threshold: int, expected: Endpoint) -> None:
    assert choose_endpoint(policy, count, threshold) is expected


def test_choose_endpoint_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="profiles_to_send"):
        choose_endpoint(EndpointPolicy.AUTO, -1, 10)
    with pytest.raises(ValueError, match="threshold"):
        choose_endpoint(EndpointPolicy.AUTO, 1, 0)


def test_endpoint_limits_follow_batch_docs() -> None:
    assert (Endpoint.UPDATE.max_batch, Endpoint.UPDATE.rate_per_second, Endpoint.UPDATE.burst) == (200, 300, 1_000)
    assert (Endpoint.MASS_UPDATE.max_batch, Endpoint.MASS_UPDATE.rate_per_second, Endpoint.MASS_UPDATE.burst) == (
        10_000,
        10_000,
        10_000,
    )
    for endpoint in Endpoint:
        assert endpoint.burst >= endpoint.max_batch  # one full request must always be admissible


# -- the rate limiter ------------------------------------------------------------------


async def test_limiter_allows_the_burst_then_paces_at_the_rate() -> None:
    time = FakeTime()
    limiter = ProfileRateLimiter(300, 1_000, clock=time.clock, sleep=time.sleep)
    waits = [await limiter.acquire(200) for _ in range(5)]
    assert waits == [0.0] * 5
    assert time.sleeps == []

    waits = [await limiter.acquire(200) for _ in range(3)]
    assert waits == pytest.approx([200 / 300] * 3)
    assert time.sleeps == pytest.approx([200 / 300] * 3)

    time.now += 10.0  # idle: the bucket refills, but never past its capacity
    assert limiter.available() == pytest.approx(1_000)
    assert await limiter.acquire(1_000) == 0.0
    assert await limiter.acquire(300) == pytest.approx(1.0)


async def test_a_mass_update_bucket_fills_to_one_request_at_first_and_after_any_pause() -> None:
    """Batch's mass-update has no burst: two requests at once would spend its whole second.

    Then the paced requests after them would reach Batch with no slack for jitter until our
    headroom refilled it (~17 s), and any that came early was a 429 and a 5,000-profile
    resend. So, at a run's start and after a pause alike, one request leaves at once and
    the next after its share of the rate; a full 10,000-profile request waits for the rest.
    """
    time = FakeTime()
    registry = RateLimiterRegistry(clock=time.clock, sleep=time.sleep)
    limiter = registry.get(PROJECT_KEY, Endpoint.MASS_UPDATE)
    batch, rate = Endpoint.MASS_UPDATE.send_batch, 10_000 * RATE_HEADROOM
    assert [await limiter.acquire(batch) for _ in range(3)] == pytest.approx([0.0, batch / rate, batch / rate])

    time.now += 30.0  # the sender waited (the differ between two parts of its stream)
    assert limiter.available() == pytest.approx(batch)
    assert [await limiter.acquire(batch) for _ in range(2)] == pytest.approx([0.0, batch / rate])

    time.now += 30.0
    assert await limiter.acquire(Endpoint.MASS_UPDATE.max_batch) == pytest.approx(batch / rate)
    update = registry.get(PROJECT_KEY, Endpoint.UPDATE)  # /update keeps Batch's burst of 1,000
    assert [await update.acquire(200) for _ in range(5)] == [0.0] * 5


async def test_concurrent_callers_queue_with_exact_waits() -> None:
    recorded: list[float] = []

    async def record(seconds: float) -> None:  # a sleep that does not move the clock
        recorded.append(seconds)

    clock_value = 50.0
    limiter = ProfileRateLimiter(300, 300, clock=lambda: clock_value, sleep=record)
    waits = await asyncio.gather(*(limiter.acquire(300) for _ in range(4)))
    assert waits == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert recorded == pytest.approx([1.0, 2.0, 3.0])


async def test_limiter_refuses_oversized_requests_and_long_waits_without_taking_tokens() -> None:
    time = FakeTime()
    limiter = ProfileRateLimiter(300, 1_000, clock=time.clock, sleep=time.sleep)
    with pytest.raises(ValueError, match="capacity 1000"):
        await limiter.acquire(1_001)
    assert await limiter.acquire(0) == 0.0
    assert await limiter.acquire(1_000) == 0.0
    with pytest.raises(RateLimitWaitTooLong) as raised:
        await limiter.acquire(300, max_wait=0.5)
    assert raised.value.wait == pytest.approx(1.0)
    assert limiter.available() == pytest.approx(0.0)  # nothing was reserved
    assert await limiter.acquire(300, max_wait=1.0) == pytest.approx(1.0)


async def test_a_cancelled_wait_gives_its_tokens_back() -> None:
    release = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        await release.wait()

    clock_value = 0.0
    limiter = ProfileRateLimiter(100, 100, clock=lambda: clock_value, sleep=blocking_sleep)
    assert await limiter.acquire(100) == 0.0
    waiter = asyncio.create_task(limiter.acquire(50))
    await asyncio.sleep(0)
    assert limiter.available() == pytest.approx(-50.0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.available() == pytest.approx(0.0)


def test_registry_shares_per_project_key_and_separates_endpoints() -> None:
    registry = RateLimiterRegistry()
    update = registry.get(PROJECT_KEY, Endpoint.UPDATE)
    assert registry.get(PROJECT_KEY, Endpoint.UPDATE) is update
    assert registry.get(PROJECT_KEY, Endpoint.MASS_UPDATE) is not update
    assert registry.get("project_other", Endpoint.UPDATE) is not update
    assert (update.rate, update.capacity) == (300.0 * RATE_HEADROOM, 1_000)
    mass = registry.get(PROJECT_KEY, Endpoint.MASS_UPDATE)
    assert (mass.rate, mass.capacity) == (10_000.0 * RATE_HEADROOM, 10_000)
    assert PROJECT_KEY not in repr(registry)


async def test_clients_sharing_a_project_key_share_one_budget(batch: ScriptedBatch) -> None:
    time = FakeTime()
    registry = RateLimiterRegistry(clock=time.clock, sleep=time.sleep)

    def client(activation: str, project_key: str = PROJECT_KEY) -> BatchClient:
        return make_client(
            batch.base_url,
            time=time,
            limiters=registry,
            activation=activation,
            project_key=project_key,
            rate_limit=True,
        )

    first, second, other_project = client("first"), client("second"), client("third", "project_other")
    async with first, second, other_project:
        burst = [await first.send(Endpoint.UPDATE, profiles(200)) for _ in range(5)]
        assert [o.wait_seconds for o in burst] == [0.0] * 5

        # The second activation writes to the same project: the burst is already spent.
        paced = await second.send(Endpoint.UPDATE, profiles(200))
        assert paced.wait_seconds == pytest.approx(200 / RATE)

        # Another project key has its own budget; so has the other endpoint.
        fresh = await other_project.send(Endpoint.UPDATE, profiles(200))
        mass = await second.send(Endpoint.MASS_UPDATE, profiles(5_000))
        assert (fresh.wait_seconds, mass.wait_seconds) == (0.0, 0.0)

    assert time.sleeps == pytest.approx([200 / RATE])
    assert all(len(o.acknowledged) == 200 for o in [*burst, paced, fresh])
    assert len(mass.acknowledged) == 5_000


async def test_every_attempt_pays_the_rate_limiter(batch: ScriptedBatch) -> None:
    time = FakeTime()
    registry = RateLimiterRegistry(clock=time.clock, sleep=time.sleep)
    client = make_client(batch.base_url, time=time, limiters=registry, rate_limit=True)
    async with client:
        for _ in range(4):
            await client.send(Endpoint.UPDATE, profiles(200))
        batch.script(Reply(503))
        assert registry.get(PROJECT_KEY, Endpoint.UPDATE).available() == pytest.approx(200)
        outcome = await client.send(Endpoint.UPDATE, profiles(200))
    # 200 tokens for the 503'd attempt, 200 more for the retry after its 0.5 s backoff,
    # during which 150 tokens came back: the retry waits for the 50 still missing.
    assert len(outcome.acknowledged) == 200
    assert outcome.attempts == 2
    assert time.sleeps == pytest.approx([0.5, (200 - 0.5 * RATE) / RATE])
    assert outcome.wait_seconds == pytest.approx(0.5 + (200 - 0.5 * RATE) / RATE)


async def test_the_process_wide_registry_is_the_default(batch: ScriptedBatch) -> None:
    project_key = "project_only_used_by_the_default_registry_test"
    shared = PROCESS_LIMITERS.get(project_key, Endpoint.UPDATE)
    before = shared.available()
    client = BatchClient(destination(batch.base_url, rate_limit=True), credentials(project_key), activation="defaults")
    async with client:
        outcome = await client.send(Endpoint.UPDATE, profiles(100))
    assert outcome.acknowledged == [f"user-{i}" for i in range(100)]
    # Real clock: a few tokens may have come back meanwhile, far fewer than the 100 taken.
    assert shared.available() < before - 50


def test_client_repr_names_the_activation_only() -> None:
    client = BatchClient(destination("https://api.batch.com"), credentials(), activation="vip-segment")
    assert repr(client) == "BatchClient(activation='vip-segment', base_url='https://api.batch.com', api_version='2.11')"


# -- against the project's Batch simulator ---------------------------------------------


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[BatchSimulator, str]]:
    sim = BatchSimulator(credentials={PROJECT_KEY: API_KEY}, rate_limit=True)
    base_url = await sim.start()
    yield sim, base_url
    await sim.stop()


async def test_a_thousand_profiles_land_in_the_simulator(simulator: tuple[BatchSimulator, str]) -> None:
    sim, base_url = simulator
    # A few faults on the way: retried inside send, invisible in the result.
    # Every retry pays the client's limiter again (200 profiles beyond the 1,000 burst cost
    # 2/3 s of real time at 300/s), so keep the faults few.
    sim.faults.update({"fail_next": 1, "fail_status": 503, "drop_before_apply": 1})
    time = FakeTime()  # backoff sleeps only; the rate limiter runs on the real clock
    client = make_client(base_url, time=time, limiters=RateLimiterRegistry(), rate_limit=True, concurrency=4)
    sent = [
        ProfileUpdate(
            f"customer-{i:04d}",
            {"$email_address": f"customer{i}@example.com", "firstname": f"Name {i}", "points": i, "vip": i % 2 == 0},
        )
        for i in range(1_000)
    ]
    chunks = [sent[start : start + Endpoint.UPDATE.max_batch] for start in range(0, len(sent), 200)]
    async with client:
        outcomes = await asyncio.gather(*(client.send(Endpoint.UPDATE, chunk) for chunk in chunks))

    acknowledged = [custom_id for outcome in outcomes for custom_id in outcome.acknowledged]
    assert sorted(acknowledged) == [p.custom_id for p in sent]
    assert all(not o.failed and not o.rejected for o in outcomes)
    assert sum(o.attempts for o in outcomes) == 5 + 2  # one 503 and one dropped connection, retried
    stored = sim.profiles(PROJECT_KEY)
    assert len(stored) == 1_000
    for profile in sent:
        assert stored[profile.custom_id] == profile.attributes


async def test_simulator_partial_errors_map_back_to_the_right_rows(simulator: tuple[BatchSimulator, str]) -> None:
    sim, base_url = simulator
    sent = [
        ProfileUpdate("ok-1", {"firstname": "Ann"}),
        ProfileUpdate("too-long", {"firstname": "x" * 301}),
        ProfileUpdate("ok-2", {"firstname": "Bob"}),
        ProfileUpdate("bad-name", {"First Name": "Eve"}),
    ]
    outcome = await send(make_client(base_url), sent)
    assert outcome.acknowledged == ["ok-1", "ok-2"]
    assert [r.custom_id for r in outcome.rejected] == ["too-long", "bad-name"]
    assert outcome.rejected[0].attribute == "firstname"
    assert set(sim.profiles(PROJECT_KEY)) == {"ok-1", "ok-2"}


async def test_simulator_item_errors_of_each_kind_end_where_they_belong(simulator: tuple[BatchSimulator, str]) -> None:
    sim, base_url = simulator
    sent = profiles(200)
    # Value refusals follow the payload; server/unknown/none errors strike at random (from the
    # simulator's seeded RNG: the same draws every time) and are retried until they clear.
    sim.faults.update({"item_errors": {"value": 0.1, "server": 0.1, "unknown": 0.1, "none": 0.1}})
    outcome = await send(make_client(base_url, max_attempts=8), sent)
    assert_partition(outcome, sent)
    stats = sim.stats()["item_errors"]
    assert outcome.failed == []
    assert len(outcome.rejected) == stats["value"] > 0
    assert all(r.category == "attribute" and r.reason == "simulated: value refused" for r in outcome.rejected)
    assert outcome.item_retries == stats["server"] + stats["unknown"] + stats["none"] > 0
    assert set(sim.profiles(PROJECT_KEY)) == set(outcome.acknowledged)


async def test_simulator_refuses_a_wrong_key_with_batch_auth_error(simulator: tuple[BatchSimulator, str]) -> None:
    _, base_url = simulator
    client = make_client(base_url, project_key="project_unknown_to_the_simulator")
    async with client:
        with pytest.raises(BatchAuthError, match=PROJECT_KEY_ENV):
            await client.check_credentials()


def test_send_batches_leave_half_the_bucket_as_slack() -> None:
    # /update: 200 per request (the API maximum) is well under its 1,000 burst.
    assert Endpoint.UPDATE.send_batch == 200
    # /mass-update: a 10,000 request would need the whole "no burst" bucket at once.
    assert Endpoint.MASS_UPDATE.send_batch == 5_000
    assert all(e.send_batch <= e.max_batch for e in Endpoint)


# -- a host that connects and never answers (issue 19 item 18) ---------------------------------


async def test_a_host_that_connects_and_never_answers_is_an_outage_within_seconds() -> None:
    with SilentServer() as silent:
        client = make_client(silent.base_url, request_timeout_seconds=1.0, max_attempts=6)
        started = monotonic()
        with structlog.testing.capture_logs() as logs, pytest.raises(BatchUnreachable) as raised:
            await send(client, profiles(3))
        elapsed = monotonic() - started
    message = str(raised.value)
    assert f"Batch at {silent.base_url} does not answer" in message
    assert "accepted the connection, but 2 requests in a row got no HTTP answer within 1 s" in message
    assert "destination.base_url" in message
    # Two probes of 1 s each, not 6 attempts of the request with their backoff.
    assert 1.5 < elapsed < 4, elapsed
    # Only the probes left: no profile was sent, and no key (the probe carries none).
    assert silent.received.count(b"GET / HTTP/1.1") == 2
    assert b"POST" not in silent.received
    assert not any(secret.encode() in silent.received for secret in SECRETS)
    assert [entry["event"] for entry in logs] == ["batch_probe_silent", "batch_probe_silent"]


async def test_check_credentials_does_not_wait_a_full_timeout_on_a_silent_host() -> None:
    with SilentServer() as silent:
        client = make_client(silent.base_url, request_timeout_seconds=60.0)
        started = monotonic()
        async with client:
            with pytest.raises(BatchUnreachable, match="does not answer"):
                await client.check_credentials()
        assert monotonic() - started < 15  # two 5 s probes, not a 60 s request


async def test_a_host_that_answers_the_probe_is_probed_once(batch: ScriptedBatch) -> None:
    probes: list[str] = []

    async def on_request_start(session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
        probes.append(params.method)

    tracing = aiohttp.TraceConfig()
    tracing.on_request_start.append(on_request_start)
    async with aiohttp.ClientSession(trace_configs=[tracing]) as session:
        client = make_client(batch.base_url, session=session)
        async with client:
            await asyncio.gather(*(client.send(Endpoint.UPDATE, profiles(2, f"p{i}")) for i in range(4)))
            await client.send(Endpoint.UPDATE, profiles(1))
    # The scripted server routes POST only: the GET is answered 405, which is an answer.
    assert probes == ["GET", "POST", "POST", "POST", "POST", "POST"]
    assert len(batch.received) == 5


async def test_requests_that_stop_being_answered_stop_the_run_after_three_in_a_row(batch: ScriptedBatch) -> None:
    batch.script(Reply())  # the first request is answered
    batch.default = Reply(delay=30.0)  # then the host hangs
    client = make_client(batch.base_url, request_timeout_seconds=0.2, max_attempts=6)
    async with client:
        first = await client.send(Endpoint.UPDATE, profiles(1))
        assert first.acknowledged == ["user-0"]
        with pytest.raises(BatchUnreachable) as raised:
            await client.send(Endpoint.UPDATE, profiles(2, "later"))
    assert "does not answer: 3 requests in a row got no answer within 0.2 s" in str(raised.value)
    assert len(batch.received) == 4


async def test_timeouts_cut_by_the_deadline_are_not_an_outage(batch: ScriptedBatch) -> None:
    batch.default = Reply(delay=30.0)
    clock = FakeTime()
    client = make_client(batch.base_url, time=clock, request_timeout_seconds=5.0, max_attempts=6)
    async with client:
        for _ in range(4):
            # The fake clock does not move with real time: each request is cut at the 0.2 s
            # left before the deadline, a timeout of our own making.
            outcome = await client.send(Endpoint.UPDATE, profiles(1), deadline=clock.now + 0.2)
            assert outcome.failed == ["user-0"]
