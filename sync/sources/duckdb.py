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
from sync.duckdb_sql import bound_memory, quote_identifier
from sync.errors import ConfigError, FatalError


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
        # DuckDB keeps every block of the file it has read, up to 80 % of the machine's
        # memory by default: a 5M-row segment read three times stayed resident (~220 MB).
        # Bounded, it evicts them as the stream moves on, and a heavy segment query spills
        # to a directory of its own (a read-only database has none by default). Every size
        # the config's pattern lets through is one DuckDB accepts.
        self._spill = tempfile.TemporaryDirectory(prefix="cepsync-source-")
        bound_memory(self._connection, memory_limit=config.memory_limit, spill_directory=self._spill.name)

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
