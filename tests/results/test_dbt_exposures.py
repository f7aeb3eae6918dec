"""``cepsync dbt-exposures DIR``: one dbt exposure per activation, checked against the exposure
part of dbt's published JSON schema for schema.yml files (fixtures/dbt_exposures_schema.json;
dbt-core does not install offline here, and no JSON-schema library is pinned, so the few
keywords that part uses are checked by :func:`validate` below, which refuses any other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sync.cli import app
from sync.config_file import load_activations
from sync.results.dbt import Manifest, render, table_names

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "dbt_exposures_schema.json").read_text(encoding="utf-8"))
_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "boolean": bool}
_KNOWN = {"$schema", "$comment", "title", "type", "const", "enum", "required", "properties", "additionalProperties"}
_KNOWN |= {"items", "anyOf", "oneOf", "$ref", "$defs"}


def validate(instance: Any, schema: dict[str, Any], where: str = "$") -> None:
    """JSON Schema (the keywords of the fixture only): raises AssertionError naming the place."""
    unknown = set(schema) - _KNOWN
    assert not unknown, f"validator does not know {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        validate(instance, SCHEMA["$defs"][name], where)
    if "type" in schema:
        kind = _TYPES[schema["type"]]
        assert isinstance(instance, kind), f"{where}: not {schema['type']}"
        assert not (schema["type"] == "number" and isinstance(instance, bool)), f"{where}: a boolean"
    if "const" in schema:
        assert instance == schema["const"], f"{where}: not {schema['const']!r}"
    if "enum" in schema:
        assert instance in schema["enum"], f"{where}: {instance!r} not in {schema['enum']}"
    for name in schema.get("required", ()):
        assert name in instance, f"{where}: {name} missing"
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for key, value in instance.items():
            if key in properties:
                validate(value, properties[key], f"{where}.{key}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{where}: {key} not allowed"
    if isinstance(instance, list) and "items" in schema:
        for index, item in enumerate(instance):
            validate(item, schema["items"], f"{where}[{index}]")
    if "anyOf" in schema:
        assert any(_valid(instance, option, where) for option in schema["anyOf"]), f"{where}: no anyOf matches"
    if "oneOf" in schema:
        assert sum(_valid(instance, option, where) for option in schema["oneOf"]) == 1, f"{where}: not oneOf"


def _valid(instance: Any, schema: dict[str, Any], where: str) -> bool:
    try:
        validate(instance, schema, where)
    except AssertionError:
        return False
    return True


DESTINATION = {"api_key_env": "BATCH_REST_API_KEY", "project_key_env": "BATCH_PROJECT_KEY"}
ACTIVATIONS = {
    "vip.yaml": {
        "name": "vip-customers",
        "description": "VIP customers to Batch",
        "owner": {"name": "CRM team", "email": "crm@example.com"},
        "source": {
            "type": "bigquery",
            "project": "acme-prod",
            "query": "-- dbt: {{ ref('vip_scores') }}\n"
            "SELECT c.*, s.score FROM `acme-prod.crm.customers` AS c JOIN marts.scores s USING (customer_id) "
            "WHERE EXTRACT(YEAR FROM c.created_at) > 2020",
        },
        "destination": DESTINATION,
        "mapping": {"custom_id": "customer_id"},
        "schedule": {"cron": "0 * * * *"},
        "results": {"dataset": "analytics.cepsync_results"},
    },
    "local.yaml": {
        "name": "local_people",
        "source": {"type": "duckdb", "database": "segment.duckdb", "table": "people"},
        "destination": DESTINATION,
        "mapping": {"custom_id": "customer_id"},
    },
    "raw.yaml": {
        "name": "raw_events",
        "owner": {"email": "data@example.com"},
        "source": {"type": "bigquery", "query": "SELECT 1 AS customer_id  -- {{ source('events', 'raw') }}"},
        "destination": DESTINATION,
        "mapping": {"custom_id": "customer_id"},
    },
}
MANIFEST = {
    "nodes": {
        "model.shop.customers": {
            "resource_type": "model",
            "name": "customers",
            "database": "acme-prod",
            "schema": "crm",
            "alias": "customers",
        },
        "model.shop.scores": {
            "resource_type": "model",
            "name": "scores_v2",
            "database": "acme-prod",
            "schema": "marts",
            "alias": "scores",
        },
        "model.other.scores": {
            "resource_type": "model",
            "name": "scores_staging",
            "database": "acme-dev",
            "schema": "marts",
            "alias": "scores",
        },
        "test.shop.unique": {"resource_type": "test", "name": "unique", "database": "x", "schema": "y"},
    },
    "sources": {
        "source.shop.local.people": {
            "source_name": "local",
            "name": "people",
            "database": "segment",
            "schema": "main",
            "identifier": "people",
        }
    },
}


@pytest.fixture
def activation_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "activations"
    directory.mkdir()
    for name, body in ACTIVATIONS.items():
        (directory / name).write_text(yaml.safe_dump(body), encoding="utf-8")
    return directory


def test_every_activation_is_an_exposure_valid_under_dbts_schema(activation_dir: Path) -> None:
    text = render(load_activations(activation_dir).values(), Manifest.from_document(MANIFEST))
    document = yaml.safe_load(text)
    validate(document, SCHEMA)
    exposures = {item["label"]: item for item in document["exposures"]}
    assert set(exposures) == {"vip-customers", "local_people", "raw_events"}
    vip = exposures["vip-customers"]
    assert vip["name"] == "vip_customers"
    assert vip["type"] == "application"
    assert vip["owner"] == {"name": "CRM team", "email": "crm@example.com"}
    # The ref written in the query, the model behind the 3-part name, and marts.scores read in
    # the source's own project (acme-prod), not the dev copy.
    assert vip["depends_on"] == ["ref('vip_scores')", "ref('customers')", "ref('scores_v2')"]
    assert vip["meta"]["results"] == "analytics.cepsync_results"
    assert vip["meta"]["schedule"] == "0 * * * *"
    assert exposures["local_people"]["depends_on"] == ["source('local', 'people')"]
    assert exposures["raw_events"]["depends_on"] == ["source('events', 'raw')"]
    assert exposures["raw_events"]["owner"] == {"email": "data@example.com"}
    # What could not be told is a comment, and no owner is said to be a stand-in.
    assert "# local_people: no owner in the activation" in text
    assert exposures["local_people"]["owner"] == {"name": "cepsync"}


def test_without_a_manifest_tables_are_left_out_and_said_so(activation_dir: Path) -> None:
    text = render(load_activations(activation_dir).values())
    validate(yaml.safe_load(text), SCHEMA)
    assert "# vip-customers: table acme-prod.crm.customers: not matched to a dbt model or source (no --manifest" in text
    assert "# vip-customers: table marts.scores: not matched" in text
    assert "created_at" not in text.split("exposures:", 1)[0]
    vip = next(e for e in yaml.safe_load(text)["exposures"] if e["label"] == "vip-customers")
    assert vip["depends_on"] == ["ref('vip_scores')"]


def test_an_unknown_or_ambiguous_table_is_a_comment_never_a_guess(tmp_path: Path, activation_dir: Path) -> None:
    manifest = {"nodes": {k: v for k, v in MANIFEST["nodes"].items() if k != "model.shop.customers"}, "sources": {}}
    manifest["nodes"]["model.third.scores"] = {**manifest["nodes"]["model.shop.scores"], "name": "scores_copy"}
    text = render(load_activations(activation_dir).values(), Manifest.from_document(manifest))
    assert (
        "# vip-customers: table acme-prod.crm.customers: no model or source of the manifest has this relation" in text
    )
    assert (
        "table marts.scores: matches several relations of the manifest (ref('scores_copy'), ref('scores_v2'))" in text
    )
    vip = next(e for e in yaml.safe_load(text)["exposures"] if e["label"] == "vip-customers")
    assert vip["depends_on"] == ["ref('vip_scores')"]


def test_table_names_skip_ctes_functions_comments_and_subqueries() -> None:
    sql = (
        "WITH recent AS (SELECT * FROM `p.crm.orders` WHERE EXTRACT(YEAR FROM created_at) = 2026)\n"
        "SELECT c.* FROM crm.customers AS c JOIN recent r ON r.id = c.id LEFT JOIN `p`.`crm`.`tiers` t USING (id)\n"
        "WHERE c.id IN (SELECT id FROM vips) AND TRIM(BOTH ' ' FROM c.name) != '' -- FROM commented\n"
        "/* JOIN hidden */"
    )
    assert table_names(sql) == [["p", "crm", "orders"], ["crm", "customers"], ["p", "crm", "tiers"], ["vips"]]


def test_the_validator_refuses_what_dbt_refuses() -> None:
    good = {"version": 2, "exposures": [{"name": "a", "type": "application", "owner": {"name": "x"}, "depends_on": []}]}
    validate(good, SCHEMA)
    for broken in (
        {"version": 2, "exposures": [{"name": "a", "type": "app", "owner": {"name": "x"}, "depends_on": []}]},
        {"version": 2, "exposures": [{"name": "a", "type": "application", "owner": {}, "depends_on": []}]},
        {"version": 2, "exposures": [{"name": "a", "type": "application", "owner": {"name": "x"}}]},
        {"version": 2, "exposure": []},
    ):
        with pytest.raises(AssertionError):
            validate(broken, SCHEMA)


def test_the_command_prints_the_yaml_and_refuses_a_bad_manifest(tmp_path: Path, activation_dir: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(MANIFEST), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["dbt-exposures", str(activation_dir), "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    validate(yaml.safe_load(result.stdout), SCHEMA)
    manifest.write_text("{not json", encoding="utf-8")
    refused = runner.invoke(app, ["dbt-exposures", str(activation_dir), "--manifest", str(manifest)])
    assert refused.exit_code == 2
    assert "the dbt manifest is not JSON" in refused.stderr
    assert "Traceback" not in refused.output
    missing = runner.invoke(app, ["dbt-exposures", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "activation directory not found" in missing.stderr
