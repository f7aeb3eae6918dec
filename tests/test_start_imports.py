"""What `cepsync run` loads before it runs: nothing a DuckDB + SQLite run never needs.

Structure, not speed (bench/bench_start.py measures the time): the Google clients load only
for Google sources and stores, the report and charting code only with the commands that
draw them, the simulator and demo only with `cepsync simulator` and `cepsync demo`. A fresh
interpreter imports the CLI as the console script does, and builds the edges of a DuckDB
activation on SQLite state (what `cepsync run` does before the engine starts); its
``sys.modules`` is then checked.

The run's first line (docs/how-a-run-works.md, "Start-up") is pinned the same way: the real
command runs in a fresh interpreter whose stderr notes ``sys.modules`` when that line is
written, so a heavy import creeping back in front of it fails here.

What a whole run loads is checked when the process exits: a run with nothing to send, nothing
to log and its record printed as JSON never loads aiohttp, structlog nor rich
(docs/how-a-run-works.md, "What loads only when it is used").
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from sync.cli import start_line
from sync.config_file import parse_activation
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.runs import RunOptions
from tests.support.engine_support import API_KEY, ENV, PROJECT_KEY, people, write_segment

REPO_ROOT = Path(__file__).resolve().parents[1]

# Never imported by a DuckDB + SQLite run (prefixes: a package and its submodules).
NEVER = (
    "google.cloud.bigquery",
    "google.cloud.firestore",
    "sync.report",
    "sync.dev",
    "sync.warehouse",
    "sync.sources.bigquery",
    "sync.state.firestore",
    "pygal",
    "jinja2",
)

# Not when the command starts: aiohttp loads with a run's first request to Batch, croniter with an
# activation that has a schedule.
NOT_AT_START = ("aiohttp", "croniter")

_PROBE = """
import json, os, sys
from pathlib import Path

import sync.cli  # what the console script imports
from sync.cli_common import _store
from sync.config_file import load_activation
from sync.runtime import build_client, open_differ, open_source_from_env

at_start = sorted(sys.modules)
directory = Path(sys.argv[1])
activation = load_activation(directory / "activation.yaml")
client = build_client(activation)
source = open_source_from_env(activation, os.environ)
store = _store(f"sqlite:///{directory / 'state.db'}")
differ = open_differ(activation, store, source)
differ.close(); source.close(); store.close()
print(json.dumps({"at_start": at_start, "edges_built": sorted(sys.modules)}))
"""

_ACTIVATION = """\
name: start_imports
source:
  type: duckdb
  database: segment.duckdb
  query: SELECT * FROM customers
destination:
  api_key_env: BATCH_REST_API_KEY
  project_key_env: BATCH_PROJECT_KEY
  base_url: http://127.0.0.1:9
mapping:
  custom_id: customer_id
  email: email
"""


def _loaded(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [name for name in names if any(name == p or name.startswith(p + ".") for p in prefixes)]


def test_a_duckdb_sqlite_run_imports_nothing_it_never_needs(tmp_path: Path) -> None:
    (tmp_path / "activation.yaml").write_text(_ACTIVATION, encoding="utf-8")
    with duckdb.connect(str(tmp_path / "segment.duckdb")) as connection:
        connection.execute("CREATE TABLE customers AS SELECT 'a' AS customer_id, 'a@example.com' AS email")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "BATCH_REST_API_KEY": "test-key-0123456789",
        "BATCH_PROJECT_KEY": "project_0123456789",
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert _loaded(modules["edges_built"], NEVER) == []
    assert _loaded(modules["at_start"], NOT_AT_START) == []
    # Building the Batch client loads no HTTP library: its first request will.
    assert _loaded(modules["edges_built"], ("aiohttp", "structlog")) == []
    # The probe did build the run's edges: the DuckDB source and the SQLite store are loaded.
    assert "sync.sources.duckdb" in modules["edges_built"]
    assert "sync.state.sqlite" in modules["edges_built"]


# Not loaded yet when `cepsync run` writes its first line: the engine and the edges, the
# columnar and network libraries, logging and the terminal library.
NOT_BEFORE_FIRST_LINE = (
    *NEVER,
    *NOT_AT_START,
    "sync.engine",
    "sync.runtime",
    "sync.cli_run",
    "sync.sources",
    "sync.state.sqlite",
    "sync.state.base",
    "sync.diff",
    "sync.mapping",
    "sync.convert",
    "pyarrow",
    "duckdb",
    "structlog",
    "rich",
    "asyncio",
    "email_validator",
)

# The console script, with stderr tapped: the modules loaded when the first line is written.
_TAPPED_RUN = """
import json, sys

