"""Builds the edges (source, state store, Batch client) from settings, for the CLI and main.py.

State locations are URLs:

* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` — the embedded default;
* ``firestore://`` — Firestore in the ambient project (``GOOGLE_CLOUD_PROJECT`` / ADC);
  ``firestore://PROJECT/DATABASE?prefix=cepsync`` names them.

Google Cloud libraries are imported only when a Google Cloud edge is asked for, so the
embedded default runs without them.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from sync.batch.client import BatchClient
from sync.batch.ratelimit import RateLimiterRegistry
from sync.config import Activation, BigQuerySourceConfig, Credentials, DuckDBSourceConfig
from sync.errors import ConfigError
from sync.sources.base import Source
from sync.state.base import StateStore

DEFAULT_STATE_URL = "sqlite:///.cepsync/state.db"

# One registry per process: activations sharing a project key share Batch's budget.
_LIMITERS = RateLimiterRegistry()


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


def open_source(activation: Activation) -> Source:
    """The segment source the activation describes."""
    config = activation.source
    if isinstance(config, DuckDBSourceConfig):
        from sync.sources.duckdb import DuckDBSource

        return DuckDBSource(config, activation=activation.name)
    if isinstance(config, BigQuerySourceConfig):
        from sync.sources.bigquery import BigQuerySource

        return BigQuerySource(config, activation=activation.name)
    raise ConfigError(f"unsupported source type {type(config).__name__}", field="source")


def build_client(activation: Activation, environ: dict[str, str] | None = None) -> BatchClient:
    """A Batch client with credentials from the environment (ConfigError if missing)."""
    credentials = Credentials.from_env(activation, environ)
    from sync.logs import scrubber

    scrubber.add([credentials.api_key.get_secret_value(), credentials.project_key.get_secret_value()])
    return BatchClient(activation.destination, credentials, activation=activation.name, limiters=_LIMITERS)
