"""Pytest plugin: a session-wide local BigQuery emulator (register in conftest ``pytest_plugins``).

Fixtures:

* ``bq_emulator`` (session): a running :class:`tests.support.bigquery_emulator.BigQueryEmulator`, with
  ``client()`` and ``read_client()`` factories for the real google-cloud clients. Installs
  ``.venv-bq`` first when needed; fails loudly, never skips, if the emulator cannot start.
* ``bq_client`` (session): one ``bigquery.Client`` on the emulator.
* ``bq_read_client`` (session): one Storage Read API client on the emulator.
* ``bq_dataset`` (function): a fresh, empty dataset, deleted with its tables afterwards.
* ``bq_proxy`` (function): a :class:`tests.support.bigquery_emulator.RecordingProxy` in front of the
  emulator's REST API, to see which calls were made and to inject BigQuery errors.

Named ``bq_*`` so they cannot clash with the ``bigquery_*`` fixtures that local-bigquery's own
pytest plugin defines where it is installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from google.cloud import bigquery
from google.cloud.bigquery_storage import BigQueryReadClient

from tests.support.bigquery_emulator import BigQueryEmulator, RecordingProxy, running_emulator


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    data_dir = tmp_path_factory.mktemp("bigquery-emulator") / "data"
    with running_emulator(data_dir) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def bq_client(bq_emulator: BigQueryEmulator) -> Iterator[bigquery.Client]:
    client = bq_emulator.client()
    yield client
    client.close()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="session")
def bq_read_client(bq_emulator: BigQueryEmulator) -> BigQueryReadClient:
    return bq_emulator.read_client()


@pytest.fixture
def bq_dataset(bq_client: bigquery.Client) -> Iterator[bigquery.Dataset]:
    dataset = bq_client.create_dataset(f"test_{uuid.uuid4().hex[:12]}")
    yield dataset
    bq_client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)


@pytest.fixture
def bq_proxy(bq_emulator: BigQueryEmulator) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(bq_emulator.rest_url)
    yield proxy
    proxy.close()
