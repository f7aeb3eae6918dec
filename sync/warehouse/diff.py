"""The segment diff run as BigQuery SQL: only the changes leave the warehouse.

:class:`WarehouseDiff` is a :class:`sync.differ.Differ`, with the same output columns as
:class:`sync.diff.SegmentDiff`, so the engine maps, plans and sends its batches unchanged. Queries of a run
(sync/warehouse/sql.py has their text):

1. ``diff`` (:meth:`scan_ids`) is the run's one scan of the segment, so a delta is billed
   for the segment once: it hashes every row in SQL, joins it to the state table, and
   writes to its result table only the rows that are new, moved, or have a
   null/duplicated id, followed by the id scan's figures (row count, null ids, duplicated
   ids with their copies, how many ids have a stored fingerprint, and in mirror mode the
   ids that left).
2. ``id scan`` reads those figures from the result table: only they, the duplicated and
   the removed ids leave the warehouse at this point.
3. ``moved rows`` (:meth:`moved_rows`) and ``new and bad rows`` (:meth:`rows_to_send` in a
   delta) each read one part of that small table.
4. ``full pass`` (full passes only) returns every row with its stored fingerprint, ordered
   by Custom ID when the engine checkpoints a full pass: a full pass scans the segment twice.

Rows that leave the warehouse carry no row number (``__cepsync_row`` is NULL): BigQuery
has no stable row order, and numbering 100M rows would serialise the query on one worker.
Rejected rows are named by their Custom ID instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa
from google.cloud import bigquery

from sync.config import Activation, BigQuerySourceConfig
from sync.differ import DUPLICATE, KEY, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW, DiffRequest, IdScan
from sync.errors import ConfigError
from sync.sources.bigquery import parse_table_reference, query_parameters
from sync.warehouse import sql
from sync.warehouse.bq import Warehouse
from sync.warehouse.store import WarehouseFingerprints


class WarehouseDiff:
    """The differ of one run, in BigQuery (see the module docstring)."""

    def __init__(
        self,
        activation: Activation,
        warehouse: Warehouse,
        *,
        fingerprints: str,
        columns: Sequence[str],
        schema: pa.Schema,
        mapping_version: str,
        intents: Sequence[str] = (),
        unconfirmed: Sequence[str] = (),
        on_rows: Callable[[int], None] | None = None,
        on_no_state: Callable[[], None] | None = None,
    ) -> None:
        config = activation.source
        if not isinstance(config, BigQuerySourceConfig):
            raise ConfigError("diff mode 'warehouse' needs a BigQuery source", field="diff.mode")
        self._warehouse = warehouse
        self._activation = activation.name
        self._mirror = activation.sync_mode.value == "mirror"
        self._columns = list(columns)
        self._fingerprints = fingerprints
        if config.table is not None:
            reference = parse_table_reference(
                config.table, default_project=config.project or warehouse.client.project, activation=activation.name
            )
            self._segment = sql.table_sql(reference)
        else:
            assert config.query is not None
            self._segment = f"(\n{config.query}\n)"
        field_types = {c: _field_type(schema.field(c).type) for c in self._columns}
        self._key = sql.key_sql(self._columns[0], field_types[self._columns[0]])
        types = [f"{c}:{field_types[c]}" for c in self._columns]
        self._parameters: list[sql_parameter] = [
            *query_parameters(config.parameters, activation=activation.name),
            bigquery.ScalarQueryParameter("cepsync_activation", "STRING", activation.name),
            bigquery.ScalarQueryParameter("cepsync_salt", "STRING", sql.raw_salt(mapping_version, types)),
        ]
        self._intents = sorted(set(intents))
        # Ids an earlier run sent without a committed acknowledgement: their stored
        # fingerprints are read as zero, so they are mapped and sent again.
        self._unconfirmed = bigquery.ArrayQueryParameter("cepsync_unconfirmed", "STRING", sorted(set(unconfirmed)))
        self._output = pa.schema(
            [
                *(schema.field(c) for c in self._columns),
                pa.field(ROW, pa.int64()),
                pa.field(KEY, pa.string()),
                pa.field(RAW, pa.uint64()),
                pa.field(DUPLICATE, pa.bool_()),
                pa.field(STORED_RAW, pa.uint64()),
                pa.field(STORED_PAYLOAD, pa.uint64()),
                pa.field(STORED_ATTRIBUTES, pa.binary()),
            ]
        )
        self._on_rows = on_rows
        self._on_no_state = on_no_state
        self._diff_job: bigquery.QueryJob | None = None
        self.seconds = {"read": 0.0, "hash_and_diff": 0.0}
        self.orders_for_free = True  # BigQuery sorts a full pass on its side
        self.stored_count = 0

    @property
    def ledger(self) -> Warehouse:
        return self._warehouse

    def close(self) -> None:
        """Nothing to release: result tables are BigQuery's anonymous ones (kept 24 h)."""

    def _query(self, purpose: str, text: str, extra: Sequence[sql_parameter] = ()) -> bigquery.QueryJob:
        started = time.perf_counter()
        job = self._warehouse.query(purpose, text, [*self._parameters, *extra])
        self.seconds["hash_and_diff"] += time.perf_counter() - started
        return job

    def _read(self, job: bigquery.QueryJob) -> Iterator[pa.RecordBatch]:
        batches = self._warehouse.read(job, self._output)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.seconds["read"] += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def scan_ids(self) -> IdScan:
        """Run the diff (the one scan of the segment) and read the id scan's figures from its result."""
        diff = self._diff()
        if diff.destination is None:
            raise RuntimeError("the warehouse diff's query wrote no result table")
        job = self._query("id scan", sql.scan_result_sql(sql.table_sql(diff.destination)))
        schema = pa.schema([("kind", pa.string()), ("k", pa.string()), ("n", pa.int64())])
        counts: dict[str, int] = {}
        duplicates: dict[str, int] = {}
        removed: list[str] = []
        started = time.perf_counter()
        for batch in self._warehouse.read(job, schema, bulk=False):
            for kind, key, n in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                if kind == "duplicate":
                    duplicates[key] = int(n)
                elif kind == "removed":
                    removed.append(key)
                else:
                    counts[kind] = int(n or 0)
        self.seconds["read"] += time.perf_counter() - started
        if counts.get("stored", 0) == 0 and self._on_no_state is not None:
            # BigQuery holds no fingerprint of this activation: a first run, or state
            # left in the other mode's store (the hook refuses that one).
            self._on_no_state()
        matched = counts.get("matched", 0)
        self.stored_count = counts.get("synced", 0)
        if self._on_rows is not None:
            self._on_rows(counts.get("rows", 0))
        return IdScan(
            rows=counts.get("rows", 0),
            null_ids=counts.get("null_ids", 0),
            duplicates=duplicates,
            matched=matched,
            new_ids=counts.get("distinct", 0) - len(duplicates) - matched,
            removed=sorted(removed),
            synced=counts.get("synced", 0),
        )

    def _diff(self) -> bigquery.QueryJob:
        if self._diff_job is None:
            self._diff_job = self._query(
                "diff",
                sql.diff_sql(self._segment, self._columns, self._key, self._fingerprints),
                [
                    self._unconfirmed,
                    bigquery.ArrayQueryParameter("cepsync_intents", "STRING", self._intents),
                    bigquery.ScalarQueryParameter("cepsync_mirror", "BOOL", self._mirror),
                ],
            )
        return self._diff_job

    def _part(self, *, moved: bool) -> Iterator[pa.RecordBatch]:
        diff = self._diff()
        if diff.destination is None:
            return iter(())
        result = sql.table_sql(diff.destination)
        job = self._query("moved rows" if moved else "new and bad rows", sql.result_part_sql(result, moved=moved))
        return self._read(job)

    def moved_rows(self) -> Iterator[pa.RecordBatch]:
        """Rows with a stored fingerprint whose raw hash moved (not duplicated)."""
        return self._part(moved=True)

    def rows_to_send(self, *, full: bool, ordered: bool = False) -> Iterator[pa.RecordBatch]:
        """New rows and rows with a bad id; in a full pass, every row (ordered by Custom ID if asked)."""
        if not full:
            return self._part(moved=False)
        job = self._query(
            "full pass",
            sql.full_sql(self._segment, self._columns, self._key, self._fingerprints, ordered=ordered),
            [self._unconfirmed],
        )
        return self._read(job)


