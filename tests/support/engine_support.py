"""Helpers for engine tests: a DuckDB segment, an activation, and one run against the simulator.

Everything is real: DuckDB file, SQLite state file, the HTTP simulator, the aiohttp client.
Only the client's backoff sleep is shortened, so retry storms take milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from sync.batch.client import BatchClient
from sync.batch.ratelimit import RateLimiterRegistry
from sync.config import Activation, Credentials
from sync.config_file import parse_activation
from sync.differ import DifferFactory
from sync.engine import Run, RunOptions, RunResult
from sync.runs import Progress
from sync.sources.duckdb import DuckDBSource
from sync.state.sqlite import SQLiteStateStore

API_KEY = "test-rest-api-key-5f1c2d9e8a"
PROJECT_KEY = "project_test_0664hxvwffvbpn278g"
ENV = {"BATCH_REST_API_KEY": API_KEY, "BATCH_PROJECT_KEY": PROJECT_KEY}

SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("email", pa.string()),
        ("phone", pa.string()),
        ("first_name", pa.string()),
        ("points", pa.int64()),
        ("active", pa.bool_()),
    ]
)


def person(index: int, **changes: Any) -> dict[str, Any]:
    row = {
        "customer_id": f"c{index:05d}",
        "email": f"person{index}@example.com",
        "phone": f"+3361234{index % 10000:04d}",
        "first_name": f"Name{index}",
        "points": index,
        "active": True,
    }
    row.update(changes)
    return row


def people(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [person(index) for index in range(start, start + count)]


def write_segment(path: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with duckdb.connect(str(path)) as connection:
        connection.register("incoming", table)
        connection.execute("CREATE OR REPLACE TABLE people AS SELECT * FROM incoming")
        connection.unregister("incoming")


def make_activation(directory: Path, base_url: str, **overrides: Any) -> Activation:
    config: dict[str, Any] = {
        "name": "test_people",
        "source": {
            "type": "duckdb",
            "database": str(directory / "segment.duckdb"),
            "query": "SELECT * FROM people WHERE active",
        },
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": base_url,
            "concurrency": 4,
            "max_attempts": 4,
        },
        "run_type": "full_then_delta",
        "sync_mode": "upsert",
        "mapping": {"custom_id": "customer_id", "email": "email", "phone": "phone"},
        "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "points"}],
        "journal": {"flush_every_profiles": 50, "flush_every_seconds": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return parse_activation(config, source="test")


async def _no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


def make_client(activation: Activation, *, api_key: str = API_KEY) -> BatchClient:
    return BatchClient(
        activation.destination,
        Credentials(api_key, PROJECT_KEY),
        activation=activation.name,
        limiters=RateLimiterRegistry(),
        sleep=_no_wait,
    )


async def run_once(
    activation: Activation,
    state_path: Path,
    *,
    client: BatchClient | None = None,
    rejects: Callable[[dict[str, Any]], None] | None = None,
    differ: Callable[[DuckDBSource, SQLiteStateStore], DifferFactory] | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> RunResult:
    """One run; ``differ`` builds the run's differ from its source and store (default: the embedded one)."""
    source = DuckDBSource(activation.source, activation=activation.name)  # type: ignore[arg-type]
    store = SQLiteStateStore(state_path)
    try:
        run = Run(
            activation,
            source=source,
            store=store,
            client=client or make_client(activation),
            differ=None if differ is None else differ(source, store),
            options=RunOptions(**options),
            progress=progress,
            rejects=rejects,
        )
        return await run.execute()
    finally:
        source.close()
        store.close()


def stored_ids(state_path: Path, activation: str = "test_people") -> set[str]:
    store = SQLiteStateStore(state_path)
    try:
        return set(store.load_fingerprints(activation))
    finally:
        store.close()
