"""``diff: warehouse`` end to end: the local BigQuery emulator (real google-cloud-bigquery
client), SQLite for the lease/meta/intents/runs, and the Batch simulator.

full → delta → no change → mirror removal → crash between journal append and merge →
convergence → crash between merge and journal clean-up → convergence, then the fence.

A "crash" at a boundary is BigQuery refusing the statement that starts the next step (an
HTTP 403 injected by a real proxy in front of the emulator): the run stops there exactly as
a killed process would, with the journal appended and not merged (or merged and not cleaned).
The emulator reports 0 bytes processed and no slot-ms for every job, so cost figures are
checked for presence and job ids here, and their values only on real BigQuery.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from google.cloud import bigquery
from typer.testing import CliRunner

from sync.cli import app
from sync.config import Activation
from sync.config_file import parse_activation
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.engine import Run, RunOptions
from sync.errors import LeaseLost
from sync.sources.bigquery import BigQuerySource
from sync.state.sqlite import SQLiteStateStore
from sync.warehouse import sql
from sync.warehouse.bq import Warehouse
from sync.warehouse.diff import WarehouseDiffer
from sync.warehouse.store import WarehouseFingerprints
from tests.support.bigquery_emulator import BigQueryEmulator, RecordingProxy
from tests.support.engine_support import API_KEY, ENV, PROJECT_KEY, SCHEMA, make_client, people, person

NAME = "wh_people"


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def write_segment(client: bigquery.Client, dataset: bigquery.Dataset, rows: list[dict[str, Any]]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
    buffer.seek(0)
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
    )
    client.load_table_from_file(buffer, dataset.table("people"), job_config=config).result()


def activation_for(dataset: bigquery.Dataset, base_url: str, *, name: str = NAME, **settings: Any) -> Activation:
    """The tests' mirror activation with a warehouse diff; ``settings`` add or replace top-level keys."""
    return parse_activation(
        {
            "name": name,
            "source": {"type": "bigquery", "project": dataset.project, "table": f"{dataset.dataset_id}.people"},
            "destination": {
                "api_key_env": "BATCH_REST_API_KEY",
                "project_key_env": "BATCH_PROJECT_KEY",
                "base_url": base_url,
                "concurrency": 2,
                "max_attempts": 2,
            },
            "sync_mode": "mirror",
            "mapping": {"custom_id": "customer_id", "email": "email"},
            "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "points"}],
            "guards": {"max_removed_percent": 50, "max_changed_percent": 100},
            "journal": {"flush_every_profiles": 100_000, "flush_every_seconds": 30},
            "diff": {"mode": "warehouse", "dataset": dataset.dataset_id, "maximum_bytes_billed": 10_000_000_000},
            **settings,
        },
        source="test",
    )


def open_store(
    client: bigquery.Client, dataset: bigquery.Dataset, state: Path, *, name: str = NAME
) -> WarehouseFingerprints:
    warehouse = Warehouse(client, activation=name, maximum_bytes_billed=10_000_000_000)
    return WarehouseFingerprints(SQLiteStateStore(state), warehouse, dataset.reference)


async def run(
    activation: Activation, client: bigquery.Client, dataset: bigquery.Dataset, state: Path, *, full: bool = False
) -> tuple[dict[str, Any], WarehouseFingerprints]:
    store = open_store(client, dataset, state)
    source = BigQuerySource(activation.source, activation=NAME, client=client)  # type: ignore[arg-type]
    try:
        result = await Run(
            activation,
            source=source,
            store=store.base,
            differ=WarehouseDiffer(activation, store),
            client=make_client(activation),
            options=RunOptions(lease_ttl_seconds=60, full=full),
        ).execute()
    finally:
        source.close()
        store.base.close()
    return result.record, store


def table_rows(client: bigquery.Client, dataset: bigquery.Dataset, table: str) -> dict[str, tuple[int, int]]:
    rows = client.query(f"SELECT custom_id, raw, payload FROM `{dataset.project}.{dataset.dataset_id}.{table}`")
    return {row[0]: (row[1], row[2]) for row in rows.result()}


def rows_out(record: dict[str, Any]) -> int:
    """Segment rows that left the warehouse (the diff's parts and a full pass)."""
    parts = ("moved rows", "new and bad rows", "full pass")
    return sum(job["rows_out"] for job in record["warehouse"]["jobs"] if job["purpose"] in parts)


def held(simulator: BatchSimulator) -> dict[str, dict[str, Any]]:
    return {
        cid: attrs
        for cid, attrs in simulator.profiles(PROJECT_KEY).items()
        if any(v is not None for v in attrs.values())
    }


