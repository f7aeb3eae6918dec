"""Client-side pacing for Batch's profile APIs: a token bucket counted in profiles.

Batch counts its rate limits in *updates* (one Custom ID in a request), not in requests:
``/profiles/update`` allows 300 profiles/s with bursts up to 1,000 and
``/profiles/mass-update`` 10,000 profiles/s with no burst (doc.batch.com, "choosing the
right API endpoint"). Pacing ourselves to those numbers keeps 429 storms rare; the
client still retries the 429s that slip through.

docs/batch-api.md, "Limits, counted in profiles": one budget per project key and per endpoint, shared by every
activation of the process that uses that project key. :class:`RateLimiterRegistry` hands
out those shared buckets, and the audience calls' (a :class:`Budget` of their own, counted
in ids: :mod:`sync.batch.audiences`).

The bucket works by *reservation*: ``acquire(n)`` takes ``n`` tokens at once (the level
may go negative), then sleeps until the debt it created has been refilled. Concurrent
callers therefore queue in arrival order with exact, precomputed waits, and nothing here
holds a lock across a sleep (or binds to one event loop, so a process-wide registry is
safe across runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from sync.batch.endpoint import Endpoint
from sync.errors import TransientError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


# Share of Batch's published rate we aim for (see RateLimiterRegistry.get).
RATE_HEADROOM = 0.97


class RateLimitWaitTooLong(TransientError):
    """Waiting for the rate limiter would take longer than the caller may wait."""

    def __init__(self, profiles: int, wait: float, max_wait: float) -> None:
        self.profiles = profiles
        self.wait = wait
        self.max_wait = max_wait
        super().__init__(
            f"sending {profiles} profiles needs a {wait:.2f} s wait for the rate limit, "
            f"but only {max(max_wait, 0.0):.2f} s remain before the deadline"
        )


class ProfileRateLimiter:
    """A token bucket counted in profiles: ``capacity`` tokens, refilled at ``rate`` per second.

    The bucket starts full, so a fresh process may send ``capacity`` profiles at once
    (Batch's burst) and is then paced at ``rate``. A ``ceiling`` below ``capacity`` is the
    most it fills to, at first and after any pause: a request larger than that waits for
    the rest (the reservation below), so that after a pause no more than ``ceiling``
    profiles leave at once.

    Args:
        rate: Tokens (profiles) added per second.
        capacity: The largest single ``acquire``; also the most tokens the bucket holds, but for a ``ceiling``.
        clock: Monotonic clock in seconds (injectable for tests).
        sleep: Coroutine that sleeps for a number of seconds (injectable for tests).
        ceiling: Most tokens the bucket fills to, and holds at first (default: ``capacity``).
    """

    def __init__(
        self,
        rate: float,
        capacity: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        ceiling: float | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.rate = float(rate)
        self.capacity = capacity
        self.ceiling = float(capacity if ceiling is None else min(ceiling, capacity))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.ceiling
        self._updated = clock()

    def __repr__(self) -> str:
        return f"ProfileRateLimiter(rate={self.rate:g}/s, capacity={self.capacity})"

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.ceiling, self._tokens + elapsed * self.rate)
        self._updated = now

    def available(self) -> float:
        """Tokens available right now (negative while reservations are still being paid off)."""
        self._refill()
        return self._tokens

    async def acquire(self, profiles: int, *, max_wait: float | None = None) -> float:
        """Wait until ``profiles`` tokens are available and take them.

        Args:
            profiles: Tokens to take; at most ``capacity`` (a larger request could never
                be admitted by a bucket of that size).
            max_wait: If the wait would be longer than this many seconds, take nothing
                and raise :class:`RateLimitWaitTooLong` at once instead of sleeping.

        Returns:
            The number of seconds this call waited (0.0 when tokens were available).

        Raises:
            ValueError: ``profiles`` is negative or above ``capacity``.
            RateLimitWaitTooLong: the wait would exceed ``max_wait``.
        """
        if profiles < 0 or profiles > self.capacity:
            raise ValueError(f"cannot acquire {profiles} tokens from a bucket of capacity {self.capacity}")
        if profiles == 0:
            return 0.0
        self._refill()
        remaining = self._tokens - profiles
        wait = 0.0 if remaining >= 0 else -remaining / self.rate
        if max_wait is not None and wait > max_wait:
            raise RateLimitWaitTooLong(profiles, wait, max_wait)
        # Reserve before sleeping: later callers see the debt and queue behind us.
        self._tokens = remaining
        if wait <= 0:
            return 0.0
        try:
            await self._sleep(wait)
        except asyncio.CancelledError:
            # Nothing will be sent with these tokens: give them back. Callers that reserved
            # after us already computed their waits with our debt, so they stay on the safe side.
            self._refill()
            self._tokens = min(self.ceiling, self._tokens + profiles)
            raise
        return wait


class Budget(NamedTuple):
    """A rate budget that every client of a process using one project key shares.

    ``name`` tells budgets of one project key apart; ``rate`` (tokens a second) and
    ``capacity`` shape its bucket, which fills to ``ceiling`` tokens at most (default: full).
    """

    name: str
    rate: float
    capacity: int
    ceiling: float | None = None


def endpoint_budget(endpoint: Endpoint) -> Budget:
    """The budget of one profile endpoint (its name is the endpoint's)."""
    # A little under Batch's published rate: our clock and Batch's bucket never start in
    # step, and a 429 costs a round trip plus a backoff, far more than 3 %.
    # /mass-update has "no burst": Batch counts a request when it has read and parsed it,
    # which for a 5,000-profile body lags the moment we took our tokens. Filling to one
    # request's worth, not the whole second, leaves that lag as slack: the second request
    # of a run leaves half a second after the first instead of at once (a 1M full load
    # measured one 429 at its start without it). The same holds after any pause (the
    # sender waiting on the differ, as a continuation leg's stream moves from one part to
    # the next): two requests at once would spend Batch's whole second, and the paced ones
    # after them would arrive with no slack against jitter for ~17 s (our 3 % headroom
    # refills it at 300 profiles a second).
    ceiling = endpoint.burst - endpoint.send_batch if endpoint is Endpoint.MASS_UPDATE else None
    return Budget(endpoint.value, endpoint.rate_per_second * RATE_HEADROOM, endpoint.burst, ceiling)


class RateLimiterRegistry:
    """One :class:`ProfileRateLimiter` per (project key, budget), created on first use.

    Share one registry across every client of a process (the default client registry is
    process-wide) so that activations writing to the same Batch project share its budget.
    Project keys are held only as hashes, so neither the registry nor its repr carries them.

    Args:
        clock: Clock handed to every limiter this registry creates.
        sleep: Sleep handed to every limiter this registry creates.
    """

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._limiters: dict[tuple[bytes, str], ProfileRateLimiter] = {}

    def __repr__(self) -> str:
        return f"RateLimiterRegistry({len(self._limiters)} limiters)"

    def get(self, project_key: str, endpoint: Endpoint) -> ProfileRateLimiter:
        """The shared limiter for this project key and profile endpoint."""
        return self.shared(project_key, endpoint_budget(endpoint))

    def shared(self, project_key: str, budget: Budget) -> ProfileRateLimiter:
        """The shared limiter for this project key and budget (the first caller's shape of a name holds)."""
        digest = hashlib.blake2b(project_key.encode(), digest_size=16).digest()
        key = (digest, budget.name)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = ProfileRateLimiter(
                budget.rate, budget.capacity, clock=self._clock, sleep=self._sleep, ceiling=budget.ceiling
            )
            self._limiters[key] = limiter
        return limiter


# Process-wide default: every BatchClient built without an explicit registry shares it
# (docs/batch-api.md). Safe across event loops: limiters hold no loop-bound objects.
PROCESS_LIMITERS = RateLimiterRegistry()
