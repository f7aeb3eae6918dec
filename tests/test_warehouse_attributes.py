"""``send: changed_attributes`` with ``diff: warehouse``: attribute sets kept in BigQuery.

The local BigQuery emulator (real google-cloud-bigquery client), SQLite for the lease and
the meta, the Batch simulator. The sets ride in ``cepsync_fingerprints.attributes`` (BYTES),
through the journal's load jobs and the MERGE; tables created before the column existed get
it added in place.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery

from sync.config import Activation
from sync.dev.simulator import BatchSimulator
from sync.engine import Run, RunOptions
from sync.model import Fingerprint, JournalEntry
from sync.sources.bigquery import BigQuerySource
from sync.warehouse import sql
from sync.warehouse.diff import WarehouseDiffer
from tests.support.engine_support import API_KEY, PROJECT_KEY, make_client, people
from tests.test_warehouse_diff import activation_for, open_store, write_segment

NAME = "wh_attrs"
pytestmark = pytest.mark.emulator


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


async def run(
    activation: Activation, client: bigquery.Client, dataset: bigquery.Dataset, state: Path
) -> dict[str, Any]:
    store = open_store(client, dataset, state, name=NAME)
    source = BigQuerySource(activation.source, activation=NAME, client=client)  # type: ignore[arg-type]
    try:
        result = await Run(
            activation,
            source=source,
            store=store.base,
            differ=WarehouseDiffer(activation, store),
            client=make_client(activation),
            options=RunOptions(lease_ttl_seconds=60),
        ).execute()
    finally:
        source.close()
        store.base.close()
    return result.record


def stored_sets(client: bigquery.Client, dataset: bigquery.Dataset) -> dict[str, bytes | None]:
    rows = client.query(
        f"SELECT custom_id, attributes FROM `{dataset.project}.{dataset.dataset_id}.{sql.FINGERPRINTS}`"
    )
    return {row[0]: row[1] for row in rows.result()}


async def test_what_the_app_wrote_survives_a_warehouse_diff_delta(
    sim: tuple[BatchSimulator, str], bq_client: bigquery.Client, bq_dataset: bigquery.Dataset, tmp_path: Path
) -> None:
    simulator, url = sim
    activation = activation_for(bq_dataset, url, name=NAME, send="changed_attributes")
    state = tmp_path / "state.sqlite"
    segment = people(12)
    write_segment(bq_client, bq_dataset, segment)
    record = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    sets = stored_sets(bq_client, bq_dataset)
    # $email_address, firstname, points: three 4-byte hashes a profile, merged into the table.
    assert len(sets) == 12
    assert all(value is not None and len(value) == 12 for value in sets.values())

    simulator.write_as_app(PROJECT_KEY, "c00001", {"firstname": "Appy", "$language": "fr"})
    segment[1]["points"] = 1_001
    segment = [row for row in segment if row["customer_id"] != "c00005"]
    write_segment(bq_client, bq_dataset, segment)
    record = await run(activation, bq_client, bq_dataset, state)
    assert record["status"] == "succeeded", record.get("error")
    assert (record["counts"]["changed"], record["counts"]["removed"]) == (1, 1)
    one = simulator.profiles(PROJECT_KEY)["c00001"]
    assert (one["points"], one["firstname"], one["$language"]) == (1_001, "Appy", "fr")
    after = stored_sets(bq_client, bq_dataset)
    assert "c00005" not in after
    assert after["c00001"] != sets["c00001"]
    assert after["c00002"] == sets["c00002"]


def test_tables_made_before_attribute_sets_get_the_column_and_keep_their_rows(
    bq_client: bigquery.Client, bq_dataset: bigquery.Dataset, tmp_path: Path
) -> None:
    old = [field for field in sql.FINGERPRINTS_SCHEMA if field.name != "attributes"]
    for name, schema in ((sql.FINGERPRINTS, old), (sql.JOURNAL, [*old, bigquery.SchemaField("put", "BOOL")])):
        bq_client.create_table(bigquery.Table(bq_dataset.table(name), schema=schema))
    now = datetime(2026, 12, 1, tzinfo=UTC)
    rows = pa.table(
        {
            "activation": ["wh_attrs"],
            "custom_id": ["old-1"],
            "raw": pa.array([5], pa.int64()),
            "payload": pa.array([6], pa.int64()),
            "token": pa.array([0], pa.int64()),
            "flush": pa.array([0], pa.int64()),
            "pos": pa.array([0], pa.int64()),
            "acknowledged_at": pa.array([now], pa.timestamp("us", tz="UTC")),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(rows, buffer)
    buffer.seek(0)
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    bq_client.load_table_from_file(buffer, bq_dataset.table(sql.FINGERPRINTS), job_config=config).result()

    store = open_store(bq_client, bq_dataset, tmp_path / "state.sqlite", name=NAME)
    try:
        store.ensure_tables()
        names = {field.name for field in bq_client.get_table(bq_dataset.table(sql.FINGERPRINTS)).schema}
        assert "attributes" in names
        assert store.load_fingerprints(NAME) == {"old-1": Fingerprint(5, 6)}
        lease = store.base.acquire_lease(NAME, "test", 60, now)
        store.commit(lease, [JournalEntry("new-1", Fingerprint(7, 8, b"\x01\x00\x00\x00"))], now)
        store.compact(lease, now)
        assert store.load_fingerprints(NAME) == {
            "old-1": Fingerprint(5, 6),
            "new-1": Fingerprint(7, 8, b"\x01\x00\x00\x00"),
        }
    finally:
        store.base.close()
