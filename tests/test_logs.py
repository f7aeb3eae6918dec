"""Logging (sync/logs.py): structlog loads with the first line written, and the lines do not change for it.

A line below the configured level loads nothing (a `cepsync run` with nothing to report never
imports structlog, nor the rich tracebacks it brings). A line that is written looks the same
whether structlog was loaded before :func:`configure_logging` (configured at once) or loads with
that line (configured then): each mode (the console line of the command line, the JSON line of
the Cloud Function) is run both ways in a fresh interpreter and compared.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from sync.logs import bind_context, clear_context, configure_logging, get_logger, scrubber
from sync.redact import MASK

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "logs-test-secret-9f8e7d6c5b4a"
# A timestamp of structlog's TimeStamper(fmt="iso", utc=True).
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"

# Writes a few lines of every kind, in a fresh interpreter. argv: json|console, early|late
# (early: structlog imported before configure_logging, as every process did before).
_LINES = """
import json, sys
if sys.argv[2] == "early":
    import structlog
from sync.logs import configure_logging, get_logger, scrubber
scrubber.add([sys.argv[3]])
configure_logging(json=sys.argv[1] == "json", level="warning")
log = get_logger("cepsync.test").bind(activation="vip", run_id="r-1")
log.info("below the level", n=0)
quiet = sorted(m for m in sys.modules if m == "structlog" or m.startswith(("structlog.", "rich")))
log.warning("batch_request_retry", status=503, problem="HTTP 503 " + sys.argv[3], nested={"k": [sys.argv[3]]})
log.error("run failed", error="a 'quoted' error", trace="projects/p/traces/t")
try:
    {}["missing"]
except KeyError:
    log.exception("run failed unexpectedly")
log.critical("critical line")
sys.stdout.write(json.dumps({"quiet": quiet, "loaded": "structlog" in sys.modules}))
"""


def _lines(mode: str, when: str) -> tuple[list[str], dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _LINES, mode, when, SECRET],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines(), json.loads(done.stdout)


def _without_times(lines: list[str]) -> list[str]:
    return [re.sub(STAMP, "<time>", line) for line in lines]


def test_a_line_below_the_level_loads_nothing_and_one_above_loads_structlog() -> None:
    lines, modules = _lines("console", "late")
    assert modules["quiet"] == []
    assert modules["loaded"] is True
    assert not any("below the level" in line for line in lines)


def test_the_console_lines_are_structlogs_plain_lines_whenever_it_loads() -> None:
    late, _ = _lines("console", "late")
    early, early_modules = _lines("console", "early")
    assert early_modules["quiet"] != []  # the early run did load structlog first
    assert _without_times(late) == _without_times(early)
    assert re.fullmatch(
        rf"{STAMP} \[warning  \] batch_request_retry            activation=vip nested={{'k': \['{re.escape(MASK)}'\]}} "
        rf"problem='HTTP 503 {re.escape(MASK)}' run_id=r-1 status=503",
        late[0],
    ), late[0]
    assert re.fullmatch(
        rf"{STAMP} \[error    \] run failed                     activation=vip error=\"a 'quoted' error\" "
        r"run_id=r-1 trace=projects/p/traces/t",
        late[1],
    ), late[1]
    assert re.fullmatch(rf"{STAMP} \[error    \] run failed unexpectedly        activation=vip run_id=r-1", late[2])
    assert late[3] == "Traceback (most recent call last):"
    assert late[-2] == "KeyError: 'missing'"
    assert re.fullmatch(rf"{STAMP} \[critical \] critical line                  activation=vip run_id=r-1", late[-1])
    assert not any(SECRET in line for line in late)


def test_the_json_lines_are_cloud_loggings_whenever_structlog_loads() -> None:
    late, _ = _lines("json", "late")
    early, _ = _lines("json", "early")
    assert _without_times(late) == _without_times(early)
    documents = [json.loads(line) for line in late]
    assert [(d["severity"], d["level"], d["message"]) for d in documents] == [
        ("WARNING", "warning", "batch_request_retry"),
        ("ERROR", "error", "run failed"),
        ("ERROR", "error", "run failed unexpectedly"),
        ("CRITICAL", "critical", "critical line"),
    ]
    first = documents[0]
    assert re.fullmatch(STAMP, first["timestamp"])
    assert first["logging.googleapis.com/labels"] == {"activation": "vip", "run_id": "r-1"}
    assert (first["status"], first["problem"], first["nested"]) == (503, f"HTTP 503 {MASK}", {"k": [MASK]})
    assert documents[1]["logging.googleapis.com/trace"] == "projects/p/traces/t"
    assert "trace" not in documents[1]
    assert documents[2]["exception"].startswith("Traceback (most recent call last):")
    assert documents[2]["exception"].endswith("KeyError: 'missing'")
    assert not any(SECRET in line for line in late)


_THREADS = """
import sys, threading
from sync.logs import configure_logging, get_logger
configure_logging(json=True, level="info")
start = threading.Barrier(8)

def first_line(n):
    start.wait()
    get_logger("cepsync.test").bind(activation=f"a{n}").info("first line", n=n)

threads = [threading.Thread(target=first_line, args=(n,)) for n in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def test_threads_writing_their_first_lines_together_all_write_configured_lines() -> None:
    # structlog loads with these lines: none of them may be written with its defaults.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    documents = [json.loads(line) for line in done.stderr.splitlines()]
    assert sorted(d["n"] for d in documents) == list(range(8))
    assert {d["severity"] for d in documents} == {"INFO"}


def test_context_fields_are_added_to_every_line_until_cleared() -> None:
    stream = io.StringIO()
    saved = structlog.get_config()
    scrubber.add([SECRET])
    configure_logging(json=True, level="info", stream=stream)
    try:
        log = get_logger("cepsync.test")
        bind_context(trigger="pubsub", activation="vip")
        log.info("with context", key=SECRET)
        clear_context()
        log.info("without context")
        log.debug("below the level")
    finally:
        clear_context()
        structlog.configure(**saved)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["trigger"], first["activation"], first["key"]) == ("pubsub", "vip", MASK)
    assert first["logging.googleapis.com/labels"] == {"activation": "vip"}
    assert "trigger" not in second
    assert second["message"] == "without context"


def test_a_bound_logger_keeps_its_fields_and_leaves_its_parent_alone() -> None:
    stream = io.StringIO()
    saved = structlog.get_config()
    configure_logging(json=True, level="info", stream=stream)
    try:
        parent = get_logger("cepsync.test").bind(activation="vip")
        child = parent.bind(run_id="r-2", activation="other")
        parent.info("parent")
        child.info("child")
    finally:
        structlog.configure(**saved)
    parent_line, child_line = (json.loads(line) for line in stream.getvalue().splitlines())
    assert parent_line["logging.googleapis.com/labels"] == {"activation": "vip"}
    assert child_line["logging.googleapis.com/labels"] == {"activation": "other", "run_id": "r-2"}


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(KeyError):
        configure_logging(level="loud")


def test_only_sync_logs_imports_structlog() -> None:
    # Any other module importing it would load it (and rich's tracebacks) with that module.
    importers = []
    for path in sorted((REPO_ROOT / "sync").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == "structlog" or name.startswith("structlog.") for name in names):
                importers.append(path.relative_to(REPO_ROOT).as_posix())
    assert sorted(set(importers)) == ["sync/logs.py"]
