"""A delta whose guards hold whatever its moved rows hold sends them as they are mapped.

The moved rows (a stored id whose raw values moved) are mapped before the first request, so
that the guards judge the exact number of changed profiles. When the guards hold even if
every moved row changed (the pass counted them; a changed row is a moved one), the stream
maps them instead and sends each group as it fills: the first request no longer waits for
the last moved row. The counts, the guards' record and what Batch holds stay exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sync.config import Activation
from sync.dev.simulator import BatchSimulator
from sync.diff import EmbeddedDiffer
from sync.differ import Differ, DiffRequest
from sync.runs import RunResult
from sync.sources.duckdb import DuckDBSource
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    PROJECT_KEY,
    make_activation,
    make_client,
    people,
    run_once,
    write_segment,
)

# Moved rows come in the differ's output batches (up to sync.diff.OUTPUT_BATCH_ROWS, 2,048):
# those before the last one hold at least ROWS - 2,048 rows, more than a mass-update group.
ROWS = 8_000
Hold = Callable[[int, bool], None]  # a batch's index, and whether it is the last
COSMETIC_EVERY = 100  # one row in 100 only changes form


class _Events:
    """What happened, in order: each batch of moved rows read, and the first group handed to the sender."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.announced = threading.Event()

    # sync.runs.Progress
    def rows_read(self, rows: int) -> None:
        pass

    def planned(self, counts: dict[str, int]) -> None:
        pass

    def sending(self, total: int, endpoint: str) -> None:
        self.seen.append(f"sending {total}")
        self.announced.set()

    def sent(self, acknowledged: int, rejected: int, failed: int) -> None:
        pass


class _Watched:
    """The run's real differ, its moved rows noted as they are read.

    ``hold``: called before each batch is handed over with its index and whether it is the
    last (it may wait for something); the batches are read one ahead to know the last.
    """

    def __init__(self, diff: Differ, events: _Events, *, hold: Hold | None) -> None:
        self._diff = diff
        self._events = events
        self._hold = hold

    def __getattr__(self, name: str) -> Any:
        return getattr(self._diff, name)

    def moved_rows(self) -> Iterator[pa.RecordBatch]:
        batches = iter(self._diff.moved_rows())
        batch = next(batches, None)
        index = 0
        while batch is not None:
            following = next(batches, None)
            if self._hold is not None:
                self._hold(index, following is None)
            self._events.seen.append("moved batch")
            yield batch
            batch, index = following, index + 1


class _WatchedDiffer(EmbeddedDiffer):
    def __init__(
        self,
        source: DuckDBSource,
        store: SQLiteStateStore,
        events: _Events,
        *,
        hold: Hold | None,
    ) -> None:
        super().__init__(source, store)
        self._events = events
        self._hold = hold

    def open(self, activation: str, request: DiffRequest) -> Differ:
        opened = super().open(activation, request)
        return _Watched(opened, self._events, hold=self._hold)  # type: ignore[return-value]


async def run_watched(
    activation: Activation, state_path: Path, events: _Events, hold: Hold, **options: Any
) -> RunResult:
    """One run whose moved rows are noted in ``events`` as they are read, each batch after ``hold``."""
    return await run_once(
        activation,
        state_path,
        differ=lambda source, store: _WatchedDiffer(source, store, events, hold=hold),
        progress=events,
        **options,
    )


