"""The results tables in BigQuery: real runs (BigQuery segment on the local emulator, SQLite
state, the HTTP simulator) write them with load jobs across a full run, a delta, a guard abort
and a failed run; then the tables are queried. A results dataset that does not exist leaves the
sync committed and the failure in the record.
"""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery

from sync.config import Activation
from sync.config_file import parse_activation
from sync.dev.simulator import BatchSimulator
from sync.engine import Run, RunOptions
from sync.report.html import render_report
from sync.sources.bigquery import BigQuerySource
from sync.state.sqlite import SQLiteStateStore
from tests.results.test_results_report import shown_queries
from tests.support.bigquery_emulator import BigQueryEmulator
from tests.support.engine_support import API_KEY, PROJECT_KEY, SCHEMA, make_client, people, person

NAME = "bq_results"


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


@pytest.fixture
def emulated(bq_emulator: BigQueryEmulator, monkeypatch: pytest.MonkeyPatch) -> BigQueryEmulator:
    """The results writer finds the emulator as the CLI and the function would: by environment."""
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", bq_emulator.rest_url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", bq_emulator.project)
    return bq_emulator


def write_segment(client: bigquery.Client, dataset: bigquery.Dataset, rows: list[dict[str, Any]]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
    buffer.seek(0)
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET, write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE
    )
    client.load_table_from_file(buffer, dataset.table("people"), job_config=config).result()


def activation_for(dataset: bigquery.Dataset, base_url: str, *, results: str, **overrides: Any) -> Activation:
    config: dict[str, Any] = {
        "name": NAME,
        "source": {"type": "bigquery", "project": dataset.project, "table": f"{dataset.dataset_id}.people"},
        "destination": {
            "api_key_env": "BATCH_REST_API_KEY",
            "project_key_env": "BATCH_PROJECT_KEY",
            "base_url": base_url,
            "concurrency": 2,
            "max_attempts": 6,
        },
        "sync_mode": "mirror",
        "mapping": {"custom_id": "customer_id", "email": "email", "phone": "phone"},
        "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "points"}],
        "results": {"dataset": results},
        **overrides,
    }
    return parse_activation(config, source="test")


async def run(activation: Activation, client: bigquery.Client, state: Path) -> dict[str, Any]:
    store = SQLiteStateStore(state)
    source = BigQuerySource(activation.source, activation=NAME, client=client)  # type: ignore[arg-type]
    try:
        result = await Run(
            activation, source=source, store=store, client=make_client(activation), options=RunOptions()
        ).execute()
    finally:
        source.close()
        store.close()
    return result.record


def select(client: bigquery.Client, dataset: bigquery.Dataset, sql: str) -> list[dict[str, Any]]:
    config = bigquery.QueryJobConfig(default_dataset=dataset.reference)
    return [dict(row) for row in client.query(sql, job_config=config).result()]


def bad_rows() -> list[dict[str, Any]]:
    return [person(900, email="not-an-address: secret@"), person(901, phone="call me maybe")]


