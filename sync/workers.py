"""Mapping on several cores: the same ``convert_batch`` + ``encode_batch`` + ``plan_rows``, in worker processes.

Mapping is the one stage that holds the GIL (phone numbers, emails, dates are Python code).
On a machine with spare cores, the engine hands the differ's batches to a pool of worker
processes and takes the planned batches back *in the order it sent them*, so a full pass
still sends in Custom ID order and every decision is the one a single process makes (each
worker builds the same :class:`~sync.mapping.ProfileMapper` from the same activation and
column types). On one core there is no pool: the pipeline alone carries the load.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor

import pyarrow as pa

from sync.config import Activation, AttributeType
from sync.encode import encode_batch
from sync.mapping import ProfileMapper
from sync.model import Refusal
from sync.plan import BatchPlan, plan_rows

# Batches in flight per worker: enough to keep every worker busy while results are taken
# in order, few enough that memory stays bounded.
BATCHES_PER_WORKER = 2
# Below this many rows to map, starting processes costs more than it saves.
AUTO_POOL_MIN_ROWS = 50_000
AUTO_POOL_MAX_WORKERS = 4

_mapper: ProfileMapper | None = None
_duplicates: Mapping[str, int] = {}
_refused: Mapping[str, Refusal] | None = None
_id_column = ""


def auto_workers() -> int:
    """Worker processes worth starting here: all cores but two (the event loop and DuckDB), at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(AUTO_POOL_MAX_WORKERS, cores - 2))


def _start(
    activation_json: str,
    types: dict[str, str],
    duplicates: dict[str, int],
    id_column: str,
    refused: dict[str, Refusal] | None,
) -> None:
    global _mapper, _duplicates, _id_column, _refused
    activation = Activation.model_validate_json(activation_json)
    _mapper = ProfileMapper(activation, {column: AttributeType(value) for column, value in types.items()})
    _duplicates = duplicates
    _id_column = id_column
    _refused = refused


def _map_and_plan(batch: pa.RecordBatch, full: bool) -> tuple[BatchPlan, float]:
    assert _mapper is not None, "worker not started"
    started = time.perf_counter()
    plan = plan_rows(
        batch,
        encode_batch(_mapper.convert_batch(batch)),
        full=full,
        duplicates=_duplicates,
        id_column=_id_column,
        payload_keys=_mapper.payload_keys,
        refused=_refused,
    )
    return plan, time.perf_counter() - started


class MappingPool:
    """Worker processes that map and plan batches; results come back in submission order.

    Args:
        workers: Processes to start.
        activation: The activation (each worker builds its own mapper from it).
        types: Column -> resolved attribute type (``resolve_attribute_types``).
        duplicates: Custom ID -> copies for every duplicated id (from the id scan).
        id_column: The Custom ID column.
        refused: Payloads Batch refused, by Custom ID (not sent again unchanged), or None.
    """

    def __init__(
        self,
        workers: int,
        activation: Activation,
        types: Mapping[str, AttributeType],
        duplicates: Mapping[str, int],
        id_column: str,
        refused: Mapping[str, Refusal] | None = None,
    ) -> None:
        self.workers = workers
        # spawn, not fork: the parent runs DuckDB and asyncio threads, which a fork would
        # copy in whatever state they are in.
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(
                activation.model_dump_json(),
                {column: kind.value for column, kind in types.items()},
                dict(duplicates),
                id_column,
                None if refused is None else dict(refused),
            ),
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