@pytest.mark.parametrize("limit", [100.0, 99.5], ids=["guards hold", "changed guard judged on the exact count"])
async def test_moved_rows_are_sent_as_they_are_mapped_when_the_guards_hold_whatever_they_hold(
    unlimited_sim: tuple[BatchSimulator, str], tmp_path: Path, limit: float
) -> None:
    simulator, url = unlimited_sim
    rows = people(ROWS)
    write_segment(tmp_path / "segment.duckdb", rows)
    activation = make_activation(
        tmp_path,
        url,
        sync_mode="mirror",
        destination={"endpoint": "mass-update"},
        guards={"max_changed_percent": limit},
        journal={"flush_every_profiles": 2_000},
    )
    first = await run_once(activation, tmp_path / "state.db")
    assert first.record["counts"]["acknowledged"] == ROWS

    # Every row moves; 99 % change, 1 % only change form (the same number, written otherwise).
    # The batches before the last then fill the first group and its window of intents
    # (sync.send.IntentNoter): the first group can leave before the last batch is read.
    for index, row in enumerate(rows):
        if index % COSMETIC_EVERY:
            row["points"] += 1
        else:
            row["phone"] = "+33 " + row["phone"][3:]
    write_segment(tmp_path / "segment.duckdb", rows)
    events = _Events()

    # With the guards holding, the last batch of moved rows waits until the first group
    # reached the sender (30 s at most): a run that maps every moved row first waits it out.
    def hold(index: int, last: bool) -> None:
        if last and limit == 100:
            events.announced.wait(timeout=30)

    second = await run_watched(activation, tmp_path / "state.db", events, hold)

    assert second.status == "succeeded", second.record["error"]
    counts = second.record["counts"]
    cosmetic = ROWS // COSMETIC_EVERY
    changed = ROWS - cosmetic
    assert (counts["changed"], counts["refreshed"], counts["unchanged"]) == (changed, cosmetic, cosmetic)
    assert (counts["sent"], counts["acknowledged"]) == (changed, changed)
    verdict = next(g for g in second.record["guards"] if g["guard"] == "changed_percent")
    assert verdict["tripped"] is False
    assert f"{changed} of {ROWS} synced profiles changed" in verdict["detail"]  # the exact count, not the bound
    assert simulator.profiles(PROJECT_KEY)["c00001"]["points"] == rows[1]["points"]
    batches = events.seen.count("moved batch")
    assert batches >= 2
    sending = next(index for index, event in enumerate(events.seen) if event.startswith("sending"))
    if limit == 100:
        # The guards hold even if every moved row changed: the first group reached the
        # sender before the last batch of moved rows was read (which waited for it).
        assert events.seen[sending] == f"sending {ROWS}"  # announced with the bound
        assert sending < len(events.seen) - 1
    else:
        # 100 % moved would trip 99.5 %: every moved row is mapped first; 99 % changed holds.
        assert sending == batches
        assert events.seen[sending] == f"sending {changed}"

    third = await run_once(activation, tmp_path / "state.db")  # the refreshes were committed
    assert (third.record["counts"]["sent"], third.record["counts"]["unchanged"]) == (0, ROWS)


async def test_a_run_that_stops_sending_early_still_counts_every_moved_row(
    unlimited_sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    """Sending stops at the first request (a wrong key) with moved rows still unread: they are mapped all the same."""
    _, url = unlimited_sim
    rows = people(ROWS)
    write_segment(tmp_path / "segment.duckdb", rows)
    # Loaded and checked on mass-update (fast); the stopped run sends on /update, 200 a group.
    guards = {"max_changed_percent": 100}
    loaded = make_activation(tmp_path, url, destination={"endpoint": "mass-update"}, guards=guards)
    activation = make_activation(tmp_path, url, destination={"endpoint": "update"}, guards=guards)
    await run_once(loaded, tmp_path / "state.db")
    for row in rows:
        row["points"] += 1
    write_segment(tmp_path / "segment.duckdb", rows)
    # The second batch of moved rows is read 2 s after the first group reached the sender, by
    # which time Batch refused the key and the run stopped sending: the next group handed
    # on is the last, and the batches after it are left to be read.
    events = _Events()

    def hold(index: int, last: bool) -> None:
        if index == 1:
            events.announced.wait(timeout=30)
            time.sleep(2)

    stopped = await run_watched(
        activation, tmp_path / "state.db", events, hold, client=make_client(activation, api_key="wrong-key")
    )
    assert stopped.status == "auth_error"
    assert events.seen.count("moved batch") >= 3
    assert stopped.record["counts"]["changed"] == ROWS  # not only the rows mapped before the stop
    assert stopped.record["counts"]["acknowledged"] == 0
    again = await run_once(loaded, tmp_path / "state.db")  # nothing was committed: all sent now
    assert (again.record["counts"]["changed"], again.record["counts"]["acknowledged"]) == (ROWS, ROWS)
