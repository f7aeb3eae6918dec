"""The run's lease and time: taking it, keeping it renewed, and how long a request may take.

Guarantee 4 (``docs/how-a-run-works.md``): the lease is taken before state is read and
every commit is fenced by its token. :class:`LeaseKeeper` holds the current lease, renews
it in the background at a third of its ttl, and answers the two questions the sender asks
of time: the latest moment a request may still be answered (:meth:`LeaseKeeper.deadline`)
and whether a new request may start at all (:meth:`LeaseKeeper.budget_exhausted`).
"""

from __future__ import annotations

import asyncio

from sync.errors import LeaseLost
from sync.logs import get_logger
from sync.model import Lease
from sync.runs import Clock, RunOptions
from sync.state.base import LeaseStore

log = get_logger("cepsync.lease")


class LeaseKeeper:
    """One run's lease (see the module docstring).

    Args:
        store: Where leases are kept.
        activation: The activation the lease is for.
        options: The run's ttl, time budget and owner.
        clock: Wall time for the lease, monotonic time for the budget.
    """

    def __init__(self, store: LeaseStore, activation: str, options: RunOptions, clock: Clock) -> None:
        self._store = store
        self._activation = activation
        self._options = options
        self._clock = clock
        self._started = clock.monotonic()
        self._lease: Lease | None = None

    @property
    def lease(self) -> Lease:
        """The current lease (renewals replace it). Only once :meth:`acquire` succeeded."""
        assert self._lease is not None, "no lease taken"
        return self._lease

    def acquire(self) -> Lease:
        """Take the lease (raises ``LeaseHeld`` when another run holds it)."""
        options = self._options
        self._lease = self._store.acquire_lease(
            self._activation, options.owner, options.lease_ttl_seconds, self._clock.now()
        )
        return self._lease

    def release(self) -> None:
        if self._lease is not None:
            self._store.release_lease(self._lease)

    def elapsed(self) -> float:
        """Seconds since the run started (its time budget counts from then)."""
        return self._clock.monotonic() - self._started

    def budget_exhausted(self) -> bool:
        """True once no new request may start (``sync.send.Budget``): the run hands over."""
        budget = self._options.time_budget_seconds
        if budget is None:
            return False
        return self.elapsed() >= budget - self._options.budget_margin_seconds

    def deadline(self) -> float:
        """No request may keep retrying past the time budget or the lease expiry."""
        lease = self.lease
        ttl = self._options.lease_ttl_seconds
        lease_left = (lease.expires_at - self._clock.now()).total_seconds()
        if lease_left >= ttl / 2:
            # The renewer is keeping up (it extends the lease to a full ttl every ttl/3, so a
            # healthy lease never has less than two thirds left): count on that renewal rather
            # than on what the current lease has left, or a short lease would fail a request
            # whose rate-limit wait is longer than a fraction of the ttl. A lease that renewal
            # stopped extending falls below half and bounds requests by its real expiry again
            # (and no commit outlives it: every commit is fenced).
            lease_left = ttl
        # Keep a margin before expiry.
        margin = min(5.0, ttl * 0.25)
        deadline = self._clock.monotonic() + max(lease_left - margin, 0.0)
        budget = self._options.time_budget_seconds
        if budget is not None:
            deadline = min(deadline, self._started + budget - self._options.budget_margin_seconds / 2)
        return deadline

    async def renew_forever(self) -> None:
        """Keep the lease at least two thirds of its ttl ahead.

        Each renewal is due once a third of the ttl has passed since the expiry was set,
        counted from the lease itself rather than from the last wake-up: a first state
        call can be slow (a cold client's first Firestore request took over a second on
        the emulator) and eat into a short lease before this task even starts.
        """
        ttl = self._options.lease_ttl_seconds
        while True:
            left = (self.lease.expires_at - self._clock.now()).total_seconds()
            await asyncio.sleep(max(left - ttl * 2 / 3, 0.05))
            try:
                renewed = await asyncio.to_thread(self._store.renew_lease, self.lease, ttl, self._clock.now())
            except LeaseLost:
                log.error(
                    "lease lost: another run took over; no further commit will succeed", activation=self._activation
                )
                return
            self._lease = renewed
