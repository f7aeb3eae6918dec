"""Warehouse diff against function diff, on the local BigQuery emulator, in one run.

    .venv/bin/python bench/bench_warehouse.py                   # 100,000 profiles, 1 % changed
    .venv/bin/python bench/bench_warehouse.py --rows 5000

For each of a full load and a 1 %-changed delta, the same activation (mirror mode, a
BigQuery table segment) runs once with ``diff: function`` and once with ``diff: warehouse``,
each run in its own child process, against the same emulator and the same Batch simulator.
Printed per run: rows that left the warehouse, profiles sent, the seconds of the diff
statement (warehouse) or of reading the segment (function), wall time, peak RSS of the
function's process, and the bytes the queries reported. Both modes read through the
Storage Read API, as in production.

The local emulator (DuckDB behind BigQuery's APIs) is far slower than BigQuery and reports
0 bytes processed, so the figures compare the two modes' *shape* (what leaves the warehouse,
what the function holds), not BigQuery's speed or cost; docs/warehouse-diff.md does the cost
arithmetic. It needs `make bigquery-emulator`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
# The BigQuery emulator wrapper of the tests (tests.support.bigquery_emulator).
sys.path.insert(0, str(REPO_ROOT))

from bench_sync import simulator_process  # noqa: E402 - after the path set-up above

API_KEY_ENV = "BATCH_REST_API_KEY"
PROJECT_KEY_ENV = "BATCH_PROJECT_KEY"
NAME = "bench_warehouse"
DATASET = "bench"
SCHEMA = pa.schema([("customer_id", pa.string()), ("email", pa.string()), ("points", pa.int64())])


def segment(rows: int, changed_every: int = 0) -> pa.Table:
    return pa.table(
        {
            "customer_id": [f"c{i:08d}" for i in range(rows)],
            "email": [f"person{i}@example.com" for i in range(rows)],
            "points": [i + (1 if changed_every and i % changed_every == 0 else 0) for i in range(rows)],
        },
        schema=SCHEMA,
    )


def activation(project: str, base_url: str, mode: str) -> dict[str, Any]:
    return {
        "name": NAME,
        "source": {"type": "bigquery", "project": project, "table": f"{DATASET}.people"},
        "destination": {"api_key_env": API_KEY_ENV, "project_key_env": PROJECT_KEY_ENV, "base_url": base_url},
        "sync_mode": "mirror",
        "mapping": {"custom_id": "customer_id", "email": "email"},
        "attributes": [{"column": "points"}],
        "guards": {"max_changed_percent": 100},
        "journal": {"flush_every_profiles": 100_000, "flush_every_seconds": 30},
        "diff": {"mode": mode, "dataset": DATASET} if mode == "warehouse" else {"mode": "function"},
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine run, the way the CLI runs it, measured from inside its own process.

    The source and the warehouse state find the emulator through BIGQUERY_EMULATOR_HOST and
    BIGQUERY_STORAGE_EMULATOR_HOST, so both modes read through the Storage Read API.
    """
    from sync.config_file import parse_activation
    from sync.engine import Run, RunOptions
    from sync.logs import configure_logging
    from sync.runtime import build_client, open_differ, open_source_from_env
    from sync.state.sqlite import SQLiteStateStore

    configure_logging(level="warning")
    config = parse_activation(spec["activation"], source="bench")
    source = open_source_from_env(config, os.environ)
    store = SQLiteStateStore(spec["state_path"])
    started = time.perf_counter()
    differ = open_differ(config, store, source)
    try:
        run = Run(
            config,
            source=source,
            store=store,
            client=build_client(config),
            differ=differ,
            options=RunOptions(trigger="bench"),
        )
        record = asyncio.run(run.execute()).record
        stats = source.stats()
    finally:
        differ.close()
        source.close()
        store.close()
    wall = time.perf_counter() - started
    jobs = (record.get("warehouse") or {}).get("jobs", [])
    parts = ("moved rows", "new and bad rows", "full pass")
    rows_out = sum(job.get("rows_out", 0) for job in jobs if job.get("purpose") in parts) if jobs else stats.get("rows")
    return {
        "status": record["status"],
        "error": record.get("error"),
        "sent": record.get("counts", {}).get("sent", 0),
        "rows_out": rows_out,
        "bytes_processed": sum(job.get("bytes_processed") or 0 for job in jobs) or stats.get("bytes_processed"),
        # Seconds BigQuery spent on the diff statement (warehouse) or reading the segment (function).
        "diff_seconds": sum(job.get("seconds") or 0 for job in jobs if job.get("purpose") == "diff")
        if jobs
        else stats.get("read_seconds"),
        "wall_seconds": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def write_segment(client: Any, table: pa.Table) -> None:
    from google.cloud import bigquery

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    buffer.seek(0)
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET, write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE
    )
    client.load_table_from_file(buffer, f"{client.project}.{DATASET}.people", job_config=config).result()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--_child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        spec = json.loads(Path(args._child).read_text(encoding="utf-8"))
        Path(spec["result_path"]).write_text(json.dumps(child(spec)), encoding="utf-8")
        return 0
    from tests.support.bigquery_emulator import running_emulator

    workdir = Path(tempfile.mkdtemp(prefix="cepsync-bench-wh-"))
    env = {
        **os.environ,
        API_KEY_ENV: "bench-" + secrets.token_hex(8),
        PROJECT_KEY_ENV: "project_" + secrets.token_hex(8),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    results: list[tuple[str, str, dict[str, Any]]] = []
    with running_emulator(workdir / "emulator") as emulator, simulator_process(env, workdir / "sim.log") as base_url:
        client = emulator.client()
        client.create_dataset(DATASET, exists_ok=True)
        every = max(1, round(100 / args.changed_percent)) if args.changed_percent else 0
        for step, table in (("full", segment(args.rows)), ("delta", segment(args.rows, every))):
            write_segment(client, table)
            for mode in ("function", "warehouse"):
                spec = {
                    "activation": activation(client.project, base_url, mode),
                    "project": client.project,
                    "rest_url": emulator.rest_url,
                    "state_path": str(workdir / f"{mode}.db"),
                    "result_path": str(workdir / f"{step}-{mode}.json"),
                }
                spec_path = workdir / f"{step}-{mode}.spec.json"
                spec_path.write_text(json.dumps(spec), encoding="utf-8")
                print(f"{step} · diff: {mode}", file=sys.stderr, flush=True)
                # The warehouse state store finds the emulator the way the BigQuery source does.
                child_env = {
                    **env,
                    "BIGQUERY_EMULATOR_HOST": emulator.rest_url,
                    "BIGQUERY_STORAGE_EMULATOR_HOST": emulator.grpc_address,
                    "GOOGLE_CLOUD_PROJECT": client.project,
                }
                subprocess.run(  # noqa: S603 - this script, fixed arguments
                    [sys.executable, __file__, "--_child", str(spec_path)], env=child_env, check=True
                )
                results.append((step, mode, json.loads(Path(spec["result_path"]).read_text(encoding="utf-8"))))
        client.close()
    print(f"\n{args.rows:,} profiles, {args.changed_percent:g} % changed, local BigQuery emulator")
    header = (
        f"{'run':<7}{'diff':<11}{'status':>27}{'rows out':>10}{'sent':>8}{'query/read s':>13}{'wall s':>9}"
        f"{'RSS MB':>8}{'bytes':>9}"
    )
    print(header)
    print("-" * len(header))
    for step, mode, result in results:
        if result.get("error"):
            print(f"{step} {mode}: {result['error']}", file=sys.stderr)
        print(
            f"{step:<7}{mode:<11}{result['status']:>27}{result['rows_out'] or 0:>10,}{result['sent']:>8,}"
            f"{result['diff_seconds'] or 0:>13.1f}{result['wall_seconds']:>9.1f}{result['peak_rss_mb']:>8.0f}"
            f"{result['bytes_processed'] or 0:>9,}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