class Tap:
    def __init__(self, inner, out):
        self.inner, self.out, self.noted = inner, out, False

    def write(self, text):
        if not self.noted:
            self.noted = True
            with open(self.out, "w", encoding="utf-8") as note:
                json.dump({"line": text, "modules": sorted(sys.modules)}, note)
        return self.inner.write(text)

    def __getattr__(self, name):
        return getattr(self.inner, name)

sys.stderr = Tap(sys.stderr, sys.argv.pop(1))
from sync.cli import app
sys.exit(app())
"""


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY})) as running:
        yield running


def _people_activation(tmp_path: Path, base_url: str) -> Path:
    write_segment(tmp_path / "segment.duckdb", people(20))
    path = tmp_path / "people.yaml"
    path.write_text(
        _ACTIVATION.replace("start_imports", "first_line")
        .replace("SELECT * FROM customers", "SELECT * FROM people")
        .replace("http://127.0.0.1:9", base_url),
        encoding="utf-8",
    )
    return path


def _command(tmp_path: Path, *args: str, tap: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    program = [sys.executable, "-c", _TAPPED_RUN, str(tap)] if tap else [sys.executable, "-m", "sync.cli"]
    return subprocess.run(
        [*program, *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120
    )


def test_the_first_line_comes_before_the_engine_and_says_what_runs(tmp_path: Path, simulator: SimulatorThread) -> None:
    activation = _people_activation(tmp_path, simulator.base_url)
    state = tmp_path / "state.db"
    tap = tmp_path / "tap.json"
    done = _command(tmp_path, "run", str(activation), "--state", f"sqlite:///{state}", tap=tap)
    assert done.returncode == 0, done.stderr
    noted = json.loads(tap.read_text(encoding="utf-8"))
    line = noted["line"]
    # The first thing written on stderr is the start line, whole, before anything ran.
    assert line.startswith("run starting: activation first_line, run id ")
    assert f"source duckdb {tmp_path / 'segment.duckdb'} (query)" in line
    assert f"to {simulator.base_url} (upsert, full_then_delta)" in line
    assert line.endswith(f", state {state}\n")
    assert _loaded(noted["modules"], NOT_BEFORE_FIRST_LINE) == []
    assert "sync.config" in noted["modules"]  # the activation was read and checked first
    # The run it announced is the run that happened: same id in the record, 20 profiles sent.
    run_id = line.split("run id ", 1)[1].split(",", 1)[0]
    assert f"first_line · run {run_id} · succeeded" in done.stdout
    assert simulator.simulator.stats()["profiles_received"] == 20


# The console script, noting ``sys.modules`` when the process exits.
_NOTED_RUN = """
import atexit, json, sys

out = sys.argv.pop(1)

def note():
    with open(out, "w", encoding="utf-8") as file:
        json.dump(sorted(sys.modules), file)

