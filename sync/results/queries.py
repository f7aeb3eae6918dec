"""The SQL that lists one run's rows in the results tables (the HTML report shows it).

The text is shown to a person, never executed here; the run id is quoted as a literal of
each dialect all the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import PurePath

from sync.results.schema import REJECTIONS_TABLE, RUNS_TABLE


def _bigquery_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _duckdb_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_queries(record: Mapping[str, object]) -> dict[str, str] | None:
    """``{"where", "runs", "rejections"}`` for a run whose results were written, else None.

    BigQuery: fully qualified tables, and a filter on the run's UTC day so that only that
    partition is read. DuckDB: the tables of the file named in ``where`` (by its name only).
    """
    results = record.get("results")
    if not isinstance(results, Mapping) or not record.get("run_id"):
        return None
    if results.get("backend") == "bigquery":
        run_id = _bigquery_literal(str(record["run_id"]))
        runs = str(results.get("runs_table") or RUNS_TABLE).replace("`", "")
        rejections = str(results.get("rejections_table") or REJECTIONS_TABLE).replace("`", "")
        day = _day(record.get("started_at"))
        window = ""
        if day is not None:
            following = day + timedelta(days=1)
            window = (
                f"\n  AND started_at >= TIMESTAMP '{day:%Y-%m-%d} 00:00:00+00'"
                f" AND started_at < TIMESTAMP '{following:%Y-%m-%d} 00:00:00+00'"
            )
        return {
            "where": f"BigQuery, dataset {runs.rpartition('.')[0]}",
            "runs": f"SELECT * FROM `{runs}`\nWHERE run_id = {run_id}{window}",  # noqa: S608 - shown, not run
            "rejections": f"SELECT * FROM `{rejections}`\nWHERE run_id = {run_id}{window}\n"  # noqa: S608
            "ORDER BY segment_row, custom_id",
        }
    run_id = _duckdb_literal(str(record["run_id"]))
    database = PurePath(str(results.get("database") or "")).name or "the results file"
    return {
        "where": f"DuckDB file {database}",
        "runs": f"SELECT * FROM {RUNS_TABLE} WHERE run_id = {run_id}",  # noqa: S608 - shown, not run
        "rejections": f"SELECT * FROM {REJECTIONS_TABLE} WHERE run_id = {run_id}\n"  # noqa: S608 - shown, not run
        "ORDER BY segment_row, custom_id",
    }


def _day(value: object) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)
