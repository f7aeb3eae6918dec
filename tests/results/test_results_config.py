"""The `results` and `owner` keys of an activation: off by default, each mistake named with
its file and field before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sync.config_file import load_activation, parse_activation
from sync.errors import ConfigError

DESTINATION = {"api_key_env": "K", "project_key_env": "P"}
BIGQUERY = {"type": "bigquery", "table": "crm.customers"}
DUCKDB = {"type": "duckdb", "database": "segment.duckdb", "table": "people"}


def activation(source: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "a", "source": source, "destination": DESTINATION, "mapping": {"custom_id": "id"}, **extra}


def test_results_are_off_unless_asked_for() -> None:
    assert parse_activation(activation(BIGQUERY), source="a.yaml").results is None
    assert parse_activation(activation(DUCKDB, results={}), source="a.yaml").results is not None


@pytest.mark.parametrize(
    ("source", "results", "field", "message"),
    [
        (BIGQUERY, {}, "results.dataset", "a BigQuery source writes its results to a dataset: name it"),
        (BIGQUERY, {"database": "r.duckdb"}, "results.dataset", "a BigQuery source writes its results to a dataset"),
        (DUCKDB, {"dataset": "x"}, "results.dataset", "a DuckDB source writes its results to a DuckDB file"),
        (BIGQUERY, {"dataset": "bad name!"}, "results", "the dataset name has a character other than a letter"),
        (BIGQUERY, {"dataset": "d", "database": "r.duckdb"}, "results", "not both"),
        (BIGQUERY, {"dataset": "d", "max_rejection_rows": 0}, "results.max_rejection_rows", ""),
        (BIGQUERY, {"dataset": "d", "values": True}, "results.values", ""),
    ],
)
def test_a_wrong_results_key_names_its_field(
    source: dict[str, Any], results: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_activation(activation(source, results=results), source="a.yaml")
    assert raised.value.field is not None
    assert raised.value.field.startswith(field)
    assert message in str(raised.value)
    assert "a.yaml" in str(raised.value)


def test_owner_needs_a_name_or_an_email() -> None:
    owned = parse_activation(activation(BIGQUERY, owner={"email": "crm@example.com"}), source="a.yaml")
    assert owned.owner is not None
    assert owned.owner.email == "crm@example.com"
    with pytest.raises(ConfigError, match="give the owner's 'name', 'email' or both"):
        parse_activation(activation(BIGQUERY, owner={}), source="a.yaml")


def test_a_results_database_is_read_relative_to_the_activation_file(tmp_path: Path) -> None:
    folder = tmp_path / "activations"
    folder.mkdir()
    path = folder / "a.yaml"
    path.write_text(yaml.safe_dump(activation(DUCKDB, results={"database": "../out/results.duckdb"})), encoding="utf-8")
    loaded = load_activation(path)
    assert loaded.results is not None
    assert loaded.results.database == str((tmp_path / "out" / "results.duckdb").resolve())