@pytest.mark.emulator
async def test_full_delta_mirror_crashes_and_convergence(
    sim: tuple[BatchSimulator, str],
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    bq_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    simulator, url = sim
    activation = activation_for(bq_dataset, url)
    state = tmp_path / "state.sqlite"
    segment = people(30)
    write_segment(bq_client, bq_dataset, segment)

    # 1. Full: every row leaves once, every profile is acknowledged and merged.
    record, _ = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert record["counts"]["acknowledged"] == 30
    assert rows_out(record) == 30
    assert len(held(simulator)) == 30
    assert len(table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)) == 30
    assert table_rows(bq_client, bq_dataset, sql.JOURNAL) == {}
    cost = record["warehouse"]
    purposes = [job["purpose"] for job in cost["jobs"]]
    assert {"id scan", "diff", "journal append", "merge", "drop merged journal"} <= set(purposes)
    assert all(job["job_id"] for job in cost["jobs"])
    assert {"bytes_processed", "bytes_billed", "slot_ms"} <= set(cost)

    # 2. Delta: two changed, one new; only those three rows leave the warehouse.
    segment[3] = person(3, first_name="Changed")
    segment[7] = person(7, points=7_000)
    segment.append(person(30))
    write_segment(bq_client, bq_dataset, segment)
    record, _ = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert record["counts"]["acknowledged"] == 3
    assert rows_out(record) == 3
    assert held(simulator)["c00003"]["firstname"] == "Changed"

    # 3. No change: nothing leaves, nothing is sent.
    record, _ = await run(activation, bq_client, bq_dataset, state)
    assert record["counts"]["sent"] == 0
    assert rows_out(record) == 0

    # 4. Mirror removal: two ids left the segment; they are cleared and forgotten.
    segment = [row for row in segment if row["customer_id"] not in ("c00010", "c00011")]
    write_segment(bq_client, bq_dataset, segment)
    record, _ = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert record["counts"]["removed"] == 2
    assert "c00010" not in held(simulator)
    assert "c00011" not in held(simulator)
    stored = table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)
    assert len(stored) == 29
    assert "c00010" not in stored

    # 5. Crash between the journal append and the merge: BigQuery refuses the end-of-run
    # MERGE (the recovery MERGE at the start of the run is let through).
    proxy_client = bq_proxy.client(bq_dataset.project)
    segment[0] = person(0, first_name="AfterCrash")
    write_segment(bq_client, bq_dataset, segment)
    bq_proxy.inject(
        "POST", "/jobs", status=403, reason="accessDenied", message="crash", times=1, body_contains="MERGE ", skip=1
    )
    record, _ = await run(activation, proxy_client, bq_dataset, state)
    assert record["status"] == "failed"
    assert record["counts"]["acknowledged"] == 1
    assert set(table_rows(bq_client, bq_dataset, sql.JOURNAL)) == {"c00000"}
    before = table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)["c00000"]
    journal = table_rows(bq_client, bq_dataset, sql.JOURNAL)["c00000"]
    assert before != journal

    # 6. Convergence: the next run merges the crashed run's journal first; nothing is re-sent.
    record, _ = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert record["counts"]["sent"] == 0
    assert rows_out(record) == 0
    assert table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)["c00000"] == journal
    assert table_rows(bq_client, bq_dataset, sql.JOURNAL) == {}

    # 7. Crash during the merge step, between the MERGE and the journal clean-up.
    segment[1] = person(1, first_name="MidMerge")
    write_segment(bq_client, bq_dataset, segment)
    bq_proxy.inject(
        "POST",
        "/jobs",
        status=403,
        reason="accessDenied",
        message="crash",
        times=1,
        body_contains="DELETE FROM",
        skip=1,
    )
    record, _ = await run(activation, proxy_client, bq_dataset, state)
    assert record["status"] == "failed"
    merged = table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)["c00001"]
    assert table_rows(bq_client, bq_dataset, sql.JOURNAL) == {"c00001": merged}
    record, _ = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert record["counts"]["sent"] == 0
    assert table_rows(bq_client, bq_dataset, sql.JOURNAL) == {}
    assert table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)["c00001"] == merged
    assert held(simulator)["c00001"]["firstname"] == "MidMerge"
    proxy_client.close()  # type: ignore[no-untyped-call]


