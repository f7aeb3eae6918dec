"""One engine run in its own child process, measured from inside (shared by the bench scripts).

The parent (:func:`run_child`) writes a spec, starts a bench script with ``--_child`` on the
code of a given tree, and reads back the result; the child (:func:`measure_run`) builds the
same edges `cepsync run` builds, runs the activation once and measures wall time, CPU time
and peak RSS of its own process only.

Only the standard library is imported here, and the engine's modules only inside
:func:`measure_run`: a child may run the engine of another commit (``PYTHONPATH`` puts that
checkout first), so this module must import on any of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

StoreOpener = Callable[[dict[str, Any]], tuple[Any, Callable[[], dict[str, Any]]]]


def child_main(spec_path: str, open_store: StoreOpener) -> int:
    """A child's whole life: read the spec, run on the store ``open_store`` gives, write the result."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    store, counters = open_store(spec)
    result = measure_run(spec, store, counters)
    Path(spec["result_path"]).write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


def measure_run(spec: dict[str, Any], store: Any, counters: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``spec["activation"]`` once on ``store``; the run record and this process's figures.

    ``counters`` is read right after the run, before the store is closed: the store served
    this run and nothing else, so they are the run's own. The store is closed here.
    """
    from sync.config_file import parse_activation
    from sync.engine import Run, RunOptions
    from sync.logs import configure_logging
    from sync.runtime import build_client, open_source

    if spec.get("cpus"):
        # The Cloud Functions default: one vCPU. The simulator keeps the other core.
        os.sched_setaffinity(0, set(spec["cpus"]))
    configure_logging(level="warning")
    activation = parse_activation(spec["activation"], source="bench")
    source = open_source(activation)
    options = RunOptions(trigger="bench")
    if spec.get("lease_ttl_seconds") is not None:
        options.lease_ttl_seconds = float(spec["lease_ttl_seconds"])
    if spec.get("time_budget_seconds") is not None:
        options.time_budget_seconds = float(spec["time_budget_seconds"])
    if spec.get("continuation_of"):
        options.continuation_of = str(spec["continuation_of"])
    try:
        run = Run(activation, source=source, store=store, client=build_client(activation), options=options)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result = asyncio.run(run.execute())
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        store_stats = counters()
    finally:
        source.close()
        store.close()
    return {
        "record": result.record,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3),
        "peak_rss_bytes": peak_rss_bytes(after),
        "state_store": store_stats,
    }


def peak_rss_bytes(usage: resource.struct_rusage) -> int:
    """This process image's peak resident set: ``VmHWM`` where Linux has it.

    Not ``ru_maxrss`` alone: Linux carries a process's peak across ``exec`` (it keeps the
    larger of the old and new images' peaks), and a child started by ``subprocess`` is a
    fork or vfork of the bench, whose peak while it generated the segment (~370 MB at 1M,
    ~570 MB at 5M) then shows as the engine's. ``ru_maxrss`` (KiB on Linux) is the fallback.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(usage.ru_maxrss) * 1024


def run_child(
    spec: dict[str, Any],
    workdir: Path,
    env: dict[str, str],
    label: str,
    *,
    script: Path,
    tree: Path,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``script --_child run SPEC`` on the code in ``tree``; the child's JSON result.

    ``tree`` is this checkout, or a checkout of a baseline commit: ``PYTHONPATH`` puts that
    tree's ``sync`` first, so the child runs that engine against the same segment, simulator
    and machine, and the two are compared in one run.

    Raises:
        RuntimeError: The child exited with an error or outlived ``timeout`` (then it is
            killed); the message names its log.
    """
    spec_path = workdir / f"{label}.spec.json"
    result_path = workdir / f"{label}.result.json"
    log_path = workdir / f"{label}.log"
    spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}), encoding="utf-8")
    command = [sys.executable, str(script), "--_child", "run", str(spec_path)]
    child_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with log_path.open("wb") as log:
        try:
            completed = subprocess.run(  # noqa: S603 - a bench script of ours, fixed arguments
                command, env=child_env, cwd=tree, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{label}: child killed after {timeout:.0f} s; see {log_path}") from None
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{label}: child exited with code {completed.returncode}; see {log_path}")
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    result["process_seconds"] = round(elapsed, 3)
    return result
