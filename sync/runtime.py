"""Builds the edges (source, state store, differ, Batch client) from settings, for the CLI and main.py.

State locations are URLs:

* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` — the embedded store.
  Without ``--state`` / ``CEPSYNC_STATE`` the CLI uses one file per user,
  ``$XDG_STATE_HOME/cepsync/state.db`` (``~/.local/state/cepsync/state.db`` when that
  variable is unset): the same state whatever directory a command runs from, keyed
  inside by activation name (see :func:`default_state_url`);
* ``firestore://`` — Firestore in the ambient project (``GOOGLE_CLOUD_PROJECT`` / ADC);
  ``firestore://PROJECT/DATABASE?prefix=cepsync`` names them. The bare word ``firestore``
  (the deployed function's ``CEPSYNC_STATE``) is expanded by :func:`expand_state_url`.

A state store that cannot be opened (a path through a file, a directory, a file that is
not a SQLite database, no Google credentials) is a :class:`ConfigError` naming it; a
damaged file is never written to.

Google Cloud libraries are imported only when a Google Cloud edge is asked for, so the
embedded default runs without them.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import ParseResult, parse_qs, urlparse

import pyarrow as pa

from sync.batch.client import BatchClient
from sync.batch.ratelimit import PROCESS_LIMITERS
from sync.bigquery_clients import BigQueryEmulatorEndpoints, emulator_clients
from sync.config import Activation, BigQuerySourceConfig, Credentials, DiffMode, DuckDBSourceConfig
from sync.differ import DifferFactory
from sync.errors import ConfigError, FatalError
from sync.sources.base import LocalSegment, Source, local_segment
from sync.state.base import StateStore

# State URLs are read in their own room (the CLI names its state before anything heavy loads).
from sync.state_url import default_state_url as default_state_url
from sync.state_url import expand_state_url as expand_state_url
from sync.state_url import sqlite_state_path as sqlite_state_path

if TYPE_CHECKING:
    from sync.warehouse.store import WarehouseFingerprints


class StateNotFound(ConfigError):
    """A command that only reads state found none at the URL (and created none)."""


def open_store(url: str, *, create: bool = True, read_only: bool = False) -> StateStore:
    """Open the state store a URL names (see module docstring).

    Args:
        url: ``sqlite:///PATH`` or ``firestore://...``.
        create: False for commands that may write but must not create (reset): a SQLite file
            that does not exist raises :class:`StateNotFound` instead of being created.
        read_only: For commands that only read (plan, history, report): a SQLite file is
            opened read-only, never created, never written, its schema never upgraded in
            place; no file, or an empty one, raises :class:`StateNotFound`.
    """
    parsed = urlparse(url)
    path = sqlite_state_path(url)
    if path is not None:
        return _open_sqlite(path, create=create and not read_only, read_only=read_only)
    if parsed.scheme == "firestore":
        return _open_firestore(parsed)
    raise ConfigError(
        f"unknown state URL scheme {parsed.scheme!r}: use sqlite:///PATH or firestore://PROJECT/DATABASE",
        field="--state",
    )


def _open_sqlite(path: str, *, create: bool, read_only: bool = False) -> StateStore:
    from sync.state.sqlite import SQLiteStateStore, StateNotInitialised

    if path == ":memory:":
        return SQLiteStateStore(path)
    file = Path(path)
    if file.is_dir():
        raise ConfigError(
            f"state path {path} is a directory; name a file in it, e.g. {file / 'state.db'}", field="--state"
        )
    # A path that goes through a file can never be created (FileExistsError, NotADirectoryError).
    ancestor = next((parent for parent in file.absolute().parents if parent.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise ConfigError(
            f"state path {path} goes through {ancestor}, which is a file, not a directory", field="--state"
        )
    if not create and not file.exists():
        raise StateNotFound(f"no state at {path}: nothing has run with this state yet", field="--state")
    try:
        return SQLiteStateStore(path, read_only=read_only)
    except StateNotInitialised as error:
        raise StateNotFound(str(error), field="--state") from None
    except OSError as error:
        # A parent that is a file (FileExistsError, NotADirectoryError) or cannot be written.
        raise ConfigError(
            f"cannot create the state database {path}: {error.strerror or error}", field="--state"
        ) from None
    except sqlite3.DatabaseError as error:
        if isinstance(error, sqlite3.OperationalError) and "not a database" not in str(error):
            writable = os.access(file.parent, os.W_OK) and (not file.exists() or os.access(file, os.W_OK))
            hint = "" if writable else " (the file or its directory is not writable)"
            raise ConfigError(f"cannot open the state database {path}: {error}{hint}", field="--state") from None
        # "file is not a database", "database disk image is malformed": SQLite refused it
        # before anything was written; we leave it exactly as it is.
        raise ConfigError(
            f"{path} is not a usable SQLite state database ({error}); it was left untouched: move it away "
            "or restore it, or point --state at another file",
            field="--state",
        ) from None


def _open_firestore(parsed: ParseResult) -> StateStore:
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import firestore

    from sync.state.firestore import FirestoreStateStore

    project = parsed.netloc or None
    database = parsed.path.strip("/") or "(default)"
    query = parse_qs(parsed.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"prefix"})
    if unknown or len(query.get("prefix", ())) > 1 or query.get("prefix") == [""]:
        raise ConfigError(
            f"Firestore state URL takes one parameter, prefix=NAME (got {parsed.query!r})", field="--state"
        )
    prefix = query.get("prefix", ["cepsync"])[0]
    try:
        client = firestore.Client(project=project, database=database)
    except DefaultCredentialsError:
        raise ConfigError(
            "Firestore state needs Google Cloud credentials and none were found: run "
            "`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
            "(or FIRESTORE_EMULATOR_HOST for an emulator)",
            field="--state",
        ) from None
    except OSError as error:  # google-cloud-core: "Project was not passed and could not be determined"
        raise ConfigError(
            f"Firestore state: {error}; name it, firestore://PROJECT, or set GOOGLE_CLOUD_PROJECT", field="--state"
        ) from None
    return FirestoreStateStore(client, prefix=prefix)


class _SourceWithClients:
    """A source plus the clients built for it, closed together."""

    def __init__(self, source: Source, closers: list[Callable[[], None]]) -> None:
        self._source = source
        self.engine = source.engine
        self._closers = closers

    def schema(self) -> pa.Schema:
        return self._source.schema()

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        return self._source.read_batches(columns)

    def stats(self) -> dict[str, object]:
        return self._source.stats()

    def local_segment(self) -> LocalSegment | None:
        return local_segment(self._source)

    def close(self) -> None:
        self._source.close()
        for close in reversed(self._closers):
            close()


class _DuckDBSegment(_SourceWithClients):
    """A DuckDB source whose open and schema failures are config errors (exit 2).

    Before any row is read, a DuckDB failure can only come from the activation: a file
    that is not a DuckDB database, a directory, a missing table, SQL that does not parse
    or bind. Those are the user's to fix, so they name the file and the field; a failure
    while reading rows stays a run failure.
    """

    def __init__(self, activation: Activation, config: DuckDBSourceConfig) -> None:
        from sync.sources.duckdb import DuckDBSource

        self._origin = activation.origin
        self._segment_field = "source.table" if config.table is not None else "source.query"
        try:
            source = DuckDBSource(config, activation=activation.name)
        except ConfigError as error:
            raise ConfigError(_detail(error), source=self._origin, field=error.field or "source.database") from None
        except FatalError as error:
            raise ConfigError(
                f"{_detail(error)} (is it a DuckDB database file?)", source=self._origin, field="source.database"
            ) from None
        super().__init__(source, [])

    def schema(self) -> pa.Schema:
        try:
            return self._source.schema()
        except ConfigError:
            raise
        except FatalError as error:
            raise ConfigError(_detail(error), source=self._origin, field=self._segment_field) from None


def _detail(error: Exception) -> str:
    """The source's message without its "activation 'x': " prefix (the config error names the file)."""
    return re.sub(r"^activation '[^']*'(, field '[^']*')?: ", "", str(error))