atexit.register(note)
from sync.cli import app
sys.exit(app())
"""

# Loaded only by a run that sends something (aiohttp), maps an address (email_validator),
# writes a log line (structlog, which brings rich's tracebacks) or writes for a person (rich:
# bars, tables; never with --json).
ONLY_WHEN_USED = ("aiohttp", "email_validator", "structlog", "rich")


def _noted_run(tmp_path: Path, note: Path, *args: str) -> tuple[dict[str, Any], list[str]]:
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _NOTED_RUN, str(note), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --json: nothing on stderr, no log line either
    record: dict[str, Any] = json.loads(done.stdout)
    return record, json.loads(note.read_text(encoding="utf-8"))


def test_a_run_with_nothing_to_send_never_loads_the_http_client_nor_structlog(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    activation = _people_activation(tmp_path, simulator.base_url)
    arguments = ("run", str(activation), "--state", f"sqlite:///{tmp_path / 'state.db'}", "--json")
    # The first run sends every profile: its requests load aiohttp.
    first, first_modules = _noted_run(tmp_path, tmp_path / "first.json", *arguments)
    assert first["counts"]["acknowledged"] == 20
    assert "aiohttp" in first_modules
    # Nothing changed: the run opens and closes its Batch client without a request, writes
    # no log line, and prints its record as JSON.
    again, again_modules = _noted_run(tmp_path, tmp_path / "again.json", *arguments)
    assert again["status"] == "succeeded"
    assert (again["counts"]["sent"], again["counts"]["unchanged"]) == (0, 20)
    assert _loaded(again_modules, ONLY_WHEN_USED) == []
    assert "sync.engine" in again_modules  # it did run
    assert simulator.simulator.stats()["profiles_received"] == 20


def test_a_run_with_json_writes_one_document_and_no_first_line(tmp_path: Path, simulator: SimulatorThread) -> None:
    activation = _people_activation(tmp_path, simulator.base_url)
    done = _command(tmp_path, "run", str(activation), "--state", f"sqlite:///{tmp_path / 'state.db'}", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["acknowledged"] == 20
    assert done.stderr == ""


def _at_a_terminal(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """The command with stderr on a pseudo-terminal (stdout a pipe): its result and what the terminal got."""
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR", "TERM"):
        env.pop(name, None)
    leader, follower = pty.openpty()
    received = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the command's end of the terminal is closed
            while chunk := os.read(leader, 65536):
                received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sync.cli", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        os.close(follower)
        reader.join(timeout=30)
        os.close(leader)
    return done, received.decode(errors="replace")


def test_a_run_with_json_at_a_terminal_draws_no_bars(tmp_path: Path, simulator: SimulatorThread) -> None:
    activation = _people_activation(tmp_path, simulator.base_url)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    done, terminal = _at_a_terminal(tmp_path, "run", str(activation), "--state", state, "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["counts"]["acknowledged"] == 20
    assert terminal == ""
    # Without --json, the same terminal gets the start line and the bars.
    done, terminal = _at_a_terminal(tmp_path, "run", str(activation), "--state", state, "--full")
    assert done.returncode == 0
    assert terminal.startswith("run starting: activation first_line")
    assert "reading segment" in terminal
    assert "sending to /profiles/update" in terminal


def test_a_bad_argument_fails_before_the_first_line(tmp_path: Path) -> None:
    activation = _people_activation(tmp_path, "http://127.0.0.1:9")
    done = _command(tmp_path, "run", str(activation), "--state", "sqlite:///state.db?mode=ro")
    assert done.returncode == 2
    assert "run starting" not in done.stderr
    assert "query parameters" in done.stderr
    done = _command(tmp_path, "run", str(activation), "--allow", "nope")
    assert done.returncode == 2
    assert "run starting" not in done.stderr
    assert "unknown guard(s) 'nope'" in done.stderr
    # The Batch keys are read before the line too: a run that cannot send does not announce itself.
    (tmp_path / "keyless.yaml").write_text(
        activation.read_text(encoding="utf-8").replace("BATCH_PROJECT_KEY", "CEPSYNC_TEST_UNSET_PROJECT_KEY"),
        encoding="utf-8",
    )
    done = _command(tmp_path, "run", str(tmp_path / "keyless.yaml"), "--state", "sqlite:///state.db")
    assert done.returncode == 2
    assert "run starting" not in done.stderr
    assert "CEPSYNC_TEST_UNSET_PROJECT_KEY not set" in done.stderr
    assert not (tmp_path / "state.db").exists()


def test_the_first_line_escapes_what_the_file_and_the_environment_gave() -> None:
    activation = parse_activation(
        {
            "name": "escaped",
            "source": {"type": "duckdb", "database": "/data/seg\x1b[2J\n.duckdb", "table": "people"},
            "destination": {"api_key_env": "K", "project_key_env": "P", "base_url": "https://api.batch.com"},
            "mapping": {"custom_id": "customer_id"},
        },
        source="escaped.yaml",
    )
    line = start_line(activation, RunOptions(run_id="20260101T000000Z-abcdef", full=True), "/state/\x07.db")
    assert "\x1b" not in line
    assert "\n" not in line
    assert "\x07" not in line
    assert "source duckdb /data/seg\\x1b[2J\\n.duckdb (table people)" in line
    assert "(upsert, full_then_delta, --full)" in line
    assert line.endswith("state /state/\\x07.db")
