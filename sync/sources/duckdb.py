"""DuckDB segment source: the embedded default warehouse.

The database is opened read-only, so a sync can never change the segment, and several
runs (or a BI tool) can read it at once. Rows stream as Arrow record batches, so memory
stays bounded whatever the segment size.

DuckDB's memory limit bounds both a query's working memory and its cache of the file's
blocks, which fills up to the limit on every read. Unless the activation sets
``source.memory_limit``, each read gets what its plan needs (:func:`read_memory_limit`):
a query DuckDB streams holds a few blocks per column at a time, so a small cap keeps the
cache small; a sort, join, aggregate or window keeps the generous default, under which it
spills rather than fails (``docs/how-a-run-works.md``, "Memory").

One outsized value (a 10 MB string in one row) needs about twice its size at once, far
more than a small cap. Rather than give every read that headroom (the cache would fill it:
a 1M-row read would keep it resident for nothing), a streamed read that runs out of memory
under a cap of ours is started again, under twice the cap, after the rows it has already
yielded (:meth:`DuckDBSource.read_batches`): only the read that meets such a value pays for
it. The value then reaches the mapping, which rejects its row with a reason
(``string_too_long``), and the run goes on.

Only the mapped columns are ever read (a projection), and the schema is read from one
column of each distinct type, so a table 10,000 columns wide costs what its mapped columns
cost.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final

import duckdb
import pyarrow as pa

from sync.config import DuckDBSourceConfig
from sync.duckdb_sql import bound_memory, quote_identifier, quote_literal
from sync.errors import ConfigError, FatalError
from sync.scratch import scratch_directory

# The cap of a read whose plan holds rows (sorts, joins, aggregates, windows), and of any
# read's when the activation sets none.
QUERY_MEMORY_LIMIT_MB: Final = 128
# A streamed read runs on one thread (a scan outpaces the mapping anyway), pins a block or
# two per column, and caches the file's blocks up to its cap. Measured on one thread: 81 long
# string columns fail at 48 MB and pass at 64 MB (this gives 69 MB); the benchmark's 17 short
# columns pass at 12 MB (this gives 21).
STREAM_BASE_MB: Final = 8
STREAM_PER_COLUMN_MB: Final = 0.75
# A streamed read that runs out of memory under a cap of ours is retried under twice the
# cap, up to this one: a single value of up to about 200 MB (a string, a list) passes.
# Beyond it, the activation must set source.memory_limit.
STREAM_RETRY_CEILING_MB: Final = 512

# Threads of the embedded differ's queries in the segment's database (sync.local_pass),
# but a sort's (one).
DIFFER_THREADS: Final = min(4, os.cpu_count() or 1)

# The cap set for a moment once the differ's queries end, so that DuckDB lets go of the
# file's blocks they cached (what a cap cannot free, DuckDB keeps: the setting then fails).
RELEASE_MEMORY_LIMIT: Final = "1MB"

# How DuckDB's out-of-memory errors begin, also once Arrow's stream reader has wrapped one.
OUT_OF_MEMORY: Final = "Out of Memory Error"

# Physical operators that pass rows through without holding them (EXPLAIN's names).
STREAMING_OPERATORS: Final = frozenset(
    {
        "PROJECTION",
        "FILTER",
        "SEQ_SCAN",
        "TABLE_SCAN",
        "DUMMY_SCAN",
        "EMPTY_RESULT",
        "STREAMING_LIMIT",
        "LIMIT",
        "UNION",
        "UNNEST",
    }
)


def plan_operators(connection: duckdb.DuckDBPyConnection, sql: str) -> set[str] | None:
    """The physical operators of ``sql``'s plan (None when DuckDB cannot explain it)."""
    try:
        rows = connection.execute(f"EXPLAIN (FORMAT json) {sql}").fetchall()
        nodes = [node for _, text in rows for node in json.loads(text)]
    except (duckdb.Error, ValueError, TypeError):
        return None
    names: set[str] = set()
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            names.add(str(node.get("name", "")).strip())
            nodes.extend(node.get("children") or [])
    return names


def streams(operators: set[str] | None) -> bool:
    """Whether a plan of these operators passes rows through without holding them."""
    return operators is not None and operators <= STREAMING_OPERATORS


def read_memory_limit(operators: set[str] | None, columns: int) -> str:
    """The cap of one read: small for a plan that streams, the default for one that holds rows."""
    if not streams(operators):
        return f"{QUERY_MEMORY_LIMIT_MB}MB"
    return f"{min(QUERY_MEMORY_LIMIT_MB, math.ceil(STREAM_BASE_MB + STREAM_PER_COLUMN_MB * columns))}MB"