def open_source(
    activation: Activation,
    *,
    bigquery_emulator: BigQueryEmulatorEndpoints | None = None,
    default_project: str | None = None,
) -> Source:
    """The segment source the activation describes.

    A BigQuery source uses Application Default Credentials, or a local emulator when
    ``bigquery_emulator`` is given (see :meth:`BigQueryEmulatorEndpoints.from_env`).
    """
    config = activation.source
    if isinstance(config, DuckDBSourceConfig):
        return _DuckDBSegment(activation, config)
    if isinstance(config, BigQuerySourceConfig):
        from sync.sources.bigquery import BigQuerySource

        if bigquery_emulator is None:
            # The source opens (and closes) its own production clients, after checking its
            # config: an invalid table or parameter fails before any credential is looked for.
            return BigQuerySource(config, activation=activation.name)
        clients = emulator_clients(
            bigquery_emulator,
            project=config.project or default_project,
            location=config.location,
            use_storage_api=config.use_storage_api,
        )
        try:
            source = BigQuerySource(
                config, activation=activation.name, client=clients.client, read_client=clients.read_client
            )
        except BaseException:
            clients.close()
            raise
        return _SourceWithClients(source, [clients.close])
    raise ConfigError(f"unsupported source type {type(config).__name__}", field="source")


def open_source_from_env(activation: Activation, env: Mapping[str, str]) -> Source:
    """The activation's source, as the CLI and the function open it.

    ``BIGQUERY_EMULATOR_HOST`` (and ``BIGQUERY_STORAGE_EMULATOR_HOST``) point a BigQuery
    source at a local emulator, whose project is ``GOOGLE_CLOUD_PROJECT`` when the
    activation names none.
    """
    return open_source(
        activation,
        bigquery_emulator=BigQueryEmulatorEndpoints.from_env(env),
        default_project=env.get("GOOGLE_CLOUD_PROJECT") or None,
    )


