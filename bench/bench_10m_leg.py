"""A first sync's second leg at 10M profiles: this checkout against a baseline, on the same state.

    .venv/bin/python bench/bench_10m_leg.py --baseline fb785dd --repeat 3        # ~12 min
    .venv/bin/python bench/bench_10m_leg.py --workdir W --keep ...               # keep, then reuse W

``bench_10m.py`` runs a whole first sync through its continuations (~20 minutes at 10M), so
comparing two checkouts' later legs that way takes most of an hour. This bench builds the
state such a leg starts from once, and runs only the leg, on each checkout in turn:

1. The 10M-row ``customers`` table (``bench_sync``'s generator), unless ``--workdir``
   already holds it.
2. The first leg, once and unpaced: ``cepsync run`` on the customers below
   ``--stored-share`` of the ids, against a simulator without rate limits (a first leg
   leaves exactly that: its acknowledged profiles stored, the rest of the segment new).
3. Each repetition, for each checkout in turn (which goes first alternates): a fresh copy of
   that state, then the second leg as a user runs it, ``cepsync run --time-budget B`` on the
   whole segment against the simulator with Batch's rate limits on, measured from outside
   (wall, CPU of all threads, peak RSS from ``VmHWM``).

A leg that hands over after its budget is judged by how soon its first request leaves and
how many profiles it got acknowledged before the budget ran out: every second the differ
holds the sender back is ~9,700 profiles a later leg must send. It prints each figure's
median and ratio; the figures go to ``bench/results/10m-leg-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from bench_sync import (
    REPO_ROOT,
    _get_json,
    _step,
    baseline_tree,
    bench_env,
    build_activation,
    generate_segment,
    simulator_process,
)
from cli_figures import summarise_command
from cli_run import run_command

from sync.duckdb_sql import quote_literal

ROWS = 10_000_000
# Exit code of `cepsync run` when the time budget ran out (README, "Exit codes").
EXIT_BUDGET_SPENT = 7
FIGURES = (
    "wall_seconds",
    "cpu_seconds",
    "peak_rss_mb",
    "first_request_seconds",
    "hash_and_diff_seconds",
    "acknowledged",
    "too_many_requests",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=ROWS, help=f"valid profiles in the segment (default {ROWS:,})")
    parser.add_argument(
        "--stored-share", type=float, default=0.42, help="share of the ids the first leg sent (default 0.42)"
    )
    parser.add_argument("--budget", type=float, default=70.0, help="--time-budget of the second leg (default 70)")
    parser.add_argument("--baseline", default="none", help="commit to compare against ('none': this checkout only)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per checkout (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="segment and first-leg state (built if missing)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's segment and state afterwards")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="kill a command still running after this")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "10m-leg-latest.json")
    args = parser.parse_args(argv)
    if args.rows < 2 or args.repeat < 1 or not 0 < args.stored_share < 1 or args.budget <= 0:
        parser.error("--rows >= 2, --repeat >= 1, 0 < --stored-share < 1 and a positive --budget, please")
    return args


def first_leg(workdir: Path, rows: int, share: float, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """The segment and the state a first leg leaves (built once per workdir); what they hold."""
    database, state = workdir / "segment.duckdb", workdir / "state.db"
    facts_path = workdir / "first-leg.json"
    if facts_path.is_file() and database.is_file() and state.is_file():
        facts: dict[str, Any] = json.loads(facts_path.read_text(encoding="utf-8"))
        if facts["rows"] == rows and facts["stored_share"] == share:
            return facts
    for path in (database, state):
        path.unlink(missing_ok=True)
    _step(f"generating {rows:,} customers")
    generate_segment(database, rows)
    below = f"cust-{round(rows * share):07d}"
    with simulator_process(env, workdir / "simulator-first.log", keep_every=100, rate_limit=False) as base_url:
        activation = build_activation(database, base_url, None)
        bound = quote_literal(below)
        activation["source"]["query"] = f"SELECT * FROM customers WHERE is_active AND customer_id < {bound}"  # noqa: S608 - quoted
        activation["destination"]["rate_limit"] = False
        path = workdir / "first-leg.yml"
        path.write_text(yaml.safe_dump(activation), encoding="utf-8")
        _step(f"first leg, unpaced: the customers below {below}")
        result = run_command(
            ["run", str(path), "--state", f"sqlite:///{state}", "--json"],
            tree=REPO_ROOT,
            env=env,
            workdir=workdir,
            label="first-leg",
            timeout=timeout,
        )
    record = result.record or {}
    if record.get("status") not in ("succeeded", "succeeded_with_rejections"):  # the generator's invalid rows
        raise SystemExit(f"the first leg ended {record.get('status', 'without a record')}; see {workdir}")
    facts = {"rows": rows, "stored_share": share, "stored": record["counts"]["acknowledged"], "below": below}
    facts_path.write_text(json.dumps(facts), encoding="utf-8")
    return facts


def second_leg(
    tree: Path,
    label: str,
    scratch: Path,
    workdir: Path,
    activation: Path,
    base_url: str,
    env: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A fresh copy of the first leg's state, then the second leg on ``tree``'s code."""
    state = scratch / "state.db"
    shutil.copyfile(workdir / "state.db", state)
    before = _get_json(f"{base_url}/_sim/stats")
    result = run_command(
        ["run", str(activation), "--state", f"sqlite:///{state}", "--json", "--time-budget", f"{args.budget:g}"],
        tree=tree,
        env=env,
        workdir=scratch,
        label=label.replace(" ", "-").replace("#", ""),
        timeout=args.run_timeout,
    )
    summary = summarise_command(result, before, _get_json(f"{base_url}/_sim/stats"))
    summary["hash_and_diff_seconds"] = summary["timings"].get("stages", {}).get("hash_and_diff")
    summary["delta_pass"] = (result.record or {}).get("delta_pass")
    _step(
        f"{label}: {summary['status']} (exit {summary['exit_code']}) in {summary['wall_seconds']:.1f} s, "
        f"first request {summary['first_request_seconds']} s, acknowledged {summary['acknowledged']:,}, "
        f"differ {summary['hash_and_diff_seconds']} s, peak {summary['peak_rss_mb']:.0f} MB"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = bench_env()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cepsync-10m-leg-")))
        workdir = args.workdir or scratch / "kept"
        workdir.mkdir(parents=True, exist_ok=True)
        facts = first_leg(workdir, args.rows, args.stored_share, env, args.run_timeout)
        _step(f"the first leg stored {facts['stored']:,} of {args.rows:,} profiles")
        trees: dict[str, Path] = {"current": REPO_ROOT}
        if args.baseline != "none":
            trees["baseline"] = stack.enter_context(baseline_tree(args.baseline, scratch))
        base_url = stack.enter_context(simulator_process(env, scratch / "simulator.log", keep_every=100))
        activation = build_activation(workdir / "segment.duckdb", base_url, None)
        activation_path = scratch / "activation.yml"
        activation_path.write_text(yaml.safe_dump(activation), encoding="utf-8")
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for repetition in range(args.repeat):
            for name in trees if repetition % 2 == 0 else reversed(trees):
                label = f"{name} #{repetition + 1}"
                results[name].append(
                    second_leg(trees[name], label, scratch, workdir, activation_path, base_url, env, args)
                )
        if args.workdir is not None and not args.keep:
            shutil.rmtree(workdir)
    return publish(args, facts, results)


def publish(args: argparse.Namespace, facts: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> int:
    """Print the medians and ratios; write the JSON; 1 when a leg neither handed over nor finished."""
    medians = {
        name: {key: _median([run.get(key) for run in runs]) for key in FIGURES} for name, runs in results.items()
    }
    print(
        f"\nsecond leg of a {args.rows:,}-profile first sync ({facts['stored']:,} stored), "
        f"--time-budget {args.budget:g}; medians of {args.repeat}"
    )
    print(f"{'figure':24} " + " ".join(f"{name:>12}" for name in results) + ("   ratio" if len(results) > 1 else ""))
    for key in FIGURES:
        values = [medians[name][key] for name in results]
        line = f"{key:24} " + " ".join(f"{'-' if v is None else f'{v:,.2f}':>12}" for v in values)
        base, now = medians.get("baseline", {}).get(key), medians["current"][key]
        if base is not None and now:
            line += f"   {base / now:.2f}x"
        print(line)
    for name, runs in results.items():
        print(f"{name}: " + ", ".join(str(run["delta_pass"]) for run in runs))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "first_leg": facts, "medians": medians}
    args.output.write_text(json.dumps({**report, "runs": results}, indent=2, default=str), encoding="utf-8")
    print(f"figures written to {args.output}")
    bad = [run["status"] for runs in results.values() for run in runs if run["exit_code"] not in (0, EXIT_BUDGET_SPENT)]
    return 1 if bad else 0


def _median(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


if __name__ == "__main__":
    raise SystemExit(main())
