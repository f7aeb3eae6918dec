"""Mapping on several cores: the same :class:`sync.planner.Planner`, in worker processes.

Mapping is the one stage that holds the GIL (phone numbers, emails, dates are Python code).
On a machine with spare cores, the engine hands the differ's batches to a pool of worker
processes and takes the planned batches back *in the order it sent them*, so a full pass
still sends in Custom ID order and every decision is the one a single process makes (each
worker builds the same planner from the engine's :meth:`~sync.planner.Planner.spec`). On
one core there is no pool: the pipeline alone carries the load.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack

import pyarrow as pa

from sync.memory import collector_eased
from sync.plan import BatchPlan
from sync.planner import Planner, PlannerSpec

# Batches in flight per worker: enough to keep every worker busy while results are taken
# in order, few enough that memory stays bounded.
BATCHES_PER_WORKER = 2
# Below this many rows to map, starting processes costs more than it saves.
AUTO_POOL_MIN_ROWS = 50_000
AUTO_POOL_MAX_WORKERS = 4

_planner: Planner | None = None
# A worker maps for one stream and exits with it: its collector stays eased (sync/memory.py).
_worker_scope = ExitStack()


def auto_workers() -> int:
    """Worker processes worth starting here: all cores but two (the event loop and DuckDB), at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(AUTO_POOL_MAX_WORKERS, cores - 2))


def _start(spec: PlannerSpec) -> None:
    global _planner
    _planner = Planner.from_spec(spec)
    _worker_scope.enter_context(collector_eased())


def _map_and_plan(batch: pa.RecordBatch, full: bool) -> tuple[BatchPlan, float]:
    assert _planner is not None, "worker not started"
    return _planner.plan(batch, full=full)


class MappingPool:
    """Worker processes that map and plan batches; results come back in submission order.

    Args:
        workers: Processes to start.
        planner: The run's planner; each worker builds the same one from its spec.
    """

    def __init__(self, workers: int, planner: Planner) -> None:
        # multiprocessing (~0.01 s of imports) loads with a pool, not with every run.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        # spawn, not fork: the parent runs DuckDB and asyncio threads, which a fork would
        # copy in whatever state they are in.
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(planner.spec(),),
        )

    def map_in_order(self, batches: Iterator[pa.RecordBatch], *, full: bool) -> Iterator[tuple[BatchPlan, float]]:
        """Each batch's plan and the seconds a worker spent on it, in the order of ``batches``."""
        pending: deque[Future[tuple[BatchPlan, float]]] = deque()
        depth = BATCHES_PER_WORKER * self.workers
        for batch in batches:
            pending.append(self._executor.submit(_map_and_plan, batch, full))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
