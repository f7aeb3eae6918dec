"""Activation config: every error is caught before anything is read or sent, and names file and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync.config import Activation, Credentials, MappingConfig, mapping_version
from sync.config_file import json_schema, load_activation, load_activations, parse_activation
from sync.errors import ConfigError
from sync.natives import NATIVE_FIELDS


def base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "vip_customers",
        "source": {"type": "duckdb", "database": "segment.duckdb", "table": "customers"},
        "destination": {"api_key_env": "BATCH_REST_API_KEY", "project_key_env": "BATCH_PROJECT_KEY"},
        "mapping": {"custom_id": "customer_id", "email": "email"},
        "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "loyalty_points"}],
    }
    config.update(overrides)
    return config


def write(tmp_path: Path, data: Any, name: str = "activation.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def error_of(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_activation(data, source="a.yaml")
    return caught.value


def test_a_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    activation = load_activation(write(tmp_path, base_config()))
    assert activation.run_type == "full_then_delta"
    assert activation.sync_mode == "upsert"
    assert activation.destination.api_version == "2.11"
    assert activation.destination.base_url == "https://api.batch.com"
    assert activation.mapped_columns == ["customer_id", "email", "first_name", "loyalty_points"]
    # The DuckDB path is resolved next to the activation file.
    assert activation.source.database == str((tmp_path / "segment.duckdb").resolve())  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("attributes", "field", "fragment"),
    [
        ([{"column": "a", "name": "FirstName"}], "attributes.0.name", "no uppercase"),
        ([{"column": "a", "name": "first-name"}], "attributes.0.name", "a-z, 0-9 and _"),
        ([{"column": "a", "name": "x" * 31}], "attributes.0.name", "1-30 characters"),
        ([{"column": "Bad Column"}], "attributes.0.name", "'Bad Column'"),
        (
            [{"column": "a", "name": "points"}, {"column": "b", "name": "points"}],
            "attributes.1.name",
            "two attributes map to the Batch name 'points'",
        ),
    ],
)
def test_attribute_name_errors_name_the_field(attributes: list[dict[str, str]], field: str, fragment: str) -> None:
    error = error_of(base_config(attributes=attributes))
    assert error.field == field
    assert fragment in str(error)
    assert "a.yaml" in str(error)


def test_a_thirty_character_lowercase_name_is_fine() -> None:
    activation = parse_activation(base_config(attributes=[{"column": "a", "name": "a" * 30}]), source="a.yaml")
    assert activation.attributes[0].batch_name == "a" * 30


def test_more_than_fifty_custom_attributes_is_refused() -> None:
    attributes = [{"column": f"c{i}"} for i in range(51)]
    error = error_of(base_config(attributes=attributes))
    assert "at most 50" in str(error)
    assert parse_activation(base_config(attributes=attributes[:50]), source="a.yaml")


def test_mirror_needs_full_then_delta() -> None:
    error = error_of(base_config(sync_mode="mirror", run_type="full_only"))
    assert "mirror" in str(error)
    assert "full_then_delta" in str(error)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"unexpected": 1}, "unexpected"),
        ({"mapping": {"custom_id": "id", "emial": "email"}}, "mapping.emial"),
        ({"destination": {"api_key_env": "K", "project_key_env": "P", "api_key": "secret"}}, "destination.api_key"),
    ],
)
def test_unknown_keys_are_errors(patch: dict[str, Any], field: str) -> None:
    error = error_of(base_config(**patch))
    assert error.field == field
    assert "unknown key" in str(error)


def test_source_needs_exactly_one_of_query_or_table() -> None:
    both = error_of(base_config(source={"type": "duckdb", "database": "x", "table": "t", "query": "select 1"}))
    assert "exactly one" in str(both)
    neither = error_of(base_config(source={"type": "duckdb", "database": "x"}))
    assert "exactly one" in str(neither)


def test_a_table_name_with_sql_in_it_is_refused() -> None:
    error = error_of(base_config(source={"type": "duckdb", "database": "x", "table": "t; drop table t"}))
    assert error.field == "source.table" or "table" in str(error)


def test_secret_values_are_not_accepted_as_env_var_names_and_not_echoed() -> None:
    secret = "sk-live-0123456789abcdef"
    error = error_of(base_config(destination={"api_key_env": secret, "project_key_env": "P"}))
    assert error.field == "destination.api_key_env"
    assert secret not in str(error)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_activation(broken)
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_activation(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_activation(write(tmp_path, ["a", "list"]))


def test_activation_names_must_be_unique_in_a_directory(tmp_path: Path) -> None:
    write(tmp_path, base_config(), "one.yaml")
    write(tmp_path, base_config(), "two.yml")
    with pytest.raises(ConfigError, match="used twice"):
        load_activations(tmp_path)


def test_credentials_come_from_the_environment_and_never_show(tmp_path: Path) -> None:
    activation = parse_activation(base_config(), source="a.yaml")
    with pytest.raises(ConfigError, match="BATCH_REST_API_KEY") as caught:
        Credentials.from_env(activation, {"BATCH_PROJECT_KEY": "p"})
    assert caught.value.field == "destination"
    credentials = Credentials.from_env(
        activation, {"BATCH_REST_API_KEY": "super-secret-key", "BATCH_PROJECT_KEY": "project_secret"}
    )
    assert credentials.api_key.get_secret_value() == "super-secret-key"
    for text in (repr(credentials), str(credentials), repr(credentials.api_key)):
        assert "super-secret-key" not in text
        assert "project_secret" not in text


def test_mapping_version_follows_the_mapping_only() -> None:
    one = parse_activation(base_config(), source="a.yaml")
    same = parse_activation(base_config(description="renamed", guards={"max_removed_percent": 5}), source="a.yaml")
    other = parse_activation(base_config(attributes=[{"column": "first_name"}]), source="a.yaml")
    assert mapping_version(one) == mapping_version(same)
    assert mapping_version(one) != mapping_version(other)
    assert len(mapping_version(one)) == 16


def test_send_defaults_to_the_whole_profile_and_leaves_the_mapping_version_alone() -> None:
    whole = parse_activation(base_config(), source="a.yaml")
    changed = parse_activation(base_config(send="changed_attributes"), source="a.yaml")
    assert whole.send == "whole_profile"
    assert changed.send == "changed_attributes"
    # Switching it sends nothing by itself: no re-mapping of every row.
    assert mapping_version(whole) == mapping_version(changed)
    error = error_of(base_config(send="changed"))
    assert error.field == "send"
    assert "changed_attributes" in str(error)
    assert "send" in json_schema()["properties"]


def test_json_schema_describes_the_model() -> None:
    schema = json_schema()
    assert schema["title"] == "cepsync activation"
    assert {"name", "source", "destination", "mapping"} <= set(schema["required"])
    json.dumps(schema)
    assert Activation.model_json_schema()["additionalProperties"] is False


# -- issue 8: encodings, duplicate keys, schedules, phone regions --------------------------------


@pytest.mark.parametrize(
    ("encoding", "prefix"),
    [("latin-1", b""), ("utf-16", b""), ("random", b"\xff\xfe\x00\x9c\x81")],
)
def test_a_file_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path: Path, encoding: str, prefix: bytes) -> None:
    text = yaml.safe_dump(base_config(description="Clients fidèles"), allow_unicode=True)
    data = prefix + (text.encode(encoding) if encoding != "random" else bytes(range(128, 256)))
    path = tmp_path / "latin.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        load_activation(path)
    message = str(caught.value)
    assert "latin.yaml" in message
    assert "UTF-8" in message


def test_utf8_with_a_byte_order_mark_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(base_config(description="fidèles")).encode("utf-8"))
    assert load_activation(path).description == "fidèles"


def test_a_duplicated_key_is_a_config_error_naming_key_and_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(base_config(), sort_keys=False) + "attributes:\n  - column: other\n"
    path = tmp_path / "twice.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_activation(path)
    message = str(caught.value)
    assert "twice.yaml" in message
    assert "'attributes'" in message
    assert "line" in message


def test_a_duplicated_nested_key_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "nested.yaml"
    text = yaml.safe_dump(base_config(), sort_keys=False).replace(
        "  email: email\n", "  email: email\n  email: other_email\n"
    )
    assert text.count("email:") == 2
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="'email'"):
        load_activation(path)


@pytest.mark.parametrize(
    "cron",
    [
        "every hour please",
        "61 * * * *",
        "* 24 * * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "* * * *",
        "0 * * * * *",
    ],
)
def test_a_bad_cron_expression_is_refused(cron: str) -> None:
    error = error_of(base_config(schedule={"cron": cron}))
    assert error.field == "schedule.cron"
    assert "cron" in str(error)


@pytest.mark.parametrize("cron", ["0 * * * *", "*/15 9-17 * * mon-fri", "30 2 1,15 jan,jul *", "0 0 * * 0"])
def test_good_cron_expressions_load(cron: str) -> None:
    assert parse_activation(base_config(schedule={"cron": cron}), source="a.yaml").schedule is not None


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe/Pariss", "", "../etc/passwd", "europe/paris"])
def test_a_time_zone_not_in_the_iana_database_is_refused(zone: str) -> None:
    error = error_of(base_config(schedule={"cron": "0 * * * *", "time_zone": zone}))
    assert error.field == "schedule.time_zone"
    assert "IANA" in str(error)


def test_a_real_time_zone_loads() -> None:
    activation = parse_activation(
        base_config(schedule={"cron": "0 * * * *", "time_zone": "America/Argentina/Buenos_Aires"}), source="a.yaml"
    )
    assert activation.schedule is not None
    assert activation.schedule.time_zone == "America/Argentina/Buenos_Aires"


@pytest.mark.parametrize("region", ["XX", "ZZ", "AA"])
def test_a_default_phone_region_unknown_to_the_phone_library_is_refused(region: str) -> None:
    error = error_of(
        base_config(mapping={"custom_id": "customer_id", "phone": "phone", "default_phone_region": region})
    )
    assert error.field == "mapping.default_phone_region"
    assert region in str(error)


def test_both_phone_libraries_know_the_same_regions() -> None:
    """The region is checked against rphonenumbers (asked first); phonenumbers, the second opinion, must agree."""
    import phonenumbers
    import rphonenumbers

    assert set(rphonenumbers.SUPPORTED_REGIONS) == set(phonenumbers.SUPPORTED_REGIONS)


@pytest.mark.parametrize("region", ["FR", "GB", "US", "DE", "RE"])
def test_a_real_default_phone_region_loads(region: str) -> None:
    config = base_config(mapping={"custom_id": "customer_id", "phone": "phone", "default_phone_region": region})
    assert parse_activation(config, source="a.yaml").mapping.default_phone_region == region


def test_the_native_field_table_is_the_mapping_configs_native_fields_in_order() -> None:
    not_native = ("custom_id", "default_phone_region", "convention", "on_null")
    declared = [name for name in MappingConfig.model_fields if name not in not_native]
    assert declared == [native.field for native in NATIVE_FIELDS]
    for native in NATIVE_FIELDS:
        assert native.key in (MappingConfig.model_fields[native.field].description or ""), native
    columns = {native.field: f"col_{native.field}" for native in reversed(NATIVE_FIELDS)}
    mapping = MappingConfig(custom_id="id", **columns)
    # The table's order, whatever the order of the activation file.
    assert list(mapping.native_columns().items()) == [(native.key, f"col_{native.field}") for native in NATIVE_FIELDS]
    assert MappingConfig(custom_id="id", phone="tel").native_columns() == {"$phone_number": "tel"}
