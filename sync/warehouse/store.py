"""Fingerprints in BigQuery: the one state role a ``diff: warehouse`` run keeps there.

:class:`WarehouseFingerprints` is the fingerprint role of the state
(:class:`sync.differ.FingerprintStore`); a run holds it beside its usual state store:

* the **base store** (Firestore in production, SQLite locally) keeps the lease, the mirror
  intents, the activation meta (continuation checkpoint included), run records and
  delivery counts, exactly as in ``diff: function``; its ``compact`` is the lease check
  every write here starts with;
* **BigQuery** keeps the acknowledged fingerprints, in three tables of the dataset the
  activation names (``diff.dataset``):

  ``cepsync_fingerprints``  activation, custom_id, raw, payload, attributes, token, flush, pos,
                            acknowledged_at (``attributes``: the attribute set, or NULL)
  ``cepsync_journal``       the same plus ``put`` (false = a mirror removal); append-only
  ``cepsync_fence``         activation, token: the tokens that registered to merge (a run's
                            token is its lease token plus the activation's offset, a row
                            keyed ``ACTIVATION#offset`` that :meth:`adopt_fence` writes)

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
from collections.abc import Sequence
from datetime import datetime

import pyarrow as pa
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from sync.differ import FINGERPRINT_SCHEMA, FingerprintStore, with_attributes
from sync.errors import ConfigError, LeaseLost
from sync.model import Fingerprint, JournalEntry, Lease
from sync.state import core
from sync.warehouse import sql
from sync.warehouse.bq import Warehouse, to_signed

# The old state store's runs must have left no trace (fence registration, journal append,
# merge) for this long before another store may adopt the fence: longer than an
# event-triggered function lives (540 s) plus the 30 s between journal flushes.
ADOPT_MIN_IDLE_SECONDS = 15 * 60.0


def dataset_reference(dataset: str, default_project: str) -> bigquery.DatasetReference:
    project, _, name = dataset.rpartition(".")
    return bigquery.DatasetReference(project or default_project, name)


class WarehouseFingerprints:
    """The fingerprint role (:class:`sync.differ.FingerprintStore`) in BigQuery (see the module docstring)."""

    def __init__(self, base: FingerprintStore, warehouse: Warehouse, dataset: bigquery.DatasetReference) -> None:
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
        # (activation, lease token, token in BigQuery) of the lease registered last.
        self._registered: tuple[str, int, int] | None = None
        self._tables_ready = False

    # -- BigQuery tables ------------------------------------------------------------------
    def ensure_tables(self) -> None:
        """Create the three tables if missing (the dataset itself comes from Terraform).

        A table created by an earlier version gets the columns added since (``attributes``,
        NULLABLE: BigQuery adds such a column to a table in place, its rows NULL).
        """
        if self._tables_ready:
            return
        for reference, schema, clustering in (
            (self.fingerprints, sql.FINGERPRINTS_SCHEMA, ["activation", "custom_id"]),
            (self.journal, sql.JOURNAL_SCHEMA, ["activation", "custom_id"]),
            (self.fence, sql.FENCE_SCHEMA, ["activation"]),
        ):
            table = bigquery.Table(reference, schema=schema)
            table.clustering_fields = clustering
            try:
                existing = self.warehouse.client.create_table(table, exists_ok=True)
                names = {field.name for field in existing.schema}
                missing = [field for field in schema if field.name not in names]
                if missing:
                    existing.schema = [*existing.schema, *missing]
                    self.warehouse.client.update_table(existing, ["schema"])
            except api_exceptions.NotFound:
                raise self.missing_dataset() from None
            except api_exceptions.GoogleAPICallError as error:
                raise self.warehouse.translate(f"preparing the table {reference.table_id}", error) from error
        self._tables_ready = True

    def missing_dataset(self) -> ConfigError:
        """The state dataset does not exist (or this identity cannot see it, or it is in another location)."""
        where = f" in location {self.warehouse.location}" if self.warehouse.location else ""
        return ConfigError(
            f"the BigQuery dataset {self.dataset.project}.{self.dataset.dataset_id} that holds the fingerprints "
            f"does not exist{where} (or these credentials "
            "cannot see it): create it with infra/warehouse.tf (set warehouse_state_dataset and "
            f"warehouse_state_location, then terraform apply), or `bq mk --dataset "
            f"{self.dataset.project}:{self.dataset.dataset_id}`, in the segment's location",
            source=f"activation '{self.warehouse.activation}'",
            field="diff.dataset",
        )

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

    def stored_count(self, activation: str) -> int:
        """Fingerprints and journal rows the activation has in BigQuery (0 without the tables)."""
        try:
            self.warehouse.client.get_table(self.fingerprints)
        except api_exceptions.NotFound:
            return 0  # no dataset or no tables yet: nothing was ever kept here
        except api_exceptions.GoogleAPICallError as error:
            raise self.warehouse.translate("reading the state tables", error) from error
        job = self.warehouse.query(
            "stored count", sql.stored_count_sql(self._fingerprints_sql, self._journal_sql), self._params(activation)
        )
        row = next(iter(job.result()), None)
        return 0 if row is None else int(row[0] or 0)

    def load_fingerprints(self, activation: str) -> dict[str, Fingerprint]:
        return core.fingerprints_of(self.load_fingerprint_table(activation))

    def commit(self, lease: Lease, entries: Sequence[JournalEntry] | pa.Table, now: datetime) -> None:
        """Append acknowledged entries to the journal: one load job, all rows or none (fenced)."""
        self.base.compact(lease, now)  # raises LeaseLost for a stale lease before anything is written
        if not isinstance(entries, pa.Table) and not entries:
            return
        table = core.journal_table(lease.activation, entries)
        if table.num_rows:
            self.append(lease, table.combine_chunks(), now)

    def append(self, lease: Lease, entries: pa.Table, now: datetime) -> None:
        """One load job of journal rows (a ``JOURNAL_SCHEMA`` table; no Python object per profile)."""
        self.ensure_tables()
        token = self.token(lease)
        flush = next(self._flushes)
        count = entries.num_rows
        entries = with_attributes(entries)
        rows = pa.table(
            {
                "activation": pa.array([lease.activation] * count, pa.string()),
                "custom_id": entries.column("custom_id"),
                "raw": to_signed(entries.column("raw").combine_chunks()),
                "payload": to_signed(entries.column("payload").combine_chunks()),
                "attributes": entries.column("attributes"),
                "token": pa.array([token] * count, pa.int64()),
                "flush": pa.array([flush] * count, pa.int64()),
                "pos": pa.array(range(count), pa.int64()),
                "acknowledged_at": pa.array([now] * count, pa.timestamp("us", tz="UTC")),
                "put": entries.column("put"),
            }
        )
        self.warehouse.load("journal append", self.journal, rows)

    def register(self, lease: Lease) -> int:
        """Put the run's token in the fence (from now on, older tokens merge nothing); returns it.

        The token in BigQuery is the lease token plus the activation's offset (0 unless a state
        store adopted the fence, :meth:`adopt_fence`). It is fixed at the first registration of
        a lease and used for every append and merge of that lease.
        """
        if self._registered is not None and self._registered[:2] == (lease.activation, lease.token):
            return self._registered[2]
        self.ensure_tables()
        self.warehouse.query(
            "fence",
            sql.register_fence_sql(self._fence_sql),
            [
                *self._params(lease.activation),
                bigquery.ScalarQueryParameter("cepsync_lease_token", "INT64", lease.token),
            ],
        )
        newest, offset = self._fence(lease.activation)
        token = lease.token + offset
        self._registered = (lease.activation, lease.token, token)
        self._refuse_unless_newest(lease, token, newest)
        return token

    def token(self, lease: Lease) -> int:
        """The run's token in BigQuery (registers the lease first if it has not)."""
        return self.register(lease)

    def _fence(self, activation: str) -> tuple[int | None, int]:
        job = self.warehouse.query("fence check", sql.fence_sql(self._fence_sql), self._params(activation))
        row = next(iter(job.result()), None)
        if row is None:
            return None, 0
        return (None if row[0] is None else int(row[0])), int(row[1] or 0)

    def _check_fence(self, lease: Lease) -> None:
        newest, _ = self._fence(lease.activation)
        self._refuse_unless_newest(lease, self.token(lease), newest)

    def _refuse_unless_newest(self, lease: Lease, token: int, newest: int | None) -> None:
        if newest == token:
            return
        raise LeaseLost(
            f"activation '{lease.activation}': token {token} (lease {lease.token}) is no longer the newest in "
            f"{self.fence.dataset_id}.{sql.FENCE} ({newest}); this run merges nothing. Either a newer run "
            "took over (nothing to do), or this state store is not the one the earlier runs used (a new "
            "machine, another Firestore database): once no run with the old store can still be going, "
            "let this store adopt the dataset with `cepsync adopt-fence ACTIVATION.yaml --state STATE` "
            "(docs/warehouse-diff.md, 'A new state store')"
        )

    def adopt_fence(self, lease: Lease, now: datetime, *, min_idle_seconds: float | None = None) -> int:
        """Make ``lease``'s state store the owner of the dataset's fence; returns the token it passed (0: none).

        For a state store that is new to an existing dataset: its lease tokens restart at 1
        while the fence holds the old store's, so every run of it would merge nothing. Adoption
        sets the activation's token offset to the fence's newest token, so that this store's
        tokens (lease token + offset) are newer than every token the old store used, now and
        later. Nothing else changes: the fingerprints and the journal keep their tokens.

        Against a run of the old store that is still going: its token is now older than the
        fence's newest, so its merges change nothing and it stops with LeaseLost; the profiles
        it had acknowledged are in the journal with its older token, and the next run of this
        store merges them before its own (a crash boundary like any other). Two state stores
        that keep running against one dataset take the fence from each other and fail loudly;
        that is why adoption is refused (ConfigError) while the old store left a trace (a fence
        registration, a journal append, a merge) less than ``min_idle_seconds`` ago.
        """
        if min_idle_seconds is None:
            min_idle_seconds = ADOPT_MIN_IDLE_SECONDS
        self.ensure_tables()
        job = self.warehouse.query(
            "fence adoption check",
            sql.last_activity_sql(self._fingerprints_sql, self._journal_sql, self._fence_sql),
            self._params(lease.activation),
        )
        row = next(iter(job.result()), None)
        newest = None if row is None or row[0] is None else int(row[0])
        offset = 0 if row is None else int(row[1] or 0)
        if newest is None or lease.token + offset > newest:
            self.register(lease)
            return 0
        assert row is not None
        last_seen: datetime = row[2]
        idle = (now - last_seen).total_seconds()
        if idle < min_idle_seconds:
            raise ConfigError(
                f"the fence {self.dataset.dataset_id}.{sql.FENCE} holds token {newest} from another state "
                f"store, whose runs left a trace {max(idle, 0):.0f} s ago (at {last_seen.isoformat()}): a run "
                f"may still be going. Stop it (or wait until {min_idle_seconds / 60:.0f} min have passed since "
                "its last trace), then run this again; --force skips this check",
                source=f"activation '{lease.activation}'",
                field="--state",
            )
        self.warehouse.query(
            "fence adoption",
            sql.set_offset_sql(self._fence_sql),
            [*self._params(lease.activation), bigquery.ScalarQueryParameter("cepsync_offset", "INT64", newest)],
        )
        self._registered = None
        self.register(lease)
        return newest

    def merge_journal(self, lease: Lease) -> None:
        """One fenced, idempotent MERGE of the journal into the state table."""
        token = self.register(lease)
        self.warehouse.query(
            "merge",
            sql.merge_sql(self._fingerprints_sql, self._journal_sql, self._fence_sql),
            self._params(lease.activation, token),
        )

    def drop_merged(self, lease: Lease) -> None:
        """Delete the journal rows the merge folded (fenced like it)."""
        self.warehouse.query(
            "drop merged journal",
            sql.drop_merged_sql(self._journal_sql, self._fence_sql),
            self._params(lease.activation, self.token(lease)),
        )
        self._check_fence(lease)

    def compact(self, lease: Lease, now: datetime, *, when_due: bool = False) -> None:
        """Check the lease, then merge the journal (a crashed run's too) into the state table.

        Always merged, ``when_due`` or not: the warehouse diff reads the state table alone.
        """
        self.base.compact(lease, now, when_due=when_due)
        self.merge_journal(lease)
        self.drop_merged(lease)

    # -- admin -----------------------------------------------------------------------------
    def forget(self, activation: str) -> None:
        """Delete the activation's fingerprints and journal from BigQuery (admin, not fenced)."""
        self.ensure_tables()
        for reference in (self._journal_sql, self._fingerprints_sql):
            self.warehouse.query("reset", sql.forget_sql(reference), self._params(activation))

    def close(self) -> None:
        """Close the BigQuery clients (the base store is its opener's to close)."""
        self.warehouse.close()


def check_dataset(dataset: str | None) -> str:
    if dataset is None:
        raise ConfigError("diff mode 'warehouse' needs 'dataset'", field="diff.dataset")
    return dataset
