"""The engine's hook into the results tables (docs/results.md).

:func:`collector` is called once the run holds its lease; it tees the run's rejected rows
into a :class:`~sync.results.schema.RejectionSpool`. :meth:`ResultsCollector.finish` is
called after the run ended: the sync is committed, its record saved and its lease released.
It writes the tables, and whatever happens it never raises: a failure to write is logged and
kept in the run record as ``results_error`` (the record is saved again either way).
Nothing of BigQuery is imported unless the activation writes to BigQuery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from sync.config import Activation, DuckDBSourceConfig
from sync.logs import get_logger
from sync.record import RunRecord
from sync.redact import redact
from sync.sources.base import Source
from sync.state.base import StateStore

log = get_logger("cepsync.results")

# The engine's rejects sink (sync.runbook.RejectSink): one rejected row as a record.
Rejects = Callable[[dict[str, object]], None]


class ResultsCollector:
    """One run's results: its rejected rows as they come, then both tables at the end."""

    def __init__(self, activation: Activation, run: RunRecord, environ: Mapping[str, str] | None = None) -> None:
        assert activation.results is not None
        # The tables' schema (and pyarrow.parquet) loads for an activation with results only.
        from sync.results.schema import RejectionSpool

        self.activation = activation
        self.config = activation.results
        self.environ = environ
        self.spool = RejectionSpool(
            started_at=run.started_at,
            include_values=self.config.include_values,
            max_rows=self.config.max_rejection_rows,
        )

    def tee(self, rejects: Rejects | None) -> Rejects:
        """The run's rejects callback: the spool, then the caller's (``--rejects``) if any."""
        spool = self.spool

        def both(rejected: dict[str, object]) -> None:
            spool.add(rejected)
            if rejects is not None:
                rejects(rejected)

        return both

    @property
    def database(self) -> str | None:
        """The DuckDB file the results go to (None: BigQuery)."""
        source = self.activation.source
        if self.config.database is not None:
            return self.config.database
        if isinstance(source, DuckDBSourceConfig):
            return source.database
        return None

    def finish(self, run: RunRecord, store: StateStore, source: Source | None = None) -> None:
        """Write both tables, note the outcome in the record and save it. Never raises."""
        from sync.results.schema import run_row  # loaded by __init__ already

        started = time.monotonic()
        try:
            tally = self.spool.finish()
            rows = run_row(
                run.to_dict(), tally=tally, include_values=self.config.include_values, written_at=datetime.now(UTC)
            )
            rejections = self.spool.path if tally.written else None
            database = self.database
            written: dict[str, object]
            if database is not None:
                from sync.results import duckdb as duckdb_results

                segment = self.activation.source
                if (
                    source is not None
                    and isinstance(segment, DuckDBSourceConfig)
                    and Path(database).resolve() == Path(segment.database).resolve()
                ):
                    # The run is over; the source's read-only connection would keep the
                    # file from being opened for writing in this process.
                    source.close()
                written = duckdb_results.write(database, rows, rejections, spill_directory=self.spool.path.parent)
            else:
                written = self._write_bigquery(rows, rejections)
            written["rejections_written"] = tally.written
            if tally.not_written:
                written["rejections_not_written"] = tally.not_written
            written["seconds"] = round(time.monotonic() - started, 3)
            run.extra["results"] = written
            run.extra.pop("results_error", None)
        except Exception as error:
            message = redact(f"{type(error).__name__}: {error}" if not str(error) else str(error))
            run.extra["results_error"] = f"the results tables were not written: {message}"
            log.error("results not written", activation=self.activation.name, run_id=run.run_id, error=message)
        finally:
            self.spool.close()
        try:
            store.save_run(run.to_dict())
        except Exception as error:
            log.error("run record not updated with the results outcome", run_id=run.run_id, error=str(error))

    def _write_bigquery(self, rows: pa.Table, rejections: Path | None) -> dict[str, object]:
        from sync.results.bigquery import BigQueryResults, results_client

        assert self.config.dataset is not None
        client = results_client(self.activation, self.environ)
        try:
            writer = BigQueryResults(client, self.config.dataset, activation=self.activation.name)
            return writer.write(rows, rejections)
        finally:
            client.close()  # type: ignore[no-untyped-call]


def collector(activation: Activation, run: RunRecord) -> ResultsCollector | None:
    """The run's results collector, or None when the activation writes no results."""
    if activation.results is None:
        return None
    return ResultsCollector(activation, run)
