"""The results tables in a DuckDB file: both inserts in one transaction.

Timestamps are stored as ``TIMESTAMP`` in UTC (the connection's time zone is set to UTC
before the insert casts them), so ``CAST(started_at AS DATE)`` is the UTC day, as in BigQuery.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from sync.duckdb_sql import bound_memory, quote_identifier
from sync.results.schema import REJECTIONS_COLUMNS, REJECTIONS_TABLE, RUNS_COLUMNS, RUNS_TABLE


def duckdb_type(kind: pa.DataType) -> str:
    if pa.types.is_timestamp(kind):
        return "TIMESTAMP"
    if pa.types.is_int64(kind):
        return "BIGINT"
    if pa.types.is_float64(kind):
        return "DOUBLE"
    if pa.types.is_boolean(kind):
        return "BOOLEAN"
    return "VARCHAR"


def table_ddl(table: str, columns: tuple[tuple[str, pa.DataType, bool], ...]) -> str:
    body = ",\n  ".join(
        f"{quote_identifier(name)} {duckdb_type(kind)}{' NOT NULL' if required else ''}"
        for name, kind, required in columns
    )
    return f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} (\n  {body}\n)"


def ensure_tables(connection: duckdb.DuckDBPyConnection) -> None:
    """Create both tables if missing; add the columns a newer version knows to older ones."""
    for table, columns in ((RUNS_TABLE, RUNS_COLUMNS), (REJECTIONS_TABLE, REJECTIONS_COLUMNS)):
        connection.execute(table_ddl(table, columns))
        for name, kind, _ in columns:
            connection.execute(
                f"ALTER TABLE {quote_identifier(table)} ADD COLUMN IF NOT EXISTS "
                f"{quote_identifier(name)} {duckdb_type(kind)}"
            )


# The insert streams the spooled Parquet file; past this it spills to the spool's directory.
MEMORY_LIMIT = "128MB"


def write(database: str, runs: pa.Table, rejections: Path | None, *, spill_directory: Path) -> dict[str, object]:
    """Append the run's row and its rejections to the DuckDB file, all or nothing."""
    connection = duckdb.connect(database)
    try:
        bound_memory(connection, memory_limit=MEMORY_LIMIT, spill_directory=str(spill_directory))
        connection.execute("SET TimeZone = 'UTC'")
        connection.execute("BEGIN TRANSACTION")
        ensure_tables(connection)
        if rejections is not None:
            connection.execute(
                f"INSERT INTO {quote_identifier(REJECTIONS_TABLE)} BY NAME SELECT * FROM read_parquet(?)",  # noqa: S608 - a constant name
                [str(rejections)],
            )
        connection.register("cepsync_run_row", runs)
        connection.execute(f"INSERT INTO {quote_identifier(RUNS_TABLE)} BY NAME SELECT * FROM cepsync_run_row")  # noqa: S608
        connection.unregister("cepsync_run_row")
        connection.execute("COMMIT")
    finally:
        connection.close()
    return {"backend": "duckdb", "database": database, "runs_table": RUNS_TABLE, "rejections_table": REJECTIONS_TABLE}
