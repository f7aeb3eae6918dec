"""Carry the acknowledged fingerprints from one diff mode's store to the other's.

``cepsync switch-diff ACTIVATION.yaml --to warehouse`` (or ``--to function``), run once
while no sync runs (it takes the activation's lease), before deploying the changed YAML:

1. under the lease, every acknowledged fingerprint is read from the store of the old mode
   (SQLite/Firestore, or BigQuery with its journal applied);
2. it is written to the store of the new mode (one load job and one fenced merge into
   BigQuery, or one fenced commit into SQLite/Firestore);
3. only then is it deleted from the old store.

A crash between 2 and 3 leaves both copies; running the command again copies the same
values again and finishes. Raw hashes are carried as they are: the two modes salt them
differently (sync/warehouse/sql.py), so the first run after a switch maps every row once
and finds the same payload hash: a refresh, nothing is sent.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from sync.config import Activation, DiffMode
from sync.differ import FingerprintStore
from sync.errors import ConfigError
from sync.model import JournalEntry
from sync.state.base import StateStore
from sync.warehouse.store import WarehouseFingerprints

# Fingerprints per commit into SQLite/Firestore.
CHUNK = 50_000


def switch_diff(
    activation: Activation,
    base: StateStore,
    warehouse: WarehouseFingerprints,
    *,
    to: DiffMode,
    owner: str,
    lease_ttl_seconds: float = 600.0,
    now: datetime | None = None,
) -> int:
    """Move the activation's fingerprints into the ``to`` mode's store; returns how many moved."""
    name = activation.name
    moment = now or datetime.now(UTC)
    lease = base.acquire_lease(name, owner, lease_ttl_seconds, moment)
    try:
        if to is DiffMode.WAREHOUSE:
            table = base.load_fingerprint_table(name)
            warehouse.register(lease)
            if table.num_rows:
                puts = pa.repeat(pa.scalar(True), table.num_rows)
                warehouse.append(lease, table.append_column("put", puts).combine_chunks(), moment)
            warehouse.compact(lease, moment)
            ids = table.column("custom_id").to_pylist()
            for start in range(0, len(ids), CHUNK):
                base.commit(lease, [JournalEntry(i, None) for i in ids[start : start + CHUNK]], moment)
            base.compact(lease, moment)
        else:
            table = warehouse.load_fingerprint_table(name)
            puts = pa.repeat(pa.scalar(True), table.num_rows)
            journal = table.append_column("put", puts)
            for start in range(0, table.num_rows, CHUNK):
                base.commit(lease, journal.slice(start, CHUNK), moment)
            base.compact(lease, moment)
            warehouse.forget(name)
        return int(table.num_rows)
    finally:
        base.release_lease(lease)


def _switch_command(activation: Activation, to: DiffMode) -> str:
    origin = activation.origin
    path = origin if origin.endswith((".yaml", ".yml")) else "ACTIVATION.yaml"
    return f"cepsync switch-diff {path} --to {to.value} --state STATE"


def refuse_state_left_in_bigquery(activation: Activation, previous: WarehouseFingerprints, dataset: str) -> None:
    """``diff: function`` after ``diff: warehouse`` without ``cepsync switch-diff``: refuse (ConfigError).

    ``previous`` is the fingerprint store the last run used, in ``dataset`` (``sync.runtime`` opens it only
    when that run used the warehouse diff and the function diff's store holds no
    fingerprint, docs/warehouse-diff.md, "Switching modes"). If BigQuery still holds the
    acknowledged fingerprints, a run now would send the whole segment again.
    """
    stored = previous.stored_count(activation.name)
    if stored:
        raise ConfigError(
            f"diff.mode is 'function', but the acknowledged fingerprints of this activation are in BigQuery "
            f"dataset {previous.dataset.project}.{previous.dataset.dataset_id} (its last run used diff: warehouse) "
            "and the function diff's state holds none: a run now would send the whole segment again. Move them "
            "back first, while no run is going on, with the activation YAML that still says diff: {mode: "
            f"warehouse, dataset: {dataset}}}: {_switch_command(activation, DiffMode.FUNCTION)}",
            source=f"activation '{activation.name}'",
            field="diff.mode",
        )


def refuse_state_left_in_base(activation: Activation, base: FingerprintStore, store: WarehouseFingerprints) -> None:
    """``diff: warehouse`` while the fingerprints are still in the function diff's store: refuse."""
    held = base.load_fingerprint_table(activation.name).num_rows
    if held:
        raise ConfigError(
            f"diff.mode is 'warehouse', but the {held:,} acknowledged fingerprints of this activation are in "
            f"the function diff's state and BigQuery dataset {store.dataset.project}.{store.dataset.dataset_id} "
            "holds none: a run now would send the whole segment again. Move them first, while no run is going "
            f"on: {_switch_command(activation, DiffMode.WAREHOUSE)}",
            source=f"activation '{activation.name}'",
            field="diff.mode",
        )
