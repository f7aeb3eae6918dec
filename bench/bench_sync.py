"""End-to-end throughput benchmark of one activation: full load, 1 % delta, no-change delta.

    .venv/bin/python bench/bench_sync.py            # 1,000,000 profiles
    .venv/bin/python bench/bench_sync.py --quick    # 100,000 profiles (smoke run)
    .venv/bin/python bench/bench_sync.py --rows 250000 --changed-percent 5
    .venv/bin/python bench/bench_sync.py --state firestore   # state in the Firestore emulator

What runs (see bench/README.md for how to read the figures):

1. A realistic ``customers`` table (the demo's columns and value shapes) is generated
   with DuckDB SQL in a scratch directory, plus the demo's deliberately invalid rows.
   Generating a million rows in Python (``sync.demo.generate_segment``) costs ~90 µs a
   row, mostly validating phone numbers, so the valid rows are produced in SQL from
   templates that ``phonenumbers`` accepts; the run record counts every rejection.
2. The Batch simulator runs in its own process (``python -m sync.cli simulator``) with
   Batch's rate limits on, so the engine and the simulator never share a GIL.
3. Each engine run is its own child process (this script with ``--_child``), so its peak
   RSS and CPU time are that run's alone. The activation is the demo's mapping in
   ``upsert`` mode, ``full_then_delta``, endpoint ``auto``. State is in SQLite, or with
   ``--state firestore`` in the official Firestore emulator (started here, in its own
   process group); each run then also reports the Firestore document reads, writes,
   deletes and transactions its own store instance issued (``FirestoreStateStore.op_counts``).
4. Stage probes (also child processes, before the full and the delta run) replay the
   engine's read → raw fingerprint → skip → map → plan loop with a timer per stage,
   against the same data and state, without sending or committing anything.

Figures are printed as a table and written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import duckdb
import pyarrow as pa
import yaml

from sync.batch.client import Endpoint
from sync.demo import SCHEMA as DEMO_SCHEMA
from sync.demo import invalid_rows
from sync.demo_runner import ACTIVATION_TEMPLATE

if TYPE_CHECKING:
    from sync.state.base import StateStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results" / "latest.json"
API_KEY_ENV = "BATCH_REST_API_KEY"
PROJECT_KEY_ENV = "BATCH_PROJECT_KEY"
ACTIVATION_NAME = "bench_customers"
FULL_ROWS = 1_000_000
QUICK_ROWS = 100_000
# The full-load probe maps every row it reads; a sample keeps it from doubling the bench time.
FULL_PROBE_ROWS = 100_000
SIMULATOR_START_SECONDS = 30.0
STATE_BACKENDS = ("sqlite", "firestore")
# The project the emulator serves and the state URL the engine children open (through
# `sync.runtime.open_store`, the edge `cepsync run` uses); any project id works locally.
FIRESTORE_PROJECT = "test-proj"
FIRESTORE_STATE_URL = f"firestore://{FIRESTORE_PROJECT}/(default)?prefix=bench"
# The JVM emulator takes ~10-20 s to answer on 2 cores; more when the machine is busy.
FIRESTORE_START_SECONDS = 120.0
FIRESTORE_OPS = ("reads", "writes", "deletes", "transactions")

# The demo's customers, generated in SQL. Values are derived from hash(i, salt) (shifted to
# fit BIGINT, so integer arithmetic and list indexing type-check), so the
# table is the same on every machine and every run. Phone templates are ranges that
# libphonenumber accepts as valid mobiles (checked: FR 06 1x/2x, GB 7400, DE 151, ES 6xx,
# US 415 with a 2-9 exchange), so valid rows are valid by the mapper's own rules.
_GENERATE_SQL = """
CREATE OR REPLACE TABLE customers AS
WITH base AS (
    SELECT i,
           CAST(i % 5 AS INTEGER) AS loc,
           CAST(i % 12 AS INTEGER) AS fn,
           CAST(hash(i, 'a') >> 1 AS BIGINT) AS h1, CAST(hash(i, 'b') >> 1 AS BIGINT) AS h2,
           CAST(hash(i, 'c') >> 1 AS BIGINT) AS h3, CAST(hash(i, 'd') >> 1 AS BIGINT) AS h4
    FROM range($rows) AS t(i)
),
named AS (
    SELECT *,
           ['Jane', 'Louis', 'Chloé', 'Hugo', 'Amélie', 'Noah', 'Léa', 'Arthur', 'Inès', 'Jules', 'Zoé',
            'Malo'][fn + 1] AS first,
           ['bikes', 'cinema', 'books', 'running', 'cooking', 'travel', 'music', 'garden', 'gaming',
            'yoga'] AS categories,
           printf('cust-%07d', i) AS cid
    FROM base
)
SELECT
    cid AS customer_id,
    lower(replace(first, 'é', 'e')) || '.' || i || '@example.com' AS email,
    CASE loc
        WHEN 0 THEN printf('06 %02d %02d %02d %02d', 10 + h1 % 20, h1 // 100 % 100, h2 % 100, h2 // 100 % 100)
        WHEN 1 THEN printf('+44 7400 %03d%03d', 200 + h1 % 800, 200 + h2 % 800)
        WHEN 2 THEN printf('+49 151 %04d %04d', 1000 + h1 % 9000, 1000 + h2 % 9000)
        WHEN 3 THEN printf('+34 6%02d %03d %03d', 10 + h1 % 90, 200 + h2 % 800, 200 + h3 % 800)
        ELSE printf('+1 415 %03d %04d', 200 + h1 % 800, 1000 + h2 % 9000)
    END AS phone,
    CASE WHEN i % 7 = 0 THEN upper(['fr', 'en', 'de', 'es', 'en'][loc + 1])
         ELSE ['fr', 'en', 'de', 'es', 'en'][loc + 1] END AS language,
    ['FR', 'GB', 'DE', 'ES', 'US'][loc + 1] AS country,
    ['Europe/Paris', 'Europe/London', 'Europe/Berlin', 'Europe/Madrid', 'America/New_York'][loc + 1] AS timezone,
    i % 3 <> 0 AS newsletter_opt_in,
    ['yes', 'no', 'subscribed', NULL][CAST(i % 4 AS INTEGER) + 1] AS sms_opt_in,
    first AS first_name,
    CAST(h3 % 50001 AS BIGINT) AS loyalty_points,
    round(CAST(h4 % 500001 AS DOUBLE) / 100, 2) AS lifetime_value,
    TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_minutes(CAST(h1 % 400001 AS BIGINT)) AS last_order_at,
    DATE '1950-01-01' + CAST(h2 % 20001 AS INTEGER) AS birthdate,
    CASE WHEN h4 % 4 = 0 THEN NULL
         ELSE list_distinct([categories[h3 % 10 + 1], categories[h3 // 10 % 10 + 1],
                             categories[h3 // 100 % 10 + 1]])[1:CAST(h4 % 4 AS INTEGER)]
    END AS favorite_categories,
    'https://shop.example.com/u/' || cid AS profile_url,
    TRUE AS is_active
FROM named
"""

# A realistic overnight change: more loyalty points and a newer order, for an exact share
# of the generated customers (never the deliberately invalid rows appended after them).
_CHANGE_SQL = """
UPDATE customers
SET loyalty_points = loyalty_points + 1 + CAST(hash(customer_id, 'points') % 500 AS BIGINT),
    last_order_at = last_order_at + INTERVAL 1 DAY
WHERE customer_id LIKE 'cust-%'
  AND CAST(substr(customer_id, 6) AS BIGINT) < $rows
  AND CAST(substr(customer_id, 6) AS BIGINT) % $every = 0
"""


# --- data -------------------------------------------------------------------------------------


def generate_segment(database: Path, rows: int) -> dict[str, Any]:
    """Create the ``customers`` table: ``rows`` valid customers plus the demo's invalid rows."""
    started = time.perf_counter()
    bad = invalid_rows(rows)
    with duckdb.connect(str(database)) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        connection.execute(_GENERATE_SQL, {"rows": rows})
        incoming = pa.Table.from_pylist(bad, schema=DEMO_SCHEMA)
        connection.register("incoming", incoming)
        connection.execute("INSERT INTO customers SELECT * FROM incoming")
        connection.unregister("incoming")
        total = connection.execute("SELECT count(*) FROM customers").fetchone()
    return {
        "valid_rows": rows,
        "invalid_rows_added": len(bad),
        "table_rows": int(total[0]) if total else 0,
        "seconds": round(time.perf_counter() - started, 3),
        "database_bytes": database.stat().st_size,
    }


def change_rows(database: Path, rows: int, percent: float) -> dict[str, Any]:
    """Change ``percent`` % of the generated customers (every k-th one) in place."""
    every = max(1, round(100.0 / percent)) if percent > 0 else 0
    started = time.perf_counter()
    changed = 0
    if every:
        with duckdb.connect(str(database)) as connection:
            result = connection.execute(_CHANGE_SQL, {"rows": rows, "every": every}).fetchone()
            changed = int(result[0]) if result else 0
    return {"percent": percent, "rows_changed": changed, "seconds": round(time.perf_counter() - started, 3)}


def build_activation(database: Path, base_url: str, concurrency: int | None) -> dict[str, Any]:
    """The demo's activation (same mapping), in upsert mode, pointed at the bench database."""
    config: dict[str, Any] = yaml.safe_load(ACTIVATION_TEMPLATE.format(base_url=base_url))
    config["name"] = ACTIVATION_NAME
    config["description"] = "cepsync benchmark: the demo's mapping, upsert"
    config["source"]["database"] = str(database)
    config["sync_mode"] = "upsert"
    config["destination"]["endpoint"] = "auto"
    if concurrency is not None:
        config["destination"]["concurrency"] = concurrency
    return config


# --- the simulator process ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    # Only ever our own simulator on 127.0.0.1 over http.
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed local http URL
        body: dict[str, Any] = json.loads(response.read())
        return body


@contextmanager
def simulator_process(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run ``cepsync simulator`` (rate limits on) in its own process; yield its base URL."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sync.cli", "simulator", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 - our own CLI, fixed arguments
        try:
            deadline = time.monotonic() + SIMULATOR_START_SECONDS
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the simulator exited with code {process.returncode}; see {log_path}")
                try:
                    _get_json(f"{base_url}/_sim/stats", timeout=1.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the simulator did not answer within {SIMULATOR_START_SECONDS:.0f} s"
                        ) from None
                    time.sleep(0.1)
            yield base_url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextmanager
def firestore_emulator_process() -> Iterator[str]:
    """Run the official Firestore emulator; yield its ``host:port`` for ``FIRESTORE_EMULATOR_HOST``.

    Reuses the tests' harness (``tests/firestore_emulator.py``): it starts gcloud in its own
    process group, because killing gcloud alone leaves the Java server holding the port.
    The emulator is stopped on every exit path, Ctrl-C included (the harness also
    registers an ``atexit`` hook for an interpreter that dies some other way).
    """
    tests_dir = str(REPO_ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from firestore_emulator import FirestoreEmulator

    emulator = FirestoreEmulator(project=FIRESTORE_PROJECT, start_timeout=FIRESTORE_START_SECONDS)
    try:
        emulator.start()
        yield emulator.host
    finally:
        emulator.stop()


# --- child processes: one engine run, or one stage probe --------------------------------------


def _state_bytes(state_path: Path) -> int:
    """The SQLite state on disk: main file plus its WAL and shared-memory files."""
    return sum(
        p.stat().st_size for p in (state_path, Path(f"{state_path}-wal"), Path(f"{state_path}-shm")) if p.exists()
    )


def _open_child_store(spec: dict[str, Any]) -> tuple[StateStore, Callable[[], dict[str, int]]]:
    """The state store a child runs on, and the function that reads that instance's counters.

    SQLite: ``stats()`` (transactions, statements, rows written). Firestore: ``op_counts()``
    (document reads, writes, deletes, transactions since the store was created), through
    the same ``open_store`` URL a deployment uses; the client finds the emulator through
    ``FIRESTORE_EMULATOR_HOST``, inherited from the bench.
    """
    url: str | None = spec.get("state_url")
    if url is None:
        from sync.state.sqlite import SQLiteStateStore

        sqlite_store = SQLiteStateStore(spec["state_path"])
        return sqlite_store, sqlite_store.stats
    from sync.runtime import open_store
    from sync.state.firestore import FirestoreStateStore

    store = open_store(url)
    if not isinstance(store, FirestoreStateStore):
        raise RuntimeError(f"state URL {url!r} did not open a Firestore store ({type(store).__name__})")
    return store, store.op_counts


def _child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One real engine run (the same edges `cepsync run` builds); measured from inside."""
    from sync.config import parse_activation
    from sync.engine import Run, RunOptions
    from sync.logs import configure_logging
    from sync.runtime import build_client, open_source

    configure_logging(level="warning")
    activation = parse_activation(spec["activation"], source="bench")
    source = open_source(activation)
    store, counters = _open_child_store(spec)
    try:
        run = Run(
            activation, source=source, store=store, client=build_client(activation), options=RunOptions(trigger="bench")
        )
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result = asyncio.run(run.execute())
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        # Read right after the run: this store instance served the whole run and nothing
        # else (creating it issues no request), so these are the run's own Firestore ops.
        store_stats = counters()
    finally:
        source.close()
        store.close()
    return {
        "state_backend": "firestore" if spec.get("state_url") else "sqlite",
        "record": result.record,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_bytes": after.ru_maxrss * 1024,
        "state_store": store_stats,
    }


def _child_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Replay the engine's per-batch plan (``sync.plan.plan_batch``) with stage timers.

    The same steps in the same order: Arrow columns → raw fingerprint → skip → row dicts
    for the rows that moved → map → plan. Nothing is sent and nothing is committed (the
    planner's spool is a temporary file). Stages are timed per record batch, not per row,
    so the timers cost nothing measurable.
    """
    from sync.config import mapping_version, parse_activation
    from sync.fingerprint import raw_fingerprint
    from sync.mapping import ProfileMapper, resolve_attribute_types
    from sync.plan import Planner, hashable_columns, raw_salt
    from sync.runtime import open_source

    activation = parse_activation(spec["activation"], source="bench")
    max_rows: int | None = spec["max_rows"]
    source = open_source(activation)
    store, counters = _open_child_store(spec)
    seconds = dict.fromkeys(
        (
            "load_state",
            "read_arrow",
            "to_columns",
            "raw_fingerprint",
            "try_skip",
            "to_pylist",
            "map_row",
            "plan_add",
            "finish",
        ),
        0.0,
    )
    try:
        types = resolve_attribute_types(activation, source.schema(), source="bench")
        mapper = ProfileMapper(activation, types)
        version = mapping_version(activation)
        started = time.perf_counter()
        stored = store.load_fingerprints(activation.name)
        seconds["load_state"] = time.perf_counter() - started
        planner = Planner(run_type=activation.run_type, sync_mode=activation.sync_mode, full=False, stored=stored)
        columns = mapper.columns
        id_column = activation.mapping.custom_id
        rows_seen = skipped = mapped = 0
        batches = iter(source.read_batches(columns))
        while max_rows is None or rows_seen < max_rows:
            mark = time.perf_counter()
            batch = next(batches, None)
            now = time.perf_counter()
            seconds["read_arrow"] += now - mark
            if batch is None:
                break
            if max_rows is not None and rows_seen + batch.num_rows > max_rows:
                batch = batch.slice(0, max_rows - rows_seen)
            first = rows_seen + 1
            mark = now
            salt = raw_salt(version, batch.schema, columns)
            ids = batch.column(id_column).to_pylist()
            lists = hashable_columns(batch, columns)
            now = time.perf_counter()
            seconds["to_columns"] += now - mark
            mark = now
            raws = [raw_fingerprint(values, salt) for values in zip(*lists, strict=True)]
            now = time.perf_counter()
            seconds["raw_fingerprint"] += now - mark
            mark = now
            to_map = [
                (index, raw) for index, raw in enumerate(raws) if not planner.try_skip(ids[index], raw, first + index)
            ]
            now = time.perf_counter()
            seconds["try_skip"] += now - mark
            mark = now
            rows = batch.take(pa.array([index for index, _ in to_map], type=pa.int64())).to_pylist() if to_map else []
            now = time.perf_counter()
            seconds["to_pylist"] += now - mark
            mark = now
            mapped_rows = [mapper.map_row(row) for row in rows]
            now = time.perf_counter()
            seconds["map_row"] += now - mark
            mark = now
            for (index, raw), mapped_row in zip(to_map, mapped_rows, strict=True):
                planner.add(mapped_row, raw, first + index)
            seconds["plan_add"] += time.perf_counter() - mark
            rows_seen += batch.num_rows
            mapped += len(to_map)
            skipped += batch.num_rows - len(to_map)
        mark = time.perf_counter()
        plan = planner.finish()
        seconds["finish"] = time.perf_counter() - mark
        plan.spool.close()
        store_stats = counters()
    finally:
        source.close()
        store.close()
    per_row = {stage: round(1e6 * value / rows_seen, 2) if rows_seen else 0.0 for stage, value in seconds.items()}
    mapped_stages = ("to_pylist", "map_row", "plan_add")
    per_mapped = {stage: round(1e6 * seconds[stage] / mapped, 2) if mapped else 0.0 for stage in mapped_stages}
    return {
        "rows": rows_seen,
        "skipped_without_mapping": skipped,
        "mapped": mapped,
        "plan_counts": dict(plan.summary()),
        "seconds": {stage: round(value, 3) for stage, value in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 3),
        "microseconds_per_row": per_row,
        "microseconds_per_mapped_row": per_mapped,
        "state_store": store_stats,
    }


def run_child(kind: str, spec: dict[str, Any], workdir: Path, env: dict[str, str], label: str) -> dict[str, Any]:
    """Run this script as a child (`--_child KIND SPEC`), return its JSON result."""
    spec_path = workdir / f"{label}.spec.json"
    result_path = workdir / f"{label}.result.json"
    spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}), encoding="utf-8")
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, str(spec_path)]
    started = time.perf_counter()
    with (workdir / f"{label}.log").open("wb") as log:
        completed = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)  # noqa: S603 - this script, fixed arguments
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{label}: child exited with code {completed.returncode}; see {workdir / f'{label}.log'}")
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    result["process_seconds"] = round(elapsed, 3)
    return result


def child_main(kind: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = _child_run(spec) if kind == "run" else _child_probe(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


# --- figures ----------------------------------------------------------------------------------


def summarise_run(result: dict[str, Any], state_path: Path | None) -> dict[str, Any]:
    """The figures of one engine run, derived from its run record and the child's counters.

    ``state_path`` is the SQLite state file, or None when the state is in Firestore (its
    size on disk then means nothing; the run's Firestore ops are reported instead).
    """
    record = result["record"]
    counts = record.get("counts", {})
    timings = record.get("timings", {})
    wall = result["wall_seconds"]
    rows = counts.get("rows", 0)
    sent = counts.get("sent", 0)
    acknowledged = counts.get("acknowledged", 0)
    send_seconds = timings.get("send_seconds", 0.0)
    read_and_plan = timings.get("read_and_plan_seconds", 0.0)
    endpoint = record.get("endpoint")
    limit = Endpoint(endpoint).rate_per_second if endpoint else None
    send_rate = sent / send_seconds if sent and send_seconds else 0.0
    # A send that fits in the endpoint's token bucket (burst) is not paced at all, so its
    # rate says nothing about the sustained limit: no ratio for it.
    paced = bool(endpoint) and sent > Endpoint(endpoint).burst
    return {
        "status": record["status"],
        "endpoint": endpoint if sent else f"{endpoint} (nothing sent)",
        "batch_limit_per_second": limit,
        "wall_seconds": wall,
        "process_seconds": result["process_seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "rows_scanned": rows,
        "rows_scanned_per_second": round(rows / wall, 1) if wall else 0.0,
        "counts": counts,
        "rejected_by_reason": record.get("rejected_by_reason", {}),
        "profiles_sent": sent,
        "profiles_acknowledged": acknowledged,
        "profiles_per_second_overall": round(acknowledged / wall, 1) if wall else 0.0,
        "send_profiles_per_second": round(send_rate, 1),
        "send_ratio_to_batch_limit": round(send_rate / limit, 3) if limit and send_rate and paced else None,
        "timings": {
            "read_and_plan_seconds": read_and_plan,
            "source_read_seconds": record.get("source", {}).get("read_seconds"),
            "send_seconds": send_seconds,
            "wire_seconds_summed": timings.get("wire_seconds", 0.0),
            "wait_seconds_summed": timings.get("wait_seconds", 0.0),
            "commit_seconds": timings.get("commit_seconds", 0.0),
            "other_seconds": round(max(0.0, timings.get("total_seconds", wall) - read_and_plan - send_seconds), 3),
            "total_seconds": timings.get("total_seconds"),
        },
        "journal": record.get("journal"),
        "state_backend": result.get("state_backend", "sqlite"),
        "state_store": result["state_store"],
        "firestore_ops": result["state_store"] if result.get("state_backend") == "firestore" else None,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "state_db_bytes": _state_bytes(state_path) if state_path is not None else None,
        "run_id": record["run_id"],
    }


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def render(report: dict[str, Any]) -> str:
    runs: dict[str, dict[str, Any]] = report["runs"]
    lines = [
        f"cepsync benchmark · {report['rows']:,} profiles · {report['machine']['cpu_count']} CPUs · "
        f"Python {report['machine']['python']} · {report['machine']['platform']}",
        f"command: {report['command']}",
        f"segment: {report['segment']['table_rows']:,} rows generated in {report['segment']['seconds']:.1f} s "
        f"({report['segment']['invalid_rows_added']} deliberately invalid); "
        f"delta: {report['change']['rows_changed']:,} rows changed ({report['change']['percent']:g} %)",
        "",
    ]
    header = (
        f"{'run':<10}{'status':>27}{'wall s':>9}{'rows/s':>11}{'sent':>10}{'prof/s':>9}{'endpoint':>13}"
        f"{'x limit':>9}{'plan s':>8}{'send s':>8}{'wire Σs':>9}{'wait Σs':>9}{'commit s':>9}{'cpu s':>8}"
        f"{'RSS MB':>8}{'state MB':>9}"
    )
    lines += [header, "-" * len(header)]
    for name, run in runs.items():
        timings = run["timings"]
        ratio = run["send_ratio_to_batch_limit"]
        lines.append(
            f"{name:<10}{run['status']:>27}{run['wall_seconds']:>9.2f}{run['rows_scanned_per_second']:>11,.0f}"
            f"{run['profiles_sent']:>10,}{run['profiles_per_second_overall']:>9,.0f}"
            f"{run['endpoint'] if run['profiles_sent'] else '-':>13}{(f'{ratio:.2f}' if ratio else '-'):>9}"
            f"{timings['read_and_plan_seconds']:>8.2f}{timings['send_seconds']:>8.2f}"
            f"{timings['wire_seconds_summed']:>9.2f}{timings['wait_seconds_summed']:>9.2f}"
            f"{timings['commit_seconds']:>9.2f}{run['cpu_seconds']:>8.2f}{_mb(run['peak_rss_bytes']):>8}"
            f"{_mb(run['state_db_bytes']) if run['state_db_bytes'] is not None else '-':>9}"
        )
    lines += render_firestore_ops(runs)
    lines.append("")
    for name, run in runs.items():
        counts = run["counts"]
        lines.append(
            f"{name}: rows {counts.get('rows', 0):,} · new {counts.get('new', 0):,} · changed "
            f"{counts.get('changed', 0):,} · unchanged {counts.get('unchanged', 0):,} · rejected "
            f"{counts.get('rejected', 0):,} {run['rejected_by_reason']} · acknowledged "
            f"{run['profiles_acknowledged']:,} · process incl. start-up {run['process_seconds']:.2f} s"
        )
    probes: dict[str, dict[str, Any]] = report.get("probes", {})
    if probes:
        lines += ["", "stage probes (µs per row scanned; to_pylist/map_row/plan_add also per mapped row):"]
        for name, probe in probes.items():
            per_row = probe["microseconds_per_row"]
            stages = " · ".join(f"{stage} {value:g}" for stage, value in per_row.items() if stage != "load_state")
            per_mapped = probe["microseconds_per_mapped_row"]
            lines.append(
                f"  {name}: {probe['rows']:,} rows, {probe['skipped_without_mapping']:,} skipped without mapping, "
                f"{probe['mapped']:,} mapped, load_state {probe['seconds']['load_state']:.2f} s"
            )
            lines.append(f"    {stages}")
            lines.append(
                f"    per mapped row: to_pylist {per_mapped.get('to_pylist', 0):g} · map_row {per_mapped['map_row']:g}"
                f" · plan_add {per_mapped['plan_add']:g}"
            )
    simulator = report.get("simulator", {})
    if simulator:
        lines += [
            "",
            f"simulator: requests {simulator.get('requests')} · 429s {simulator.get('too_many_requests')} · "
            f"profiles received {simulator.get('profiles_received'):,} · applied {simulator.get('profiles_applied'):,} "
            f"· stored {simulator.get('profiles_stored'):,}",
        ]
    return "\n".join(lines)


def render_firestore_ops(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The "Firestore ops per run" table; no lines when the state was not in Firestore."""
    measured = {name: run for name, run in runs.items() if run.get("firestore_ops") is not None}
    if not measured:
        return []
    header = f"{'run':<10}{'reads':>10}{'writes':>10}{'deletes':>10}{'transactions':>14}{'rows':>12}{'sent':>10}"
    lines = [
        "",
        "Firestore ops per run (document reads, writes, deletes as Firestore bills them, and transactions;",
        "counted by the FirestoreStateStore instance the engine ran on):",
        header,
        "-" * len(header),
    ]
    for name, run in measured.items():
        ops = run["firestore_ops"]
        lines.append(
            f"{name:<10}{ops['reads']:>10,}{ops['writes']:>10,}{ops['deletes']:>10,}{ops['transactions']:>14,}"
            f"{run['rows_scanned']:>12,}{run['profiles_sent']:>10,}"
        )
    return lines


# --- orchestration ----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, default=FULL_ROWS, help="valid profiles in the segment (default 1,000,000)")
    size.add_argument("--quick", action="store_true", help=f"smoke run with {QUICK_ROWS:,} profiles")
    parser.add_argument("--changed-percent", type=float, default=1.0, help="share of rows changed before the delta run")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: the activation's)")
    parser.add_argument(
        "--state",
        choices=STATE_BACKENDS,
        default="sqlite",
        help="state store: sqlite (default) or firestore (starts the Firestore emulator; reports each run's ops)",
    )
    parser.add_argument("--no-probe", action="store_true", help="skip the stage probes (saves ~10-20 %% of the time)")
    parser.add_argument("--output", type=Path, default=DEFAULT_RESULTS, help="where to write the JSON figures")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (database, state, logs)")
    parser.add_argument("--_child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = QUICK_ROWS
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if not 0 <= args.changed_percent <= 100:
        parser.error("--changed-percent must be between 0 and 100")
    return args


def _step(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # A plain SIGTERM would end the process without unwinding: the simulator and the
    # emulator (its own process group, so it never sees our signals) would outlive it.
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._child:
        return child_main(*args._child)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    command = shlex.join([Path(sys.executable).name, "bench/bench_sync.py", *argv])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cepsync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "segment.duckdb"
    state_path = workdir / "state.db"
    for stale in (database, state_path, Path(f"{state_path}-wal"), Path(f"{state_path}-shm")):
        stale.unlink(missing_ok=True)
    # Fresh random keys for this bench only; they go to the children through the environment.
    env = {
        **os.environ,
        API_KEY_ENV: "bench-" + secrets.token_hex(16),
        PROJECT_KEY_ENV: "project_bench" + secrets.token_hex(8),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))

    report: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(),
        "rows": args.rows,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "duckdb": duckdb.__version__,
        },
        "state": args.state,
        "runs": {},
        "probes": {},
    }
    firestore = args.state == "firestore"
    # None: the state is in Firestore, there is no state file to measure.
    measured_state: Path | None = None if firestore else state_path
    try:
        with ExitStack() as services:
            if firestore:
                # Started first, so a missing gcloud fails before minutes of data generation.
                _step("starting the Firestore emulator")
                env["FIRESTORE_EMULATOR_HOST"] = services.enter_context(firestore_emulator_process())
                report["firestore"] = {
                    "emulator_host": env["FIRESTORE_EMULATOR_HOST"],
                    "state_url": FIRESTORE_STATE_URL,
                }
            _step(f"generating {args.rows:,} customers in {database}")
            report["segment"] = generate_segment(database, args.rows)
            base_url = services.enter_context(simulator_process(env, workdir / "simulator.log"))
            activation = build_activation(database, base_url, args.concurrency)
            spec: dict[str, Any] = {"activation": activation, "state_path": str(state_path)}
            if firestore:
                spec["state_url"] = FIRESTORE_STATE_URL
            if not args.no_probe:
                _step("probe: full-load stages")
                report["probes"]["full"] = run_child(
                    "probe", {**spec, "max_rows": min(args.rows, FULL_PROBE_ROWS)}, workdir, env, "probe-full"
                )
            _step("run 1: full load")
            report["runs"]["full"] = summarise_run(run_child("run", spec, workdir, env, "run-full"), measured_state)
            _step(f"changing {args.changed_percent:g} % of the rows")
            report["change"] = change_rows(database, args.rows, args.changed_percent)
            if not args.no_probe:
                _step("probe: delta stages")
                report["probes"]["delta"] = run_child("probe", {**spec, "max_rows": None}, workdir, env, "probe-delta")
            _step("run 2: delta")
            report["runs"]["delta"] = summarise_run(run_child("run", spec, workdir, env, "run-delta"), measured_state)
            _step("run 3: delta, nothing changed")
            report["runs"]["no_change"] = summarise_run(
                run_child("run", spec, workdir, env, "run-nochange"), measured_state
            )
            report["simulator"] = _get_json(f"{base_url}/_sim/stats")
    except BaseException:
        # Keep the logs the error points at.
        print(f"benchmark failed; scratch kept in {workdir}", file=sys.stderr)
        raise
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    report["ended_at"] = datetime.now(UTC).isoformat()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(render(report))
    print(f"\nfigures written to {args.output}" + (f"; scratch kept in {workdir}" if args.keep or args.workdir else ""))
    failed = [
        name for name, run in report["runs"].items() if run["status"] not in ("succeeded", "succeeded_with_rejections")
    ]
    if failed:
        print(f"runs that did not succeed: {', '.join(failed)} (see the run records in {args.output})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
