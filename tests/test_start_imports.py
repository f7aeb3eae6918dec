"""What `cepsync run` loads before it runs: nothing a DuckDB + SQLite run never needs.

Structure, not speed (bench/bench_start.py measures the time): the Google clients load only
for Google sources and stores, the report and charting code only with the commands that
draw them, the simulator and demo only with `cepsync simulator` and `cepsync demo`. A fresh
interpreter imports the CLI as the console script does, and builds the edges of a DuckDB
activation on SQLite state (what `cepsync run` does before the engine starts); its
``sys.modules`` is then checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb

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

# Loaded when a run opens its Batch session, not when the command starts.
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
    # The probe did build the run's edges: the DuckDB source and the SQLite store are loaded.
    assert "sync.sources.duckdb" in modules["edges_built"]
    assert "sync.state.sqlite" in modules["edges_built"]
