"""The results tables in BigQuery, appended with load jobs (docs/results.md, "Quotas").

Load jobs cost nothing, and each one is atomic. BigQuery allows 1,500 load jobs per table
per day (jobs that fail count too): a run issues one load job for ``cepsync_rejections``
(only when it rejected something) and one for ``cepsync_runs``, so at most 1,500 runs a day
can share one results dataset. The rejections are loaded first: a run that has its row in
``cepsync_runs`` has all its written rejections in ``cepsync_rejections``.

Both tables are partitioned by day on ``started_at`` (the run's start) and clustered by
activation, so a query on a few days of one activation reads only those partitions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from sync.bigquery_clients import MissingCredentials, open_bigquery
from sync.config import Activation, BigQuerySourceConfig
from sync.errors import ConfigError, FatalError
from sync.redact import redact
from sync.results.schema import REJECTIONS_COLUMNS, REJECTIONS_TABLE, RUNS_COLUMNS, RUNS_TABLE
from sync.sources.bigquery import API_RETRY

_CLUSTERING = {RUNS_TABLE: ["activation", "status"], REJECTIONS_TABLE: ["activation", "reason"]}
_LABEL_VALUE_LENGTH = 63

T = TypeVar("T")


class ResultsWriteError(FatalError):
    """The results could not be written (the sync itself is committed)."""


def bigquery_type(kind: pa.DataType) -> str:
    if pa.types.is_timestamp(kind):
        return "TIMESTAMP"
    if pa.types.is_int64(kind):
        return "INT64"
    if pa.types.is_float64(kind):
        return "FLOAT64"
    if pa.types.is_boolean(kind):
        return "BOOL"
    return "STRING"


def table_schema(columns: tuple[tuple[str, pa.DataType, bool], ...]) -> list[bigquery.SchemaField]:
    return [
        bigquery.SchemaField(name, bigquery_type(kind), mode="REQUIRED" if required else "NULLABLE")
        for name, kind, required in columns
    ]


def results_client(activation: Activation, environ: Mapping[str, str] | None = None) -> bigquery.Client:
    """A BigQuery client for the activation's results: Application Default Credentials, or the
    local emulator ``BIGQUERY_EMULATOR_HOST`` names (as the BigQuery source does). The caller
    closes it; no Storage Read client is opened (load jobs only)."""
    config = activation.source
    if not isinstance(config, BigQuerySourceConfig):
        raise ConfigError("results.dataset needs a BigQuery source", field="results.dataset")
    try:
        clients = open_bigquery(
            project=config.project,
            # No default location: each load job runs where the results dataset is.
            location=None,
            use_storage_api=False,
            environ=os.environ if environ is None else environ,
            activation=activation.name,
            field="results.dataset",
        )
    except MissingCredentials:
        raise ResultsWriteError(
            "no Google credentials found to write the results (Application Default Credentials)"
        ) from None
    return clients.client


def table_name(reference: bigquery.TableReference) -> str:
    return f"{reference.project}.{reference.dataset_id}.{reference.table_id}"


class BigQueryResults:
    """One activation's results dataset."""

    def __init__(self, client: bigquery.Client, dataset: str, *, activation: str, location: str | None = None) -> None:
        project, _, name = dataset.rpartition(".")
        self.client = client
        self.dataset = bigquery.DatasetReference(project or client.project, name)
        self.activation = activation
        self.location = location
        self.runs = self.dataset.table(RUNS_TABLE)
        self.rejections = self.dataset.table(REJECTIONS_TABLE)

    def ensure_tables(self) -> None:
        """Create both tables if missing (the dataset itself is Terraform's, infra/results.tf)."""
        for reference, columns in ((self.runs, RUNS_COLUMNS), (self.rejections, REJECTIONS_COLUMNS)):
            table = bigquery.Table(reference, schema=table_schema(columns))
            table.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field="started_at"
            )
            table.clustering_fields = _CLUSTERING[reference.table_id]
            table.description = "cepsync results (docs/results.md)"
            self._call(f"creating {reference.table_id}", partial(self.client.create_table, table, exists_ok=True))

    def write(self, runs: pa.Table, rejections: Path | None) -> dict[str, object]:
        """Load the rejections (if any), then the run's row: one load job per table."""
        self.ensure_tables()
        jobs: list[str] = []
        if rejections is not None:
            with rejections.open("rb") as file:
                jobs.append(self._load(self.rejections, file))
        buffer = io.BytesIO()
        pq.write_table(runs, buffer)
        buffer.seek(0)
        jobs.append(self._load(self.runs, buffer))
        return {
            "backend": "bigquery",
            "runs_table": table_name(self.runs),
            "rejections_table": table_name(self.rejections),
            "jobs": jobs,
        }

    def _load(self, table: bigquery.TableReference, file: BinaryIO) -> str:
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
            # A table created by an older version gains the columns this one adds.
            schema_update_options=[bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION],
        )
        label = self.activation[:_LABEL_VALUE_LENGTH]
        config.labels = {"cepsync_activation": label}

        def load() -> str:
            job = self.client.load_table_from_file(file, table, job_config=config, location=self.location)
            job.result(retry=API_RETRY)
            return str(job.job_id)

        return str(self._call(f"loading {table.table_id}", load))

    def _call(self, purpose: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except api_exceptions.GoogleAPICallError as error:
            hint = ""
            if isinstance(error, api_exceptions.NotFound):
                hint = f" (create the dataset {self.dataset.project}.{self.dataset.dataset_id} first: infra/results.tf)"
            raise ResultsWriteError(f"{purpose}: {redact(str(error.message))}{hint}") from error