@pytest.mark.emulator
async def test_a_change_batch_applied_without_an_acknowledgement_is_sent_again_from_bigquery(
    sim: tuple[BatchSimulator, str],
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # The warehouse diff reads the stored fingerprints of the ids an earlier run left noted
    # as zero in its SQL (@cepsync_unconfirmed), like the function diff does in Arrow.
    simulator, url = sim
    activation = activation_for(bq_dataset, url)
    state = tmp_path / "state.sqlite"
    write_segment(bq_client, bq_dataset, people(10))
    first, _ = await run(activation, bq_client, bq_dataset, state)
    assert first["status"] == "succeeded", first.get("error")

    segment = people(10)
    segment[4] = person(4, points=444)
    write_segment(bq_client, bq_dataset, segment)
    simulator.faults.update({"drop_after_apply": 10})  # applied by Batch, the answers lost
    lost, _ = await run(activation, bq_client, bq_dataset, state)
    assert lost["counts"]["acknowledged"] == 0
    assert held(simulator)["c00004"]["points"] == 444
    simulator.faults.clear()

    write_segment(bq_client, bq_dataset, people(10))  # back to what Batch acknowledged
    recovered, _ = await run(activation, bq_client, bq_dataset, state)
    assert recovered["status"] == "succeeded", recovered.get("error")
    assert recovered["counts"]["unconfirmed"] == 1
    assert held(simulator)["c00004"]["points"] == 4
    assert rows_out(recovered) == 1  # only the unconfirmed row left the warehouse


@pytest.mark.emulator
async def test_a_stale_lease_can_neither_append_nor_merge(
    bq_client: bigquery.Client, bq_dataset: bigquery.Dataset, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from sync.model import Fingerprint, JournalEntry

    store = open_store(bq_client, bq_dataset, tmp_path / "state.sqlite")
    now = datetime.now(UTC)
    try:
        stale = store.base.acquire_lease(NAME, "old", 60, now)
        store.register(stale)
        store.commit(stale, [JournalEntry("a", Fingerprint(1, 2))], now)
        store.base.release_lease(stale)
        current = store.base.acquire_lease(NAME, "new", 60, now)
        store.register(current)
        store.commit(current, [JournalEntry("a", Fingerprint(3, 4)), JournalEntry("b", Fingerprint(5, 6))], now)
        # The base store refuses the stale token before BigQuery is asked anything...
        with pytest.raises(LeaseLost):
            store.commit(stale, [JournalEntry("c", Fingerprint(7, 8))], now)
        # ...and the MERGE itself is fenced in SQL: sent with the stale token, it changes nothing.
        store.warehouse.query(
            "stale merge",
            sql.merge_sql(store.fingerprints_sql, sql.table_sql(store.journal), sql.table_sql(store.fence)),
            [
                bigquery.ScalarQueryParameter("cepsync_activation", "STRING", NAME),
                bigquery.ScalarQueryParameter("cepsync_token", "INT64", stale.token),
            ],
        )
        assert table_rows(bq_client, bq_dataset, sql.FINGERPRINTS) == {}
        store.compact(current, now)
        assert table_rows(bq_client, bq_dataset, sql.FINGERPRINTS) == {"a": (3, 4), "b": (5, 6)}
        assert store.load_fingerprints(NAME) == {"a": Fingerprint(3, 4), "b": Fingerprint(5, 6)}
    finally:
        store.base.close()


@pytest.mark.emulator
async def test_switching_modes_carries_the_state_over_and_resends_nothing(
    sim: tuple[BatchSimulator, str],
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    simulator, url = sim
    warehouse_activation = activation_for(bq_dataset, url)
    config = warehouse_activation.model_dump(mode="json", exclude={"diff"})
    function_activation = parse_activation(config, source="test")
    state = tmp_path / "state.sqlite"
    write_segment(bq_client, bq_dataset, people(12))

    # diff: function, with the same BigQuery segment: a full load into SQLite.
    source = BigQuerySource(function_activation.source, activation=NAME, client=bq_client)  # type: ignore[arg-type]
    store = SQLiteStateStore(state)
    try:
        result = await Run(
            function_activation, source=source, store=store, client=make_client(function_activation)
        ).execute()
    finally:
        source.close()
        store.close()
    assert result.record["counts"]["acknowledged"] == 12

    # The documented step, through the real CLI, with the YAML that names the dataset.
    path = tmp_path / "wh.yaml"
    path.write_text(yaml.safe_dump(warehouse_activation.model_dump(mode="json")), encoding="utf-8")
    env = {
        "BIGQUERY_EMULATOR_HOST": bq_emulator.rest_url,
        "GOOGLE_CLOUD_PROJECT": bq_dataset.project,
        "COLUMNS": "200",
    }
    outcome = CliRunner().invoke(
        app, ["switch-diff", str(path), "--to", "warehouse", "--state", f"sqlite:///{state}"], env=env
    )
    assert outcome.exit_code == 0, outcome.output
    assert "12 fingerprints" in outcome.output
    assert len(table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)) == 12
    emptied = SQLiteStateStore(state)
    try:
        assert emptied.load_fingerprints(NAME) == {}
    finally:
        emptied.close()

    # diff: warehouse now: every row is mapped once (the raw hash recipe differs), nothing is sent.
    record, _ = await run(warehouse_activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert record["counts"]["sent"] == 0
    assert rows_out(record) == 12
    record, _ = await run(warehouse_activation, bq_client, bq_dataset, state)
    assert rows_out(record) == 0

    # And back: the function diff finds every fingerprint and sends nothing.
    outcome = CliRunner().invoke(
        app, ["switch-diff", str(path), "--to", "function", "--state", f"sqlite:///{state}"], env=env
    )
    assert outcome.exit_code == 0, outcome.output
    assert table_rows(bq_client, bq_dataset, sql.FINGERPRINTS) == {}
    source = BigQuerySource(function_activation.source, activation=NAME, client=bq_client)  # type: ignore[arg-type]
    store = SQLiteStateStore(state)
    try:
        result = await Run(
            function_activation, source=source, store=store, client=make_client(function_activation)
        ).execute()
    finally:
        source.close()
        store.close()
    assert result.record["status"] == "succeeded"
    assert result.record["counts"]["sent"] == 0
    assert len(held(simulator)) == 12


@pytest.mark.emulator
async def test_every_statement_is_the_pinned_sql_with_parameters_and_a_bytes_cap(
    sim: tuple[BatchSimulator, str],
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    bq_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    _, url = sim
    activation = activation_for(bq_dataset, url)
    write_segment(bq_client, bq_dataset, people(5))
    proxy_client = bq_proxy.client(bq_dataset.project)
    record, store = await run(activation, proxy_client, bq_dataset, tmp_path / "state.sqlite")
    assert record["status"] == "succeeded", record.get("error")
    # A full pass (--full) reads every row back, ordered by Custom ID for its checkpoint.
    full, _ = await run(activation, proxy_client, bq_dataset, tmp_path / "state.sqlite", full=True)
    proxy_client.close()  # type: ignore[no-untyped-call]
    assert full["counts"]["acknowledged"] == 5
    assert rows_out(full) == 5
    record["warehouse"]["jobs"] += full["warehouse"]["jobs"]
    queries = [
        request.json()["configuration"]["query"]
        for request in bq_proxy.requests
        if request.method == "POST"
        and request.path.split("?")[0].endswith("/bigquery/v2/projects/cepsync-test/jobs")
        and "query" in request.json()["configuration"]
    ]
    assert len(queries) == len([job for job in record["warehouse"]["jobs"] if job["purpose"] != "journal append"])
    for query in queries:
        assert query["maximumBytesBilled"] == "10000000000"
        assert query["useLegacySql"] is False
        assert NAME not in query["query"]  # the activation is a parameter, never spliced in
    texts = {query["query"] for query in queries}
    fingerprints, journal, fence = (sql.table_sql(t) for t in (store.fingerprints, store.journal, store.fence))
    segment = sql.table_sql(bq_dataset.table("people"))
    columns = ["customer_id", "email", "first_name", "points"]
    assert sql.merge_sql(fingerprints, journal, fence) in texts
    assert sql.drop_merged_sql(journal, fence) in texts
    assert sql.diff_sql(segment, columns, "`customer_id`", fingerprints) in texts
    assert sql.full_sql(segment, columns, "`customer_id`", fingerprints, ordered=True) in texts
    assert sql.register_fence_sql(fence) in texts


def query_texts(proxy: RecordingProxy, since: int = 0) -> list[str]:
    """The text of every query job sent through ``proxy`` from its ``since``-th request on."""
    return [
        request.json()["configuration"]["query"]["query"]
        for request in proxy.requests[since:]
        if request.method == "POST"
        and request.path.split("?")[0].endswith("/jobs")
        and "query" in request.json()["configuration"]
    ]


@pytest.mark.emulator
async def test_a_delta_is_one_scan_of_the_segment_and_a_full_pass_two(
    sim: tuple[BatchSimulator, str],
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    bq_proxy: RecordingProxy,
    tmp_path: Path,
) -> None:
    # Issue 20, item 1: on BigQuery, one read means one billed scan. BigQuery bills a
    # query for the columns of each table it references, so a run's scans of the segment
    # are its queries that name the segment. The emulator bills nothing; the ledger and the
    # statements that reached BigQuery say which jobs touched the segment.
    simulator, url = sim
    activation = activation_for(bq_dataset, url)
    state = tmp_path / "state.sqlite"
    proxy_client = bq_proxy.client(bq_dataset.project)
    segment_sql = sql.table_sql(bq_dataset.table("people"))
    rows = people(20)
    write_segment(bq_client, bq_dataset, rows)
    # c00003 moved, c00018 and c00019 left, c00020 is new, c00005 comes twice.
    changed = [person(i, first_name="Moved") if i == 3 else person(i) for i in range(18)] + [person(20), person(5)]
    steps = [("first sync", rows, False), ("delta", changed, False), ("no change", changed, False)]
    steps.append(("full pass", changed, True))
    scans: dict[str, int] = {}
    records: dict[str, dict[str, Any]] = {}
    try:
        for name, segment, full in steps:
            write_segment(bq_client, bq_dataset, segment)
            before = len(bq_proxy.requests)
            record, _ = await run(activation, proxy_client, bq_dataset, state, full=full)
            assert record["status"] in ("succeeded", "succeeded_with_rejections"), (name, record.get("error"))
            touching = [text for text in query_texts(bq_proxy, before) if segment_sql in text]
            assert all(text.count(segment_sql) == 1 for text in touching)  # named once in each
            scanning = [job for job in record["warehouse"]["jobs"] if job["purpose"] in ("diff", "full pass")]
            assert len(scanning) == len(touching), name  # the ledger names the same jobs
            assert all(job["job_id"] and "bytes_billed" in job for job in scanning)
            scans[name], records[name] = len(touching), record
    finally:
        proxy_client.close()  # type: ignore[no-untyped-call]
    assert scans == {"first sync": 1, "delta": 1, "no change": 1, "full pass": 2}

    # And the one scan said everything the three reads used to.
    delta = records["delta"]
    assert delta["counts"]["rows"] == 20
    assert delta["counts"]["removed"] == 2  # c00018, c00019 left (mirror)
    assert delta["counts"]["duplicates"] == 2  # both copies of c00005, rejected with a reason
    assert delta["rejected_by_reason"] == {"duplicate_custom_id": 2}
    assert (delta["counts"]["changed"], delta["counts"]["new"]) == (1, 1)  # c00003, c00020
    assert rows_out(delta) == 4  # c00003 (moved), c00020 (new), c00005 twice (bad): nothing else left BigQuery
    assert held(simulator)["c00003"]["firstname"] == "Moved"
    assert "c00018" not in held(simulator)
    assert records["no change"]["counts"]["sent"] == 0
    assert rows_out(records["no change"]) == 2  # the duplicated id's two rows, rejected again
    assert records["full pass"]["counts"]["acknowledged"] == 18  # every valid id: 19 less the duplicated c00005


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"diff": {"mode": "warehouse"}}, "needs 'dataset'"),
        ({"diff": {"mode": "warehouse", "dataset": "bad.name.x"}}, "has 2 dots: give dataset or project.dataset"),
        # Issue 19, item 14: the rule in words, not the pattern.
        (
            {"diff": {"mode": "warehouse", "dataset": "proj.cepsync_state"}},
            "the project id 'proj' has 4 characters; a Google Cloud project id has 6 to 30 characters",
        ),
        (
            {"diff": {"mode": "warehouse", "dataset": "my-project.state-1"}},
            "the dataset name has a character other than a letter, a digit or an underscore",
        ),
        ({"diff": {"mode": "function", "dataset": "state"}}, "only apply to mode 'warehouse'"),
        ({"journal": {"flush_every_profiles": 2_000, "flush_every_seconds": 30}}, "load job"),
        ({"source": {"type": "duckdb", "database": "x.duckdb", "table": "people"}}, "needs a BigQuery source"),
    ],
)
def test_the_warehouse_option_is_validated(change: dict[str, Any], message: str) -> None:
    from sync.errors import ConfigError

    base = activation_for(bigquery.Dataset("cepsync-test.state"), "http://127.0.0.1:1").model_dump(mode="json")
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_activation({**base, **change}, source="test")


