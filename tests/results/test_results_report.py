"""The HTML report links each run to its rows in the results tables: the query it shows, read
back out of the HTML, lists that run's rows when run against the tables; everything is escaped."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from sync.dev.simulator import BatchSimulator
from sync.report.html import render_report
from sync.results.queries import run_queries
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import API_KEY, PROJECT_KEY, make_activation, people, person, run_once, write_segment


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


def shown_queries(page: str) -> dict[str, str]:
    """Run id -> the query text of the report's results table, unescaped as a browser shows it."""
    rows = re.findall(r'<tr data-run="([^"]*)">.*?<pre class="results-query">(.*?)</pre>', page, re.DOTALL)
    return {html.unescape(run): html.unescape(text) for run, text in rows}


async def test_the_report_shows_a_query_that_lists_each_runs_rows(
    sim: tuple[BatchSimulator, str], tmp_path: Path
) -> None:
    _, url = sim
    segment = tmp_path / "segment.duckdb"
    write_segment(segment, [*people(10), person(900, email="bad"), person(901, email="worse")])
    activation = make_activation(tmp_path, url, results={})
    first = (await run_once(activation, tmp_path / "state.db")).record
    write_segment(segment, [*people(10), person(900, email="bad")])
    second = (await run_once(activation, tmp_path / "state.db")).record
    store = SQLiteStateStore(tmp_path / "state.db")
    try:
        records = store.list_runs("test_people", 10)
    finally:
        store.close()
    page = render_report("test_people", records, state_kind="sqlite")
    assert 'id="results"' in page
    assert "DuckDB file segment.duckdb" in page
    section = page.split('<h2 id="results">', 1)[1].split("<h2", 1)[0]
    assert str(tmp_path) not in section  # the file by its name only
    queries = shown_queries(page)
    assert set(queries) == {first["run_id"], second["run_id"]}
    with duckdb.connect(str(segment), read_only=True) as connection:
        for record, rejected in ((first, {"c00900", "c00901"}), (second, {"c00900"})):
            runs_sql, rejections_sql = [part.strip() for part in queries[record["run_id"]].split(";") if part.strip()]
            assert connection.execute(runs_sql).fetchall()[0][0] == record["run_id"]
            names = [column[0] for column in connection.execute(rejections_sql).description]
            found = {
                dict(zip(names, row, strict=True))["custom_id"] for row in connection.execute(rejections_sql).fetchall()
            }
            assert found == rejected


def test_a_failed_write_and_hostile_values_are_shown_escaped() -> None:
    hostile = "<script>alert(1)</script>"
    records: list[dict[str, Any]] = [
        {
            "run_id": "20261207T010203Z-abc123'<b>",
            "activation": "x",
            "started_at": "2026-12-07T01:02:03+00:00",
            "status": "succeeded",
            "counts": {},
            "results": {
                "backend": "bigquery",
                "runs_table": f"p.d{hostile}.cepsync_runs",
                "rejections_table": "p.d.cepsync_rejections",
                "rejections_written": 0,
            },
        },
        {
            "run_id": "20261207T000000Z-def456",
            "activation": "x",
            "started_at": "2026-12-07T00:00:00+00:00",
            "status": "succeeded",
            "counts": {},
            "results_error": f"the results tables were not written: {hostile}",
        },
    ]
    page = render_report("x", records, state_kind="sqlite")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>" not in page
    shown = shown_queries(page)
    query = shown["20261207T010203Z-abc123'<b>"]
    assert "WHERE run_id = '20261207T010203Z-abc123\\'<b>'" in query  # a BigQuery string literal
    assert (
        "started_at >= TIMESTAMP '2026-12-07 00:00:00+00' AND started_at < TIMESTAMP '2026-12-08 00:00:00+00'" in query
    )


def test_no_results_no_section() -> None:
    record = {"run_id": "r1", "activation": "x", "started_at": "2026-12-07T00:00:00+00:00", "status": "succeeded"}
    assert 'id="results"' not in render_report("x", [record], state_kind="sqlite")
    assert run_queries(record) is None