def build_client(activation: Activation, environ: dict[str, str] | None = None) -> BatchClient:
    """A Batch client with credentials from the environment (ConfigError if missing)."""
    credentials = Credentials.from_env(activation, environ)
    from sync.logs import scrubber

    scrubber.add([credentials.api_key.get_secret_value(), credentials.project_key.get_secret_value()])
    return BatchClient(activation.destination, credentials, activation=activation.name, limiters=PROCESS_LIMITERS)


def open_differ(
    activation: Activation, store: StateStore, source: Source, environ: Mapping[str, str] | None = None
) -> DifferFactory:
    """The activation's differ and the store of its fingerprints (``docs/warehouse-diff.md``).

    ``diff: function`` (the default): the embedded differ, fingerprints in ``store``; first
    refused if the last run kept them in BigQuery and they were not carried back.
    ``diff: warehouse``: the BigQuery differ, fingerprints in ``diff.dataset``; its runs are
    refused if the fingerprints are still in ``store``. Nothing of BigQuery is imported for
    the default (the client weighs ~45 MB of memory).
    """
    env = os.environ if environ is None else environ
    if activation.diff.mode is not DiffMode.WAREHOUSE:
        dataset = _dataset_left_in_bigquery(activation, store)
        if dataset is not None:
            from sync.config import DiffConfig
            from sync.warehouse.switch import refuse_state_left_in_bigquery

            previous_config = activation.model_copy(
                update={"diff": DiffConfig(mode=DiffMode.WAREHOUSE, dataset=dataset)}
            )
            previous = open_warehouse_fingerprints(previous_config, store, env)
            try:
                refuse_state_left_in_bigquery(activation, previous, dataset)
            finally:
                previous.close()
        # DuckDB and pyarrow.compute load for the embedded diff only (not for a warehouse diff).
        from sync.diff import EmbeddedDiffer

        return EmbeddedDiffer(source, store)
    from sync.warehouse.diff import WarehouseDiffer
    from sync.warehouse.switch import refuse_state_left_in_base

    fingerprints = open_warehouse_fingerprints(activation, store, env)
    return WarehouseDiffer(
        activation, fingerprints, on_no_state=lambda: refuse_state_left_in_base(activation, store, fingerprints)
    )


def _dataset_left_in_bigquery(activation: Activation, store: StateStore) -> str | None:
    """The dataset the last run kept the fingerprints in, if it used the warehouse diff and
    ``store`` holds none (cheap when nothing is wrong: one read of the latest run record)."""
    if not isinstance(activation.source, BigQuerySourceConfig):
        return None
    runs = store.list_runs(activation.name, 1)
    diff = ((runs[0].get("config") or {}).get("diff") or {}) if runs else {}
    dataset = diff.get("dataset") if diff.get("mode") == DiffMode.WAREHOUSE.value else None
    if not isinstance(dataset, str):
        return None
    from sync.config import state_dataset_problem

    if state_dataset_problem(dataset) is not None:
        return None
    if store.load_fingerprint_table(activation.name).num_rows:
        return None  # switched back already (or both hold some after a crashed switch: run it again)
    return dataset


def open_warehouse_fingerprints(
    activation: Activation, base: StateStore, environ: Mapping[str, str] | None = None
) -> WarehouseFingerprints:
    """The activation's fingerprints in BigQuery (``diff.dataset``), their lease checked through ``base``.

    The clients come from the one factory every BigQuery use shares
    (:func:`sync.bigquery_clients.open_bigquery`): Application Default Credentials and the
    Storage Read API in production, the local emulator when ``BIGQUERY_EMULATOR_HOST`` says so.
    """
    config = activation.source
    if not isinstance(config, BigQuerySourceConfig) or activation.diff.dataset is None:
        raise ConfigError("diff mode 'warehouse' needs a BigQuery source and diff.dataset", field="diff")
    from sync.bigquery_clients import open_bigquery
    from sync.warehouse.bq import Warehouse
    from sync.warehouse.store import WarehouseFingerprints, dataset_reference

    clients = open_bigquery(
        project=config.project,
        location=config.location,
        use_storage_api=config.use_storage_api,
        environ=os.environ if environ is None else environ,
        activation=activation.name,
        field="diff",
    )
    warehouse = Warehouse(
        clients.client,
        activation=activation.name,
        read_client=clients.read_client,
        location=config.location,
        maximum_bytes_billed=activation.diff.maximum_bytes_billed,
        closers=[clients.close],
    )
    return WarehouseFingerprints(base, warehouse, dataset_reference(activation.diff.dataset, clients.client.project))