# --- issue 19: the traps of the warehouse mode -------------------------------------------------


@pytest.fixture
def threaded_sim() -> Iterator[SimulatorThread]:
    """The simulator on its own thread, for the CLI (which runs its own event loop)."""
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as running:
        yield running


def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    outcome = CliRunner().invoke(app, list(args), env={**ENV, "COLUMNS": "300", **env})
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), outcome.output
    return outcome.exit_code, " ".join(outcome.output.split())


def emulator_env(emulator: BigQueryEmulator, *, storage: bool = False) -> dict[str, str]:
    env = {"BIGQUERY_EMULATOR_HOST": emulator.rest_url, "GOOGLE_CLOUD_PROJECT": emulator.project}
    if storage:
        env["BIGQUERY_STORAGE_EMULATOR_HOST"] = emulator.grpc_address
    return env


def yaml_file(path: Path, activation: Activation) -> Path:
    path.write_text(yaml.safe_dump(activation.model_dump(mode="json")), encoding="utf-8")
    return path


def function_twin(activation: Activation) -> Activation:
    return parse_activation(activation.model_dump(mode="json", exclude={"diff"}), source="test")


@pytest.mark.emulator
def test_switching_to_the_warehouse_diff_without_switch_diff_is_refused(
    threaded_sim: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # Item 9, one way: the fingerprints are in SQLite (diff: function), the YAML now says
    # diff: warehouse. Before, the run sent all 12 profiles again.
    warehouse = activation_for(bq_dataset, threaded_sim.base_url)
    function_file = yaml_file(tmp_path / "fn.yaml", function_twin(warehouse))
    warehouse_file = yaml_file(tmp_path / "wh.yaml", warehouse)
    write_segment(bq_client, bq_dataset, people(12))
    env, state = emulator_env(bq_emulator), f"sqlite:///{tmp_path / 'state.db'}"
    code, output = cli(env, "run", str(function_file), "--state", state)
    assert code == 0, output
    sent = threaded_sim.simulator.stats()["profiles_received"]

    for command in ("run", "plan"):
        code, output = cli(env, command, str(warehouse_file), "--state", state)
        assert code == 2, output
        assert "the 12 acknowledged fingerprints of this activation are in the function diff's state" in output
        assert f"cepsync switch-diff {warehouse_file} --to warehouse --state STATE" in output
        assert "Traceback" not in output
    assert threaded_sim.simulator.stats()["profiles_received"] == sent  # nothing was sent
    assert table_rows(bq_client, bq_dataset, sql.FINGERPRINTS) == {}

    # The command it names works, and then the run sends nothing.
    code, output = cli(env, "switch-diff", str(warehouse_file), "--to", "warehouse", "--state", state)
    assert code == 0, output
    code, output = cli(env, "run", str(warehouse_file), "--state", state, "--json")
    assert code == 0, output
    assert json.loads(output)["counts"]["sent"] == 0


@pytest.mark.emulator
def test_switching_back_to_the_function_diff_without_switch_diff_is_refused(
    threaded_sim: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # Item 9, the other way: the fingerprints are in BigQuery, the YAML says diff: function again.
    warehouse = activation_for(bq_dataset, threaded_sim.base_url)
    function_file = yaml_file(tmp_path / "fn.yaml", function_twin(warehouse))
    warehouse_file = yaml_file(tmp_path / "wh.yaml", warehouse)
    write_segment(bq_client, bq_dataset, people(12))
    env, state = emulator_env(bq_emulator), f"sqlite:///{tmp_path / 'state.db'}"
    code, output = cli(env, "run", str(warehouse_file), "--state", state)
    assert code == 0, output
    sent = threaded_sim.simulator.stats()["profiles_received"]

    for command in ("run", "plan"):
        code, output = cli(env, command, str(function_file), "--state", state)
        assert code == 2, output
        assert f"are in BigQuery dataset {bq_dataset.project}.{bq_dataset.dataset_id}" in output
        assert f"cepsync switch-diff {function_file} --to function --state STATE" in output
    assert threaded_sim.simulator.stats()["profiles_received"] == sent

    code, output = cli(env, "switch-diff", str(warehouse_file), "--to", "function", "--state", state)
    assert code == 0, output
    code, output = cli(env, "run", str(function_file), "--state", state, "--json")
    assert code == 0, output
    assert json.loads(output)["counts"]["sent"] == 0
    # A function-diff run is now the latest: the next runs do not ask BigQuery again.
    code, output = cli(env, "run", str(function_file), "--state", state, "--json")
    assert code == 0, output


@pytest.mark.emulator
def test_a_missing_state_dataset_is_a_config_error_naming_it_and_the_terraform(
    threaded_sim: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # Item 10: before, `NotFound: 404` tracebacks from run, plan and switch-diff.
    activation = activation_for(bq_dataset, threaded_sim.base_url)
    config = activation.model_dump(mode="json")
    config["diff"]["dataset"] = "no_such_state"
    path = tmp_path / "wh.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    write_segment(bq_client, bq_dataset, people(3))
    env, state = emulator_env(bq_emulator), f"sqlite:///{tmp_path / 'state.db'}"
    for args in (("run",), ("plan",), ("switch-diff", "--to", "warehouse")):
        code, output = cli(env, args[0], str(path), *args[1:], "--state", state)
        assert code == 2, (args, output)
        assert (
            f"the BigQuery dataset {bq_dataset.project}.no_such_state that holds the fingerprints does not exist"
            in output
        )
        assert "infra/warehouse.tf" in output
        assert "Traceback" not in output
        assert "NotFound" not in output
    assert threaded_sim.simulator.stats()["profiles_received"] == 0


@pytest.mark.emulator
def test_a_new_state_store_adopts_the_fence_and_an_old_run_can_no_longer_merge(
    threaded_sim: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # Item 11: a new laptop (a fresh SQLite) against a dataset an older store has used.
    from datetime import UTC, datetime

    from sync.model import Fingerprint, JournalEntry

    activation = activation_for(bq_dataset, threaded_sim.base_url)
    path = yaml_file(tmp_path / "wh.yaml", activation)
    write_segment(bq_client, bq_dataset, people(8))
    env = emulator_env(bq_emulator)
    old_state, new_state = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}"
    for _ in range(3):  # the old store's tokens reach 3
        code, output = cli(env, "run", str(path), "--state", old_state)
        assert code == 0, output
    # A run of the old store that is still going: it registered and appended one profile.
    old = open_store(bq_client, bq_dataset, tmp_path / "old.db")
    now = datetime.now(UTC)
    still_running = old.base.acquire_lease(NAME, "old-function", 600, now)
    old.register(still_running)
    old.commit(still_running, [JournalEntry("c00001", Fingerprint(11, 11))], now)

    # The new store is stuck, and the error says what to do.
    code, output = cli(env, "run", str(path), "--state", new_state)
    assert code != 0
    assert "cepsync adopt-fence" in output
    # Refused while the old store's runs were active minutes ago...
    code, output = cli(env, "adopt-fence", str(path), "--state", new_state)
    assert code == 2, output
    assert "a run may still be going" in output
    # ...and done with --force.
    code, output = cli(env, "adopt-fence", str(path), "--state", new_state, "--force")
    assert code == 0, output
    assert f"took over from token {still_running.token}" in output

    # The old run goes on: its merge is fenced out and it stops; what it acknowledged stays
    # in the journal, under its older token.
    old.commit(still_running, [JournalEntry("c00002", Fingerprint(22, 22))], now)
    with pytest.raises(LeaseLost):
        old.compact(still_running, now)
    assert set(table_rows(bq_client, bq_dataset, sql.JOURNAL)) == {"c00001", "c00002"}
    old.base.close()

    # The new store runs: its first merge folds the old run's acknowledgements (nothing is
    # lost); their rows differ from the segment, so those two are sent, nothing else.
    code, output = cli(env, "run", str(path), "--state", new_state, "--json")
    assert code == 0, output
    record = json.loads(output)
    assert record["counts"]["sent"] == 2, json.dumps(record["counts"])
    assert table_rows(bq_client, bq_dataset, sql.JOURNAL) == {}
    stored = table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)
    assert len(stored) == 8
    assert stored["c00001"] != (11, 11)
    assert stored["c00002"] != (22, 22)
    code, output = cli(env, "run", str(path), "--state", new_state, "--json")
    assert code == 0, output
    assert json.loads(output)["counts"]["sent"] == 0
    # Adopting again finds nothing to adopt.
    code, output = cli(env, "adopt-fence", str(path), "--state", new_state)
    assert code == 0, output
    assert "nothing to adopt" in output


@pytest.mark.emulator
def test_the_rows_that_leave_the_warehouse_go_through_the_storage_read_api(
    threaded_sim: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # Item 12: the diff's rows (and a full pass) are read with a Storage Read client; the id
    # scan's few rows page over REST.
    activation = activation_for(bq_dataset, threaded_sim.base_url)
    path = yaml_file(tmp_path / "wh.yaml", activation)
    write_segment(bq_client, bq_dataset, people(25))
    env, state = emulator_env(bq_emulator, storage=True), f"sqlite:///{tmp_path / 'state.db'}"
    code, output = cli(env, "run", str(path), "--state", state, "--json")
    assert code == 0, output
    jobs = {job["purpose"]: job for job in json.loads(output)["warehouse"]["jobs"]}
    assert jobs["new and bad rows"]["read_path"] == "storage_api"
    assert jobs["new and bad rows"]["rows_out"] == 25
    assert jobs["id scan"]["read_path"] == "rest_paging"
    assert len(threaded_sim.simulator.profiles(PROJECT_KEY)) == 25
    code, output = cli(env, "run", str(path), "--state", state, "--json", "--full")
    assert code == 0, output
    jobs = {job["purpose"]: job for job in json.loads(output)["warehouse"]["jobs"]}
    assert jobs["full pass"]["read_path"] == "storage_api"
    assert jobs["full pass"]["rows_out"] == 25


def fake_service_account(path: Path) -> Path:
    """A syntactically valid service-account key (a fresh RSA key): enough to build clients offline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "cepsync-prod",
                "private_key_id": "0",
                "private_key": pem,
                "client_email": "sync@cepsync-prod.iam.gserviceaccount.com",
                "client_id": "0",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        ),
        encoding="utf-8",
    )
    return path


def test_outside_the_emulator_the_warehouse_reads_with_a_storage_client_on_the_same_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Item 12, production: before, the read client was built only with the emulator variables.
    from google.cloud.bigquery_storage import BigQueryReadClient

    from sync.runtime import open_warehouse_fingerprints

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(fake_service_account(tmp_path / "key.json")))
    activation = activation_for(bigquery.Dataset("cepsync-prod.state"), "http://127.0.0.1:1")
    base = SQLiteStateStore(tmp_path / "state.db")
    store = open_warehouse_fingerprints(activation, base, environ={})
    try:
        assert isinstance(store, WarehouseFingerprints)
        read_client = store.warehouse.read_client
        assert isinstance(read_client, BigQueryReadClient)
        # The client's own service account (google-cloud-bigquery builds its read client the same way).
        assert read_client._transport._credentials.service_account_email == (
            "sync@cepsync-prod.iam.gserviceaccount.com"
        )
        assert store.dataset.project == "cepsync-prod"
        # use_storage_api: false keeps REST paging.
        rest = activation.model_copy(update={"source": activation.source.model_copy(update={"use_storage_api": False})})
        other = open_warehouse_fingerprints(rest, SQLiteStateStore(tmp_path / "other.db"), environ={})
        assert isinstance(other, WarehouseFingerprints)
        assert other.warehouse.read_client is None
        other.close()
        other.base.close()
    finally:
        store.close()
        base.close()


@pytest.mark.emulator
@pytest.mark.slow
def test_a_hundred_thousand_row_segment_end_to_end(
    threaded_sim: SimulatorThread,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    tmp_path: Path,
) -> None:
    # Issue 19, item 15: the emulator stalled on the diff past ~5,000 rows (FARM_FINGERPRINT).
    bq_client.query_and_wait(
        f"CREATE TABLE `{bq_dataset.dataset_id}.people` AS SELECT FORMAT('c%06d', n) AS customer_id, "
        "CONCAT('p', CAST(n AS STRING), '@example.com') AS email, 'Ann' AS first_name, n AS points "
        "FROM UNNEST(GENERATE_ARRAY(0, 99999)) AS n"
    )
    path = yaml_file(tmp_path / "wh.yaml", activation_for(bq_dataset, threaded_sim.base_url))
    env, state = emulator_env(bq_emulator, storage=True), f"sqlite:///{tmp_path / 'state.db'}"
    code, output = cli(env, "run", str(path), "--state", state, "--json")
    assert code == 0, output[-2000:]
    record = json.loads(output)
    assert record["counts"]["acknowledged"] == 100_000
    assert rows_out(record) == 100_000
    diff = next(job for job in record["warehouse"]["jobs"] if job["purpose"] == "diff")
    assert diff["seconds"] < 60  # ~1 s here; the FARM_FINGERPRINT recipe did not finish 16,000 rows in 5 min

    bq_client.query_and_wait(
        f"UPDATE `{bq_dataset.dataset_id}.people` SET points = points + 1 WHERE MOD(points, 100) = 0"
    )
    code, output = cli(env, "run", str(path), "--state", state, "--json")
    assert code == 0, output[-2000:]
    record = json.loads(output)
    assert record["counts"]["sent"] == 1_000
    assert rows_out(record) == 1_000
    assert len(table_rows(bq_client, bq_dataset, sql.FINGERPRINTS)) == 100_000


class _UnreadSegment:
    """A source that fails the test if anything reads it (the Source protocol)."""

    engine = "unread"

    def schema(self) -> pa.Schema:
        raise AssertionError("the segment was read")

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        raise AssertionError("the segment was read")

    def stats(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


async def test_a_warehouse_diff_run_built_without_its_differ_is_refused_before_anything_is_read(
    tmp_path: Path,
) -> None:
    # Issue 23: the engine no longer builds the warehouse edge (sync.runtime.open_differ does).
    # A run of a diff: warehouse activation handed no differ must not fall back to an
    # in-memory diff against a state that holds none of its fingerprints (a full resend).
    activation = activation_for(bigquery.Dataset("cepsync-test.state"), "http://127.0.0.1:1")
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        result = await Run(activation, source=_UnreadSegment(), store=store, client=None).execute()
        assert result.status == "config_error"
        assert "open_differ" in str(result.record["error"])
        assert store.list_runs(NAME, 5) == []  # refused before the lease: nothing recorded, nothing held
    finally:
        store.close()
