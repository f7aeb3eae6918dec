"""BigQuery segment source: a query or a table, streamed as Arrow record batches.

How it talks to BigQuery, and why:

* ``schema()`` never reads rows. A table's schema comes from ``tables.get``; a query's from a
  **dry run**, which BigQuery does not bill (it only validates the SQL and estimates the bytes).
  A ``SELECT * FROM (query) LIMIT 0`` wrapper would be billed as a full scan of every column the
  query references: on-demand pricing charges bytes read, and ``LIMIT`` does not reduce them.
* ``read_batches()`` runs the query once, then reads its result table (or the segment table)
  with ``list_rows(selected_fields=...)``: through the **Storage Read API** when a read client is
  available (parallel Arrow streams, bounded queue), else by **REST paging** (``tabledata.list``).
  Reading the result table rather than iterating ``QueryJob.result()`` directly keeps the path
  deterministic (the client library silently skips the Storage API when the first REST page
  happens to hold the whole result) and fetches only the needed columns on both paths.
* Query parameters are always ``ScalarQueryParameter``s, never spliced into the SQL; a table
  reference is validated and passed as a :class:`~google.cloud.bigquery.TableReference`, never
  interpolated into SQL.
* Transient failures (429, 5xx, connection resets, ``rateLimitExceeded``/``backendError``) are
  retried with the client's own retry objects, bounded in time so a run stays inside its Cloud
  Functions budget. Everything else becomes a :class:`sync.errors.FatalError` subclass naming
  the activation; retries exhausted become a :class:`sync.errors.TransientError`.
* Fatal means "the same request will get the same answer": permission denied (403, gRPC
  PERMISSION_DENIED/UNAUTHENTICATED), not found (404, NOT_FOUND), an invalid query or
  argument (400, INVALID_ARGUMENT) and a result too large to receive (gRPC RESOURCE_EXHAUSTED
  "message larger than max", BigQuery ``responseTooLarge``) are fatal on both read paths, so
  the function does not ask Pub/Sub to redeliver them. Only a quota, a rate limit or an
  outage is transient, and the function bounds even those (infra/README.md).

Every batch is cast to the Arrow schema derived from the BigQuery schema (:func:`arrow_schema`),
so both read paths yield identical batches (the Storage API names list children ``l``, REST
``item``; REST tags DATETIME with extension metadata).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ParamSpec, TypedDict, TypeVar

import pyarrow as pa
from google.api_core import retry as api_retry
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY, DEFAULT_RETRY

# The clients are built in sync/bigquery_clients.py (one factory for every BigQuery user).
from sync.bigquery_clients import BigQueryClients, application_default_clients
from sync.config import BigQuerySourceConfig
from sync.errors import ConfigError

# Re-exported: the error classes live with their translation rule (sync/sources/bigquery_errors.py).
from sync.sources.bigquery_errors import BigQueryBytesLimitExceeded as BigQueryBytesLimitExceeded
from sync.sources.bigquery_errors import BigQueryNotFound as BigQueryNotFound
from sync.sources.bigquery_errors import BigQueryPermissionDenied as BigQueryPermissionDenied
from sync.sources.bigquery_errors import BigQueryQueryInvalid as BigQueryQueryInvalid
from sync.sources.bigquery_errors import BigQueryResultTooLarge as BigQueryResultTooLarge
from sync.sources.bigquery_errors import BigQuerySourceError as BigQuerySourceError
from sync.sources.bigquery_errors import BigQueryUnavailable as BigQueryUnavailable
from sync.sources.bigquery_errors import translate

if TYPE_CHECKING:
    from google.cloud.bigquery_storage import BigQueryReadClient

P = ParamSpec("P")
T = TypeVar("T")

# Bounded retries for API calls (jobs.insert, getQueryResults, tabledata.list, tables.get).
# The library default retries for 10 minutes; an event-triggered function dies at 540 s, so we
# stop well before and let the run be retried as a whole.
API_RETRY: api_retry.Retry = DEFAULT_RETRY.with_timeout(90.0).with_delay(initial=1.0, maximum=16.0)
# Bounded retries of a *failed job* (jobRateLimitExceeded, backendError...): the query restarts.
JOB_RETRY: api_retry.Retry = DEFAULT_JOB_RETRY.with_timeout(240.0).with_delay(initial=1.0, maximum=32.0)
# Most rows per batch handed to the engine: the tabledata.list page size on the REST path
# (BigQuery also caps a page at 10 MB), and the size larger Storage API pages are sliced to
# (zero-copy), so the mapping stage, which builds Python objects per row, works on bounded
# chunks whatever page size the server chose.
BATCH_ROWS = 20_000
# Storage Read streams read in parallel (one thread each, queue of one page per stream). A
# Cloud Function has 1-2 vCPUs: more streams would only add memory, not speed.
STORAGE_MAX_STREAMS = 4
# Parameter names: letters, digits and underscores, not starting with a digit, at most 128.
PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Table references: [project.]dataset.table. Project ids are lowercase letters, digits and
# hyphens (some legacy ids have uppercase); datasets are letters, digits and underscores; table
# names also allow hyphens. Stricter than BigQuery for tables (no Unicode, no spaces) on purpose:
# the reference lands in logs and run records.
_PROJECT_ID = r"[A-Za-z0-9][A-Za-z0-9-]{0,62}"
_DATASET_ID = r"[A-Za-z_][A-Za-z0-9_]{0,1023}"
_TABLE_ID = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,1023}"
TABLE_REFERENCE = re.compile(rf"^(?:(?P<project>{_PROJECT_ID})\.)?(?P<dataset>{_DATASET_ID})\.(?P<table>{_TABLE_ID})$")
# Job labels (cost attribution in INFORMATION_SCHEMA.JOBS): lowercase, digits, _ and -, <= 63.
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")

_SCALAR_TYPES: Mapping[str, pa.DataType] = {
    "STRING": pa.string(),
    "BYTES": pa.binary(),
    "INTEGER": pa.int64(),
    "INT64": pa.int64(),
    "FLOAT": pa.float64(),
    "FLOAT64": pa.float64(),
    "NUMERIC": pa.decimal128(38, 9),
    "BIGNUMERIC": pa.decimal256(76, 38),
    "BOOLEAN": pa.bool_(),
    "BOOL": pa.bool_(),
    "DATE": pa.date32(),
    "DATETIME": pa.timestamp("us"),
    "TIME": pa.time64("us"),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    # GEOGRAPHY arrives as WKT text and JSON as its text form on both read paths.
    "GEOGRAPHY": pa.string(),
    "JSON": pa.string(),
}


def arrow_type(field: bigquery.SchemaField) -> pa.DataType:
    """The Arrow type a BigQuery field is read as (REPEATED becomes a list).

    Raises:
        ValueError: for a field type this source does not read (e.g. RANGE, INTERVAL).
    """
    field_type = (field.field_type or "").upper()
    if field_type in ("RECORD", "STRUCT"):
        item: pa.DataType = pa.struct([_arrow_field(sub) for sub in field.fields])
    elif field_type in _SCALAR_TYPES:
        item = _SCALAR_TYPES[field_type]
    else:
        raise ValueError(f"column {field.name!r} has BigQuery type {field_type}, which cepsync does not read")
    return pa.list_(item) if field.mode == "REPEATED" else item


def _arrow_field(field: bigquery.SchemaField) -> pa.Field:
    # REQUIRED columns are declared non-nullable; a REPEATED column is never NULL (empty array).
    nullable = field.mode not in ("REQUIRED", "REPEATED")
    return pa.field(field.name, arrow_type(field), nullable=nullable)


def arrow_schema(fields: Sequence[bigquery.SchemaField]) -> pa.Schema:
    """The Arrow schema of a BigQuery schema, as :meth:`BigQuerySource.read_batches` yields it.

    STRING→string, INT64→int64, FLOAT64→float64, NUMERIC→decimal128(38, 9),
    BIGNUMERIC→decimal256(76, 38), BOOL→bool, DATE→date32, DATETIME→timestamp[us],
    TIME→time64[us], TIMESTAMP→timestamp[us, UTC], BYTES→binary, GEOGRAPHY/JSON→string,
    RECORD→struct, and any REPEATED field → list of its type.
    """
    return pa.schema([_arrow_field(field) for field in fields])


def parse_table_reference(table: str, *, default_project: str | None, activation: str) -> bigquery.TableReference:
    """``project.dataset.table`` or ``dataset.table`` → a TableReference, or a ConfigError.

    Checked here even though the config model checks too: a source may be built from a config
    made with ``model_construct`` or by code, and the reference must never reach an API call
    (let alone SQL) unless it is plain identifiers.
    """
    match = _check_table_reference(table, activation=activation)
    project = match.group("project") or default_project
    if project is None:
        raise ConfigError(
            f"BigQuery table {table!r} names no project and neither the source nor the client has one",
            source=f"activation '{activation}'",
            field="source.project",
        )
    return bigquery.TableReference(bigquery.DatasetReference(project, match.group("dataset")), match.group("table"))


def _check_table_reference(table: str, *, activation: str) -> re.Match[str]:
    match = TABLE_REFERENCE.match(table)
    if match is None:
        raise ConfigError(
            f"BigQuery table {table[:80]!r} must be project.dataset.table or dataset.table "
            "(letters, digits, _ and -; no quotes, spaces or SQL)",
            source=f"activation '{activation}'",
            field="source.table",
        )
    return match


def query_parameters(parameters: Mapping[str, object], *, activation: str) -> list[bigquery.ScalarQueryParameter]:
    """Named ``@parameters`` typed from their Python values (bool before int: bool is an int)."""
    result: list[bigquery.ScalarQueryParameter] = []
    for name, value in parameters.items():
        if not PARAMETER_NAME.match(name):
            raise ConfigError(
                f"query parameter name {name[:40]!r} must be letters, digits and _ (not starting with a digit)",
                source=f"activation '{activation}'",
                field="source.parameters",
            )
        if isinstance(value, bool):
            type_ = "BOOL"
        elif isinstance(value, int):
            type_ = "INT64"
        elif isinstance(value, float):
            type_ = "FLOAT64"
        elif isinstance(value, str):
            type_ = "STRING"
        else:
            raise ConfigError(
                f"query parameter {name!r} has unsupported type {type(value).__name__}",
                source=f"activation '{activation}'",
                field="source.parameters",
            )
        result.append(bigquery.ScalarQueryParameter(name, type_, value))
    return result


class _Stats(TypedDict):
    """The run record's facts about the read (see :meth:`BigQuerySource.stats`)."""

    engine: str
    segment: str
    table: str | None
    rows: int
    batches: int
    read_seconds: float
    bytes_estimated: int | None
    bytes_processed: int | None
    bytes_billed: int | None
    cache_hit: bool | None
    job_id: str | None
    location: str | None
    read_path: str | None