async def test_full_delta_guard_abort_and_failed_runs_load_their_rows(
    sim: tuple[BatchSimulator, str],
    emulated: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    simulator, url = sim
    state = tmp_path / "state.db"
    rows = people(40)
    write_segment(bq_client, bq_dataset, rows + bad_rows())
    simulator.faults.update({"reject_custom_ids": ["c00005"]})
    activation = activation_for(bq_dataset, url, results=bq_dataset.dataset_id)

    full = await run(activation, bq_client, state)
    assert full["status"] == "succeeded_with_rejections"
    assert "results_error" not in full
    results = full["results"]
    assert results["backend"] == "bigquery"
    assert results["runs_table"] == f"{bq_dataset.project}.{bq_dataset.dataset_id}.cepsync_runs"
    assert len(results["jobs"]) == 2  # one load job per table
    assert results["rejections_written"] == 3

    rows[2] = person(2, first_name="Changed")
    write_segment(bq_client, bq_dataset, rows + bad_rows())
    delta = await run(activation, bq_client, state)
    assert delta["counts"]["changed"] == 1

    write_segment(bq_client, bq_dataset, rows[:5])
    aborted = await run(activation, bq_client, state)
    assert aborted["status"] == "aborted_by_guard"
    assert len(aborted["results"]["jobs"]) == 1  # nothing rejected: no load job for the rejections

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    unreachable = activation_for(bq_dataset, f"http://127.0.0.1:{closed}", results=bq_dataset.dataset_id)
    write_segment(bq_client, bq_dataset, [*rows, person(40)])
    failed = await run(unreachable, bq_client, state)
    assert failed["status"] == "failed"
    assert "results" in failed

    table = bq_client.get_table(bq_dataset.table("cepsync_runs"))
    assert table.time_partitioning.field == "started_at"
    assert table.clustering_fields == ["activation", "status"]
    runs = select(
        bq_client,
        bq_dataset,
        "SELECT run_id, status, n_rows, n_new, n_changed, n_rejected, n_rejected_by_batch, guard_tripped, "
        "retryable, rejections_written FROM cepsync_runs ORDER BY started_at",
    )
    assert [r["run_id"] for r in runs] == [r["run_id"] for r in (full, delta, aborted, failed)]
    assert [r["status"] for r in runs] == [
        "succeeded_with_rejections",
        "succeeded_with_rejections",
        "aborted_by_guard",
        "failed",
    ]
    assert runs[0]["n_rows"] == 42
    assert runs[0]["n_new"] == 40
    assert runs[0]["n_rejected"] == 2
    assert runs[0]["n_rejected_by_batch"] == 1
    assert runs[1]["n_changed"] == 1
    assert runs[2]["guard_tripped"] is True
    assert runs[3]["retryable"] is True
    assert [r["rejections_written"] for r in runs] == [3, 3, 0, 1]

    rejections = select(
        bq_client,
        bq_dataset,
        "SELECT run_id, custom_id, reason, field, detail, batch_reason, value, from_batch FROM cepsync_rejections",
    )
    of_full = {(r["custom_id"], r["reason"]) for r in rejections if r["run_id"] == full["run_id"]}
    assert of_full == {("c00900", "invalid_email"), ("c00901", "invalid_phone"), ("c00005", "batch_rejected")}
    refused = next(r for r in rejections if r["run_id"] == full["run_id"] and r["from_batch"])
    assert refused["batch_reason"] == "simulated rejection"
    assert all(r["value"] is None for r in rejections)
    assert not any("secret" in (r["detail"] or "") for r in rejections)

    # The report's query for a run, read out of the HTML, lists that run's rows in BigQuery.
    store = SQLiteStateStore(state)
    try:
        page = render_report(NAME, store.list_runs(NAME, 10), state_kind="sqlite")
    finally:
        store.close()
    shown = shown_queries(page)
    assert set(shown) == {r["run_id"] for r in (full, delta, aborted, failed)}
    runs_sql, rejections_sql = [part.strip() for part in shown[full["run_id"]].split(";") if part.strip()]
    assert [row["run_id"] for row in bq_client.query(runs_sql).result()] == [full["run_id"]]
    assert {row["custom_id"] for row in bq_client.query(rejections_sql).result()} == {"c00900", "c00901", "c00005"}


async def test_a_missing_results_dataset_leaves_the_sync_committed(
    sim: tuple[BatchSimulator, str],
    emulated: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    simulator, url = sim
    write_segment(bq_client, bq_dataset, people(10))
    activation = activation_for(bq_dataset, url, results="no_such_dataset")
    record = await run(activation, bq_client, tmp_path / "state.db")
    assert record["status"] == "succeeded"
    assert "results" not in record
    error = record["results_error"]
    assert error.startswith("the results tables were not written: creating cepsync_runs: ")
    assert error.endswith(f"(create the dataset {bq_dataset.project}.no_such_dataset first: infra/results.tf)")
    assert len(simulator.profiles(PROJECT_KEY)) == 10
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        assert len(store.load_fingerprints(NAME)) == 10
        assert store.list_runs(NAME, 1)[0]["results_error"] == record["results_error"]
    finally:
        store.close()
