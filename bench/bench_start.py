"""How fast cepsync starts: import work before a run's first line, for the CLI and the function.

    .venv/bin/python bench/bench_start.py                      # this checkout and d7cf1b1, 7 repetitions
    .venv/bin/python bench/bench_start.py --baseline none      # this checkout only
    .venv/bin/python bench/bench_start.py --repeat 15 --rows 500

Three figures per checkout, each over ``--repeat`` repetitions (median, min, max):

* ``import sync.cli``: the cumulative time of ``sync.cli`` in ``python -X importtime``
  (what the interpreter spends importing the command line before typer parses anything);
* ``cepsync run``: wall time from starting ``cepsync run ACTIVATION.yaml`` (a small DuckDB
  activation, SQLite state, a fresh state per repetition, so every run is a full load)
  against the local Batch simulator to the first line the process writes, on stdout or
  stderr. The run's whole wall time is printed beside it;
* ``import main``: the function's entry module (``main.py``, functions-framework), imported
  with the function's environment, as a cold instance does: its ``-X importtime``
  cumulative time and the wall time of the whole interpreter;
* the function's cold start: a fresh interpreter imports ``main`` and hands ``http_sync`` one
  request (``{"activation": "vip_customers"}``, a Flask test request, SQLite state, a fresh
  state per repetition, so a full load) against the same simulator: the wall time from
  starting the interpreter to the answer, and the part of it the request took.

The run's first line is the first line the command writes on stdout or stderr, whatever it
says: since the start line (docs/how-a-run-works.md, "Start-up") it is ``run starting: ...`` on
stderr; before it, the baseline's first line was the run record's, printed after the run.

With ``--baseline REV`` (default d7cf1b1, before the imports were deferred; ``none`` to skip)
the same figures are measured on a ``git worktree`` of that commit in a temporary directory,
in alternation with this checkout (the machine's noise falls on both), and their ratios
printed (baseline / this checkout: above 1 means this checkout starts faster).

This is a benchmark, not a test: it asserts nothing about speed. It exits 1 if a run did
not succeed. ``-X importtime`` adds its own overhead, so its figures are for comparing
checkouts, not absolute.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench_sync import simulator_process

from sync.dev.demo import generate_segment, write_customers
from sync.dev.demo_runner import ACTIVATION_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "d7cf1b1"
RUN_TIMEOUT_SECONDS = 120.0


@dataclass
class Figures:
    """Each figure's samples (seconds) for one checkout."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)


FIGURES = (
    ("import sync.cli (importtime)", "import_cli"),
    ("cepsync run: first line", "run_first_line"),
    ("cepsync run: whole run", "run_wall"),
    ("import main (importtime)", "import_main"),
    ("python -c 'import main' (wall)", "main_wall"),
    ("function: import + 1st request", "function_cold"),
    ("  of which the request", "function_request"),
)

# A cold instance: import main, then one HTTP request through http_sync (the Flask request
# functions-framework would hand it), timed inside; the answer's status is printed with it.
_FUNCTION_PROBE = """
import json, sys, time
started = time.perf_counter()
import main
imported = time.perf_counter()
from flask import Flask, request
with Flask("bench").test_request_context("/", method="POST", json={"activation": "vip_customers"}):
    body, status = main.http_sync(request)
answered = time.perf_counter()
print(json.dumps({"request": answered - imported, "status": status, "run_status": body.get("status")}))
"""