class BigQuerySource:
    """Reads one segment (a query or a table) from BigQuery.

    Args:
        config: The activation's ``source`` block.
        activation: The activation name, used in every error message and as a job label.
        client: A BigQuery client. Default: ``bigquery.Client(project=config.project,
            location=config.location)`` with Application Default Credentials.
        read_client: A Storage Read API client. Default: one with the default client's
            credentials when ``use_storage_api`` is set, no ``client`` was injected and
            ``google-cloud-bigquery-storage`` is installed. A caller that injects ``client``
            (another endpoint, other credentials) injects the matching read client too;
            without one the source pages over REST.
        retry: Retry policy for API calls (default :data:`API_RETRY`).
        job_retry: Retry policy for failed query jobs (default :data:`JOB_RETRY`).
        batch_rows: Most rows per yielded batch (default :data:`BATCH_ROWS`).

    Raises:
        ConfigError: an invalid table reference or query parameter (before any API call), or no
            Application Default Credentials (or project) for the default client.
    """

    # The raw hash's salt (sync.sources.base.Source.engine): the class name it always was.
    engine = "BigQuerySource"

    def __init__(
        self,
        config: BigQuerySourceConfig,
        *,
        activation: str,
        client: bigquery.Client | None = None,
        read_client: BigQueryReadClient | None = None,
        retry: api_retry.Retry | None = None,
        job_retry: api_retry.Retry | None = None,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self._config = config
        self._activation = activation
        self._retry = API_RETRY if retry is None else retry
        self._job_retry = JOB_RETRY if job_retry is None else job_retry
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self._batch_rows = batch_rows
        # Validate everything the config says before creating clients or calling anything.
        self._parameters = query_parameters(config.parameters, activation=activation) if config.query else []
        if config.table is not None:
            # Checked before a client exists, so a hostile reference never reaches any call.
            _check_table_reference(config.table, activation=activation)
        if config.query is None and config.table is None:
            raise ConfigError("give exactly one of 'query' or 'table'", source=self._where, field="source")

        # The clients this source opened itself (closed by close()); injected ones are the caller's.
        self._owned: BigQueryClients | None = None
        if client is None:
            self._owned = application_default_clients(
                project=config.project,
                location=config.location,
                use_storage_api=config.use_storage_api and read_client is None,
                activation=activation,
            )
            client = self._owned.client
            if read_client is None:
                read_client = self._owned.read_client
        self._client = client
        self._read_client = read_client if config.use_storage_api else None

        self._table_ref = (
            parse_table_reference(config.table, default_project=config.project or client.project, activation=activation)
            if config.table is not None
            else None
        )
        self._source_schema: list[bigquery.SchemaField] | None = None
        self._open_batches: Iterator[pa.RecordBatch] | None = None
        # The query's result table and schema once it ran: later reads of the run reuse it.
        self._result: tuple[bigquery.TableReference, list[bigquery.SchemaField]] | None = None
        self._stats: _Stats = {
            "engine": "bigquery",
            "segment": "table" if self._table_ref is not None else "query",
            "table": str(self._table_ref) if self._table_ref is not None else None,
            "rows": 0,
            "batches": 0,
            "read_seconds": 0.0,
            "bytes_estimated": None,
            "bytes_processed": None,
            "bytes_billed": None,
            "cache_hit": None,
            "job_id": None,
            "location": config.location,
            "read_path": None,
        }

    @property
    def _where(self) -> str:
        return f"activation '{self._activation}'"

    # --- schema -------------------------------------------------------------------------------

    def schema(self) -> pa.Schema:
        """The segment's columns as Arrow types, without reading a row.

        A table: ``tables.get``. A query: a dry run (free on BigQuery; validates the SQL and the
        parameters, so a bad query fails here, before the run takes its lease).
        """
        fields = self._bigquery_schema()
        try:
            return arrow_schema(fields)
        except ValueError as error:
            raise ConfigError(str(error), source=self._where, field="source") from None

    def _bigquery_schema(self) -> list[bigquery.SchemaField]:
        if self._source_schema is not None:
            return self._source_schema
        if self._table_ref is not None:
            table = self._call("reading the table's schema", self._client.get_table, self._table_ref, retry=self._retry)
            if table.table_type not in (None, "TABLE", "MATERIALIZED_VIEW", "SNAPSHOT", "EXTERNAL"):
                # tabledata.list and the Storage API cannot read a logical VIEW.
                raise ConfigError(
                    f"BigQuery {str(table.table_type).lower()} {self._table_ref} cannot be read as a table: "
                    "use a 'query' that selects from it instead",
                    source=self._where,
                    field="source.table",
                )
            self._source_schema = list(table.schema)
        else:
            job = self._call("validating the query (dry run)", self._start_query, dry_run=True)
            self._stats["bytes_estimated"] = job.total_bytes_processed
            if not job.schema:
                raise ConfigError(
                    "the query returns no columns (a script or DDL is not a segment: end with one SELECT)",
                    source=self._where,
                    field="source.query",
                )
            self._source_schema = list(job.schema)
        return self._source_schema

    # --- reading ------------------------------------------------------------------------------

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The segment's rows, only ``columns`` (in that order), as Arrow record batches.

        Raises:
            ConfigError: a requested column is not in the segment.
            BigQuerySourceError: BigQuery refused the query or the read (a FatalError).
            BigQueryUnavailable: BigQuery stayed unavailable through the bounded retries.
        """
        if not columns:
            # BigQuery reads every column when selected_fields is empty: never what was meant.
            raise ConfigError("no columns to read", source=self._where, field="mapping")
        # Checked now, against the table schema or the dry run's, so a missing column fails
        # before the query runs (and is billed), not at the first batch.
        self._select(self._bigquery_schema(), columns)
        batches = self._read(columns)
        self._open_batches = batches
        return batches

    def _read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        started = time.perf_counter()
        if self._table_ref is not None:
            fields = self._select(self._bigquery_schema(), columns)
            source: bigquery.Table | bigquery.TableReference = self._table_ref
        elif self._result is not None:
            # A later read of the same run (the engine reads the id column, then the rows):
            # the query's result table again, one consistent snapshot, no second job.
            destination, result_fields = self._result
            fields = self._select(result_fields, columns)
            source = destination
        else:
            job = self._call("running the query", self._start_query, dry_run=False)
            self._stats["job_id"] = job.job_id
            # result() with no page size asks getQueryResults for zero rows: it only waits.
            self._call("running the query", job.result, retry=self._retry)
            self._stats["bytes_processed"] = job.total_bytes_processed
            self._stats["bytes_billed"] = job.total_bytes_billed
            self._stats["cache_hit"] = job.cache_hit
            self._stats["location"] = job.location
            if job.destination is None:
                raise ConfigError(
                    "the query produced no result table (a script or DDL is not a segment: end with one SELECT)",
                    source=self._where,
                    field="source.query",
                )
            # The job's final schema is authoritative (the dry run's is an estimate of it).
            result_fields = list(job.schema or self._bigquery_schema())
            fields = self._select(result_fields, columns)
            source = job.destination
            self._result = (job.destination, result_fields)
        target = arrow_schema(fields)
        rows = self._call(
            "reading the segment",
            self._client.list_rows,
            source,
            selected_fields=fields,
            page_size=None if self._read_client is not None else self._batch_rows,
            retry=self._retry,
        )
        self._stats["read_path"] = "storage_api" if self._read_client is not None else "rest_paging"
        if self._read_client is not None:
            stream = rows.to_arrow_iterable(bqstorage_client=self._read_client, max_stream_count=STORAGE_MAX_STREAMS)
        else:
            stream = rows.to_arrow_iterable()
        self._stats["read_seconds"] += time.perf_counter() - started
        iterator = iter(stream)
        try:
            while True:
                started = time.perf_counter()
                batch = self._call("reading the segment", next, iterator, None)
                self._stats["read_seconds"] += time.perf_counter() - started
                if batch is None:
                    break
                if batch.num_rows == 0:
                    continue
                batch = self._conform(batch, target)
                for offset in range(0, batch.num_rows, self._batch_rows):
                    chunk = batch.slice(offset, self._batch_rows)
                    self._stats["rows"] += chunk.num_rows
                    self._stats["batches"] += 1
                    yield chunk
        finally:
            # Stops the Storage API worker threads when the consumer stops early.
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            self._stats["read_seconds"] = round(self._stats["read_seconds"], 3)

    def _select(self, fields: Sequence[bigquery.SchemaField], columns: list[str]) -> list[bigquery.SchemaField]:
        by_name = {field.name: field for field in fields}
        missing = [column for column in columns if column not in by_name]
        if missing:
            folded = {field.name.casefold(): field.name for field in fields}
            hints = [
                f"{column!r} (the segment has {folded[column.casefold()]!r})"
                for column in missing
                if column.casefold() in folded
            ]
            detail = f"; names are case-sensitive here: {', '.join(hints)}" if hints else ""
            available = ", ".join(field.name for field in fields[:30])
            raise ConfigError(
                f"column(s) {', '.join(repr(c) for c in missing)} not in the segment "
                f"(it has: {available}{', ...' if len(fields) > 30 else ''}){detail}",
                source=self._where,
                field="mapping",
            )
        try:
            for column in columns:
                arrow_type(by_name[column])
        except ValueError as error:
            raise ConfigError(str(error), source=self._where, field="mapping") from None
        return [by_name[column] for column in columns]

    def _conform(self, batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
        """Order the columns as asked and cast to the one schema both read paths share."""
        try:
            arrays = [batch.column(field.name) for field in target]
        except KeyError as error:
            raise BigQuerySourceError(
                f"BigQuery returned a batch without column {error}", activation=self._activation
            ) from None
        projected = pa.RecordBatch.from_arrays(arrays, names=target.names)
        if projected.schema.equals(target, check_metadata=True):
            return projected
        try:
            return projected.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise BigQuerySourceError(
                f"BigQuery returned data that does not fit the segment schema: {error}", activation=self._activation
            ) from None

    def _start_query(self, *, dry_run: bool) -> bigquery.QueryJob:
        assert self._config.query is not None
        job_config = bigquery.QueryJobConfig(
            dry_run=dry_run,
            # A dry run must not be answered from the cache: it would report 0 bytes.
            use_query_cache=not dry_run,
            use_legacy_sql=False,
            query_parameters=self._parameters,
        )
        # Only set when given: an explicit null is refused by stricter JSON validators.
        if self._config.maximum_bytes_billed is not None:
            job_config.maximum_bytes_billed = self._config.maximum_bytes_billed
        if _LABEL_VALUE.match(self._activation):
            job_config.labels = {"cepsync_activation": self._activation}
        return self._client.query(
            self._config.query,
            job_config=job_config,
            project=self._config.project,
            location=self._config.location,
            retry=self._retry,
            job_retry=None if dry_run else self._job_retry,
        )

    # --- errors -------------------------------------------------------------------------------

    def _call(self, action: str, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)``, its failure translated (:func:`sync.sources.bigquery_errors.translate`)."""
        try:
            return function(*args, **kwargs)
        except (ConfigError, BigQuerySourceError, BigQueryUnavailable):
            raise
        except Exception as error:
            translated = translate(
                error,
                action=action,
                activation=self._activation,
                maximum_bytes_billed=self._config.maximum_bytes_billed,
            )
            if translated is None:
                raise
            raise translated from None

    # --- run record ---------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Facts for the run record.

        Keys: ``rows``, ``batches``, ``read_seconds``, ``bytes_estimated`` (dry run),
        ``bytes_processed``, ``bytes_billed``, ``cache_hit``, ``job_id``, ``location`` (query
        segments; ``None`` for a table, which runs no job), ``read_path`` (``"storage_api"`` or
        ``"rest_paging"``), ``segment`` (``"query"``/``"table"``), ``table``, ``engine``.
        """
        return dict(self._stats)

    def close(self) -> None:
        """Stop an unfinished read and close the clients this source created (not injected ones)."""
        if self._open_batches is not None:
            close = getattr(self._open_batches, "close", None)
            if close is not None:
                close()
            self._open_batches = None
        if self._owned is not None:
            self._owned.close()
