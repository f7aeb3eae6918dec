"""The pipeline's producing side: the differ's batches, planned and grouped into requests.

A run streams (``docs/how-a-run-works.md``, "The pipeline"): one worker thread reads the
differ's batches, has them mapped and planned (in this thread, or in worker processes when
the run is large and the machine has cores to spare), and cuts the rows to send into
request-sized :class:`sync.send.SendGroup`\\ s, while the event loop sends the groups that
are ready. This module is that thread's side; :mod:`sync.engine` hands its groups to the
sender. What the thread finds worth a word (rejected rows, rows a continued pass skipped)
goes to the run book, the one owner of the run's counts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import KEY, Differ, IdScan
from sync.memory import collector_eased, release_free_memory
from sync.model import ActivationMeta
from sync.plan import BatchPlan, PlanCounts, ProfileRows
from sync.planner import Planner
from sync.record import StageTimings
from sync.runbook import RunBook
from sync.send import SendGroup
from sync.workers import AUTO_POOL_MIN_ROWS, MappingPool, auto_workers

# Rows mapped between two hand-backs of freed memory to the OS (sync/memory.py).
TRIM_EVERY_ROWS: Final = 50_000


@dataclass
class Scan:
    """What the state and one read of the id column say, before any row is mapped."""

    diff: Differ
    ids: IdScan
    meta: ActivationMeta
    planner: Planner
    full: bool  # every valid row is sent (FULL ONLY, --full, or a continued full pass)
    watermark: str | None  # a continued full pass skips ids at or below it
    version: str  # the mapping version
    # Intents an earlier run left unsettled (a crash, failed requests): usually none.
    stale_intents: frozenset[str] = frozenset()

    @property
    def may_send(self) -> bool:
        """Whether the run will likely send: a full pass, removals, moved rows or unsettled intents.

        New ids alone do not count: a segment's rows whose values Batch cannot take are new
        on every run (never acknowledged, never stored), and rejected again before any send.
        """
        ids = self.ids
        return self.full or bool(ids.removed or ids.moved != 0 or self.stale_intents)

    @property
    def may_map(self) -> bool:
        """Whether the run will likely map rows: a full pass, moved rows, or rows with new, null or duplicated ids."""
        ids = self.ids
        return self.full or bool(ids.moved != 0 or ids.new_ids or ids.null_ids or ids.duplicates)


@dataclass
class Moved:
    """Rows with a stored fingerprint whose raw values moved: mapped before the first send, or as it goes.

    ``Producer.moved`` maps them all before anything is sent (``sends`` holds the changed
    ones). When the guards cannot trip whatever they hold, the stream maps them first
    instead, sending each group as it fills (``Producer.groups(..., map_moved=True)``), and
    fills ``refreshes`` and ``tally`` here as it goes; ``sends`` stays empty.
    """

    sends: ProfileRows
    refreshes: ProfileRows
    tally: PlanCounts

    @classmethod
    def to_map(cls) -> Moved:
        """Nothing mapped yet: filled by :meth:`take` as the moved rows are (``Producer.moved``, or the stream's)."""
        return cls(ProfileRows(), ProfileRows(), PlanCounts())

    def take(self, planned: BatchPlan) -> None:
        """Add a planned batch of moved rows' refreshes and counts (its sends are the caller's)."""
        self.tally.add(planned.tally)
        if planned.refreshes:
            self.refreshes = ProfileRows.concat([self.refreshes, planned.refreshes])


class Producer:
    """Plans a scan's batches and cuts them into send groups (see the module docstring).

    Args:
        scan: The run's scan (its differ, planner, full pass and watermark).
        book: Where rejected rows and skipped counts go.
        stages: The run's stage timings (``map`` is added to here).
        stop: Set by the event loop when the run stops sending: the thread stops reading.
        ordered: A full pass must come in id order (for a continuation's watermark).
        map_workers: Worker processes to map with; None: as many as the machine spares
            for large runs; 0: map in this thread.
    """

    def __init__(
        self,
        scan: Scan,
        book: RunBook,
        stages: StageTimings,
        stop: threading.Event,
        *,
        ordered: bool,
        map_workers: int | None,
    ) -> None:
        self.scan = scan
        self.book = book
        self.stages = stages
        self.stop = stop
        self.ordered = ordered
        self.map_workers = map_workers

    def plan(self, batch: pa.RecordBatch, *, full: bool) -> BatchPlan:
        planned, seconds = self.scan.planner.plan(batch, full=full)
        self.stages.map += seconds
        return planned

    def moved(self) -> Moved:
        """Map the rows whose stored fingerprint may have changed: the changed count is exact."""
        moved = Moved.to_map()
        sends: list[ProfileRows] = []
        for planned in self._moved_plans():
            if self.scan.full:  # counted for the guards; the full pass sends every row itself
                moved.tally.add(planned.tally)
                continue
            moved.take(planned)
            sends.append(planned.sends)
            self.book.keep_rejected(planned)
        moved.sends = ProfileRows.concat(sends)
        return moved

    def _moved_plans(self) -> Iterator[BatchPlan]:
        for batch in self.scan.diff.moved_rows():
            yield self.plan(batch, full=False)

    def groups(
        self, moved: Moved, tally: PlanCounts, *, group_size: int, map_moved: bool = False
    ) -> Iterator[SendGroup]:
        """Read, diff, map and plan the rows to send, one group (one request) at a time.

        Runs in a worker thread: DuckDB and Arrow release the GIL, the mapping does not.
        ``tally`` is added every planned batch's counts. ``map_moved``: the moved rows are
        not mapped yet (``Moved.to_map``); they come first, each group sent as it fills, and
        they are all mapped even if sending stops early, so the run's counts stay exact.
        """
        with collector_eased():
            pending = moved.sends
            if map_moved:
                pending = yield from self._moved_groups(moved, tally, group_size=group_size)
            yield from self._cut(pending, self._mapping_pool(), tally, group_size=group_size)

    def _moved_groups(
        self, moved: Moved, tally: PlanCounts, *, group_size: int
    ) -> Generator[SendGroup, None, ProfileRows]:
        """The moved rows' full groups as they are mapped; returns what is left (less than a group)."""

        def take(planned: BatchPlan) -> None:
            moved.take(planned)
            tally.add(planned.tally)
            self.book.keep_rejected(planned)

        pending = ProfileRows()
        plans = self._moved_plans()
        try:
            for planned in plans:
                take(planned)
                if planned.sends:
                    pending = ProfileRows.concat([pending, planned.sends])
                pending = yield from _full_groups(pending, group_size)
        except GeneratorExit:
            # Sending stopped (a failure, the time budget): the rest are still mapped, so the
            # record counts every changed row, as when they are all mapped before sending. A
            # failure while doing so leaves the counts short; the run reports what stopped it.
            with contextlib.suppress(Exception):
                for planned in plans:
                    take(planned)
            raise
        return pending

    def _cut(
        self, pending: ProfileRows, pool: MappingPool | None, tally: PlanCounts, *, group_size: int
    ) -> Iterator[SendGroup]:
        try:
            # The moved rows are mapped already: their full groups leave before the stream's
            # first read, which would otherwise come between the pass and the first request.
            pending = yield from _full_groups(pending, group_size)
            if self.stop.is_set():
                return
            if pool is None:
                planned_batches: Iterator[BatchPlan] = (
                    self.plan(batch, full=self.scan.full) for batch in self._batches()
                )
            else:
                planned_batches = self._timed(pool.map_in_order(self._batches(), full=self.scan.full))
            rows_since_trim = 0
            for planned in planned_batches:
                rows_since_trim += len(planned.sends) + len(planned.refreshes) + len(planned.rejected)
                if rows_since_trim >= TRIM_EVERY_ROWS:
                    rows_since_trim = 0
                    release_free_memory()
                tally.add(planned.tally)
                self.book.keep_rejected(planned)
                if planned.sends:
                    pending = ProfileRows.concat([pending, planned.sends])
                pending = yield from _full_groups(pending, group_size)
                if self.stop.is_set():
                    return
        finally:
            if pool is not None:
                pool.close()
        for start in range(0, len(pending), group_size):
            yield SendGroup(upserts=pending.slice(start, group_size))

    def _batches(self) -> Iterator[pa.RecordBatch]:
        """The differ's rows to send; a continued full pass drops what its first legs sent."""
        scan = self.scan
        skipped = scan.ids.below_watermark  # what the differ already left out
        if scan.watermark is not None:
            self.book.count("skipped_by_checkpoint", skipped)
        for batch in scan.diff.rows_to_send(full=scan.full, ordered=scan.full and self.ordered):
            if self.stop.is_set():
                return
            if scan.watermark is not None:
                keys = batch.column(KEY)
                keep = pc.or_kleene(pc.greater(keys, pa.scalar(scan.watermark, pa.string())), pc.is_null(keys))
                before = batch.num_rows
                batch = batch.filter(keep)
                skipped += before - batch.num_rows
                self.book.count("skipped_by_checkpoint", skipped)
                if batch.num_rows == 0:
                    continue
            yield batch

    def _mapping_pool(self) -> MappingPool | None:
        """Worker processes for the mapping, when asked for or when the run is large enough."""
        ids = self.scan.ids
        workers = self.map_workers
        if workers is None:
            rows = ids.new_ids + (ids.matched if self.scan.full else 0)
            workers = auto_workers() if rows >= AUTO_POOL_MIN_ROWS else 0
        if workers <= 0:
            return None
        self.book.note_timing("map_workers", workers)
        return MappingPool(workers, self.scan.planner)

    def _timed(self, results: Iterator[tuple[BatchPlan, float]]) -> Iterator[BatchPlan]:
        for planned, seconds in results:
            self.stages.map += seconds
            yield planned


def _full_groups(pending: ProfileRows, group_size: int) -> Generator[SendGroup, None, ProfileRows]:
    """The full groups of ``pending``, one request each; returns the rest (less than a group)."""
    while len(pending) >= group_size:
        group, pending = pending.slice(0, group_size), pending.slice(group_size)
        yield SendGroup(upserts=group)
    return pending
