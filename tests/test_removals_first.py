"""A mirror delta's removals leave while its moved rows are still being read and mapped.

The ids that left the segment are known once the pass is done and the guards were judged:
they need no mapping, so their requests leave at once, alongside the stream, instead of
after its last group. The counts and what Batch holds stay exact.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sync.dev.simulator import BatchSimulator
from tests.support.engine_support import PROJECT_KEY, make_activation, people, run_once, write_segment
from tests.test_moved_stream import _Events, run_watched

ROWS = 8_000
GONE_EVERY = 8  # one row in 8 leaves the segment: 1,000
CHANGED_EVERY = 3  # one row in 3 of those left gets more points


class _Answered(_Events):
    """The run's progress, plus the moment the first request was answered."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = threading.Event()

    def sent(self, acknowledged: int, rejected: int, failed: int) -> None:
        if not self.answered.is_set():
            self.seen.append("answered")
            self.answered.set()


async def test_removals_leave_before_the_moved_rows_are_read(
    unlimited_sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    simulator, url = unlimited_sim
    rows = people(ROWS)
    write_segment(tmp_path / "segment.duckdb", rows)
    activation = make_activation(
        tmp_path,
        url,
        sync_mode="mirror",
        destination={"endpoint": "mass-update"},
        guards={"max_changed_percent": 100, "max_removed_percent": 50},
    )
    first = await run_once(activation, tmp_path / "state.db")
    assert first.record["counts"]["acknowledged"] == ROWS

    gone = [row["customer_id"] for index, row in enumerate(rows) if index % GONE_EVERY == 0]
    kept = [row for index, row in enumerate(rows) if index % GONE_EVERY]
    changed = kept[::CHANGED_EVERY]
    for row in changed:
        row["points"] += 1
    write_segment(tmp_path / "segment.duckdb", kept)
    events = _Answered()

    # The first batch of moved rows waits until a request was answered (10 s at most): a
    # run that sends its removals after the stream waits it out, and answers come after.
    def hold(index: int, last: bool) -> None:
        if index == 0:
            events.answered.wait(timeout=10)

    second = await run_watched(activation, tmp_path / "state.db", events, hold)

    assert second.status == "succeeded", second.record["error"]
    assert events.seen.index("answered") < events.seen.index("moved batch")
    counts = second.record["counts"]
    assert (counts["removed"], counts["changed"], counts["new"]) == (len(gone), len(changed), 0)
    assert counts["acknowledged"] == len(gone) + len(changed)
    held = simulator.profiles(PROJECT_KEY)
    assert all("points" not in held[custom_id] for custom_id in gone)  # cleared
    assert all(held[row["customer_id"]]["points"] == row["points"] for row in changed)

    third = await run_once(activation, tmp_path / "state.db")  # everything was committed
    assert (third.record["counts"]["sent"], third.record["counts"]["removed"]) == (0, 0)
    assert third.record["counts"]["unchanged"] == len(kept)
