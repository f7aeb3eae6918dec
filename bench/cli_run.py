"""One `cepsync run` command, measured from outside as a user's machine sees it.

    python bench/cli_run.py --_wrap PEAK.json -- run ACTIVATION.yml --state sqlite:///S --json

The parent (:func:`run_command`) starts the command and measures it end to end:

- **wall**: from starting the process to its exit (interpreter start-up, imports, the run,
  printing the record, and shutting down), measured in the parent;
- **CPU**: user + system time of the command's process, all its threads, and every child
  process it started and waited for (the mapping's worker processes), from ``wait4()`` on
  the command's process: Linux adds a reaped child's times to its parent's, so one
  ``rusage`` holds the whole tree;
- **peak RSS**: the command's own ``VmHWM`` (the high-water mark of its resident set, from
  ``/proc/self/status``), read by the command's process itself just before it exits (the
  ``--_wrap`` mode below); while it runs, the parent also samples ``VmHWM`` of the command
  and ``VmRSS`` of the command plus its worker processes every 50 ms (a fallback if the
  command dies before its exit hook, and the tree's peak, which the hook cannot see).

Why a wrapper and not ``ru_maxrss``: Linux carries a process's peak RSS across ``fork`` and
``exec``, so a command started by a bench that had generated a 1M-row segment would report
the bench's peak, not its own. And a sample taken from outside can miss the last growth
before exit; the exit hook cannot.

``--_wrap`` does exactly what the ``cepsync`` console script does (``sys.exit(app())`` with
``app`` from ``sync.cli``), after registering an ``atexit`` hook that writes ``VmHWM`` to
the given file. It imports only the standard library before that, so it runs the command of
any commit (``PYTHONPATH`` puts that checkout's ``sync`` first) and adds nothing measurable
to its start-up.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLE_SECONDS = 0.05
WRAP_FLAG = "--_wrap"


# --- inside the command's process -------------------------------------------------------------


def _status_kib(pid: int | str, key: str) -> int | None:
    """One ``kB`` figure (``VmHWM``, ``VmRSS``) of ``/proc/PID/status``; None when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _write_peak(path: str) -> None:
    """The ``atexit`` hook: this process's ``VmHWM`` in bytes, to ``path``."""
    hwm = _status_kib("self", "VmHWM")
    Path(path).write_text(json.dumps({"vm_hwm_bytes": None if hwm is None else hwm * 1024}), encoding="ascii")


def wrap_main(argv: list[str]) -> int:
    """``--_wrap PEAK -- ARGS...``: the ``cepsync`` console script with ``ARGS``, plus the exit hook."""
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit(f"usage: {Path(__file__).name} {WRAP_FLAG} PEAK.json -- CEPSYNC-ARGS...")
    atexit.register(_write_peak, argv[0])
    from sync.cli import app  # the console script's entry point (pyproject: cepsync = "sync.cli:app")

    sys.argv = ["cepsync", *argv[2:]]
    result: int = app()
    return result


# --- in the bench: start the command, measure it ----------------------------------------------


