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
    from sync.warehouse.diff import WarehouseDiff


def warehouse_store(activation: Activation, base: StateStore, environ: Mapping[str, str] | None = None) -> StateStore:
    """The activation's store: ``base`` itself, or (``diff: warehouse``) BigQuery fingerprints over it.

    A store that already is a :class:`WarehouseStateStore` is kept (a caller built it).
    The BigQuery client uses Application Default Credentials, or the local emulator named by
    ``BIGQUERY_EMULATOR_HOST`` / ``BIGQUERY_STORAGE_EMULATOR_HOST`` as the BigQuery source does.
    """
    if activation.diff.mode is not DiffMode.WAREHOUSE:
        # Checked before any import: the BigQuery client weighs ~45 MB of memory, which an
        # in-memory diff (the default) never needs.
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
    read_client = None
    closers: list[Callable[[], None]] = []
    if emulator is None:
        from google.auth import exceptions as auth_exceptions

        from sync.sources.bigquery import BigQueryPermissionDenied

        try:
            client = bigquery.Client(project=config.project, location=config.location)
        except auth_exceptions.DefaultCredentialsError:
            raise BigQueryPermissionDenied(
                "no Google credentials found for the warehouse diff (Application Default Credentials)",
                activation=activation.name,
            ) from None
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
    )


def costs(store: StateStore) -> dict[str, Any]:
    """The run record's ``warehouse`` entry (every BigQuery job and its cost), if any."""
    from sync.warehouse.store import WarehouseStateStore

    if not isinstance(store, WarehouseStateStore):
        return {}
    return {"warehouse": store.warehouse.ledger.as_record()}