class DuckDBSource:
    """Reads one segment (query or table) from a DuckDB database file."""

    # The raw hash's salt (sync.sources.base.Source.engine). The string is the name the salt
    # took from the CLI's wrapper class before sources stated it: kept, so that states
    # written then stay valid (a new string would map every profile once more).
    engine = "_DuckDBSegment"

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
        self._spill = scratch_directory("source")
        self._limit = config.memory_limit or f"{QUERY_MEMORY_LIMIT_MB}MB"
        bound_memory(self._connection, memory_limit=self._limit, spill_directory=self._spill.name)

    def _segment_sql(self) -> str:
        if self._config.table is not None:
            # Validated by the config model (identifiers only); quoted part by part anyway.
            table = ".".join(quote_identifier(part) for part in self._config.table.split("."))
            return f"SELECT * FROM {table}"  # noqa: S608 - identifiers validated by the config model, then quoted
        assert self._config.query is not None
        return self._config.query

    def _read_sql(self, columns: list[str] | None, *, skip: int = 0) -> str:
        projection = "*" if columns is None else ", ".join(quote_identifier(c) for c in columns)
        if self._config.table is not None:
            # Straight from the table: only the projected columns are scanned.
            table = ".".join(quote_identifier(part) for part in self._config.table.split("."))
            sql = f"SELECT {projection} FROM {table}"  # noqa: S608 - identifiers validated by the config model, then quoted
        else:
            sql = f"SELECT {projection} FROM ({self._segment_sql()}) AS segment"  # noqa: S608 - the user's own segment SQL
        return sql if not skip else f"{sql} OFFSET {int(skip)}"

    def _relation(self, columns: list[str] | None, *, skip: int = 0) -> duckdb.DuckDBPyRelation:
        try:
            return self._connection.sql(self._read_sql(columns, skip=skip))
        except duckdb.Error as error:
            raise FatalError(f"activation '{self._activation}': the segment query failed: {error}") from None

    def schema(self) -> pa.Schema:
        """The segment's columns, under the names the table or query gives them.

        Binding the query names its columns and their DuckDB types without reading; the
        Arrow type of each distinct DuckDB type is then read from one column of that type
        (``LIMIT 0``): a ``SELECT *`` of a table 10,000 columns wide, even ``LIMIT 0``,
        allocates a vector per column and outgrows the cap. Names are the query's own, so
        two columns a join names alike (``email``, ``email``) stay alike, and the mapping
        refuses to guess (:func:`sync.mapping.resolve_attribute_types`); the wrapping
        ``SELECT`` would silently call the second one ``email_1``.
        """
        try:
            names = self._connection.sql(self._segment_sql()).columns
            wrapped = self._relation(None)
            unique_names, types = wrapped.columns, wrapped.types
            representatives: dict[str, str] = {}
            for name, duck_type in zip(unique_names, types, strict=True):
                representatives.setdefault(str(duck_type), name)
            sample = (
                self._connection.sql(self._read_sql(list(representatives.values()))).limit(0).to_arrow_table().schema
            )
        except duckdb.Error as error:
            raise FatalError(f"activation '{self._activation}': the segment query failed: {error}") from None
        arrow_types = dict(zip(representatives, sample.types, strict=True))
        return pa.schema(
            [pa.field(name, arrow_types[str(duck_type)]) for name, duck_type in zip(names, types, strict=True)]
        )

    def _bound_read(self, columns: list[str]) -> bool:
        """Size the connection's cap for the next read (unless the activation set one).

        Returns:
            Whether the read streams under a cap of ours, so that it may be retried under
            a larger one (:meth:`read_batches`).
        """
        if self._config.memory_limit is not None:
            return False
        # Set on every read: DuckDB shares one database (and its settings) between the
        # connections of a process to the same file.
        operators = plan_operators(self._connection, self._read_sql(columns))
        self._limit = read_memory_limit(operators, len(columns))
        self._connection.execute(f"SET memory_limit = {quote_literal(self._limit)}")
        if streams(operators):
            self._connection.execute("SET threads = 1")
            return True
        self._connection.execute("RESET threads")
        return False

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The mapped columns of every row, in record batches.

        A streamed read runs on one thread, so its rows come in the same order every
        time. When one under a cap of ours runs out of memory (one outsized value), it is
        started again under twice the cap, after the rows already yielded (``OFFSET``),
        up to :data:`STREAM_RETRY_CEILING_MB`. The rows before are read again, not sent
        again; the larger cap holds to the end of this read only.
        """
        retry = self._bound_read(columns)
        yielded = 0
        while True:
            relation = self._relation(columns, skip=yielded)
            started = time.perf_counter()
            try:
                reader = relation.to_arrow_reader(self._config.batch_rows)
                for batch in reader:
                    self._rows += batch.num_rows
                    self._batches += 1
                    yielded += batch.num_rows
                    self._seconds += time.perf_counter() - started
                    yield batch
                    started = time.perf_counter()
                return
            except (duckdb.Error, pa.ArrowException, OSError) as error:
                # Past the first batch, DuckDB's errors reach us through Arrow's stream
                # reader, as an OSError carrying DuckDB's message.
                if not isinstance(error, duckdb.OutOfMemoryException) and OUT_OF_MEMORY not in str(error):
                    raise FatalError(f"activation '{self._activation}': reading the segment failed: {error}") from None
                larger = self._larger_limit() if retry else None
                if larger is None:
                    raise FatalError(self._out_of_memory(error)) from None
                self._limit = larger
                self._connection.execute(f"SET memory_limit = {quote_literal(larger)}")

    def _larger_limit(self) -> str | None:
        """Twice the current cap of ours, or None past :data:`STREAM_RETRY_CEILING_MB`."""
        current = int(self._limit.removesuffix("MB"))
        if current >= STREAM_RETRY_CEILING_MB:
            return None
        return f"{min(STREAM_RETRY_CEILING_MB, max(2 * current, QUERY_MEMORY_LIMIT_MB // 4))}MB"

    def _out_of_memory(self, error: Exception) -> str:
        if self._config.memory_limit is not None:
            return (
                f"activation '{self._activation}': reading the segment needs more memory than "
                f"source.memory_limit allows ({self._limit}): set a larger one in the activation. "
                f"DuckDB said: {error}"
            )
        return (
            f"activation '{self._activation}': reading the segment needs more memory than cepsync gives a "
            f"read by default ({self._limit}; source.memory_limit is not set): set source.memory_limit "
            f"in the activation, for example 1GB. DuckDB said: {error}"
        )

    def local_segment(self) -> DuckDBSource:
        """This source as a :class:`sync.sources.base.LocalSegment`: the differ may query it here."""
        return self

    def segment_sql(self, columns: list[str]) -> str:
        """The SQL :meth:`read_batches` reads ``columns`` with."""
        return self._read_sql(columns)

    def differ_cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for the embedded differ's queries (its temporary tables live there)."""
        return self._connection.cursor()

    @contextmanager
    def differ_settings(self, cursor: duckdb.DuckDBPyConnection, memory_limit: str, *, sorts: bool) -> Iterator[None]:
        """The differ's settings while its queries run: up to :data:`DIFFER_THREADS` threads, ``memory_limit``.

        ``sorts``: the queries sort the segment's rows, on one thread (on two, a sort of
        166k of the benchmark's rows handed to Arrow ran out of memory under 128 MB; on one
        it passes under 64 MB).

        Under the activation's own ``source.memory_limit`` instead when it sets one.
        DuckDB's settings are the database's, not the cursor's: the read settings are put
        back after (each read sizes its own anyway, :meth:`_bound_read`). DuckDB's errors
        but running out of memory (the differ then streams) become the run's failure.
        """
        limit = self._config.memory_limit or memory_limit
        try:
            cursor.execute(f"SET memory_limit = {quote_literal(limit)}")
            cursor.execute(f"SET threads = {1 if sorts else DIFFER_THREADS}")
            yield
        except duckdb.OutOfMemoryException:
            raise
        except duckdb.Error as error:
            raise FatalError(f"activation '{self._activation}': comparing the segment failed: {error}") from None
        finally:
            # The blocks the differ's queries cached (up to their cap: every mapped column's)
            # are let go: DuckDB would keep them until the database closes, through the
            # run's commit, where its peak memory is (docs/how-a-run-works.md, "A local segment").
            with suppress(duckdb.Error):
                self._connection.execute(f"SET memory_limit = {quote_literal(RELEASE_MEMORY_LIMIT)}")
            self._connection.execute(f"SET memory_limit = {quote_literal(self._limit)}")
            self._connection.execute("SET threads = 1")

    def stats(self) -> dict[str, object]:
        return {
            "engine": "duckdb",
            "rows": self._rows,
            "batches": self._batches,
            "read_seconds": round(self._seconds, 3),
        }

    def close(self) -> None:
        self._connection.close()
        self._spill.cleanup()
