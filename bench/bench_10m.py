"""10M profiles on one machine: `cepsync run` on the embedded default, end to end.

    .venv/bin/python bench/bench_10m.py                        # 10,000,000 profiles (~25 min)
    .venv/bin/python bench/bench_10m.py --rows 200000          # the same steps, small (~1 min)

What runs (bench/README.md says how to read the figures):

1. A 10M-row ``customers`` table, bench_sync's generator (DuckDB SQL, deterministic).
2. The Batch simulator in its own process with Batch's rate limits on (not measured).
3. The first sync as a user on one machine runs it: ``cepsync run --time-budget B`` (SQLite
   state, DuckDB source), and again while it exits 7 (time budget spent: a continuation
   finishes the pass). Each command is measured from outside (``bench/cli_run.py``): wall,
   CPU of all threads and child processes, peak RSS (``VmHWM``).
4. A run with nothing changed, then a delta (``--changed-percent`` changed,
   ``--removed-percent`` gone), whose exactness is checked against the simulator.
5. Issue 20's targets, each ``met`` or ``NOT met``.

Figures are printed and written to ``bench/results/10m-latest.json``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from bench_sync import (
    PROJECT_KEY_ENV,
    REPO_ROOT,
    _exit_on_sigterm,
    _get_json,
    _step,
    bench_env,
    build_activation,
    change_rows,
    generate_segment,
    keep_every_for,
    machine,
    publish,
    remove_rows,
    simulator_process,
)
from cli_figures import (
    check_delta,
    expected_delta,
    floor_seconds,
    simulator_profile,
    succeeded,
    summarise_command,
)
from cli_run import run_command

DEFAULT_RESULTS = REPO_ROOT / "bench" / "results" / "10m-latest.json"
ROWS = 10_000_000
# An event-triggered Cloud Function's limit; the first sync hands over at each one.
BUDGET_SECONDS = 540.0
# Exit code of `cepsync run` when the time budget ran out (README, "Exit codes").
EXIT_BUDGET_SPENT = 7
# Issue 20's targets for 10M profiles.
FIRST_SYNC_FLOOR_FACTOR = 1.1
DELTA_FLOOR_FACTOR = 1.3
NO_CHANGE_SECONDS = 8.0
PEAK_RSS_MB = 700.0
# A profile the simulator keeps whole is ~1.9 kB of Python dicts (17.7 GB resident at 10M,
# measured), so past SIMULATOR_KEPT_PROFILES it keeps one in keep_every_for(rows) whole and
# only counts the others' updates (~150 bytes each). With the command, DuckDB's cache and the
# bench, the run needs this much memory free before it starts, or the machine runs out part
# way (it has no swap to slow it).
SIMULATOR_BYTES_PER_PROFILE = 1_900
SIMULATOR_BYTES_PER_COUNTED_PROFILE = 150
OTHER_BYTES = 2_000_000_000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=ROWS, help=f"valid profiles in the segment (default {ROWS:,})")
    parser.add_argument(
        "--budget",
        type=float,
        default=BUDGET_SECONDS,
        help=f"--time-budget of each first-sync command, seconds (default {BUDGET_SECONDS:g})",
    )
    parser.add_argument("--max-legs", type=int, default=10, help="stop the first sync after this many commands")
    parser.add_argument("--changed-percent", type=float, default=1.0, help="rows changed before the delta")
    parser.add_argument("--removed-percent", type=float, default=0.5, help="rows that leave before the delta")
    parser.add_argument(
        "--cpus",
        default="",
        help="pin every command to these cores, e.g. 0 (default: not pinned, as a user's machine runs it)",
    )
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="kill a command still running after this")
    parser.add_argument(
        "--skip-memory-check", action="store_true", help="start even if the simulator may not fit in free memory"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_RESULTS, help="where to write the JSON figures")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (database, state, logs)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.max_legs < 1:
        parser.error("--rows and --max-legs must be at least 1")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    if not 0 <= args.changed_percent <= 100 or not 0 <= args.removed_percent <= 100:
        parser.error("--changed-percent and --removed-percent must be between 0 and 100")
    try:
        args.cpus = [int(cpu) for cpu in args.cpus.split(",") if cpu.strip()]
    except ValueError:
        parser.error(f"--cpus takes core numbers separated by commas, not {args.cpus!r}")
    return args


def memory_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo``: what can be allocated without swapping or evicting."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def check_memory(rows: int) -> str | None:
    """Why the machine cannot hold this run's simulator, or None when it can (or cannot tell)."""
    whole = rows // keep_every_for(rows)
    needed = whole * SIMULATOR_BYTES_PER_PROFILE + (rows - whole) * SIMULATOR_BYTES_PER_COUNTED_PROFILE + OTHER_BYTES
    available = memory_available_bytes()
    if available is None or available >= needed:
        return None
    return (
        f"{rows:,} profiles need about {needed / 1e9:.1f} GB free (the Batch simulator keeps {whole:,} of them "
        f"whole, ~{SIMULATOR_BYTES_PER_PROFILE:,} bytes each, and counts the others), and {available / 1e9:.1f} GB "
        "is available; "
        "free memory, lower --rows, or pass --skip-memory-check"
    )


