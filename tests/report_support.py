"""A real run history for report, history and monitoring tests.

Six runs of one mirror activation through the real engine (DuckDB segment, SQLite state,
the HTTP Batch simulator in a thread): rejections ours and Batch's, a clean success, a 503
storm (partial), refused credentials (auth_error), a guard abort, then a success with
rejections again (the latest run). Names
and values carry ``<script>`` and markup, so every view of them must escape.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_support import make_activation, make_client, people, person, run_once, write_segment

from sync.batch.simulator import SimulatorThread
from sync.config import Activation
from sync.state.sqlite import SQLiteStateStore

NAME = "report_people"
SCRIPT_ID = "<script>window.__pwned=1</script>"
MARKUP_EMAIL = "not-an-email<b>bold</b><img src=x onerror=window.__pwned=3>"
QUERY_INJECTION = "<script>window.__pwned=2</script><b>query-markup</b>"
DESCRIPTION = "VIP <i>segment</i> & <script>window.__pwned=4</script>"
EXPECTED_STATUSES = [
    "succeeded_with_rejections",
    "succeeded",
    "partial",
    "auth_error",
    "aborted_by_guard",
    "succeeded_with_rejections",
]


@dataclass
class History:
    state: Path
    activation: Activation
    records: list[dict[str, Any]]  # newest first, as the store lists them

    @property
    def state_url(self) -> str:
        return f"sqlite:///{self.state}"


def first_segment() -> list[dict[str, Any]]:
    rows = people(300)
    for index in (3, 4, 5):
        rows[index] = person(index, email=MARKUP_EMAIL)
    rows[10] = person(10, customer_id=SCRIPT_ID, phone="<b>not a phone</b>")
    return rows


def build_history(directory: Path, simulator: SimulatorThread) -> History:
    """Run the six runs and return the records; the simulator's faults are cleared after."""
    segment = directory / "segment.duckdb"
    state = directory / "state.db"
    activation = make_activation(
        directory,
        simulator.base_url,
        name=NAME,
        description=DESCRIPTION,
        sync_mode="mirror",
        source={"query": f"SELECT * FROM people WHERE active /* {QUERY_INJECTION} */"},
        destination={"rate_limit": False, "endpoint": "update"},
        guards={"max_changed_percent": 100},
    )
    faults = simulator.simulator.faults

    def run(**kwargs: Any) -> str:
        return asyncio.run(run_once(activation, state, **kwargs)).status

    statuses = []
    write_segment(segment, first_segment())
    faults.reject_custom_ids = {"c00007", "c00008"}
    statuses.append(run())
    faults.clear()
    write_segment(segment, people(300))
    statuses.append(run())
    write_segment(segment, [person(i, points=i + 1) if i < 20 else person(i) for i in range(300)])
    faults.update({"fail_next": 1_000, "fail_status": 503})
    statuses.append(run())
    faults.clear()
    statuses.append(run(client=make_client(activation, api_key="wrong-key-000000")))
    write_segment(segment, people(100))
    statuses.append(run())
    last = [person(i, points=i + 1) if i < 20 else person(i) for i in range(300)]
    last[3] = person(3, email=MARKUP_EMAIL)
    write_segment(segment, last)
    faults.reject_custom_ids = {"c00015"}
    statuses.append(run())
    faults.clear()
    assert statuses == EXPECTED_STATUSES, statuses
    store = SQLiteStateStore(state)
    try:
        records = store.list_runs(NAME, 50)
    finally:
        store.close()
    return History(state, activation, records)
