"""``cepsync demo``: a real sync on the embedded default, start to finish, in one command.

DuckDB segment → engine → local Batch simulator (real HTTP, Batch's rate limits on),
state in SQLite. Day 1 is a full load; day 2 a delta in mirror mode with changed,
new, departed and invalid rows. At the end the demo checks that Batch holds exactly
the segment's valid rows.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from sync.config_file import load_activation
from sync.dev.demo import generate_segment, invalid_ids, next_day, write_customers
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.engine import RunOptions, RunResult

# The two commands the demo borrows from the CLI, which hands them in (the CLI imports this
# module only when `cepsync demo` runs; this module never imports the CLI).
ExecuteRun = Callable[..., RunResult]
PrintRecord = Callable[..., None]

ACTIVATION_TEMPLATE = """\
# A demo activation: active customers mirrored to a Batch project.
name: vip_customers
description: Active customers, mirrored to Batch (demo)
source:
  type: duckdb
  database: segment.duckdb
  query: SELECT * FROM customers WHERE is_active
destination:
  api_key_env: BATCH_REST_API_KEY
  project_key_env: BATCH_PROJECT_KEY
  base_url: {base_url}
run_type: full_then_delta
sync_mode: mirror
mapping:
  custom_id: customer_id
  email: email
  phone: phone
  language: language
  region: country
  timezone: timezone
  email_marketing: newsletter_opt_in
  sms_marketing: sms_opt_in
  default_phone_region: FR
attributes:
  - column: first_name
    name: firstname
  - column: loyalty_points
  - column: lifetime_value
  - column: last_order_at
  - column: birthdate
  - column: favorite_categories
  - column: profile_url
    type: url
guards:
  max_removed_percent: 10
"""


def _valid_active_ids(rows: list[dict[str, Any]], invalid: set[str]) -> set[str]:
    """What Batch should hold after a clean mirror run: the demo's valid, active rows."""
    return {row["customer_id"] for row in rows if row["is_active"] and row["customer_id"]} - invalid


def run_demo(
    directory: Path,
    *,
    rows: int,
    console: Console,
    progress_factory: Callable[[], Any],
    progress_adapter: Callable[[Any], Any],
    execute_run: ExecuteRun,
    print_record: PrintRecord,
) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    api_key = os.environ.setdefault("BATCH_REST_API_KEY", "demo-" + secrets.token_hex(12))
    project_key = os.environ.setdefault("BATCH_PROJECT_KEY", "project_demo" + secrets.token_hex(8))
    state = f"sqlite:///{directory / 'state.db'}"
    database = directory / "segment.duckdb"
    day_one = generate_segment(rows)
    write_customers(database, day_one)
    # Invalid rows that fail mapping are only those `generate_segment` adds on purpose.
    simulator = BatchSimulator({project_key: api_key}, rate_limit=True)
    with SimulatorThread(simulator) as running:
        config_path = directory / "vip_customers.yaml"
        config_path.write_text(ACTIVATION_TEMPLATE.format(base_url=running.base_url), encoding="utf-8")
        activation = load_activation(config_path)
        console.rule("[bold]Day 1: first run (full load)")
        # Paths, URLs and commands are printed whole (soft_wrap: no line break is inserted),
        # so they can be copied from a narrow terminal, and as Text (a path is not markup).
        console.print(
            Text(f"segment: {len(day_one):,} rows in {database} · Batch simulator at {running.base_url}"),
            soft_wrap=True,
        )
        result = _one_run(execute_run, activation, state, progress_factory, progress_adapter)
        print_record(result.record, samples=12)
        if result.exit_code:
            return result.exit_code

        day_two = next_day(day_one)
        write_customers(database, day_two)
        console.rule("[bold]Day 2: delta run (mirror)")
        console.print(
            "overnight: ~5% of customers changed, ~2% left the segment, ~1% joined, ~1% had a cosmetic change"
        )
        result = _one_run(execute_run, activation, state, progress_factory, progress_adapter)
        print_record(result.record, samples=3)
        if result.exit_code:
            return result.exit_code

        held = {cid for cid, attrs in simulator.profiles(project_key).items() if _has_data(attrs)}
        expected = _valid_active_ids(day_two, invalid_ids(rows))
        console.rule("[bold]Check")
        if held == expected:
            console.print(
                f"[green]✓[/] Batch holds data for exactly the segment's {len(expected):,} valid rows "
                f"({len(simulator.profiles(project_key)) - len(held)} departed profiles were cleared)."
            )
        else:
            console.print(
                f"[red]✗[/] mismatch: {len(held - expected)} unexpected, {len(expected - held)} missing profiles"
            )
            return 1
        console.print(
            Text(f"\nactivation: {config_path}\nhistory:    cepsync history vip_customers --state {state}"),
            soft_wrap=True,
        )
    return 0


def _has_data(attributes: dict[str, Any]) -> bool:
    return any(value is not None for value in attributes.get("attributes", attributes).values())


def _one_run(
    execute_run: ExecuteRun,
    activation: Any,
    state: str,
    progress_factory: Callable[[], Any],
    adapter: Callable[[Any], Any],
) -> RunResult:
    with progress_factory() as bars:
        return execute_run(activation, state=state, options=RunOptions(trigger="demo"), progress=adapter(bars))
