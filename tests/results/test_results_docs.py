"""The example queries of docs/results.md, read from the doc itself (so it cannot drift), run
against the same results tables in DuckDB and on the BigQuery emulator, written by the real
writers: both engines give the same answers, and the answers are the expected ones."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import bigquery

from sync.results import duckdb as duckdb_results
from sync.results.bigquery import BigQueryResults
from sync.results.schema import RejectionSpool, run_row

DOC = Path(__file__).resolve().parents[2] / "docs" / "results.md"
TITLES = (
    "Rejections by reason over time",
    "The latest run of each activation",
    "Profiles rejected three runs in a row",
    "The latest run's rejections, joined back to the segment",
)
NOW = datetime.now(UTC).replace(microsecond=0)


def doc_queries() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Example queries", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^### (.+?)\n.*?```sql\n(.*?)```", section, re.MULTILINE | re.DOTALL))


@dataclass
class FakeRun:
    activation: str
    status: str
    age: timedelta
    rejected: list[tuple[str | None, str]]  # (custom_id, reason)

    @property
    def started(self) -> datetime:
        return NOW - self.age

    @property
    def run_id(self) -> str:
        return self.started.strftime("%Y%m%dT%H%M%SZ") + "-" + self.activation[:6].ljust(6, "0")


RUNS = (
    FakeRun(
        "vip_customers",
        "succeeded_with_rejections",
        timedelta(days=3),
        [("101", "invalid_email"), ("102", "invalid_phone")],
    ),
    FakeRun(
        "vip_customers",
        "succeeded_with_rejections",
        timedelta(days=2),
        [("101", "invalid_email"), ("103", "invalid_email")],
    ),
    FakeRun(
        "vip_customers",
        "succeeded_with_rejections",
        timedelta(days=1),
        [("101", "invalid_email"), ("102", "invalid_phone"), ("103", "invalid_email"), (None, "missing_custom_id")],
    ),
    # A guard abort between two complete runs does not break a streak.
    FakeRun("vip_customers", "aborted_by_guard", timedelta(hours=12), []),
    FakeRun(
        "vip_customers",
        "succeeded_with_rejections",
        timedelta(hours=1),
        [("101", "invalid_email"), ("103", "batch_rejected")],
    ),
    FakeRun("newsletter", "succeeded_with_rejections", timedelta(days=2), [("102", "invalid_phone")]),
    FakeRun("newsletter", "failed", timedelta(hours=2), []),
)

CUSTOMERS = pa.table(
    {
        "customer_id": pa.array([101, 102, 103, 104], pa.int64()),
        "email": ["a@example", "b@example.com", "c@example", "d@example.com"],
        "country": ["FR", "DE", "ES", "IT"],
    }
)


def records() -> Iterator[tuple[pa.Table, RejectionSpool]]:
    for run in RUNS:
        record = {
            "run_id": run.run_id,
            "activation": run.activation,
            "started_at": run.started.isoformat(),
            "ended_at": (run.started + timedelta(seconds=30)).isoformat(),
            "status": run.status,
            "counts": {"rows": 100, "sent": 90, "rejected": len(run.rejected)},
            "error": "a failure" if run.status == "failed" else None,
        }
        spool = RejectionSpool(started_at=record["started_at"], include_values=False, max_rows=1000)
        for custom_id, reason in run.rejected:
            spool.add(
                {
                    "run_id": run.run_id,
                    "activation": run.activation,
                    "row": 1,
                    "custom_id": custom_id,
                    "issues": [{"field": "email", "reason": reason, "detail": f"not valid: '{custom_id}'"}],
                }
            )
        tally = spool.finish()
        yield run_row(record, tally=tally, include_values=False, written_at=NOW), spool


@pytest.fixture
def duckdb_file(tmp_path: Path) -> Path:
    database = tmp_path / "results.duckdb"
    for row, spool in records():
        try:
            duckdb_results.write(str(database), row, spool.path if spool.has_rows else None, spill_directory=tmp_path)
        finally:
            spool.close()
    with duckdb.connect(str(database)) as connection:
        connection.register("incoming", CUSTOMERS)
        connection.execute("CREATE TABLE customers AS SELECT * FROM incoming")
    return database


def run_duckdb(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(database), read_only=True) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        return [tuple(row) for row in connection.execute(sql).fetchall()]


def run_bigquery(client: bigquery.Client, dataset: bigquery.Dataset, sql: str) -> list[tuple[Any, ...]]:
    config = bigquery.QueryJobConfig(default_dataset=dataset.reference)
    return [tuple(row.values()) for row in client.query(sql, job_config=config).result()]


def check_answers(answers: dict[str, list[tuple[Any, ...]]]) -> None:
    """What each query must say about RUNS and CUSTOMERS."""
    by_day = answers[TITLES[0]]
    vip = [run for run in RUNS if run.activation == "vip_customers"]
    expected_rows = sorted(
        (run.started.date(), reason, sum(1 for _, r in run.rejected if r == reason))
        for run in vip
        for reason in sorted({r for _, r in run.rejected})
    )
    assert [(day, reason, n) for day, reason, n, _ in by_day] == _merge_days(expected_rows)
    latest = answers[TITLES[1]]
    assert [(row[0], row[1], row[2]) for row in latest] == [
        ("newsletter", RUNS[6].run_id, "failed"),
        ("vip_customers", RUNS[4].run_id, "succeeded_with_rejections"),
    ]
    assert latest[0][6] == "a failure"
    streaks = answers[TITLES[2]]
    assert streaks == [("vip_customers", "101", RUNS[4].run_id), ("vip_customers", "103", RUNS[4].run_id)]
    joined = answers[TITLES[3]]
    assert joined == [
        ("101", "invalid_email", "email", "not valid", "a@example", "FR"),
        ("103", "batch_rejected", "email", "not valid: '103'", "c@example", "ES"),
    ]


def _merge_days(rows: list[tuple[Any, str, int]]) -> list[tuple[Any, str, int]]:
    merged: dict[tuple[Any, str], int] = {}
    for day, reason, n in rows:
        merged[(day, reason)] = merged.get((day, reason), 0) + n
    return [(day, reason, n) for (day, reason), n in sorted(merged.items())]


def test_the_doc_holds_the_four_example_queries() -> None:
    assert tuple(doc_queries()) == TITLES


def test_the_example_queries_answer_in_duckdb(duckdb_file: Path) -> None:
    check_answers({title: run_duckdb(duckdb_file, sql) for title, sql in doc_queries().items()})


def test_the_example_queries_answer_alike_on_the_bigquery_emulator(
    bq_client: bigquery.Client, bq_dataset: bigquery.Dataset, duckdb_file: Path
) -> None:
    writer = BigQueryResults(bq_client, bq_dataset.dataset_id, activation="docs")
    for row, spool in records():
        try:
            writer.write(row, spool.path if spool.has_rows else None)
        finally:
            spool.close()
    buffer = io.BytesIO()
    pq.write_table(CUSTOMERS, buffer)
    buffer.seek(0)
    load = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    bq_client.load_table_from_file(buffer, bq_dataset.table("customers"), job_config=load).result()
    answers = {title: run_bigquery(bq_client, bq_dataset, sql) for title, sql in doc_queries().items()}
    check_answers(answers)
    for title, sql in doc_queries().items():
        assert _plain(answers[title]) == _plain(run_duckdb(duckdb_file, sql)), title


def _plain(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with timestamps as UTC instants (BigQuery answers aware ones, DuckDB naive UTC)."""
    return [
        tuple(
            value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value
            for value in row
        )
        for row in rows
    ]


def test_every_column_of_both_tables_is_documented() -> None:
    from sync.results.schema import REJECTIONS_COLUMNS, RUNS_COLUMNS

    text = DOC.read_text(encoding="utf-8")
    runs = text.split("## `cepsync_runs`", 1)[1].split("\n## ", 1)[0]
    rejections = text.split("## `cepsync_rejections`", 1)[1].split("\n## ", 1)[0]
    assert [name for name, _, _ in RUNS_COLUMNS if f"`{name}`" not in runs] == []
    assert [name for name, _, _ in REJECTIONS_COLUMNS if f"`{name}`" not in rejections] == []