def _env(checkout: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONPATH": str(checkout)}
    env.pop("PYTHONSTARTUP", None)
    env["PYTHONDONTWRITEBYTECODE"] = "0"
    return env


def importtime(checkout: Path, module: str, env: dict[str, str]) -> float:
    """The cumulative import time of ``module`` (seconds), from ``python -X importtime``."""
    done = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in done.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        _, cumulative, name = line.split("|")
        if name.strip() == module and name.startswith(" " + module):  # the top-level entry, not a nested one
            return int(cumulative) / 1e6
    raise RuntimeError(f"no importtime line for {module} in {checkout}")


def wall(checkout: Path, code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, check=True, capture_output=True)  # noqa: S603 - this interpreter, fixed arguments
    return time.perf_counter() - start


def first_line(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int, str]:
    """(seconds to the first line on stdout or stderr, seconds to exit, exit code, that line)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S603 - our own CLI
    assert process.stdout is not None
    assert process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    selector.register(process.stderr, selectors.EVENT_READ)
    buffers: dict[int, bytes] = {}
    first: float | None = None
    line = ""
    deadline = start + RUN_TIMEOUT_SECONDS
    open_streams = 2
    while open_streams:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.perf_counter())):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            buffers[key.fd] = buffers.get(key.fd, b"") + chunk
            if first is None and b"\n" in buffers[key.fd]:
                first = time.perf_counter() - start
                line = buffers[key.fd].split(b"\n", 1)[0].decode(errors="replace")
        if time.perf_counter() > deadline:
            process.kill()
            break
    code = process.wait()
    total = time.perf_counter() - start
    selector.close()
    if code != 0:
        output = b"\n".join(buffers.values()).decode(errors="replace")
        raise RuntimeError(f"{' '.join(command)} exited with {code}:\n{output[-2000:]}")
    return (first if first is not None else total), total, code, line


@contextmanager
def checkout_of(revision: str, scratch: Path) -> Iterator[Path]:
    """A detached ``git worktree`` of ``revision``, removed afterwards."""
    path = scratch / f"baseline-{revision}"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), revision], cwd=REPO_ROOT, check=True)  # noqa: S603, S607 - git from PATH, fixed arguments
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO_ROOT, check=False)  # noqa: S603, S607 - git from PATH, fixed arguments


def measure_once(checkout: Path, figures: Figures, scratch: Path, activation: Path, keys: dict[str, str]) -> str:
    """One repetition of every figure on one checkout; the run's first line."""
    env = _env(checkout, keys)
    figures.add("import_cli", importtime(checkout, "sync.cli", env))
    state = scratch / f"state-{secrets.token_hex(4)}.db"
    # The console script of this environment: `from sync.cli import app; app()`, with
    # PYTHONPATH putting the checkout's sync package first.
    script = Path(sys.executable).parent / "cepsync"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from sync.cli import app; app()"]
    arguments = ["run", str(activation), "--state", f"sqlite:///{state}"]
    first, total, _, line = first_line([*command, *arguments], env, scratch)
    figures.add("run_first_line", first)
    figures.add("run_wall", total)
    state.unlink(missing_ok=True)
    function_env = {
        **env,
        "CEPSYNC_STATE": f"sqlite:///{scratch / 'function-state.db'}",
        "CEPSYNC_ACTIVATIONS_DIR": str(scratch / "function"),
        "CEPSYNC_LOG_LEVEL": "info",
    }
    figures.add("import_main", importtime(checkout, "main", function_env))
    figures.add("main_wall", wall(checkout, "import main", function_env))
    (scratch / "function-state.db").unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-c", _FUNCTION_PROBE], env=function_env, cwd=checkout, capture_output=True, text=True
    )
    cold = time.perf_counter() - start
    answer = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else {}
    if answer.get("status") != 200:
        raise RuntimeError(f"the function's request failed on {checkout}: {answer or done.stderr[-2000:]}")
    figures.add("function_cold", cold)
    figures.add("function_request", float(answer["request"]))
    return line


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} {min(values):7.3f} {max(values):7.3f}"


def print_table(results: dict[str, Figures], baseline: str | None) -> None:
    names = list(results)
    header = f"{'seconds':32}" + "".join(f" {name[:23]:>23}" for name in names)
    if baseline is not None:
        header += f" {'ratio':>7}"
    print(header)
    print(f"{'':32}" + "".join(f" {'median     min     max':>23}" for _ in names))
    for label, key in FIGURES:
        row = f"{label:32}" + "".join(f" {_stats(results[name].samples[key]):>23}" for name in names)
        if baseline is not None:
            base = statistics.median(results[baseline].samples[key])
            now = statistics.median(results["this checkout"].samples[key])
            row += f" {base / now:7.2f}"
        print(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per figure (medians are printed)")
    parser.add_argument("--rows", type=int, default=200, help="rows of the DuckDB segment")
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help=f"commit to compare with (default {DEFAULT_BASELINE}; 'none')"
    )
    args = parser.parse_args()
    baseline = None if args.baseline == "none" else args.baseline
    keys = {
        "BATCH_REST_API_KEY": "bench-" + secrets.token_hex(12),
        "BATCH_PROJECT_KEY": "project_" + secrets.token_hex(8),
    }
    scratch = Path(tempfile.mkdtemp(prefix="cepsync-bench-start-"))
    try:
        write_customers(scratch / "segment.duckdb", generate_segment(args.rows))
        with simulator_process({**os.environ, **keys}, scratch / "simulator.log") as base_url:
            activation = scratch / "activation.yaml"
            activation.write_text(ACTIVATION_TEMPLATE.format(base_url=base_url), encoding="utf-8")
            # The function's own directory: one activation of that name (the run's file sits in scratch).
            (scratch / "function").mkdir()
            function_activation = activation.read_text(encoding="utf-8").replace(
                "database: segment.duckdb", f"database: {scratch / 'segment.duckdb'}"
            )
            (scratch / "function" / "vip_customers.yaml").write_text(function_activation, encoding="utf-8")
            with checkouts_to_measure(baseline, scratch) as checkouts:
                results = {name: Figures() for name in checkouts}
                lines: dict[str, str] = {}
                for repetition in range(args.repeat):
                    # Alternate which checkout goes first, so a burst of load falls on both.
                    order = list(checkouts.items())
                    if repetition % 2:
                        order.reverse()
                    for name, path in order:
                        lines[name] = measure_once(path, results[name], scratch, activation, keys)
                    print(f"repetition {repetition + 1}/{args.repeat} done", file=sys.stderr)
        print(f"\n{args.rows:,}-row DuckDB activation, SQLite state, local simulator; {args.repeat} repetitions")
        for name, line in lines.items():
            print(f"first line ({name}): {line[:100]}")
        print()
        print_table(results, baseline and f"baseline {baseline}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


@contextmanager
def checkouts_to_measure(baseline: str | None, scratch: Path) -> Iterator[dict[str, Path]]:
    """This checkout, and the baseline's worktree when one is asked for."""
    if baseline is None:
        yield {"this checkout": REPO_ROOT}
        return
    with checkout_of(baseline, scratch) as path:
        yield {"this checkout": REPO_ROOT, f"baseline {baseline}": path}


if __name__ == "__main__":
    sys.exit(main())
