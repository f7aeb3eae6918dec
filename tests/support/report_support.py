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

from sync.config import Activation
from sync.dev.simulator import SimulatorThread
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    PROJECT_KEY,
    make_activation,
    make_client,
    people,
    person,
    run_once,
    write_segment,
)

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
    # Batch refused c00007 and c00008: they are sent again once their payload changed.
    write_segment(segment, [person(i, points=i + 1_000) if i in (7, 8) else person(i) for i in range(300)])
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
    last[10] = person(10, customer_id=SCRIPT_ID, phone="<b>not a phone</b>")
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


def function_log_lines(directory: Path, simulator: SimulatorThread) -> list[dict[str, Any]]:
    """Run the Cloud Function's Pub/Sub handler twice and return every log line it wrote.

    The first run meets one 503 (a retry line), then rejects rows (ours and Batch's); the
    second is refused by Batch (401).
    Logging is configured exactly as on Cloud Functions (JSON for Cloud Logging), into a
    buffer; each returned dict is one parsed line, as Cloud Logging would get it.
    """
    import base64
    import io
    import json

    import structlog
    import yaml

    from sync.function import configure_runtime_logging, handle_pubsub

    write_segment(directory / "segment.duckdb", first_segment())
    activations = directory / "activations"
    activations.mkdir()
    config = {
        "name": "fn_metrics",
        "source": {"type": "duckdb", "database": "../segment.duckdb", "query": "SELECT * FROM people"},
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": simulator.base_url,
            "endpoint": "update",
            "max_attempts": 2,
            "rate_limit": False,
        },
        "mapping": {"custom_id": "customer_id", "email": "email", "phone": "phone"},
        "attributes": [{"column": "points"}],
    }
    (activations / "fn_metrics.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    environ = {
        "CEPSYNC_STATE": f"sqlite:///{directory / 'state.db'}",
        "CEPSYNC_ACTIVATIONS_DIR": str(activations),
        "BATCH_REST_API_KEY": API_KEY,
        "BATCH_PROJECT_KEY": PROJECT_KEY,
        "GOOGLE_CLOUD_PROJECT": "acme-prod",
    }

    def envelope() -> dict[str, Any]:
        data = base64.b64encode(json.dumps({"activation": "fn_metrics"}).encode()).decode()
        return {"message": {"data": data, "messageId": "1"}, "subscription": "projects/acme-prod/subscriptions/s"}

    saved = structlog.get_config()
    buffer = io.StringIO()
    try:
        configure_runtime_logging(environ)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(buffer))
        simulator.simulator.faults.reject_custom_ids = {"c00007"}
        simulator.simulator.faults.update({"fail_next": 1, "fail_status": 503})
        handle_pubsub(envelope(), event_id="evt-ok", environ=environ)
        simulator.simulator.faults.clear()
        # Batch refused c00007: its payload must change for the next run to send it (to a 401).
        changed = first_segment()
        changed[7] = person(7, points=1_007)
        write_segment(directory / "segment.duckdb", changed)
        handle_pubsub(envelope(), event_id="evt-401", environ={**environ, "BATCH_REST_API_KEY": "wrong-key-000000"})
    finally:
        structlog.configure(**saved)
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def function_run_end_lines(directory: Path, simulator: SimulatorThread) -> list[dict[str, Any]]:
    """The run-end lines among :func:`function_log_lines`."""
    from sync.runlog import RUN_END_EVENT

    lines = function_log_lines(directory, simulator)
    return [line for line in lines if line.get("cepsync_event") == RUN_END_EVENT]
