"""Fingerprints in BigQuery, everything else in the usual store: the warehouse-diff state.

:class:`WarehouseStateStore` is a :class:`sync.state.base.StateStore` that composes two:

* the **base store** (Firestore in production, SQLite locally) keeps the lease, the mirror
  intents, the activation meta (continuation checkpoint included), run records and
  delivery counts, exactly as in ``diff: function``;
* **BigQuery** keeps the acknowledged fingerprints, in three tables of the dataset the
  activation names (``diff.dataset``):

  ``cepsync_fingerprints``  activation, custom_id, raw, payload, token, flush, pos, acknowledged_at
  ``cepsync_journal``       the same plus ``put`` (false = a mirror removal); append-only
  ``cepsync_fence``         activation, token: the lease tokens that registered to merge

How a fingerprint moves:

1. :meth:`commit` (each journal flush of the engine) appends the acknowledged entries to
   the journal with **one load job**. A load job is atomic (all rows or none), free, and its
   rows can be merged and deleted at once (no streaming buffer). Its cost is a quota: 1,500
   load jobs per table per day, which is why ``diff: warehouse`` requires journal flushes of
   at least 30 s / 100,000 profiles (sync/config.py). The Storage Write API has no such
   quota, but its committed rows are not atomic per flush without pending streams, and the
   local emulator does not implement it.
2. :meth:`compact` (at the start of a run, recovering a crashed one, and at its end)
   registers the lease token in the fence table, then runs one ``MERGE`` of the journal into
   the state table and one ``DELETE`` of the merged journal rows. Both are conditioned *in
   SQL* on ``@token = MAX(token)`` of the fence: once a newer run registered, a stale run's
   merge changes nothing, whatever it believes about its lease. The merge keeps the newest
   ``(token, flush, pos)`` per id and is idempotent, so a crash during it (BigQuery applies
   a statement atomically) or between it and the delete is repaired by the next compact.
   Two DML statements per run keep far below BigQuery's mutating-DML concurrency (2 running
   and 20 queued per table).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
from google.cloud import bigquery

from sync.errors import ConfigError, LeaseLost
from sync.model import ActivationMeta, Fingerprint, IntentsNote, JournalEntry, Lease, Refusal
from sync.state import core
from sync.state.base import FINGERPRINT_SCHEMA, CountsOperations, StateStore, operation_counts
from sync.warehouse import sql
from sync.warehouse.bq import Warehouse, to_signed


def dataset_reference(dataset: str, default_project: str) -> bigquery.DatasetReference:
    project, _, name = dataset.rpartition(".")
    return bigquery.DatasetReference(project or default_project, name)


class WarehouseStateStore:
    """A StateStore whose fingerprints live in BigQuery (see the module docstring)."""

    def __init__(self, base: StateStore, warehouse: Warehouse, dataset: bigquery.DatasetReference) -> None:
        self.base = base
        self.warehouse = warehouse
        self.dataset = dataset
        self.fingerprints = dataset.table(sql.FINGERPRINTS)
        self.journal = dataset.table(sql.JOURNAL)
        self.fence = dataset.table(sql.FENCE)
        self._fingerprints_sql = sql.table_sql(self.fingerprints)
        self._journal_sql = sql.table_sql(self.journal)
        self._fence_sql = sql.table_sql(self.fence)
        self._flushes = itertools.count(1)
        self._registered: tuple[str, int] | None = None
        self._tables_ready = False

    @property
    def backend(self) -> str:
        """Fingerprints in BigQuery; the lease, intents and run records in the base store."""
        base = self.base
        return f"bigquery+{base.backend if isinstance(base, CountsOperations) else type(base).__name__}"

    def op_counts(self) -> dict[str, int]:
        """The base store's counters (BigQuery's costs are in the record's ``warehouse`` entry)."""
        return operation_counts(self.base) or {}

    # -- BigQuery tables ------------------------------------------------------------------
    def ensure_tables(self) -> None:
        """Create the three tables if missing (the dataset itself comes from Terraform)."""
        if self._tables_ready:
            return
        for reference, schema, clustering in (
            (self.fingerprints, sql.FINGERPRINTS_SCHEMA, ["activation", "custom_id"]),
            (self.journal, sql.JOURNAL_SCHEMA, ["activation", "custom_id"]),
            (self.fence, sql.FENCE_SCHEMA, ["activation"]),
        ):
            table = bigquery.Table(reference, schema=schema)
            table.clustering_fields = clustering
            self.warehouse.client.create_table(table, exists_ok=True)
        self._tables_ready = True

    def _params(self, activation: str, token: int | None = None) -> list[bigquery.ScalarQueryParameter]:
        params = [bigquery.ScalarQueryParameter("cepsync_activation", "STRING", activation)]
        if token is not None:
            params.append(bigquery.ScalarQueryParameter("cepsync_token", "INT64", token))
        return params

    @property
    def fingerprints_sql(self) -> str:
        return self._fingerprints_sql

    # -- fingerprints ---------------------------------------------------------------------
    def load_fingerprint_table(self, activation: str) -> pa.Table:
        """Every acknowledged fingerprint, the journal applied (used to switch back, and by tests)."""
        self.ensure_tables()
        job = self.warehouse.query(
            "load fingerprints", sql.folded_sql(self._fingerprints_sql, self._journal_sql), self._params(activation)
        )
        batches = list(self.warehouse.read(job, FINGERPRINT_SCHEMA))
        return pa.Table.from_batches(batches, schema=FINGERPRINT_SCHEMA)

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        table = self.load_fingerprint_table(activation)
        return {
            custom_id: Fingerprint(raw, payload)
            for custom_id, raw, payload in zip(
                table.column("custom_id").to_pylist(),
                table.column("raw").to_pylist(),
                table.column("payload").to_pylist(),
                strict=True,
            )
        }

    def commit(self, lease: Lease, entries: Sequence[JournalEntry] | pa.Table, now: datetime) -> None:
        """Append acknowledged entries to the journal: one load job, all rows or none (fenced)."""
        self.base.compact(lease, now)  # raises LeaseLost for a stale lease before anything is written
        if isinstance(entries, pa.Table):
            table = core.journal_table(lease.activation, entries)
            if table.num_rows:
                ids, raws, payloads, puts = (table.column(name).combine_chunks() for name in table.column_names)
                self.append(lease, ids, raws, payloads, puts, now)
            return
        if not entries:
            return
        raws = [0 if e.fingerprint is None else e.fingerprint.raw for e in entries]
        payloads = [0 if e.fingerprint is None else e.fingerprint.payload for e in entries]
        self.append(
            lease,
            pa.array([e.custom_id for e in entries], pa.string()),
            pa.array(raws, pa.uint64()),
            pa.array(payloads, pa.uint64()),
            pa.array([e.fingerprint is not None for e in entries], pa.bool_()),
            now,
        )

    def append(
        self, lease: Lease, custom_ids: pa.Array, raws: pa.Array, payloads: pa.Array, puts: pa.Array, now: datetime
    ) -> None:
        """One load job of journal rows, built from arrays (no Python object per profile)."""
        self.ensure_tables()
        flush = next(self._flushes)
        count = len(custom_ids)
        rows = pa.table(
            {
                "activation": pa.array([lease.activation] * count, pa.string()),
                "custom_id": custom_ids,
                "raw": to_signed(raws),
                "payload": to_signed(payloads),
                "token": pa.array([lease.token] * count, pa.int64()),
                "flush": pa.array([flush] * count, pa.int64()),
                "pos": pa.array(range(count), pa.int64()),
                "acknowledged_at": pa.array([now] * count, pa.timestamp("us", tz="UTC")),
                "put": puts,
            }
        )
        self.warehouse.load("journal append", self.journal, rows)

    def register(self, lease: Lease) -> None:
        """Put the lease token in the fence: from now on, older tokens merge nothing."""
        if self._registered == (lease.activation, lease.token):
            return
        self.ensure_tables()
        self.warehouse.query(
            "fence", sql.register_fence_sql(self._fence_sql), self._params(lease.activation, lease.token)
        )
        self._registered = (lease.activation, lease.token)
        self._check_fence(lease)

    def _check_fence(self, lease: Lease) -> None:
        job = self.warehouse.query("fence check", sql.fence_sql(self._fence_sql), self._params(lease.activation))
        newest = next(iter(job.result()), None)
        token = None if newest is None else newest[0]
        if token != lease.token:
            raise LeaseLost(
                f"activation '{lease.activation}': lease token {lease.token} is no longer the newest in "
                f"{self.fence.dataset_id}.{sql.FENCE} ({token}); this run merges nothing"
            )

    def merge_journal(self, lease: Lease) -> None:
        """One fenced, idempotent MERGE of the journal into the state table."""
        self.register(lease)
        self.warehouse.query(
            "merge",
            sql.merge_sql(self._fingerprints_sql, self._journal_sql, self._fence_sql),
            self._params(lease.activation, lease.token),
        )

    def drop_merged(self, lease: Lease) -> None:
        """Delete the journal rows the merge folded (fenced like it)."""
        self.warehouse.query(
            "drop merged journal",
            sql.drop_merged_sql(self._journal_sql, self._fence_sql),
            self._params(lease.activation, lease.token),
        )
        self._check_fence(lease)

    def compact(self, lease: Lease, now: datetime) -> None:
        """Check the lease, then merge the journal (a crashed run's too) into the state table."""
        self.base.compact(lease, now)
        self.merge_journal(lease)
        self.drop_merged(lease)

    # -- admin -----------------------------------------------------------------------------
    def reset(self, activation: str, *, now: datetime | None = None) -> None:
        self.base.reset(activation, now=now)
        self.forget(activation)

    def forget(self, activation: str) -> None:
        """Delete the activation's fingerprints and journal from BigQuery (admin, not fenced)."""
        self.ensure_tables()
        for reference in (self._journal_sql, self._fingerprints_sql):
            self.warehouse.query("reset", sql.forget_sql(reference), self._params(activation))

    def close(self) -> None:
        self.warehouse.close()
        self.base.close()

    # -- everything else is the base store's ------------------------------------------------
    def acquire_lease(self, activation: str, owner: str, ttl_seconds: float, now: datetime) -> Lease:
        return self.base.acquire_lease(activation, owner, ttl_seconds, now)

    def renew_lease(self, lease: Lease, ttl_seconds: float, now: datetime) -> Lease:
        return self.base.renew_lease(lease, ttl_seconds, now)

    def release_lease(self, lease: Lease) -> None:
        self.base.release_lease(lease)

    def record_intents(self, lease: Lease, custom_ids: Iterable[str]) -> IntentsNote:
        return self.base.record_intents(lease, custom_ids)

    def retire_intents(self, lease: Lease, note: IntentsNote) -> None:
        self.base.retire_intents(lease, note)

    def load_intents(self, activation: str) -> set[str]:
        return self.base.load_intents(activation)

    def clear_intents(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        self.base.clear_intents(lease, custom_ids)

    # Payloads Batch refused are few and per id: they stay in the base store, like intents.
    def record_refusals(self, lease: Lease, refusals: Sequence[Refusal]) -> None:
        self.base.record_refusals(lease, refusals)

    def load_refusals(self, activation: str) -> dict[str, Refusal]:
        return self.base.load_refusals(activation)

    def clear_refusals(self, lease: Lease, custom_ids: Iterable[str]) -> None:
        self.base.clear_refusals(lease, custom_ids)

    def load_meta(self, activation: str) -> ActivationMeta:
        return self.base.load_meta(activation)

    def save_meta(self, lease: Lease, meta: ActivationMeta) -> None:
        self.base.save_meta(lease, meta)

    def save_run(self, record: dict[str, Any]) -> None:
        self.base.save_run(record)

    def list_runs(self, activation: str, limit: int = 20) -> list[dict[str, Any]]:
        return self.base.list_runs(activation, limit)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        return self.base.get_run(run_id)

    def find_run_by_trigger(self, activation: str, trigger_id: str) -> dict[str, Any] | None:
        return self.base.find_run_by_trigger(activation, trigger_id)

    def record_delivery_attempt(self, activation: str, trigger_id: str, now: datetime) -> int:
        return self.base.record_delivery_attempt(activation, trigger_id, now)

    def delivery_attempts(self, activation: str, trigger_id: str) -> int:
        return self.base.delivery_attempts(activation, trigger_id)

    def record_trigger_request(self, trigger_id: str, request_digest: str, now: datetime) -> str:
        return self.base.record_trigger_request(trigger_id, request_digest, now)


def check_dataset(dataset: str | None) -> str:
    if dataset is None:
        raise ConfigError("diff mode 'warehouse' needs 'dataset'", field="diff.dataset")
    return dataset