def run_all(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> None:
    """Generate, first sync through continuations, no change, delta: figures into ``report``."""
    env = bench_env()
    database = workdir / "segment.duckdb"
    activation = workdir / "activation.yml"
    state = f"sqlite:///{workdir / 'state.db'}"
    _step(f"generating {args.rows:,} customers")
    report["segment"] = generate_segment(database, args.rows)
    _step(f"generated in {report['segment']['seconds']:.1f} s")
    keep_every = keep_every_for(args.rows)
    with simulator_process(env, workdir / "simulator.log", keep_every=keep_every) as base_url:
        activation.write_text(yaml.safe_dump(build_activation(database, base_url, None)), encoding="utf-8")

        def command(label: str, *extra: str) -> dict[str, Any]:
            before = _get_json(f"{base_url}/_sim/stats")
            result = run_command(
                ["run", str(activation), "--state", state, "--json", *extra],
                tree=REPO_ROOT,
                env=env,
                workdir=workdir,
                label=label,
                timeout=args.run_timeout,
                cpus=args.cpus or None,
            )
            figures = summarise_command(result, before, _get_json(f"{base_url}/_sim/stats"))
            _step(
                f"{label}: {figures['status']} (exit {figures['exit_code']}) in {figures['wall_seconds']:.1f} s, "
                f"acknowledged {figures['acknowledged']:,}, peak RSS {_mb(figures['peak_rss_mb'])} MB"
            )
            return figures

        legs: list[dict[str, Any]] = []
        while len(legs) < args.max_legs:
            _step(f"first sync, command {len(legs) + 1} (--time-budget {args.budget:g})")
            leg = command(f"first-{len(legs) + 1}", "--time-budget", f"{args.budget:g}")
            legs.append(leg)
            if leg["exit_code"] != EXIT_BUDGET_SPENT or leg["acknowledged"] == 0:
                break
        report["first_sync"] = legs
        report["after_first_sync"] = _get_json(f"{base_url}/_sim/stats")
        if not succeeded(legs[-1]):
            return
        _step("no change")
        report["no_change"] = command("no-change")
        changed = change_rows(database, args.rows, args.changed_percent)
        removed = remove_rows(database, args.rows, args.removed_percent)
        report["delta_input"] = {"changed": changed, "removed": removed}
        _step(f"delta: {changed['rows_changed']:,} changed, {removed:,} gone")
        delta = command("delta")
        delta.update(
            check_delta(
                delta,
                database=database,
                rows=args.rows,
                changed_percent=args.changed_percent,
                removed_percent=args.removed_percent,
                profile=simulator_profile(base_url, env[PROJECT_KEY_ENV]),
                keep_every=keep_every,
            )
        )
        report["delta"] = delta
        report["simulator"] = _get_json(f"{base_url}/_sim/stats")


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 20's targets for 10M profiles: each with its value, its limit and whether it is met."""
    rows = report["rows"]
    legs = report.get("first_sync", [])
    first_floor = floor_seconds(rows)
    changed, removed = expected_delta(rows, report["changed_percent"], report["removed_percent"])
    delta_floor = floor_seconds(changed + removed)
    done = bool(legs) and succeeded(legs[-1])
    first_wall = sum(leg["wall_seconds"] for leg in legs) if done else None
    runs = [*legs, *(report[name] for name in ("no_change", "delta") if report.get(name))]
    peak = max((run["peak_rss_mb"] for run in runs if run.get("peak_rss_mb") is not None), default=None)
    no_change = report.get("no_change", {}).get("wall_seconds")
    delta = report.get("delta", {}).get("wall_seconds")
    too_many = sum(run.get("too_many_requests", 0) for run in runs)
    rows_out: list[dict[str, Any]] = [
        _target(
            "first sync, wall (all commands)",
            first_wall,
            f"<= {FIRST_SYNC_FLOOR_FACTOR * first_floor:,.0f} s (1.1 x floor {first_floor:,.0f} s)",
            first_wall is not None and first_wall <= FIRST_SYNC_FLOOR_FACTOR * first_floor,
        ),
        _target(
            "first sync, every command made progress",
            min((leg["acknowledged"] for leg in legs), default=None),
            "> 0 acknowledged by each command",
            bool(legs) and all(leg["acknowledged"] > 0 for leg in legs),
        ),
        _target(
            "no change, wall",
            no_change,
            f"<= {NO_CHANGE_SECONDS:g} s",
            no_change is not None and no_change <= NO_CHANGE_SECONDS,
        ),
        _target(
            "delta, wall",
            delta,
            f"<= {DELTA_FLOOR_FACTOR * delta_floor:.1f} s (1.3 x floor {delta_floor:.1f} s)",
            delta is not None and delta <= DELTA_FLOOR_FACTOR * delta_floor,
        ),
        _target("delta exact", None, "exact", bool(report.get("delta", {}).get("exact"))),
        _target("peak RSS, every command", peak, f"<= {PEAK_RSS_MB:g} MB", peak is not None and peak <= PEAK_RSS_MB),
        _target("429s, every command", too_many, "0", bool(runs) and too_many == 0),
    ]
    return rows_out


def _target(name: str, value: float | None, limit: str, met: bool) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "met": met}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"cepsync, {report['rows']:,} profiles on one machine · `cepsync run` end to end · "
        f"{report['machine']['cpu_count']} CPUs · Python {report['machine']['python']}",
        f"command: {report['command']}",
        _segment_line(report.get("segment")),
        "",
    ]
    header = (
        f"{'command':<14}{'status':<27}{'exit':>5}{'endpoint':>12}"
        f"{'wall s':>9}{'CPU s':>9}{'µs/row':>8}{'first req s':>12}"
        f"{'sent':>12}{'acknowledged':>14}{'RSS MB':>8}{'+workers':>9}{'429s':>6}"
    )
    lines += [header, "-" * len(header)]
    named = [(f"first {i + 1}", leg) for i, leg in enumerate(report.get("first_sync", []))]
    named += [(name.replace("_", " "), report[name]) for name in ("no_change", "delta") if report.get(name)]
    for name, run in named:
        lines.append(
            f"{name:<14}{run['status']:<27}{run['exit_code']:>5}{run.get('endpoint') or '-':>12}"
            f"{run['wall_seconds']:>9.1f}{run['cpu_seconds']:>9.1f}"
            f"{_fmt(run.get('cpu_us_per_row'), '.1f'):>8}{_fmt(run.get('first_request_seconds'), '.2f'):>12}"
            f"{run['sent']:>12,}{run['acknowledged']:>14,}{_mb(run.get('peak_rss_mb')):>8}"
            f"{_mb(run.get('tree_peak_rss_mb')):>9}{run['too_many_requests']:>6}"
        )
    lines += [f"  {name}: {run['error']}" for name, run in named if run.get("error")]
    after = report.get("after_first_sync")
    if after:
        lines.append(
            f"after the first sync the simulator held {after.get('profiles_stored', 0):,} profiles, "
            f"at most {after.get('max_updates_per_custom_id')} update per id"
        )
    delta = report.get("delta")
    if delta:
        checked = delta.get("checked_ids", {})
        lines.append(
            f"delta: {'exact' if delta.get('exact') else 'NOT exact'} (counts of every id; read back "
            f"{checked.get('changed', 0)} changed, {checked.get('removed', 0)} removed and "
            f"{checked.get('unchanged', 0)} unchanged ids)"
        )
        lines += [f"  {problem}" for problem in delta.get("problems", [])]
    lines += ["", f"{'target (issue 20, 10M)':<42}{'value':>10}  {'limit':<40}"]
    for target in report["targets"]:
        value = target["value"]
        shown = "-" if value is None else f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        lines.append(f"{target['target']:<42}{shown:>10}  {target['limit']:<40}{'met' if target['met'] else 'NOT met'}")
    return "\n".join(lines)