def _field_type(arrow: pa.DataType) -> str:
    if pa.types.is_string(arrow):
        return "STRING"
    if pa.types.is_int64(arrow):
        return "INT64"
    return str(arrow)


sql_parameter = bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter


class WarehouseDiffer:
    """The warehouse differ's factory: fingerprints in BigQuery, compared there.

    A :class:`sync.differ.DifferFactory`, built by ``sync.runtime.open_differ`` for an
    activation with ``diff: warehouse``. Every run it opens is refused (ConfigError) when
    BigQuery holds no fingerprint while the base store still does: the fingerprints were
    not carried over (``cepsync switch-diff``), and a run would send the whole segment.

    Args:
        activation: The activation (its BigQuery source and mapping).
        fingerprints: The activation's fingerprints in BigQuery (their warehouse runs the jobs).
        on_no_state: Called when BigQuery holds no fingerprint for the activation yet.
    """

    def __init__(
        self,
        activation: Activation,
        fingerprints: WarehouseFingerprints,
        *,
        on_no_state: Callable[[], None] | None = None,
    ) -> None:
        self._activation = activation
        self._fingerprints = fingerprints
        self._on_no_state = on_no_state

    @property
    def fingerprints(self) -> WarehouseFingerprints:
        return self._fingerprints

    def open(self, activation: str, request: DiffRequest) -> WarehouseDiff:
        store = self._fingerprints
        store.ensure_tables()
        return WarehouseDiff(
            self._activation,
            store.warehouse,
            fingerprints=store.fingerprints_sql,
            columns=request.columns,
            schema=request.schema,
            mapping_version=request.mapping_version,
            intents=request.intents,
            unconfirmed=request.unconfirmed,
            on_rows=request.on_rows,
            on_no_state=self._on_no_state,
        )

    def record(self) -> dict[str, object]:
        """The run record's ``warehouse`` entry: every BigQuery job of the run and its cost."""
        return {"warehouse": self._fingerprints.warehouse.ledger.as_record()}

    def close(self) -> None:
        self._fingerprints.close()
