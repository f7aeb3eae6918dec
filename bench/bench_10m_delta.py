"""A 10M delta and the no-change run after it, this checkout against a baseline, on a kept 10M workdir.

    .venv/bin/python bench/bench_10m.py --keep --workdir W            # once (~25 min)
    .venv/bin/python bench/bench_10m_delta.py W --baseline 05de5a3 --repeat 2

``bench_10m.py`` measures one checkout from a first sync on; a first sync of 10M profiles
takes ~20 minutes, so comparing two checkouts' deltas that way takes an hour. This bench
starts from the state ``bench_10m.py --keep`` left instead (its segment, its SQLite state
and its activation), so that each checkout runs the same commands on the same data:

1. The kept segment is copied once and changed again: ``--changed-percent`` of the
   generated customers get new loyalty points and a newer order (``bench_sync``'s change),
   and ``--removed-percent`` others leave the segment (not the ones ``bench_10m`` removed).
2. The Batch simulator runs in its own process with Batch's rate limits on.
3. Each repetition, for each checkout in turn (which goes first alternates): a fresh copy
   of the kept state, then ``cepsync run`` twice, measured from outside like every command
   of ``bench_10m``: the delta, then a run with nothing changed (which loads the state the
   delta left, journal and all).

It prints each command's wall, CPU and peak RSS, their medians and ratios, the run record's
first request and differ time, the state rows written, and issue 20's 10M targets for the
delta (1.3 x Batch's floor) and the no-change run (8 s), with the peak (700 MB). Both
checkouts must send and remove the same numbers of profiles, or the bench exits 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import duckdb
import yaml
from bench_10m import DELTA_FLOOR_FACTOR, NO_CHANGE_SECONDS, PEAK_RSS_MB
from bench_sync import REPO_ROOT, _get_json, _step, baseline_tree, bench_env, change_rows, simulator_process
from cli_figures import floor_seconds, summarise_command
from cli_run import run_command

# Customers that leave for this delta: a residue bench_sync's own removal never takes
# ((n + 1) % every == 0), so that they are still in the kept segment.
_LEAVE_SQL = """
UPDATE customers SET is_active = FALSE
WHERE customer_id LIKE 'cust-%'
  AND CAST(substr(customer_id, 6) AS BIGINT) < $rows
  AND (CAST(substr(customer_id, 6) AS BIGINT) + 7) % $every = 0
  AND is_active
"""
RUNS = ("delta", "no_change")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kept", type=Path, help="a workdir kept by `bench_10m.py --keep` (segment, state, activation)")
    parser.add_argument("--baseline", default="none", help="commit to compare against ('none': this checkout only)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions per checkout (default 2)")
    parser.add_argument("--changed-percent", type=float, default=1.0, help="rows changed before the delta")
    parser.add_argument("--removed-percent", type=float, default=0.5, help="rows that leave before the delta")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="kill a command still running after this")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "10m-delta-latest.json")
    args = parser.parse_args(argv)
    for name in ("segment.duckdb", "state.db", "activation.yml"):
        if not (args.kept / name).is_file():
            parser.error(f"{args.kept} has no {name}: run `bench_10m.py --keep --workdir {args.kept}` first")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def prepare_segment(kept: Path, scratch: Path, changed_percent: float, removed_percent: float) -> dict[str, Any]:
    """The kept segment copied into ``scratch`` and changed for the delta; how many rows changed and left."""
    database = scratch / "segment.duckdb"
    shutil.copyfile(kept / "segment.duckdb", database)
    with duckdb.connect(str(database)) as connection:
        ((rows,),) = connection.execute("SELECT count(*) FROM customers WHERE customer_id LIKE 'cust-%'").fetchall()
    changed = change_rows(database, int(rows), changed_percent)
    every = max(1, round(100.0 / removed_percent)) if removed_percent > 0 else 0
    left = 0
    if every:
        with duckdb.connect(str(database)) as connection:
            result = connection.execute(_LEAVE_SQL, {"rows": int(rows), "every": every}).fetchone()
            left = int(result[0]) if result else 0
    return {"rows": int(rows), "changed": changed["rows_changed"], "left": left, "database": database}


def run_pair(
    tree: Path,
    label: str,
    scratch: Path,
    kept: Path,
    activation: Path,
    base_url: str,
    env: dict[str, str],
    timeout: float,
) -> dict[str, Any]:
    """A fresh copy of the kept state, then the delta and a run with nothing changed, on ``tree``'s code."""
    state = scratch / "state.db"
    shutil.copyfile(kept / "state.db", state)
    figures: dict[str, Any] = {}
    for run in RUNS:
        before = _get_json(f"{base_url}/_sim/stats")
        result = run_command(
            ["run", str(activation), "--state", f"sqlite:///{state}", "--json"],
            tree=tree,
            env=env,
            workdir=scratch,
            label=f"{label}-{run}",
            timeout=timeout,
        )
        summary = summarise_command(result, before, _get_json(f"{base_url}/_sim/stats"))
        record = result.record or {}
        summary.update(
            hash_and_diff_seconds=summary["timings"].get("stages", {}).get("hash_and_diff"),
            removed=summary["counts"].get("removed"),
            state_rows_written=record.get("state_ops", {}).get("rows_written"),
        )
        _step(
            f"{label} {run}: {summary['status']} in {summary['wall_seconds']:.1f} s, "
            f"CPU {summary['cpu_seconds']:.1f} s, peak {summary['peak_rss_mb']:.0f} MB, "
            f"sent {summary['sent']:,}, removed {summary['removed']:,}, "
            f"state rows written {summary['state_rows_written']:,}"
        )
        figures[run] = summary
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = bench_env()
    report: dict[str, Any] = {"kept": str(args.kept), "baseline": None if args.baseline == "none" else args.baseline}
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cepsync-10m-delta-")))
        trees: dict[str, Path] = {"current": REPO_ROOT}
        if args.baseline != "none":
            trees["baseline"] = stack.enter_context(baseline_tree(args.baseline, scratch))
        _step("copying and changing the kept segment")
        segment = prepare_segment(args.kept, scratch, args.changed_percent, args.removed_percent)
        report["delta_input"] = {k: v for k, v in segment.items() if k != "database"}
        base_url = stack.enter_context(simulator_process(env, scratch / "simulator.log", keep_every=100))
        activation = yaml.safe_load((args.kept / "activation.yml").read_text(encoding="utf-8"))
        activation["source"]["database"] = str(segment["database"])
        activation["destination"]["base_url"] = base_url
        activation_path = scratch / "activation.yml"
        activation_path.write_text(yaml.safe_dump(activation), encoding="utf-8")
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for repetition in range(args.repeat):
            order = list(trees) if repetition % 2 == 0 else list(reversed(trees))
            for name in order:
                results[name].append(
                    run_pair(
                        trees[name],
                        f"{name} #{repetition + 1}",
                        scratch,
                        args.kept,
                        activation_path,
                        base_url,
                        env,
                        args.run_timeout,
                    )
                )
    report["runs"] = results
    return publish_figures(report, results, segment, args.output)


