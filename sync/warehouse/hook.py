"""The engine's hook into the warehouse diff: nothing of BigQuery is imported until asked."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sync.config import Activation, BigQuerySourceConfig, DiffMode
from sync.errors import ConfigError
from sync.state.base import StateStore

if TYPE_CHECKING:
    from google.cloud.bigquery_storage import BigQueryReadClient

    from sync.warehouse.diff import WarehouseDiff
    from sync.warehouse.store import WarehouseStateStore


def warehouse_store(activation: Activation, base: StateStore, environ: Mapping[str, str] | None = None) -> StateStore:
    """The activation's store: ``base`` itself, or (``diff: warehouse``) BigQuery fingerprints over it.

    A store that already is a :class:`WarehouseStateStore` is kept (a caller built it).
    The BigQuery client uses Application Default Credentials, or the local emulator named by
    ``BIGQUERY_EMULATOR_HOST`` / ``BIGQUERY_STORAGE_EMULATOR_HOST`` as the BigQuery source does.
    """
    if activation.diff.mode is not DiffMode.WAREHOUSE:
        # Checked before any import: the BigQuery client weighs ~45 MB of memory, which an
        # in-memory diff (the default) never needs.
        refuse_state_left_in_bigquery(activation, base, environ)
        return base
    from sync.warehouse.store import WarehouseStateStore

    if isinstance(base, WarehouseStateStore):
        return base
    config = activation.source
    if not isinstance(config, BigQuerySourceConfig) or activation.diff.dataset is None:
        raise ConfigError("diff mode 'warehouse' needs a BigQuery source and diff.dataset", field="diff")
    from google.cloud import bigquery

    from sync.runtime import BigQueryEmulatorEndpoints, emulator_read_client
    from sync.warehouse.bq import Warehouse
    from sync.warehouse.store import dataset_reference

    env = os.environ if environ is None else environ
    emulator = BigQueryEmulatorEndpoints.from_env(env)
    read_client: BigQueryReadClient | None = None
    closers: list[Callable[[], None]] = []
    if emulator is None:
        from sync.sources.bigquery import default_client, default_read_client

        # The same clients as the BigQuery source: Application Default Credentials, and the
        # Storage Read API for the rows that leave the warehouse (docs/warehouse-diff.md).
        client = default_client(
            project=config.project, location=config.location, activation=activation.name, field="diff"
        )
        if config.use_storage_api:
            read_client = default_read_client(client)
            if read_client is not None:
                closers.append(read_client.transport.close)
    else:
        from google.auth.credentials import AnonymousCredentials

        client = bigquery.Client(
            project=config.project or env.get("GOOGLE_CLOUD_PROJECT"),
            location=config.location,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": emulator.rest_url},
        )
        if emulator.storage_address is not None and config.use_storage_api:
            read_client, close_channel = emulator_read_client(emulator.storage_address)
            closers.append(close_channel)
    closers.append(client.close)
    warehouse = Warehouse(
        client,
        activation=activation.name,
        read_client=read_client,
        location=config.location,
        maximum_bytes_billed=activation.diff.maximum_bytes_billed,
        closers=closers,
    )
    return WarehouseStateStore(base, warehouse, dataset_reference(activation.diff.dataset, client.project))


def _activation_file(activation: Activation) -> str:
    origin = activation.origin
    return origin if origin.endswith((".yaml", ".yml")) else "ACTIVATION.yaml"


def _switch_command(activation: Activation, to: DiffMode) -> str:
    return f"cepsync switch-diff {_activation_file(activation)} --to {to.value} --state STATE"


def refuse_state_left_in_bigquery(
    activation: Activation, base: StateStore, environ: Mapping[str, str] | None = None
) -> None:
    """``diff: function`` after ``diff: warehouse`` without ``cepsync switch-diff``: refuse (ConfigError).

    The acknowledged fingerprints are still in BigQuery and the function diff's store holds
    none, so a run would send the whole segment again. Cheap when nothing is wrong: one read
    of the latest run record; BigQuery is asked only when that run used the warehouse diff
    and the store holds no fingerprint (docs/warehouse-diff.md, "Switching modes").
    """
    runs = base.list_runs(activation.name, 1)
    diff = ((runs[0].get("config") or {}).get("diff") or {}) if runs else {}
    dataset = diff.get("dataset") if diff.get("mode") == DiffMode.WAREHOUSE.value else None
    if not isinstance(dataset, str) or not isinstance(activation.source, BigQuerySourceConfig):
        return
    if base.load_fingerprint_table(activation.name).num_rows:
        return  # switched back already (or both hold some after a crashed switch: run it again)
    from sync.config import DiffConfig, state_dataset_problem

    if state_dataset_problem(dataset) is not None:
        return
    previous = activation.model_copy(update={"diff": DiffConfig(mode=DiffMode.WAREHOUSE, dataset=dataset)})
    store = warehouse_store(previous, base, environ)
    from sync.warehouse.store import WarehouseStateStore

    assert isinstance(store, WarehouseStateStore)
    try:
        stored = store.stored_count(activation.name)
    finally:
        store.warehouse.close()
    if stored:
        raise ConfigError(
            f"diff.mode is 'function', but the acknowledged fingerprints of this activation are in BigQuery "
            f"dataset {store.dataset.project}.{store.dataset.dataset_id} (its last run used diff: warehouse) and "
            "the function diff's state holds none: a run now would send the whole segment again. Move them back "
            "first, while no run is going on, with the activation YAML that still says diff: {mode: warehouse, "
            f"dataset: {dataset}}}: {_switch_command(activation, DiffMode.FUNCTION)}",
            source=f"activation '{activation.name}'",
            field="diff.mode",
        )


def _refuse_state_left_in_base(activation: Activation, store: WarehouseStateStore) -> None:
    """``diff: warehouse`` while the fingerprints are still in the function diff's store: refuse."""
    held = store.base.load_fingerprint_table(activation.name).num_rows
    if held:
        raise ConfigError(
            f"diff.mode is 'warehouse', but the {held:,} acknowledged fingerprints of this activation are in "
            f"the function diff's state and BigQuery dataset {store.dataset.project}.{store.dataset.dataset_id} "
            "holds none: a run now would send the whole segment again. Move them first, while no run is going "
            f"on: {_switch_command(activation, DiffMode.WAREHOUSE)}",
            source=f"activation '{activation.name}'",
            field="diff.mode",
        )


