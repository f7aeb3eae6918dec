"""Mirror intents in the SQLite state store: this layout against an earlier commit's, in one run.

    .venv/bin/python bench/bench_state.py                    # 1,000,000 ids, 3 repetitions
    .venv/bin/python bench/bench_state.py --rows 200000 --repeat 1
    .venv/bin/python bench/bench_state.py --baseline none    # this layout only

Three scenarios, each on a fresh database file, each repetition in its own child process
(so its CPU time and peak memory are its own), through the StateStore methods only, so
the same child runs against either commit's ``sync/``:

* ``bulk``: record ``--rows`` ids in groups of 1,000, then clear them in groups of 50,000.
* ``flow``: what a mirror first sync does: record a group of 1,000 before its request, clear
  two groups' ids once their commit is flushed, with four groups in flight.
* ``leftover``: ``--rows`` intents outstanding (requests that failed, or a crash), then
  twenty clears of 2,000 consecutive ids and twenty of 2,000 ids spread over all of them:
  what one flush costs against a large outstanding set.

The baseline is ``sync/`` of ``--baseline`` (default 3cf4d84: one ``intents`` row per id),
extracted with ``git archive`` into a temporary directory put first on the child's
``PYTHONPATH``. CPU seconds are the child's ``time.process_time()`` around each phase
(SQLite's own work included, waits for fsync not); the median over the repetitions is
printed. The benchmark asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The last commit with one intents row per id.
BASELINE_REF = "3cf4d84"
SCENARIOS = ("bulk", "flow", "leftover")
GROUP = 1_000
CLEAR_GROUP = 50_000
FLUSH_GROUPS = 2
IN_FLIGHT_GROUPS = 4
PROBE_CLEARS = 20
PROBE_IDS = 2_000


def _ids(rows: int) -> list[str]:
    # Zero-padded: string order is number order, as the ids of a full pass arrive.
    return [f"user-{n:08d}" for n in range(rows)]


def _groups(ids: list[str], size: int) -> list[list[str]]:
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def _child(scenario: str, db: str, rows: int) -> dict[str, Any]:
    """Run one scenario on a fresh file with whichever ``sync`` is importable; return its figures."""
    from sync.state import sqlite as layout
    from sync.state.sqlite import SQLiteStateStore

    ids = _ids(rows)
    store = SQLiteStateStore(db)
    lease = store.acquire_lease("bench", "bench", 3600.0, datetime.now(UTC))
    figures: dict[str, Any] = {"schema_version": layout.SCHEMA_VERSION}

    def phase(name: str, work: Callable[[], None]) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        work()
        figures[f"{name}_cpu_s"] = time.process_time() - cpu
        figures[f"{name}_wall_s"] = time.perf_counter() - wall

    def record_all() -> None:
        for group in _groups(ids, GROUP):
            store.record_intents(lease, group)

    if scenario == "bulk":
        phase("record", record_all)

        def clear_all() -> None:
            for group in _groups(ids, CLEAR_GROUP):
                store.clear_intents(lease, group)

        phase("clear", clear_all)
    elif scenario == "flow":

        def flow() -> None:
            in_flight: deque[list[str]] = deque()
            for group in _groups(ids, GROUP):
                store.record_intents(lease, group)
                in_flight.append(group)
                if len(in_flight) >= IN_FLIGHT_GROUPS + FLUSH_GROUPS:
                    done = [i for _ in range(FLUSH_GROUPS) for i in in_flight.popleft()]
                    store.clear_intents(lease, done)
            store.clear_intents(lease, [i for group in in_flight for i in group])

        phase("flow", flow)
    else:
        phase("record", record_all)
        step = max(1, rows // PROBE_IDS)

        def probe(pick: Callable[[int], list[str]], name: str) -> None:
            cpus, walls = [], []
            for k in range(PROBE_CLEARS):
                chosen = pick(k)
                cpu, wall = time.process_time(), time.perf_counter()
                store.clear_intents(lease, chosen)
                cpus.append(time.process_time() - cpu)
                walls.append(time.perf_counter() - wall)
            figures[f"{name}_clear_cpu_ms"] = statistics.median(cpus) * 1000
            figures[f"{name}_clear_wall_ms"] = statistics.median(walls) * 1000

        middle = rows // 2
        probe(lambda k: ids[middle + k * PROBE_IDS : middle + (k + 1) * PROBE_IDS], "consecutive")
        probe(lambda k: ids[k::step][:PROBE_IDS], "spread")
    figures["outstanding"] = len(store.load_intents("bench"))
    store.close()
    figures["db_bytes"] = os.path.getsize(db)
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def _extract(ref: str, into: Path) -> Path:
    """``sync/`` of ``ref`` under ``into``, from git (no worktree is registered)."""
    archive = subprocess.run(  # noqa: S603 - git, fixed arguments
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref, "sync"],  # noqa: S607 - git from PATH
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _run_child(code_root: Path | None, scenario: str, rows: int, workdir: Path) -> dict[str, Any]:
    db = workdir / f"state-{scenario}-{time.monotonic_ns()}.db"
    env = dict(os.environ)
    if code_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(  # noqa: S603 - this script, fixed arguments
        [sys.executable, str(Path(__file__).resolve()), "--_child", scenario, "--_db", str(db), "--rows", str(rows)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench child ({scenario}) failed:\n{done.stderr}")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _print(scenario: str, layouts: dict[str, dict[str, float]]) -> None:
    names = list(layouts)
    keys = [k for k in layouts[names[0]] if k != "schema_version"]
    header = f"{scenario:<10} {'figure':<26}" + "".join(f"{n:>22}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>10}"
    print(header)
    for key in keys:
        values = [layouts[n][key] for n in names]
        line = f"{'':<10} {key:<26}" + "".join(f"{v:>22,.3f}" for v in values)
        if len(names) == 2 and values[1]:
            line += f"{values[0] / values[1]:>10.1f}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_REF, help="git commit to compare with, or 'none'")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append", help="default: all three")
    parser.add_argument("--_child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--_db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args._child, args._db, args.rows)))
        return 0
    scenarios = args.scenario or list(SCENARIOS)
    print(f"$ {' '.join([Path(sys.executable).name, 'bench/bench_state.py', *(argv or sys.argv[1:])])}")
    print(f"{args.rows:,} ids, median of {args.repeat}, baseline {args.baseline}\n")
    with tempfile.TemporaryDirectory(prefix="cepsync-bench-state-") as tmp:
        work = Path(tmp)
        roots: dict[str, Path | None] = {"this tree": None}
        if args.baseline != "none":
            roots = {f"baseline {args.baseline}": _extract(args.baseline, work / "baseline"), **roots}
        for scenario in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
            for _ in range(args.repeat):
                for name, root in roots.items():
                    runs[name].append(_run_child(root, scenario, args.rows, work))
            _print(scenario, {name: _medians(r) for name, r in runs.items()})
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
