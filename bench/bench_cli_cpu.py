"""CPU and peak memory of the ``cepsync run`` command, end to end, against a baseline commit.

    .venv/bin/python bench/bench_cli_cpu.py                      # 1M rows, 3 repetitions, baseline main
    .venv/bin/python bench/bench_cli_cpu.py --rows 200000 --repeat 5 --baseline e932737
    .venv/bin/python bench/bench_cli_cpu.py --baseline none --runs full

What users pay for a run is the whole process: the interpreter starting, the imports, the run,
the record printed. Each repetition of each checkout runs, as its own ``python -m sync.cli run``
process on bench_sync's segment (the demo's mapping, ``mirror``, SQLite state, the simulator
with Batch's rate limits on in a process of its own), a ``full`` load, then a ``delta`` (1 % of
the rows changed, 0.5 % left) and a ``no_change`` run. The checkouts alternate within each
repetition (which goes first alternates too), so the machine's noise falls on both.

Per run type and checkout, the median over the repetitions of:

* ``CPU µs/row``: user + system CPU of the command and every process it waited for (worker
  processes included), per row of the segment, from the operating system's accounting of
  the reaped child (``os.wait4``);
* ``user µs/row``, ``system µs/row``: the same, split (system CPU is mostly page faults);
* ``peak RSS MB``: the command's own ``VmHWM``, read by its process just before it exits
  (``bench/cli_run.py``; not ``ru_maxrss``, which Linux carries over from this bench's process,
  itself ~300 MB after generating a 1M-row segment), 10^6 bytes;
* ``wall s``: the command from start to exit.

and the ratio baseline / this checkout (above 1: this checkout is cheaper). Nothing is
asserted: the bench prints figures; it exits 1 if a run did not succeed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import cli_run
import yaml
from bench_sync import (
    baseline_tree,
    build_activation,
    change_rows,
    generate_segment,
    remove_rows,
    simulator_process,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = ("full", "delta", "no_change")
# A run record's status that counts as success (the segment's invalid rows are rejected).
SUCCEEDED = ("succeeded", "succeeded_with_rejections")


def reset_simulator(base_url: str) -> None:
    request = urllib.request.Request(f"{base_url}/_sim/reset", method="POST")  # noqa: S310 - our local http simulator
    with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - our local http simulator
        pass


def run_command(
    tree: Path, activation: Path, state: Path, env: dict[str, str], scratch: Path, label: str
) -> dict[str, float | str]:
    """One ``cepsync run`` of ``tree``'s code; its CPU, peak RSS, wall time and status."""
    result = cli_run.run_command(
        ["run", str(activation), "--state", f"sqlite:///{state}", "--json"],
        tree=tree,
        env=env,
        workdir=scratch,
        label=label,
    )
    if result.record is not None:
        status = str(result.record.get("status"))
    else:
        errors = result.stderr_path.read_text(encoding="utf-8", errors="replace")
        status = f"exit {result.exit_code}: {(result.error or errors)[-500:]}"
    return {
        "cpu_s": result.cpu_seconds,
        "user_s": result.user_seconds,
        "system_s": result.system_seconds,
        "rss_mb": (result.peak_rss_bytes or 0) / 1e6,
        "wall_s": result.wall_seconds,
        "status": status,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="valid rows of the segment")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians are printed)")
    parser.add_argument("--baseline", default="main", help="commit to compare with ('none' to skip)")
    parser.add_argument("--runs", default=",".join(RUNS), help="run types, in order: full,delta,no_change")
    args = parser.parse_args(argv)
    runs = [run for run in args.runs.split(",") if run]
    if not runs or runs[0] != "full" or any(run not in RUNS for run in runs):
        parser.error(f"--runs is full, then any of {', '.join(RUNS[1:])}")
    env = {
        **os.environ,
        "BATCH_REST_API_KEY": "bench-" + secrets.token_hex(12),
        "BATCH_PROJECT_KEY": "project_" + secrets.token_hex(8),
    }
    workdir = Path(tempfile.mkdtemp(prefix="cepsync-bench-cli-"))
    figures: dict[tuple[str, str], list[dict[str, float | str]]] = {}
    failed = False
    try:
        base = workdir / "base.duckdb"
        print(f"generating {args.rows:,} rows ...", file=sys.stderr)
        generate_segment(base, args.rows)
        with ExitStack() as stack:
            trees = {"this checkout": REPO_ROOT}
            if args.baseline != "none":
                trees[f"baseline {args.baseline}"] = stack.enter_context(baseline_tree(args.baseline, workdir))
            base_url = stack.enter_context(simulator_process(env, workdir / "simulator.log"))
            for repetition in range(args.repeat):
                order = list(trees.items())
                if repetition % 2:
                    order.reverse()
                for name, tree in order:
                    scratch = workdir / f"run-{repetition}-{len(figures)}"
                    scratch.mkdir()
                    database = scratch / "segment.duckdb"
                    shutil.copyfile(base, database)
                    activation = scratch / "activation.yaml"
                    activation.write_text(yaml.safe_dump(build_activation(database, base_url, None)), encoding="utf-8")
                    state = scratch / "state.db"
                    # The simulator keeps every profile it stored: start each full load empty.
                    reset_simulator(base_url)
                    for run in runs:
                        if run == "delta":
                            change_rows(database, args.rows, 1.0)
                            remove_rows(database, args.rows, 0.5)
                        result = run_command(tree, activation, state, env, scratch, run)
                        figures.setdefault((name, run), []).append(result)
                        print(f"{repetition + 1}/{args.repeat} {name} {run}: {result}", file=sys.stderr)
                        if result["status"] not in SUCCEEDED:
                            failed = True
                    shutil.rmtree(scratch, ignore_errors=True)
        print_table(figures, list(trees), runs, args.rows, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def print_table(
    figures: dict[tuple[str, str], list[dict[str, float | str]]],
    names: list[str],
    runs: list[str],
    rows: int,
    repeat: int,
) -> None:
    print(f"\n`cepsync run` end to end, {rows:,} rows, medians of {repeat}; ratio = baseline / this checkout")
    header = f"{'run':10} {'figure':14}" + "".join(f" {name[:22]:>22}" for name in names)
    print(header + (f" {'ratio':>7}" if len(names) > 1 else ""))
    for run in runs:
        for label, key, scale in (
            ("CPU µs/row", "cpu_s", 1e6 / rows),
            ("user µs/row", "user_s", 1e6 / rows),
            ("system µs/row", "system_s", 1e6 / rows),
            ("peak RSS MB", "rss_mb", 1.0),
            ("wall s", "wall_s", 1.0),
        ):
            medians = [statistics.median(float(r[key]) for r in figures[(name, run)]) * scale for name in names]
            line = f"{run:10} {label:14}" + "".join(f" {value:22.1f}" for value in medians)
            if len(medians) > 1 and medians[0]:
                line += f" {medians[1] / medians[0]:7.2f}"
            print(line)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
