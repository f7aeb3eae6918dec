"""The one place BigQuery clients are built: production (ADC) or a local emulator.

The segment source, the warehouse diff and the results tables all talk to BigQuery with
the same pair of clients (a REST client, and a Storage Read client for bulk reads), picked
the same way: Application Default Credentials in production, anonymous credentials against
``BIGQUERY_EMULATOR_HOST`` / ``BIGQUERY_STORAGE_EMULATOR_HOST`` in tests and local runs. The
rule lives here once, so a missing credential reads the same whoever asked, and an emulator
channel accepts the same message sizes whoever opened it.

Google Cloud libraries are imported inside the functions only: importing this module (as
the CLI and :mod:`sync.runtime` do) costs nothing for an activation that never uses BigQuery.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sync.config import HTTP_URL
from sync.errors import ConfigError
from sync.redact import redact

if TYPE_CHECKING:
    from google.cloud import bigquery
    from google.cloud.bigquery_storage import BigQueryReadClient


# Options for every gRPC channel cepsync builds itself. gRPC's default caps a received message
# at 4 MiB, but a Storage Read server may send far larger ones (the local emulator sends up to
# 100,000 rows per message, several MiB for a few string columns). The generated Google
# clients lift both limits on the channels *they* build (-1: unlimited); a channel we build
# must do the same, or a large segment fails on every read.
GRPC_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)

# What a missing Google credential is: a config error (exit 2) naming what to set, the same
# rule as Firestore's (sync/runtime.py).
MISSING_CREDENTIALS = (
    "BigQuery needs Google Cloud credentials and none were found: run `gcloud auth application-default "
    "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file (on Google Cloud, attach a "
    "service account; for a local emulator, set BIGQUERY_EMULATOR_HOST)"
)


class MissingCredentials(ConfigError):
    """No Application Default Credentials (or an unusable key file): the user's to fix.

    Its own class so that a caller with its own wording for this case (the results writer)
    can tell it from the other config error, no project to run jobs in.
    """


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
        if not HTTP_URL.match(url):
            raise ConfigError("must be a URL such as http://127.0.0.1:9050", field="BIGQUERY_EMULATOR_HOST")
        return cls(url.rstrip("/"), env.get("BIGQUERY_STORAGE_EMULATOR_HOST") or None)


@dataclass
class BigQueryClients:
    """A BigQuery client, its Storage Read client (None: read over REST), and how to close them.

    ``close()`` closes what the factory opened, last opened first (the read client's channel
    before the REST client); a caller that hands the clients on keeps the duty to close them.
    """

    client: bigquery.Client
    read_client: BigQueryReadClient | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        closers, self.closers = self.closers, []
        for close in reversed(closers):
            close()


def open_bigquery(
    *,
    project: str | None,
    location: str | None,
    use_storage_api: bool,
    environ: Mapping[str, str],
    activation: str,
    field: str = "source",
) -> BigQueryClients:
    """The clients an activation's BigQuery work uses, as ``environ`` says where BigQuery is.

    Production (no ``BIGQUERY_EMULATOR_HOST``): see :func:`application_default_clients`.
    Emulator: see :func:`emulator_clients`; its project is ``project``, else
    ``GOOGLE_CLOUD_PROJECT``.

    Args:
        project: The project to run jobs in (the activation's ``source.project``).
        location: The default location of jobs, or None (each job runs where its data is).
        use_storage_api: Also open a Storage Read client (when one can be opened).
        environ: The environment to read the emulator variables from.
        activation: The activation name, for error messages.
        field: The activation field a missing credential is reported against.

    Raises:
        ConfigError: an invalid ``BIGQUERY_EMULATOR_HOST``; no credentials
            (:class:`MissingCredentials`) or no project, in production.
    """
    emulator = BigQueryEmulatorEndpoints.from_env(environ)
    if emulator is None:
        return application_default_clients(
            project=project, location=location, use_storage_api=use_storage_api, activation=activation, field=field
        )
    return emulator_clients(
        emulator,
        project=project or environ.get("GOOGLE_CLOUD_PROJECT") or None,
        location=location,
        use_storage_api=use_storage_api,
    )


def application_default_clients(
    *, project: str | None, location: str | None, use_storage_api: bool, activation: str, field: str = "source"
) -> BigQueryClients:
    """Production clients: Application Default Credentials, and the Storage Read API when asked.

    The read client shares the REST client's credentials (see :func:`default_read_client`);
    without google-cloud-bigquery-storage installed there is none and reads page over REST.
    """
    client = default_client(project=project, location=location, activation=activation, field=field)
    clients = BigQueryClients(client, closers=[client.close])
    if use_storage_api:
        clients.read_client = default_read_client(client)
        if clients.read_client is not None:
            clients.closers.append(clients.read_client.transport.close)
    return clients


def emulator_clients(
    emulator: BigQueryEmulatorEndpoints, *, project: str | None, location: str | None, use_storage_api: bool
) -> BigQueryClients:
    """Clients for a local emulator: anonymous credentials, and an insecure Storage Read channel.

    The read client exists only when ``storage_address`` is known and ``use_storage_api``
    is set; otherwise reads page over REST, as they would in production without the package.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    # Anonymous credentials only here: an emulator accepts any caller and has no token endpoint.
    client = bigquery.Client(
        project=project,
        location=location,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # google-auth is unannotated
        client_options={"api_endpoint": emulator.rest_url},
    )
    clients = BigQueryClients(client, closers=[client.close])
    if emulator.storage_address is not None and use_storage_api:
        clients.read_client, close_channel = emulator_read_client(emulator.storage_address)
        clients.closers.append(close_channel)
    return clients


def default_client(
    *, project: str | None, location: str | None, activation: str, field: str = "source"
) -> bigquery.Client:
    """A BigQuery client with Application Default Credentials, or a :class:`ConfigError` naming what to set.

    No credentials (none found, or GOOGLE_APPLICATION_CREDENTIALS naming a missing or invalid
    file) and no project to bill are the user's to fix, so both are config errors (exit 2).
    """
    from google.auth import exceptions as auth_exceptions
    from google.cloud import bigquery

    try:
        return bigquery.Client(project=project, location=location)
    except auth_exceptions.DefaultCredentialsError as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MissingCredentials(
            MISSING_CREDENTIALS + (f" ({redact(detail)[:300]})" if detail else ""),
            source=f"activation '{activation}'",
            field=field,
        ) from None
    except OSError:  # google-cloud-core: "Project was not passed and could not be determined"
        raise ConfigError(
            "BigQuery has no project to run jobs in: name it (source.project) or set GOOGLE_CLOUD_PROJECT",
            source=f"activation '{activation}'",
            field="source.project",
        ) from None


def default_read_client(client: bigquery.Client) -> BigQueryReadClient | None:
    """A Storage Read API client with ``client``'s own credentials (ADC), or None without the package.

    google-cloud-bigquery-storage is pinned in requirements.lock, so in production every bulk
    read goes through it; without it, reads page over REST.
    """
    try:
        from google.cloud.bigquery_storage import BigQueryReadClient
    except ImportError:
        return None
    # The same credentials object as the BigQuery client (one token, refreshed once), which
    # is what google-cloud-bigquery itself passes when it builds a read client.
    credentials = getattr(client, "_credentials", None)
    return BigQueryReadClient(credentials=credentials)  # type: ignore[no-untyped-call]  # generated client


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
