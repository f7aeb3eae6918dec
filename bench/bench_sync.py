"""End-to-end benchmark of one activation, against the engine it replaced, in one run.

    .venv/bin/python bench/bench_sync.py                 # 1M profiles x 3, then a 5M first sync
    .venv/bin/python bench/bench_sync.py --quick         # 100,000 profiles, once
    .venv/bin/python bench/bench_sync.py --baseline none --big-rows 0 --rows 250000

What runs (bench/README.md says how to read the figures):

1. A realistic ``customers`` table (the demo's columns and value shapes) is generated with
   DuckDB SQL, plus the demo's deliberately invalid rows (the run records count them).
2. The Batch simulator runs in its own process (``python -m sync.cli simulator``) with
   Batch's rate limits on, so the engine and the simulator never share a GIL.
3. Each engine run is its own child process (a bench script with ``--_child``), so its
   peak RSS and CPU time are that run's alone: full load, a delta (changed and removed
   rows), a run with nothing changed; the demo's mapping in ``mirror`` mode, state in
   SQLite. The baseline engine is a checkout of its commit, run by its own bench script.
4. A first sync larger than one invocation, the engine pinned to one core, continued until
   its pass is done.

Figures are printed as a table and written to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
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
from cli_figures import (
    RUN_NAMES,
    check_delta,
    expected_delta,
    floor_seconds,
    issue_table,
    simulator_profile,
    succeeded,
    summarise_command,
)
from cli_run import run_command
from measured_run import child_main as measured_child
from measured_run import run_child

from sync.batch.endpoint import Endpoint
from sync.dev.demo import SCHEMA as DEMO_SCHEMA
from sync.dev.demo import invalid_rows
from sync.dev.demo_runner import ACTIVATION_TEMPLATE

if TYPE_CHECKING:
    from sync.state.base import StateStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results" / "latest.json"
API_KEY_ENV = "BATCH_REST_API_KEY"
PROJECT_KEY_ENV = "BATCH_PROJECT_KEY"
ACTIVATION_NAME = "bench_customers"
FULL_ROWS = 1_000_000
# The previous main (the lease's single Budget protocol), before issue 20's work on a run's
# cost: the engine and the command a user ran before it.
BASELINE_REF = "67c4b5d8829dd2745345bf047ca7b7d826a2d197"
# A command still running after this long is killed and reported as crashed.
CLI_TIMEOUT_SECONDS = 3600.0
QUICK_ROWS = 100_000
SIMULATOR_START_SECONDS = 30.0

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


# Rows leaving the segment for the delta run (mirror mode clears them in Batch).
_LEAVE_SQL = """
UPDATE customers SET is_active = FALSE
WHERE customer_id LIKE 'cust-%'
  AND CAST(substr(customer_id, 6) AS BIGINT) < $rows
  AND (CAST(substr(customer_id, 6) AS BIGINT) + 1) % $every = 0
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
    config["description"] = "cepsync benchmark: the demo's mapping, mirror"
    config["source"]["database"] = str(database)
    config["sync_mode"] = "mirror"
    config["destination"]["endpoint"] = "auto"
    if concurrency is not None:
        config["destination"]["concurrency"] = concurrency
    return config


# --- the simulator process ---------------------------------------------------------------------

# Profiles the simulator keeps whole in a big segment (one in N of them past this many; the
# others are only counted): ~1.9 kB each, so 10M whole would need ~18 GB.
SIMULATOR_KEPT_PROFILES = 100_000