def open_diff(
    activation: Activation,
    store: StateStore,
    *,
    columns: Sequence[str],
    schema: pa.Schema,
    mapping_version: str,
    intents: Sequence[str],
    unconfirmed: Sequence[str] = (),
    on_rows: Callable[[int], None] | None,
) -> WarehouseDiff:
    """The BigQuery differ of a ``diff: warehouse`` run (its store must be a WarehouseStateStore)."""
    from sync.warehouse.diff import WarehouseDiff
    from sync.warehouse.store import WarehouseStateStore

    if not isinstance(store, WarehouseStateStore):
        raise ConfigError("diff mode 'warehouse' needs its BigQuery state store", field="diff")
    store.ensure_tables()
    return WarehouseDiff(
        activation,
        store.warehouse,
        fingerprints=store.fingerprints_sql,
        columns=columns,
        schema=schema,
        mapping_version=mapping_version,
        intents=intents,
        unconfirmed=unconfirmed,
        on_rows=on_rows,
        on_no_state=lambda: _refuse_state_left_in_base(activation, store),
    )


def costs(store: StateStore) -> dict[str, Any]:
    """The run record's ``warehouse`` entry (every BigQuery job and its cost), if any."""
    from sync.warehouse.store import WarehouseStateStore

    if not isinstance(store, WarehouseStateStore):
        return {}
    return {"warehouse": store.warehouse.ledger.as_record()}
