"""Builds the edges (source, state store, Batch client) from settings, for the CLI and main.py.

State locations are URLs:

* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` — the embedded default;
* ``firestore://`` — Firestore in the ambient project (``GOOGLE_CLOUD_PROJECT`` / ADC);
  ``firestore://PROJECT/DATABASE?prefix=cepsync`` names them.

Google Cloud libraries are imported only when a Google Cloud edge is asked for, so the
embedded default runs without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import pyarrow as pa

from sync.batch.client import BatchClient
from sync.batch.ratelimit import PROCESS_LIMITERS
from sync.config import Activation, BigQuerySourceConfig, Credentials, DuckDBSourceConfig
from sync.errors import ConfigError
from sync.sources.base import Source
from sync.state.base import StateStore

if TYPE_CHECKING:
    from google.cloud.bigquery_storage import BigQueryReadClient

DEFAULT_STATE_URL = "sqlite:///.cepsync/state.db"

# Options for every gRPC channel cepsync builds itself. gRPC's default caps a received message
# at 4 MiB, but a Storage Read server may send far larger ones (the local emulator sends up to
# 100,000 rows per message, several MiB for a few string columns). The generated Google
# clients lift both limits on the channels *they* build (-1: unlimited); a channel we build
# must do the same, or a large segment fails on every read.
GRPC_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)


def open_store(url: str) -> StateStore:
    """Open the state store a URL names (see module docstring)."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from sync.state.sqlite import SQLiteStateStore

        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else parsed.path
        if not path:
            raise ConfigError("sqlite state URL needs a path, e.g. sqlite:///.cepsync/state.db", field="state")
        return SQLiteStateStore(path)
    if parsed.scheme == "firestore":
        from google.cloud import firestore

        from sync.state.firestore import FirestoreStateStore

        project = parsed.netloc or None
        database = parsed.path.strip("/") or "(default)"
        prefix = parse_qs(parsed.query).get("prefix", ["cepsync"])[0]
        client = firestore.Client(project=project, database=database)
        return FirestoreStateStore(client, prefix=prefix)
    raise ConfigError(f"unknown state URL scheme {parsed.scheme!r}: use sqlite:///PATH or firestore://", field="state")


@dataclass(frozen=True)
class BigQueryEmulatorEndpoints:
    """Where a local BigQuery emulator listens (tests and local runs only; never in production).

    ``rest_url`` comes from ``BIGQUERY_EMULATOR_HOST`` (the name google-cloud-bigquery itself
    reads for its REST endpoint, a URL such as ``http://127.0.0.1:9050``); ``storage_address``
    from ``BIGQUERY_STORAGE_EMULATOR_HOST`` (``HOST:PORT`` of the Storage Read gRPC server,
    reached on an insecure channel; without it the source pages over REST).
    """

    rest_url: str
    storage_address: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BigQueryEmulatorEndpoints | None:
        url = env.get("BIGQUERY_EMULATOR_HOST") or None
        if url is None:
            return None
        if not re.match(r"^https?://[^\s/]+", url):
            raise ConfigError("must be a URL such as http://127.0.0.1:9050", field="BIGQUERY_EMULATOR_HOST")
        return cls(url.rstrip("/"), env.get("BIGQUERY_STORAGE_EMULATOR_HOST") or None)


class _SourceWithClients:
    """A source plus the clients built for it, closed together."""

    def __init__(self, source: Source, closers: list[Callable[[], None]]) -> None:
        self._source = source
        self._closers = closers

    def schema(self) -> pa.Schema:
        return self._source.schema()

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        return self._source.read_batches(columns)

    def stats(self) -> dict[str, Any]:
        return self._source.stats()

    def close(self) -> None:
        self._source.close()
        for close in reversed(self._closers):
            close()


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
        from sync.sources.duckdb import DuckDBSource

        return DuckDBSource(config, activation=activation.name)
    if isinstance(config, BigQuerySourceConfig):
        from sync.sources.bigquery import BigQuerySource

        if bigquery_emulator is None:
            return BigQuerySource(config, activation=activation.name)
        return _emulated_bigquery_source(activation, config, bigquery_emulator, default_project)
    raise ConfigError(f"unsupported source type {type(config).__name__}", field="source")


def _emulated_bigquery_source(
    activation: Activation,
    config: BigQuerySourceConfig,
    emulator: BigQueryEmulatorEndpoints,
    default_project: str | None,
) -> Source:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    from sync.sources.bigquery import BigQuerySource

    closers: list[Callable[[], None]] = []
    # Anonymous credentials only here: an emulator accepts any caller and has no token endpoint.
    client = bigquery.Client(
        project=config.project or default_project,
        location=config.location,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # google-auth is unannotated
        client_options={"api_endpoint": emulator.rest_url},
    )
    closers.append(client.close)
    read_client = None
    if emulator.storage_address is not None and config.use_storage_api:
        read_client, close_channel = emulator_read_client(emulator.storage_address)
        closers.append(close_channel)
    source = BigQuerySource(config, activation=activation.name, client=client, read_client=read_client)
    return _SourceWithClients(source, closers)


def emulator_read_client(address: str) -> tuple[BigQueryReadClient, Callable[[], None]]:
    """A Storage Read client on an insecure channel to ``HOST:PORT`` (an emulator), and its closer.

    The channel accepts messages of any size (:data:`GRPC_CHANNEL_OPTIONS`).
    """
    import grpc
    from google.cloud.bigquery_storage import BigQueryReadClient
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

    channel = grpc.insecure_channel(address, options=list(GRPC_CHANNEL_OPTIONS))
    client = BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))  # type: ignore[no-untyped-call]
    return client, channel.close


def build_client(activation: Activation, environ: dict[str, str] | None = None) -> BatchClient:
    """A Batch client with credentials from the environment (ConfigError if missing)."""
    credentials = Credentials.from_env(activation, environ)
    from sync.logs import scrubber

    scrubber.add([credentials.api_key.get_secret_value(), credentials.project_key.get_secret_value()])
    return BatchClient(activation.destination, credentials, activation=activation.name, limiters=PROCESS_LIMITERS)