def keep_every_for(rows: int) -> int:
    """The simulator's ``--keep-every`` for a segment of ``rows``: every profile up to SIMULATOR_KEPT_PROFILES."""
    return max(1, rows // SIMULATOR_KEPT_PROFILES)


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
def simulator_process(
    env: dict[str, str], log_path: Path, *, keep_every: int = 1, rate_limit: bool = True
) -> Iterator[str]:
    """Run ``cepsync simulator`` (Batch's rate limits on, unless not ``rate_limit``) in its own process; yield its URL.

    ``keep_every`` above 1: the simulator keeps the attributes of one profile in that many
    (``--keep-every``), and only an update count for the others (a 5M or 10M segment).
    """
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sync.cli", "simulator", "--host", "127.0.0.1", "--port", str(port)]
    if keep_every > 1:
        command += ["--keep-every", str(keep_every)]
    if not rate_limit:
        command.append("--no-rate-limit")
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


# --- child processes: one engine run, or one stage probe --------------------------------------


def _state_bytes(state_path: Path) -> int:
    """The SQLite state on disk: main file plus its WAL and shared-memory files."""
    return sum(
        p.stat().st_size for p in (state_path, Path(f"{state_path}-wal"), Path(f"{state_path}-shm")) if p.exists()
    )


def _open_child_store(spec: dict[str, Any]) -> tuple[StateStore, Callable[[], dict[str, int]]]:
    """The SQLite state store a child runs on, and its counters (transactions, statements, rows)."""
    from sync.state.sqlite import SQLiteStateStore

    store = SQLiteStateStore(spec["state_path"])
    return store, store.stats


def _script(tree: Path) -> Path:
    """The bench script of ``tree``: a baseline checkout runs its own engine its own way."""
    return tree / "bench" / "bench_sync.py"


def child_main(kind: str, spec_path: str) -> int:
    if kind != "run":
        raise SystemExit(f"unknown child kind {kind!r}")
    return measured_child(spec_path, _open_child_store)


def compile_sources(*trees: Path) -> None:
    """Byte-compile each checkout's ``sync`` package, so that no command compiles it as it starts.

    A fresh worktree has no ``__pycache__``, and where ``PYTHONDONTWRITEBYTECODE`` is set no
    run writes one: every command of that checkout would compile every module it imports
    (~0.2-0.3 s a command here), and the other checkout, compiled earlier, would look faster
    by that much. ``compileall`` writes the bytecode whatever that variable says.
    """
    for tree in trees:
        subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
            [sys.executable, "-m", "compileall", "-q", str(tree / "sync")], check=True, capture_output=True
        )


@contextmanager
def baseline_tree(ref: str, workdir: Path) -> Iterator[Path]:
    """A detached checkout of ``ref`` (the engine to compare against), removed afterwards."""
    tree = workdir / f"baseline-{ref[:12]}"
    subprocess.run(  # noqa: S603 - git, fixed arguments
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "--force", str(tree), ref],  # noqa: S607 - git from PATH
        check=True,
        capture_output=True,
    )
    compile_sources(tree, REPO_ROOT)
    try:
        yield tree
    finally:
        subprocess.run(  # noqa: S603 - git, fixed arguments
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tree)],  # noqa: S607 - git from PATH
            check=False,
            capture_output=True,
        )


# --- figures ----------------------------------------------------------------------------------


