"""DuckDB segment source: the embedded default warehouse.

The database is opened read-only, so a sync can never change the segment, and several
runs (or a BI tool) can read it at once. Rows stream as Arrow record batches, so memory
stays bounded whatever the segment size.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from sync.config import DuckDBSourceConfig
from sync.errors import ConfigError, FatalError


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def quote_identifier(name: str) -> str:
    """SQL-quote one identifier (DuckDB and BigQuery standard SQL both double any quote)."""
    return '"' + name.replace('"', '""') + '"'


class DuckDBSource:
    """Reads one segment (query or table) from a DuckDB database file."""

    def __init__(self, config: DuckDBSourceConfig, *, activation: str) -> None:
        self._config = config
        self._activation = activation
        self._rows = 0
        self._batches = 0
        self._seconds = 0.0
        path = Path(config.database)
        if not path.exists():
            raise ConfigError(
                f"DuckDB database {str(path)!r} not found",
                source=f"activation '{activation}'",
                field="source.database",
            )
        try:
            self._connection = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as error:
            raise FatalError(f"activation '{activation}': cannot open DuckDB database {str(path)!r}: {error}") from None
        # The engine streams the segment out of here as Arrow batches and drops each one once
        # diffed: return freed memory to the OS instead of caching up to 128 MB per thread
        # (DuckDB's default), or a million-row read leaves hundreds of MB behind.
        self._connection.execute("SET allocator_flush_threshold = '16MB'")
        self._connection.execute("SET allocator_bulk_deallocation_flush_threshold = '16MB'")
        # DuckDB keeps every block of the file it has read, up to 80 % of the machine's
        # memory by default: a 5M-row segment read three times stayed resident (~220 MB).
        # Bounded, it evicts them as the stream moves on, and a heavy segment query spills
        # to a directory of its own (a read-only database has none by default).
        self._spill = tempfile.TemporaryDirectory(prefix="cepsync-source-")
        self._connection.execute(f"SET temp_directory = {_literal(self._spill.name)}")
        try:
            self._connection.execute(f"SET memory_limit = {_literal(config.memory_limit)}")
        except duckdb.Error as error:
            self.close()
            raise ConfigError(
                f"DuckDB refuses memory limit {config.memory_limit!r}: {error}",
                source=f"activation '{activation}'",
                field="source.memory_limit",
            ) from None

    def _segment_sql(self) -> str:
        if self._config.table is not None:
            # Validated by the config model (identifiers only); quoted part by part anyway.
            table = ".".join(quote_identifier(part) for part in self._config.table.split("."))
            return f"SELECT * FROM {table}"  # noqa: S608 - identifiers validated by the config model, then quoted
        assert self._config.query is not None
        return self._config.query

    def _relation(self, columns: list[str] | None) -> duckdb.DuckDBPyRelation:
        inner = self._segment_sql()
        projection = "*" if columns is None else ", ".join(quote_identifier(c) for c in columns)
        sql = f"SELECT {projection} FROM ({inner}) AS segment"  # noqa: S608 - inner is the user's own segment SQL
        try:
            return self._connection.sql(sql)
        except duckdb.Error as error:
            raise FatalError(f"activation '{self._activation}': the segment query failed: {error}") from None

    def schema(self) -> pa.Schema:
        relation = self._relation(None)
        try:
            return relation.limit(0).to_arrow_table().schema
        except duckdb.Error as error:
            raise FatalError(f"activation '{self._activation}': the segment query failed: {error}") from None

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        relation = self._relation(columns)
        started = time.perf_counter()
        try:
            reader = relation.to_arrow_reader(self._config.batch_rows)
            for batch in reader:
                self._rows += batch.num_rows
                self._batches += 1
                self._seconds += time.perf_counter() - started
                yield batch
                started = time.perf_counter()
        except duckdb.Error as error:
            raise FatalError(f"activation '{self._activation}': reading the segment failed: {error}") from None

    def stats(self) -> dict[str, Any]:
        return {
            "engine": "duckdb",
            "rows": self._rows,
            "batches": self._batches,
            "read_seconds": round(self._seconds, 3),
        }

    def close(self) -> None:
        self._connection.close()
        self._spill.cleanup()