def _median(runs: list[dict[str, Any]], run: str, key: str) -> float | None:
    values = [r[run][key] for r in runs if r[run].get(key) is not None]
    return statistics.median(values) if values else None


def publish_figures(
    report: dict[str, Any], results: dict[str, list[dict[str, Any]]], segment: dict[str, Any], output: Path
) -> int:
    """Print medians, ratios and the targets; write the JSON; 1 when a run failed or the checkouts disagree."""
    keys = (
        "wall_seconds",
        "cpu_seconds",
        "peak_rss_mb",
        "first_request_seconds",
        "hash_and_diff_seconds",
        "state_rows_written",
    )
    medians = {
        name: {run: {key: _median(runs, run, key) for key in keys} for run in RUNS} for name, runs in results.items()
    }
    report["medians"] = medians
    print(f"\n{segment['rows']:,} customers; delta: {segment['changed']:,} changed, {segment['left']:,} left (medians)")
    print(
        f"{'run':10} {'figure':24} "
        + " ".join(f"{name:>12}" for name in results)
        + ("   ratio" if "baseline" in results else "")
    )
    for run in RUNS:
        for key in keys:
            values = [medians[name][run][key] for name in results]
            line = f"{run:10} {key:24} " + " ".join(f"{'-' if v is None else f'{v:,.2f}':>12}" for v in values)
            base, now = medians.get("baseline", {}).get(run, {}).get(key), medians["current"][run][key]
            if base is not None and now:
                line += f"   {base / now:.2f}x"
            print(line)
    floor = floor_seconds(segment["changed"] + segment["left"])
    current = medians["current"]
    peak = max(current[run]["peak_rss_mb"] or 0.0 for run in RUNS)
    checks = [
        ("delta, wall", current["delta"]["wall_seconds"], DELTA_FLOOR_FACTOR * floor),
        ("no change, wall", current["no_change"]["wall_seconds"], NO_CHANGE_SECONDS),
        ("peak RSS, both runs", peak, PEAK_RSS_MB),
    ]
    print("\nissue 20's 10M targets (this checkout):")
    for name, value, limit in checks:
        met = value is not None and value <= limit
        print(f"  {name:22} {value if value is not None else '-':>10} <= {limit:,.1f}   {'met' if met else 'NOT met'}")
    report["targets"] = [
        {"target": n, "value": v, "limit": lim, "met": v is not None and v <= lim} for n, v, lim in checks
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"figures written to {output}")
    outcomes = {(r["delta"]["sent"], r["delta"]["removed"]) for runs in results.values() for r in runs}
    failed = [
        r[run]["status"]
        for runs in results.values()
        for r in runs
        for run in RUNS
        if not str(r[run]["status"]).startswith("succeeded")
    ]
    if len(outcomes) != 1 or failed:
        print(
            f"the checkouts disagree or a run failed: (sent, removed) {sorted(outcomes)}, failed {failed}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
