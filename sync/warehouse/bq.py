"""BigQuery jobs of a warehouse-diff run: every query capped, every job on the cost ledger.

* Every query carries ``maximum_bytes_billed`` (``diff.maximum_bytes_billed``) and a
  ``cepsync_activation`` label, and only named parameters.
* Every job (query or load) lands on the :class:`Ledger`: job id, bytes processed and
  billed, slot-ms. The run record shows it under ``warehouse.jobs``.
* Results are read from the job's result table (Storage Read API when a read client is
  given, REST paging otherwise) and cast to the Arrow types the engine expects.
* BigQuery errors become the BigQuery source's error classes: fatal for a refused query
  or a bytes cap, transient for quota/rate/outage.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from sync.redact import redact
from sync.sources.bigquery import (
    API_RETRY,
    BATCH_ROWS,
    JOB_RETRY,
    STORAGE_MAX_STREAMS,
    BigQueryBytesLimitExceeded,
    BigQueryNotFound,
    BigQueryPermissionDenied,
    BigQueryQueryInvalid,
    BigQuerySourceError,
    BigQueryUnavailable,
)

if TYPE_CHECKING:
    from google.cloud.bigquery_storage import BigQueryReadClient

Parameter = bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


class Job(TypedDict, total=False):
    """One BigQuery job on the ledger (the run record's ``warehouse.jobs``, docs/warehouse-diff.md)."""

    purpose: str
    job_id: str | None
    bytes_processed: int | None
    bytes_billed: int | None
    slot_ms: int | None
    rows_out: int
    seconds: float
    read_path: str
    read_seconds: float


_COSTS: Final = ("bytes_processed", "bytes_billed", "slot_ms", "rows_out")


@dataclass
class Ledger:
    """Every BigQuery job the run issued, with what it cost."""

    jobs: list[Job] = field(default_factory=list)

    def as_record(self) -> dict[str, object]:
        def total(key: str) -> int:
            return sum(_cost(job, key) for job in self.jobs)

        return {
            "jobs": list(self.jobs),
            "bytes_processed": total("bytes_processed"),
            "bytes_billed": total("bytes_billed"),
            "slot_ms": total("slot_ms"),
            "rows_out": total("rows_out"),
        }


def _cost(job: Job, key: str) -> int:
    value = job.get(key)
    return value if isinstance(value, int) else 0


class Warehouse:
    """The BigQuery client of one activation's warehouse diff and state."""

    def __init__(
        self,
        client: bigquery.Client,
        *,
        activation: str,
        read_client: BigQueryReadClient | None = None,
        location: str | None = None,
        maximum_bytes_billed: int | None = None,
        closers: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.client = client
        self.read_client = read_client
        self.activation = activation
        self.location = location
        self.maximum_bytes_billed = maximum_bytes_billed
        self.ledger = Ledger()
        self._closers = list(closers)

    def close(self) -> None:
        """Close the clients built for this warehouse (not injected ones)."""
        for close in reversed(self._closers):
            close()
        self._closers.clear()

    def query(self, purpose: str, sql: str, parameters: Sequence[Parameter] = ()) -> bigquery.QueryJob:
        """Run one statement and wait for it; its cost goes on the ledger."""
        config = bigquery.QueryJobConfig(use_legacy_sql=False, query_parameters=list(parameters))
        if self.maximum_bytes_billed is not None:
            config.maximum_bytes_billed = self.maximum_bytes_billed
        if _LABEL_VALUE.match(self.activation):
            config.labels = {"cepsync_activation": self.activation}
        started = time.perf_counter()
        try:
            job = self.client.query(
                sql, job_config=config, location=self.location, retry=API_RETRY, job_retry=JOB_RETRY
            )
            job.result(retry=API_RETRY)
        except api_exceptions.GoogleAPICallError as error:
            raise self.translate(purpose, error) from error
        self.ledger.jobs.append(
            {
                "purpose": purpose,
                "job_id": job.job_id,
                "bytes_processed": job.total_bytes_processed,
                "bytes_billed": job.total_bytes_billed,
                "slot_ms": job.slot_millis,
                "rows_out": 0,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        return job

    def read(self, job: bigquery.QueryJob, schema: pa.Schema, *, bulk: bool = True) -> Iterator[pa.RecordBatch]:
        """The job's result rows, cast to ``schema`` (int64 hashes reinterpreted as uint64).

        ``bulk`` results (rows of the segment, fingerprints) go through the Storage Read API
        when there is a read client, in batches of at most :data:`BATCH_ROWS`; the id scan's
        few rows page over REST, which saves a read session.
        """
        entry = next(e for e in reversed(self.ledger.jobs) if e["job_id"] == job.job_id)
        if job.destination is None:
            return
        storage = bulk and self.read_client is not None
        entry["read_path"] = "storage_api" if storage else "rest_paging"
        entry["read_seconds"] = 0.0
        entry.setdefault("rows_out", 0)
        stream: Iterator[pa.RecordBatch] | None = None
        try:
            started = time.perf_counter()
            rows = self.client.list_rows(job.destination, page_size=None if storage else BATCH_ROWS, retry=API_RETRY)
            if storage:
                stream = iter(
                    rows.to_arrow_iterable(bqstorage_client=self.read_client, max_stream_count=STORAGE_MAX_STREAMS)
                )
            else:
                stream = iter(rows.to_arrow_iterable())
            while True:
                batch = next(stream, None)
                entry["read_seconds"] = round(entry.get("read_seconds", 0.0) + time.perf_counter() - started, 3)
                if batch is None:
                    return
                for offset in range(0, batch.num_rows, BATCH_ROWS):
                    chunk = batch.slice(offset, BATCH_ROWS)
                    entry["rows_out"] = entry.get("rows_out", 0) + chunk.num_rows
                    yield conform(chunk, schema)
                started = time.perf_counter()
        except api_exceptions.GoogleAPICallError as error:
            raise self.translate("reading a result", error) from error
        finally:
            # Stops the Storage API worker threads when the consumer stops early.
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def load(self, purpose: str, table: bigquery.TableReference, rows: pa.Table) -> None:
        """Append ``rows`` with one load job: all of them or none (a load job is atomic)."""
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)
        buffer.seek(0)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET, write_disposition=bigquery.WriteDisposition.WRITE_APPEND
        )
        started = time.perf_counter()
        try:
            job = self.client.load_table_from_file(buffer, table, job_config=config, location=self.location)
            job.result(retry=API_RETRY)
        except api_exceptions.GoogleAPICallError as error:
            raise self.translate(purpose, error) from error
        self.ledger.jobs.append(
            {
                "purpose": purpose,
                "job_id": job.job_id,
                "bytes_processed": 0,
                "bytes_billed": 0,
                "slot_ms": 0,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )

    def translate(self, purpose: str, error: api_exceptions.GoogleAPICallError) -> Exception:
        reasons = {str(item.get("reason")) for item in (error.errors or []) if isinstance(item, dict)}
        message = f"warehouse diff, {purpose}: {redact(str(error.message))}"
        if "bytesBilledLimitExceeded" in reasons:
            return BigQueryBytesLimitExceeded(
                message + " (raise diff.maximum_bytes_billed if this is expected)",
                activation=self.activation,
                reason="bytesBilledLimitExceeded",
            )
        if isinstance(error, api_exceptions.TooManyRequests | api_exceptions.ServerError) or reasons & {
            "rateLimitExceeded",
            "backendError",
            "quotaExceeded",
        }:
            return BigQueryUnavailable(message, activation=self.activation)
        if isinstance(error, api_exceptions.Forbidden | api_exceptions.Unauthorized):
            return BigQueryPermissionDenied(message, activation=self.activation)
        if isinstance(error, api_exceptions.NotFound):
            return BigQueryNotFound(message, activation=self.activation)
        if isinstance(error, api_exceptions.BadRequest):
            return BigQueryQueryInvalid(message, activation=self.activation)
        return BigQuerySourceError(message, activation=self.activation)


def to_signed(values: pa.Array) -> pa.Array:
    """uint64 hashes as the INT64 BigQuery stores (same 64 bits)."""
    return values.cast(pa.uint64()).view(pa.int64())


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for target in schema:
        column = batch.column(target.name)
        if pa.types.is_uint64(target.type) and pa.types.is_int64(column.type):
            column = column.view(pa.uint64())
        elif not column.type.equals(target.type):
            column = column.cast(target.type)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
