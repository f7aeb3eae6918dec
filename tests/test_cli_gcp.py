"""Debugging a production activation from a laptop: `cepsync run/plan/history` on BigQuery + Firestore.

The real CLI in a subprocess, the real Google clients, the local emulators: the same
activation file the function deploys, with the segment in the BigQuery emulator and the
state in the Firestore emulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from google.cloud import bigquery

from sync.dev.simulator import BatchSimulator, SimulatorThread
from tests.support.bigquery_emulator import BigQueryEmulator
from tests.support.engine_support import API_KEY, ENV, PROJECT_KEY
from tests.support.firestore_emulator import FirestoreEmulator

pytestmark = pytest.mark.emulator


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY})) as running:
        yield running


def cepsync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync.cli", *args],
        env={**os.environ, **ENV, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_run_plan_and_history_against_bigquery_and_firestore(
    tmp_path: Path,
    bq_emulator: BigQueryEmulator,
    bq_client: bigquery.Client,
    bq_dataset: bigquery.Dataset,
    firestore_emulator: FirestoreEmulator,
    simulator: SimulatorThread,
) -> None:
    bq_client.query_and_wait(
        f"CREATE TABLE `{bq_dataset.dataset_id}.people` AS "
        "SELECT CONCAT('c', CAST(n AS STRING)) AS customer_id, "
        "CONCAT('p', CAST(n AS STRING), '@example.com') AS email, n AS points, n <= 40 AS vip "
        "FROM UNNEST(GENERATE_ARRAY(1, 50)) AS n"
    )
    activation = tmp_path / "vip.yaml"
    activation.write_text(
        yaml.safe_dump(
            {
                "name": "vip_from_bq",
                "source": {
                    "type": "bigquery",
                    "project": bq_emulator.project,
                    "query": f"SELECT * FROM `{bq_dataset.dataset_id}.people` WHERE vip = @vip",
                    "parameters": {"vip": True},
                },
                "destination": {
                    "api_key_env": "BATCH_REST_API_KEY",
                    "project_key_env": "BATCH_PROJECT_KEY",
                    "base_url": simulator.base_url,
                },
                "mapping": {"custom_id": "customer_id", "email": "email"},
                "attributes": [{"column": "points"}],
            }
        )
    )
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    env = {
        "BIGQUERY_EMULATOR_HOST": bq_emulator.rest_url,
        "BIGQUERY_STORAGE_EMULATOR_HOST": bq_emulator.grpc_address,
        "FIRESTORE_EMULATOR_HOST": firestore_emulator.host,
        "GOOGLE_CLOUD_PROJECT": "test-proj",
        "CEPSYNC_STATE": f"firestore://test-proj/(default)?prefix={prefix}",
    }

    first = cepsync(env, "run", str(activation), "--json")
    assert first.returncode == 0, first.stderr + first.stdout
    record = json.loads(first.stdout)
    assert record["counts"]["new"] == 40
    assert record["source"]["read_path"] == "storage_api"
    assert len(simulator.simulator.profiles(PROJECT_KEY)) == 40

    planned = cepsync(env, "plan", str(activation), "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["counts"]["unchanged"] == 40

    history = cepsync(env, "history", "vip_from_bq", "--json")
    assert history.returncode == 0, history.stderr
    runs = json.loads(history.stdout)
    assert [run["run_id"] for run in runs] == [record["run_id"]]
    assert runs[0]["status"] == "succeeded"