def summarise_run(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one engine run, from its run record and the child's counters."""
    record = result["record"]
    counts = record.get("counts", {})
    timings = record.get("timings", {})
    rows = counts.get("rows", 0)
    sent = counts.get("sent", 0)
    send_seconds = timings.get("send_seconds", 0.0)
    endpoint = record.get("endpoint")
    limit = Endpoint(endpoint).rate_per_second if endpoint else None
    send_rate = sent / send_seconds if sent and send_seconds else 0.0
    # A send that fits in the endpoint's burst is not paced: no ratio to the limit for it.
    paced = bool(endpoint) and sent > Endpoint(endpoint).burst
    # The previous engine read and planned everything before its first send.
    first = timings.get("first_request_seconds", timings.get("read_and_plan_seconds") if sent else None)
    return {
        "status": record["status"],
        "endpoint": endpoint,
        "wall_seconds": result["wall_seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "cpu_us_per_row": round(1e6 * result["cpu_seconds"] / rows, 2) if rows else None,
        "rows": rows,
        "sent": sent,
        "acknowledged": counts.get("acknowledged", 0),
        "send_ratio_to_limit": round(send_rate / limit, 3) if limit and send_rate and paced else None,
        "first_request_seconds": first,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "stages": timings.get("stages"),
        "timings": timings,
        "counts": counts,
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or value != value else format(value, spec)


# The per-repetition figures of a `cepsync run` command kept as lists (medians are printed).
CLI_FIGURES = (
    "wall_seconds",
    "cpu_seconds",
    "cpu_us_per_row",
    "peak_rss_mb",
    "tree_peak_rss_mb",
    "engine_seconds",
    "too_many_requests",
    "exact",
)


def _engine_table(report: dict[str, Any], engines: list[str]) -> list[str]:
    """The engine's own figures (inside the child, around ``await Run.execute()``), medians."""
    lines = ["engine figures (inside the engine's child process, around the run itself):", ""]
    header = (
        f"{'run':<10}{'figure':<26}"
        + "".join(f"{name:>14}" for name in engines)
        + (f"{'ratio':>9}" if len(engines) == 2 else "")
    )
    lines += [header, "-" * len(header)]
    figures = [
        ("wall s", "wall_seconds", ".1f"),
        ("engine CPU µs/row", "cpu_us_per_row", ".1f"),
        ("first request after s", "first_request_seconds", ".2f"),
        ("x Batch's limit", "send_ratio_to_limit", ".2f"),
        ("peak RSS MB", "peak_rss_mb", ".0f"),
        ("429s from the simulator", "too_many_requests", ".0f"),
    ]
    for run_name in ("full", "delta", "no_change"):
        for label, key, spec in figures:
            values = [median(report["runs"][engine][run_name][key]) for engine in engines]
            if all(v != v for v in values):
                continue
            ratio = ""
            if len(values) == 2 and values[1] == values[1] and values[1] and values[0] == values[0]:
                ratio = f"{values[0] / values[1]:>8.2f}x"
            lines.append(f"{run_name:<10}{label:<26}" + "".join(f"{_fmt(v, spec):>14}" for v in values) + ratio)
    return lines


def render(report: dict[str, Any]) -> str:
    lines = [
        f"cepsync benchmark · {report['rows']:,} profiles · {report['repeat']} repetitions (median) · "
        f"{report['machine']['cpu_count']} CPUs · Python {report['machine']['python']}",
        f"command: {report['command']}",
        f"engines: current = this checkout; baseline = {report.get('baseline') or 'not run'}",
        "",
    ]
    engines = [name for name in ("baseline", "current") if report["runs"].get(name)]
    if engines:
        lines += _engine_table(report, engines)
    if report.get("cli"):
        cli_engines = [name for name in ("baseline", "current") if report["cli"].get(name)]
        labels = {"baseline": (report.get("baseline") or "baseline")[:7], "current": "this checkout"}
        lines += [
            "",
            "`cepsync run` end to end (process wall; CPU of all threads and child processes; "
            "the command's own VmHWM), medians; ratio = baseline / this checkout; "
            f"floor = profiles / {10_000:,} per s:",
            "",
            *issue_table(
                report["cli"],
                engines=[(name, labels[name]) for name in cli_engines],
                floors=report["floors_seconds"],
                rows=report["rows"],
            ),
        ]
        for name in cli_engines:
            for result in report["cli"][name].get("delta", {}).get("results", []):
                for problem in result.get("problems", []):
                    lines.append(f"  {labels[name]} delta not exact: {problem}")
            workers = {r.get("map_workers") for run in report["cli"][name].values() for r in run["results"]}
            tree_peak = max(
                (
                    r["tree_peak_rss_mb"]
                    for run in report["cli"][name].values()
                    for r in run["results"]
                    if r.get("tree_peak_rss_mb") is not None
                ),
                default=None,
            )
            if tree_peak is not None:
                lines.append(
                    f"  {labels[name]}: map worker processes {sorted(w or 0 for w in workers)}; "
                    f"highest sampled RSS of the command with its workers {tree_peak:,.0f} MB"
                )
    big = report.get("big")
    if big:
        lines += [
            "",
            f"{big['rows']:,}-row first sync, {big['budget_seconds']:g} s budget per invocation, "
            "engine pinned to one core:",
        ]
        for leg in big["legs"]:
            lines.append(
                f"  leg {leg['leg']}: {leg['status']:<26} wall {leg['wall_seconds']:8.1f} s · acknowledged "
                f"{leg['acknowledged']:>10,} · first request after {_fmt(leg['first_request_seconds'], '.2f')} s · "
                f"peak RSS {leg['peak_rss_bytes'] / 1e6:,.0f} MB"
            )
        total = sum(leg["acknowledged"] for leg in big["legs"])
        lines.append(
            f"  total acknowledged {total:,} of {big['valid_rows']:,} valid rows; "
            f"simulator holds {big['stored']:,} profiles, at most {big['max_updates_per_custom_id']} update per id"
        )
    return "\n".join(lines)


# --- orchestration ----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, default=FULL_ROWS, help="valid profiles in the segment (default 1,000,000)")
    size.add_argument("--quick", action="store_true", help=f"smoke run with {QUICK_ROWS:,} profiles, one repetition")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each engine's runs (median; default 3)")
    parser.add_argument(
        "--baseline",
        default=BASELINE_REF,
        help=f"git commit to compare against (default {BASELINE_REF[:7]}, the previous main); 'none' to skip",
    )
    parser.add_argument(
        "--measure",
        choices=("both", "engine", "cli"),
        default="both",
        help="what to measure: the engine inside a child process, the `cepsync run` command end to end, "
        "or both (default)",
    )
    parser.add_argument("--changed-percent", type=float, default=1.0, help="rows changed before the delta run")
    parser.add_argument("--removed-percent", type=float, default=0.5, help="rows that leave before the delta run")
    parser.add_argument("--big-rows", type=int, default=5_000_000, help="rows of the first-sync case (0 to skip)")
    parser.add_argument("--big-budget", type=float, default=540.0, help="time budget per invocation of the big case")
    parser.add_argument("--output", type=Path, default=DEFAULT_RESULTS, help="where to write the JSON figures")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (database, state, logs)")
    parser.add_argument("--_child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = QUICK_ROWS
        args.repeat = 1
        args.big_rows = 0
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be at least 1")
    if not 0 <= args.changed_percent <= 100 or not 0 <= args.removed_percent <= 100:
        parser.error("--changed-percent and --removed-percent must be between 0 and 100")
    return args


def _step(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # A plain SIGTERM would end the process without unwinding: the simulator and the
    # emulator (its own process group, so it never sees our signals) would outlive it.
    raise SystemExit(128 + signum)


def remove_rows(database: Path, rows: int, percent: float) -> int:
    """Make ``percent`` % of the generated customers leave the segment (mirror clears them)."""
    every = max(1, round(100.0 / percent)) if percent > 0 else 0
    if not every:
        return 0
    with duckdb.connect(str(database)) as connection:
        result = connection.execute(_LEAVE_SQL, {"rows": rows, "every": every}).fetchone()
    return int(result[0]) if result else 0


def one_engine(
    name: str, tree: Path, base: Path, args: argparse.Namespace, env: dict[str, str], workdir: Path, rep: int
) -> dict[str, dict[str, Any]]:
    """Full load, then a delta (changed + removed rows), then a run with nothing changed."""
    scratch = workdir / f"{name}-{rep}"
    scratch.mkdir(parents=True, exist_ok=True)
    database = scratch / "segment.duckdb"
    shutil.copy(base, database)
    spec: dict[str, Any] = {"state_path": str(scratch / "state.db")}
    results: dict[str, dict[str, Any]] = {}
    with simulator_process(env, scratch / "simulator.log") as base_url:
        spec["activation"] = build_activation(database, base_url, None)
        for run_name in ("full", "delta", "no_change"):
            if run_name == "delta":
                change_rows(database, args.rows, args.changed_percent)
                remove_rows(database, args.rows, args.removed_percent)
            before = _get_json(f"{base_url}/_sim/stats")
            _step(f"{name} #{rep + 1}: {run_name}")
            result = summarise_run(run_child(spec, scratch, env, f"run-{run_name}", script=_script(tree), tree=tree))
            after = _get_json(f"{base_url}/_sim/stats")
            result["too_many_requests"] = after.get("too_many_requests", 0) - before.get("too_many_requests", 0)
            result["peak_rss_mb"] = result["peak_rss_bytes"] / 1e6
            results[run_name] = result
    shutil.rmtree(scratch, ignore_errors=True) if not args.keep else None
    return results


def one_cli(
    name: str, tree: Path, base: Path, args: argparse.Namespace, env: dict[str, str], workdir: Path, rep: int
) -> dict[str, dict[str, Any]]:
    """The same three runs as :func:`one_engine`, each one a `cepsync run` command of ``tree``.

    A fresh copy of the segment, a fresh simulator and a fresh SQLite state: the commands
    start from what a user's first ``cepsync run`` would. The delta's exactness is checked
    against the simulator.
    """
    scratch = workdir / f"cli-{name}-{rep}"
    scratch.mkdir(parents=True, exist_ok=True)
    database = scratch / "segment.duckdb"
    shutil.copy(base, database)
    activation = scratch / "activation.yml"
    state = f"sqlite:///{scratch / 'state.db'}"
    results: dict[str, dict[str, Any]] = {}
    with simulator_process(env, scratch / "simulator.log") as base_url:
        activation.write_text(yaml.safe_dump(build_activation(database, base_url, None)), encoding="utf-8")
        for run_name in RUN_NAMES:
            if run_name == "delta":
                change_rows(database, args.rows, args.changed_percent)
                remove_rows(database, args.rows, args.removed_percent)
            before = _get_json(f"{base_url}/_sim/stats")
            _step(f"{name} #{rep + 1}: cepsync run, {run_name}")
            command = run_command(
                ["run", str(activation), "--state", state, "--json"],
                tree=tree,
                env=env,
                workdir=scratch,
                label=f"cli-{run_name}",
                timeout=CLI_TIMEOUT_SECONDS,
            )
            result = summarise_command(command, before, _get_json(f"{base_url}/_sim/stats"))
            if run_name == "delta":
                result.update(
                    check_delta(
                        result,
                        database=database,
                        rows=args.rows,
                        changed_percent=args.changed_percent,
                        removed_percent=args.removed_percent,
                        profile=simulator_profile(base_url, env[PROJECT_KEY_ENV]),
                    )
                )
            if not succeeded(result):
                print(
                    f"{name} cepsync run ({run_name}): {result['status']}, exit code {result['exit_code']}, "
                    f"{result['error'] or ''}; logs kept in {scratch}",
                    file=sys.stderr,
                )
                args.keep = True
            results[run_name] = result
    shutil.rmtree(scratch, ignore_errors=True) if not args.keep else None
    return results


def big_first_sync(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """A first sync larger than one invocation: continuations until the pass is done, one core."""
    scratch = workdir / "big"
    scratch.mkdir(parents=True, exist_ok=True)
    database = scratch / "segment.duckdb"
    _step(f"generating {args.big_rows:,} customers for the first-sync case")
    segment = generate_segment(database, args.big_rows)
    spec: dict[str, Any] = {
        "state_path": str(scratch / "state.db"),
        "time_budget_seconds": args.big_budget,
        "cpus": [0],
    }
    legs: list[dict[str, Any]] = []
    with simulator_process(env, scratch / "simulator.log", keep_every=keep_every_for(args.big_rows)) as base_url:
        spec["activation"] = build_activation(database, base_url, None)
        root: str | None = None
        while True:
            _step(f"first sync, invocation {len(legs) + 1}")
            leg_spec = {**spec, "continuation_of": root}
            result = run_child(
                leg_spec, scratch, env, f"big-{len(legs) + 1}", script=_script(REPO_ROOT), tree=REPO_ROOT
            )
            record = result["record"]
            legs.append(
                {
                    "leg": len(legs) + 1,
                    "status": record["status"],
                    "wall_seconds": result["wall_seconds"],
                    "acknowledged": record.get("counts", {}).get("acknowledged", 0),
                    "first_request_seconds": record.get("timings", {}).get("first_request_seconds"),
                    "peak_rss_bytes": result["peak_rss_bytes"],
                    "cpu_seconds": result["cpu_seconds"],
                }
            )
            root = root or record["run_id"]
            if record["status"] != "incomplete" or legs[-1]["acknowledged"] == 0 or len(legs) >= 10:
                break
        stats = _get_json(f"{base_url}/_sim/stats")
    return {
        "rows": args.big_rows,
        "valid_rows": args.big_rows,
        "budget_seconds": args.big_budget,
        "segment": segment,
        "legs": legs,
        "stored": stats.get("profiles_stored", 0),
        "max_updates_per_custom_id": stats.get("max_updates_per_custom_id"),
    }


def bench_env() -> dict[str, str]:
    """The children's environment: ours, plus fresh random Batch keys for this bench only."""
    return {
        **os.environ,
        API_KEY_ENV: "bench-" + secrets.token_hex(16),
        PROJECT_KEY_ENV: "project_bench" + secrets.token_hex(8),
    }


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "duckdb": duckdb.__version__,
    }


def publish(report: dict[str, Any], output: Path, render: Callable[[dict[str, Any]], str]) -> None:
    """Write the figures as JSON to ``output``, then print them as ``render`` lays them out."""
    report["ended_at"] = datetime.now(UTC).isoformat()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(render(report))
    print(f"\nfigures written to {output}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._child:
        return child_main(*args._child)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    command = shlex.join([Path(sys.executable).name, "bench/bench_sync.py", *argv])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cepsync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    report: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(),
        "rows": args.rows,
        "repeat": args.repeat,
        "baseline": None if args.baseline == "none" else args.baseline,
        "machine": machine(),
        "runs": {},
        "cli": {},
    }
    changed, removed = expected_delta(args.rows, args.changed_percent, args.removed_percent)
    report["floors_seconds"] = {
        "full": floor_seconds(args.rows),
        "delta": floor_seconds(changed + removed),
        "no_change": 0.0,
    }
    try:
        with ExitStack() as services:
            base = workdir / "base-segment.duckdb"
            _step(f"generating {args.rows:,} customers")
            report["segment"] = generate_segment(base, args.rows)
            engines: list[tuple[str, Path]] = [("current", REPO_ROOT)]
            if report["baseline"]:
                engines.insert(0, ("baseline", services.enter_context(baseline_tree(args.baseline, workdir))))
            for rep in range(args.repeat):
                # Alternate which engine goes first, so drift on a shared machine hits both.
                order = engines if rep % 2 == 0 else list(reversed(engines))
                for name, tree in order:
                    if args.measure in ("both", "engine"):
                        runs = one_engine(name, tree, base, args, env, workdir, rep)
                        for run_name, result in runs.items():
                            slot = report["runs"].setdefault(name, {}).setdefault(run_name, {"results": []})
                            slot["results"].append(result)
                    if args.measure in ("both", "cli"):
                        runs = one_cli(name, tree, base, args, env, workdir, rep)
                        for run_name, result in runs.items():
                            slot = report["cli"].setdefault(name, {}).setdefault(run_name, {"results": []})
                            slot["results"].append(result)
            for engine_runs in report["cli"].values():
                for slot in engine_runs.values():
                    for key in CLI_FIGURES:
                        slot[key] = [r[key] for r in slot["results"] if r.get(key) is not None]
            for engine_runs in report["runs"].values():
                for slot in engine_runs.values():
                    for key in (
                        "wall_seconds",
                        "cpu_us_per_row",
                        "first_request_seconds",
                        "send_ratio_to_limit",
                        "peak_rss_mb",
                        "too_many_requests",
                    ):
                        slot[key] = [r[key] for r in slot["results"] if r.get(key) is not None]
            if args.big_rows:
                report["big"] = big_first_sync(args, env, workdir)
    except BaseException:
        print(f"benchmark failed; scratch kept in {workdir}", file=sys.stderr)
        raise
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    publish(report, args.output, render)
    failed = [
        f"{kind}{engine}/{name}"
        for kind, runs in (("", report["runs"]), ("cepsync run ", report["cli"]))
        for engine, engine_runs in runs.items()
        for name, slot in engine_runs.items()
        for result in slot["results"]
        if not succeeded(result)
    ]
    if failed:
        print(f"runs that did not succeed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