def _segment_line(segment: dict[str, Any] | None) -> str:
    if not segment:
        return "segment: not generated"
    return f"segment generated in {segment['seconds']:.1f} s ({segment['database_bytes'] / 1e6:,.0f} MB on disk)"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    refusal = None if args.skip_memory_check else check_memory(args.rows)
    if refusal:
        print(f"bench_10m: {refusal}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cepsync-bench-10m-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "bench/bench_10m.py", *argv]),
        "started_at": datetime.now(UTC).isoformat(),
        "rows": args.rows,
        "budget_seconds": args.budget,
        "changed_percent": args.changed_percent,
        "removed_percent": args.removed_percent,
        "cpus": args.cpus,
        "machine": machine(),
    }
    try:
        run_all(args, workdir, report)
    except BaseException:
        print(f"benchmark failed; scratch kept in {workdir}", file=sys.stderr)
        raise
    report["targets"] = targets(report)
    runs = [*report.get("first_sync", []), *(report[name] for name in ("no_change", "delta") if report.get(name))]
    failed = not runs or not all(
        succeeded(run) or (run["exit_code"] == EXIT_BUDGET_SPENT and run is not runs[-1]) for run in runs
    )
    failed = failed or not report.get("delta", {}).get("exact")
    if failed or args.keep or args.workdir is not None:
        print(f"scratch kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    publish(report, args.output, render)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