@dataclass
class CommandResult:
    """What one command cost, and what it printed."""

    exit_code: int
    wall_seconds: float
    user_seconds: float
    system_seconds: float
    peak_rss_bytes: int | None
    peak_rss_from: str
    tree_peak_rss_bytes: int | None
    max_processes: int
    stdout_path: Path
    stderr_path: Path
    record: dict[str, Any] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "wall_seconds": round(self.wall_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "user_seconds": round(self.user_seconds, 3),
            "system_seconds": round(self.system_seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_from": self.peak_rss_from,
            "tree_peak_rss_bytes": self.tree_peak_rss_bytes,
            "max_processes": self.max_processes,
            "stdout": str(self.stdout_path),
            "stderr": str(self.stderr_path),
            "error": self.error,
            **self.extra,
        }


def _children_of(pids: set[int]) -> set[int]:
    """Every live process whose parent is in ``pids`` (one scan of ``/proc``)."""
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid in pids:
            found.add(int(entry.name))
    return found


class _Sampler(threading.Thread):
    """Samples the command's ``VmHWM`` and its process tree's summed ``VmRSS`` while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"sample-{pid}", daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.hwm_kib: int | None = None
        self.tree_kib: int | None = None
        self.max_processes = 1

    def run(self) -> None:
        while not self.stop.is_set():
            hwm = _status_kib(self.pid, "VmHWM")
            if hwm is not None:
                self.hwm_kib = max(self.hwm_kib or 0, hwm)
            tree = {self.pid}
            frontier = {self.pid}
            while frontier:
                frontier = _children_of(frontier) - tree
                tree |= frontier
            rss = [_status_kib(pid, "VmRSS") for pid in tree]
            total = sum(value for value in rss if value is not None)
            if total:
                self.tree_kib = max(self.tree_kib or 0, total)
            self.max_processes = max(self.max_processes, len(tree))
            self.stop.wait(SAMPLE_SECONDS)


def run_command(
    args: list[str],
    *,
    tree: Path,
    env: dict[str, str],
    workdir: Path,
    label: str,
    timeout: float | None = None,
    cpus: list[int] | None = None,
) -> CommandResult:
    """Run ``cepsync ARGS`` on the code of ``tree`` and measure it end to end.

    ``tree`` is this checkout or a baseline's: ``PYTHONPATH`` puts its ``sync`` first, and
    the command runs with ``tree`` as its working directory. ``cpus`` pins the command (and
    the processes it starts) to those cores. A command still running after ``timeout``
    seconds is killed (SIGKILL to its process group) and reported with exit code -9.

    When the command printed a JSON object on stdout (``--json``), it is parsed into
    ``record`` (or ``error``, for the error object ``--json`` prints on failure).
    """
    stdout_path = workdir / f"{label}.stdout"
    stderr_path = workdir / f"{label}.stderr"
    peak_path = workdir / f"{label}.peak.json"
    peak_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), WRAP_FLAG, str(peak_path), "--", *args]
    child_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))}
    affinity = set(cpus) if cpus else None

    def pin() -> None:  # runs in the child between fork and exec
        if affinity:
            os.sched_setaffinity(0, affinity)

    timed_out = threading.Event()
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(  # noqa: S603 - our own wrapper, fixed arguments
            command,
            env=child_env,
            cwd=tree,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            # Only a system call between fork and exec, started before any thread of ours.
            preexec_fn=pin if affinity else None,
            start_new_session=True,
        )
        sampler = _Sampler(process.pid)
        sampler.start()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            # Wait for the exit without reaping, so the sampler never reads a reused pid,
            # then reap it with wait4 for the whole tree's CPU times.
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            if timer:
                timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
    peak, peak_from = _peak(peak_path, sampler.hwm_kib)
    result = CommandResult(
        exit_code=process.returncode,
        wall_seconds=wall,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        peak_rss_bytes=peak,
        peak_rss_from=peak_from,
        tree_peak_rss_bytes=None if sampler.tree_kib is None else sampler.tree_kib * 1024,
        max_processes=sampler.max_processes,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
    )
    if timed_out.is_set():
        result.error = f"killed after {timeout:.0f} s"
        return result
    _read_output(result)
    return result


def _peak(peak_path: Path, sampled_kib: int | None) -> tuple[int | None, str]:
    """The exit hook's ``VmHWM``, else the highest sampled one (the command died before its hook)."""
    try:
        hwm = json.loads(peak_path.read_text(encoding="ascii")).get("vm_hwm_bytes")
    except (OSError, ValueError):
        hwm = None
    if isinstance(hwm, int):
        return hwm, "exit"
    return (None, "none") if sampled_kib is None else (sampled_kib * 1024, "sampled")


def _read_output(result: CommandResult) -> None:
    """The JSON object ``--json`` printed: the run record, or ``{"error": ...}``."""
    text = result.stdout_path.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        said = " ".join(result.stderr_path.read_text(encoding="utf-8", errors="replace").split())[-300:]
        result.error = f"no output (exit code {result.exit_code}); stderr ends: {said!r}; see {result.stderr_path}"
        return
    try:
        printed = json.loads(text[text.index("{") :])
    except ValueError:
        result.error = f"output is not JSON (exit code {result.exit_code}); see {result.stdout_path}"
        return
    if isinstance(printed, dict) and "run_id" in printed:
        result.record = printed
    else:
        result.error = json.dumps(printed)[:500]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WRAP_FLAG:
        sys.exit(wrap_main(sys.argv[2:]))
    raise SystemExit(f"{Path(__file__).name} is run by the bench scripts: {WRAP_FLAG} PEAK.json -- CEPSYNC-ARGS...")
