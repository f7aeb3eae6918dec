"""The transport's HTTP session: made by the first request, shared by every call, closed once.

A client that is entered and left without sending anything makes no session (a run with
nothing to send never loads aiohttp: tests/test_start_imports.py checks that in a fresh
interpreter). Against the real simulator; the sessions aiohttp makes are counted by wrapping
``aiohttp.ClientSession`` (the real class makes every one of them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sync.batch.client import BatchClient
from sync.batch.endpoint import Endpoint
from sync.dev.simulator import BatchSimulator
from tests.batch.test_client import API_KEY, PROJECT_KEY, make_client, profiles


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[BatchSimulator, str]]:
    sim = BatchSimulator(credentials={PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await sim.start()
    yield sim, base_url
    await sim.stop()


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[aiohttp.ClientSession]:
    """Every session aiohttp makes while the test runs, in order."""
    made: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def counted(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        session = real(*args, **kwargs)
        made.append(session)
        return session

    monkeypatch.setattr(aiohttp, "ClientSession", counted)
    return made


async def test_a_client_that_sends_nothing_makes_no_session(
    simulator: tuple[BatchSimulator, str], sessions: list[aiohttp.ClientSession]
) -> None:
    sim, base_url = simulator
    client = make_client(base_url)
    async with client:
        empty = await client.send(Endpoint.UPDATE, [])
    assert empty.acknowledged == []
    assert sessions == []
    assert sum(sim.stats()["requests"].values()) == 0
    # Closing again, or closing a client that was never entered, does nothing and raises nothing.
    await client.close()
    await make_client(base_url).close()
    assert sessions == []


async def test_concurrent_first_requests_share_one_session(
    simulator: tuple[BatchSimulator, str], sessions: list[aiohttp.ClientSession]
) -> None:
    sim, base_url = simulator
    client = make_client(base_url, concurrency=8)
    chunks = [profiles(20, prefix=f"chunk{n}") for n in range(8)]
    async with client:
        outcomes = await asyncio.gather(*(client.send(Endpoint.UPDATE, chunk) for chunk in chunks))
        assert len(sessions) == 1
        assert not sessions[0].closed
    assert sessions[0].closed
    assert sorted(c for outcome in outcomes for c in outcome.acknowledged) == sorted(
        p.custom_id for chunk in chunks for p in chunk
    )
    assert len(sim.profiles(PROJECT_KEY)) == 160


async def test_concurrent_first_calls_without_the_probe_share_one_session(
    simulator: tuple[BatchSimulator, str], sessions: list[aiohttp.ClientSession]
) -> None:
    # The probe serialises the first profile requests; the transport's own calls start
    # together here, each making its session at its first step if none exists.
    _, base_url = simulator
    client = make_client(base_url)
    transport = client.transport
    url = client.url(Endpoint.UPDATE)
    async with client:
        answers = await asyncio.gather(*(transport.post(url, b"[]", 5.0) for _ in range(6)))
    assert [answer.status for answer in answers] == [202] * 6
    assert len(sessions) == 1
    assert sessions[0].closed


async def test_a_client_can_be_entered_again_after_closing(
    simulator: tuple[BatchSimulator, str], sessions: list[aiohttp.ClientSession]
) -> None:
    sim, base_url = simulator
    client = make_client(base_url)
    for round_ in range(2):
        async with client:
            outcome = await client.send(Endpoint.UPDATE, profiles(3, prefix=f"round{round_}"))
        assert len(outcome.acknowledged) == 3
    # One session per time the client was used, each closed when it was left.
    assert len(sessions) == 2
    assert all(session.closed for session in sessions)
    assert len(sim.profiles(PROJECT_KEY)) == 6


async def test_a_closed_or_never_entered_client_refuses_to_send(
    simulator: tuple[BatchSimulator, str], sessions: list[aiohttp.ClientSession]
) -> None:
    _, base_url = simulator
    never_entered = make_client(base_url)
    with pytest.raises(RuntimeError, match="must be used as 'async with BatchClient"):
        await never_entered.send(Endpoint.UPDATE, profiles(1))
    closed = make_client(base_url)
    async with closed:
        pass
    with pytest.raises(RuntimeError, match="must be used as 'async with BatchClient"):
        await closed.transport.post(closed.url(Endpoint.UPDATE), b"[]", 5.0)
    assert sessions == []


async def test_an_injected_session_is_used_without_entering_and_never_closed(
    simulator: tuple[BatchSimulator, str],
) -> None:
    sim, base_url = simulator
    async with aiohttp.ClientSession() as session:
        client: BatchClient = make_client(base_url, session=session)
        outcome = await client.send(Endpoint.UPDATE, profiles(2))
        async with client:
            again = await client.send(Endpoint.UPDATE, profiles(2, prefix="again"))
        assert not session.closed
    assert len(outcome.acknowledged) == len(again.acknowledged) == 2
    assert len(sim.profiles(PROJECT_KEY)) == 4


async def test_ready_makes_the_session_before_a_first_call_computes_its_deadline(
    simulator: tuple[BatchSimulator, str], sessions: list[aiohttp.ClientSession]
) -> None:
    # A sender or the audience calls ready() before computing the deadline of their first
    # call: a session made inside that call would spend its deadline importing aiohttp (a run
    # with a 2 s lease once failed its first audience call after 0 attempts).
    _, base_url = simulator
    client = make_client(base_url)
    with pytest.raises(RuntimeError, match="async with BatchClient"):
        client.transport.ready()
    async with client:
        client.transport.ready()
        client.transport.ready()
        assert len(sessions) == 1
        outcome = await client.send(Endpoint.UPDATE, profiles(3))
        assert len(outcome.acknowledged) == 3
        assert len(sessions) == 1  # the call used the session ready() made
    assert sessions[0].closed
