"""The Batch simulator as a fixture, for tests that run the engine in their own event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sync.dev.simulator import BatchSimulator
from tests.support.engine_support import API_KEY, PROJECT_KEY


@pytest.fixture
async def unlimited_sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    """The simulator in the test's event loop, without Batch's rate limits (the client still paces itself)."""
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()
