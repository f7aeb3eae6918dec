"""``resolve_attribute_types``: the mapping checked against the segment's Arrow schema before any read."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from sync.config import AttributeType
from sync.errors import ConfigError
from sync.mapping import ProfileMapper, resolve_attribute_types
from tests.support.mapping_support import NATIVE_FIELDS, make_activation
from tests.support.reference_mapping import map_row


def schema_of(**columns: pa.DataType) -> pa.Schema:
    return pa.schema([("id", pa.string()), *columns.items()])


@pytest.mark.parametrize("field", ["custom_id", *NATIVE_FIELDS])
def test_a_missing_mapped_column_is_a_config_error(field: str) -> None:
    activation = make_activation({field: "absent"} if field != "custom_id" else {"custom_id": "absent"})
    with pytest.raises(ConfigError) as caught:
        resolve_attribute_types(activation, schema_of(other=pa.string()), source="crm-sync.yaml")
    error = caught.value
    assert error.field == f"mapping.{field}"
    assert error.source == "crm-sync.yaml"
    assert "crm-sync" in str(error)
    assert "'absent'" in str(error)


def test_a_missing_attribute_column_is_a_config_error() -> None:
    activation = make_activation(attributes=[{"column": "first_name"}, {"column": "absent"}])
    with pytest.raises(ConfigError) as caught:
        resolve_attribute_types(activation, schema_of(first_name=pa.string()), source="crm-sync.yaml")
    assert caught.value.field == "attributes.1.column"
    assert "activation 'crm-sync'" in str(caught.value)


@pytest.mark.parametrize(
    ("arrow_type", "expected"),
    [
        (pa.string(), AttributeType.STRING),
        (pa.large_string(), AttributeType.STRING),
        (pa.string_view(), AttributeType.STRING),
        (pa.dictionary(pa.int32(), pa.string()), AttributeType.STRING),
        (pa.int8(), AttributeType.INTEGER),
        (pa.int16(), AttributeType.INTEGER),
        (pa.int32(), AttributeType.INTEGER),
        (pa.int64(), AttributeType.INTEGER),
        (pa.uint32(), AttributeType.INTEGER),
        (pa.uint64(), AttributeType.INTEGER),
        (pa.float16(), AttributeType.FLOAT),
        (pa.float32(), AttributeType.FLOAT),
        (pa.float64(), AttributeType.FLOAT),
        (pa.decimal128(38, 9), AttributeType.FLOAT),
        (pa.decimal128(10, 2), AttributeType.FLOAT),
        (pa.decimal256(76, 38), AttributeType.FLOAT),
        (pa.decimal128(20, 0), AttributeType.INTEGER),
        (pa.decimal256(40, 0), AttributeType.INTEGER),
        (pa.bool_(), AttributeType.BOOLEAN),
        (pa.date32(), AttributeType.DATE),
        (pa.date64(), AttributeType.DATE),
        (pa.timestamp("us"), AttributeType.DATE),
        (pa.timestamp("us", tz="UTC"), AttributeType.DATE),
        (pa.timestamp("ns", tz="Europe/Paris"), AttributeType.DATE),
        (pa.list_(pa.string()), AttributeType.STRING_ARRAY),
        (pa.large_list(pa.string()), AttributeType.STRING_ARRAY),
        (pa.list_(pa.large_string()), AttributeType.STRING_ARRAY),
    ],
)
def test_types_are_inferred_from_arrow(arrow_type: pa.DataType, expected: AttributeType) -> None:
    activation = make_activation(attributes=[{"column": "col"}])
    resolved = resolve_attribute_types(activation, schema_of(col=arrow_type), source="crm-sync.yaml")
    assert resolved == {"col": expected}


@pytest.mark.parametrize(
    "arrow_type",
    [
        pa.struct([("a", pa.string())]),
        pa.list_(pa.int64()),
        pa.map_(pa.string(), pa.string()),
        pa.binary(),
        pa.time64("us"),
        pa.duration("s"),
        pa.null(),
    ],
)
def test_uninferable_types_are_config_errors(arrow_type: pa.DataType) -> None:
    activation = make_activation(attributes=[{"column": "first_name"}, {"column": "col"}])
    with pytest.raises(ConfigError, match="cannot infer") as caught:
        resolve_attribute_types(activation, schema_of(first_name=pa.string(), col=arrow_type), source="crm-sync.yaml")
    assert caught.value.field == "attributes.1.type"
    assert "crm-sync" in str(caught.value)


COMPATIBLE = [
    ("string", pa.string()),
    ("string", pa.large_string()),
    ("integer", pa.int32()),
    ("integer", pa.decimal128(18, 0)),
    # Whole values of a decimal with a scale (BigQuery NUMERIC) are integers (issue 19).
    ("integer", pa.decimal128(38, 9)),
    ("integer", pa.decimal256(76, 38)),
    ("float", pa.float32()),
    ("float", pa.decimal128(10, 3)),
    ("float", pa.int64()),
    ("boolean", pa.bool_()),
    ("boolean", pa.string()),
    ("date", pa.date32()),
    ("date", pa.timestamp("ms", tz="UTC")),
    ("date", pa.string()),
    ("url", pa.string()),
    ("string_array", pa.list_(pa.string())),
    ("string", pa.null()),
    ("date", pa.null()),
]


@pytest.mark.parametrize(("type_name", "arrow_type"), COMPATIBLE)
def test_compatible_explicit_types(type_name: str, arrow_type: pa.DataType) -> None:
    activation = make_activation(attributes=[{"column": "col", "type": type_name}])
    resolved = resolve_attribute_types(activation, schema_of(col=arrow_type), source="crm-sync.yaml")
    assert resolved == {"col": AttributeType(type_name)}


INCOMPATIBLE = [
    ("string", pa.int64()),
    ("string", pa.list_(pa.string())),
    ("integer", pa.float64()),
    ("integer", pa.string()),
    ("float", pa.string()),
    ("float", pa.bool_()),
    ("boolean", pa.int64()),
    ("date", pa.int64()),
    ("date", pa.time32("s")),
    ("url", pa.int64()),
    ("url", pa.list_(pa.string())),
    ("string_array", pa.string()),
    ("string_array", pa.list_(pa.int64())),
    ("string", pa.struct([("a", pa.string())])),
]


@pytest.mark.parametrize(("type_name", "arrow_type"), INCOMPATIBLE)
def test_incompatible_explicit_types_are_config_errors(type_name: str, arrow_type: pa.DataType) -> None:
    activation = make_activation(attributes=[{"column": "col", "type": type_name}])
    with pytest.raises(ConfigError, match=type_name) as caught:
        resolve_attribute_types(activation, schema_of(col=arrow_type), source="crm-sync.yaml")
    assert caught.value.field == "attributes.0.type"
    assert "crm-sync" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "arrow_type"),
    [
        ("custom_id", pa.float64()),
        ("custom_id", pa.bool_()),
        ("custom_id", pa.timestamp("us")),
        ("email", pa.int64()),
        ("phone", pa.float64()),
        ("language", pa.int64()),
        ("region", pa.list_(pa.string())),
        ("timezone", pa.int32()),
        ("email_marketing", pa.float64()),
        ("sms_marketing", pa.date32()),
    ],
)
def test_natives_from_an_unreadable_arrow_type_are_config_errors(field: str, arrow_type: pa.DataType) -> None:
    activation = make_activation({field: "col"})
    schema = pa.schema([("id", pa.string()), ("col", arrow_type)])
    with pytest.raises(ConfigError, match="cannot be read as") as caught:
        resolve_attribute_types(activation, schema, source="crm-sync.yaml")
    assert caught.value.field == f"mapping.{field}"


@pytest.mark.parametrize(
    ("field", "arrow_type"),
    [
        ("custom_id", pa.int64()),
        ("custom_id", pa.decimal128(38, 9)),
        ("custom_id", pa.large_string()),
        ("phone", pa.int64()),
        ("email_marketing", pa.bool_()),
        ("sms_marketing", pa.int8()),
        ("timezone", pa.dictionary(pa.int8(), pa.string())),
    ],
)
def test_natives_from_readable_arrow_types(field: str, arrow_type: pa.DataType) -> None:
    activation = make_activation({field: "col"})
    schema = pa.schema([("id", pa.string()), ("col", arrow_type)])
    assert resolve_attribute_types(activation, schema, source="crm-sync.yaml") == {}


def test_one_column_with_two_different_types_is_a_config_error() -> None:
    activation = make_activation(
        attributes=[{"column": "col", "name": "as_text"}, {"column": "col", "name": "as_date", "type": "date"}]
    )
    with pytest.raises(ConfigError, match="as string") as caught:
        resolve_attribute_types(activation, schema_of(col=pa.string()), source="crm-sync.yaml")
    assert caught.value.field == "attributes.1.type"


def test_resolved_types_drive_the_mapper() -> None:
    activation = make_activation(attributes=[{"column": "seen"}, {"column": "visits"}])
    schema = schema_of(seen=pa.timestamp("us", tz="UTC"), visits=pa.decimal128(12, 0))
    mapper = ProfileMapper(activation, resolve_attribute_types(activation, schema, source="x.yaml"))
    row = map_row(mapper, {"id": "u1", "seen": datetime(2024, 1, 2, tzinfo=UTC), "visits": Decimal("3")})
    assert row.attributes == {"date(seen)": "2024-01-02T00:00:00Z", "visits": 3}


# --- A name the segment returns twice (issue 19, item 5) ---------------------------------------


@pytest.mark.parametrize(
    ("mapping", "attributes", "names", "field"),
    [
        ({"email": "email"}, [], ["id", "email", "email"], "mapping.email"),
        ({}, [{"column": "tier"}], ["id", "tier", "TIER"], "attributes.0.column"),
        ({}, [], ["id", "ID"], "mapping.custom_id"),
    ],
)
def test_a_mapped_column_the_segment_returns_twice_is_a_config_error(
    mapping: dict[str, str], attributes: list[dict[str, str]], names: list[str], field: str
) -> None:
    activation = make_activation(mapping, attributes)
    schema = pa.schema([(name, pa.string()) for name in names])
    with pytest.raises(ConfigError) as caught:
        resolve_attribute_types(activation, schema, source="crm-sync.yaml")
    assert caught.value.field == field
    assert "activation 'crm-sync'" in str(caught.value)
    assert "is ambiguous" in str(caught.value)
    assert "AS" in str(caught.value)


def test_a_repeated_name_that_is_not_mapped_is_left_alone() -> None:
    activation = make_activation({"email": "email"})
    schema = pa.schema(
        [("id", pa.string()), ("email", pa.string()), ("updated_at", pa.int64()), ("updated_at", pa.int64())]
    )
    assert resolve_attribute_types(activation, schema, source="crm-sync.yaml") == {}
