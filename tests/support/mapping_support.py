"""Mappers and assertions the mapping tests (tests/mapping/) share."""

from __future__ import annotations

from typing import Any

from sync.config import Activation, AttributeType
from sync.config_file import parse_activation
from sync.mapping import ProfileMapper
from sync.model import Reason
from tests.support.reference_mapping import MappedRow, map_row

NATIVE_FIELDS = {
    "email": "$email_address",
    "phone": "$phone_number",
    "language": "$language",
    "region": "$region",
    "timezone": "$timezone",
    "email_marketing": "$email_marketing",
    "sms_marketing": "$sms_marketing",
}


def make_activation(
    mapping: dict[str, Any] | None = None,
    attributes: list[dict[str, Any]] | None = None,
    on_invalid_value: str = "reject_row",
) -> Activation:
    return parse_activation(
        {
            "name": "crm-sync",
            "source": {"type": "duckdb", "database": "segment.duckdb", "table": "segment"},
            "destination": {"api_key_env": "BATCH_KEY", "project_key_env": "BATCH_PROJECT"},
            "mapping": {"custom_id": "id", **(mapping or {})},
            "attributes": attributes or [],
            "on_invalid_value": on_invalid_value,
        },
        source="crm-sync.yaml",
    )


def make_mapper(
    mapping: dict[str, Any] | None = None,
    attributes: list[dict[str, Any]] | None = None,
    on_invalid_value: str = "reject_row",
    types: dict[str, AttributeType] | None = None,
) -> ProfileMapper:
    activation = make_activation(mapping, attributes, on_invalid_value)
    if types is None:
        types = {a.column: a.type for a in activation.attributes if a.type is not None}
    return ProfileMapper(activation, types)


def native_mapper(field: str, **mapping: Any) -> ProfileMapper:
    return make_mapper({field: "value", **mapping})


def custom_mapper(attribute_type: AttributeType, name: str = "value") -> ProfileMapper:
    return make_mapper(attributes=[{"column": "value", "name": name, "type": attribute_type.value}])


def map_one(mapper: ProfileMapper, value: Any) -> MappedRow:
    return map_row(mapper, {"id": "u1", "value": value})


def assert_maps_to(mapper: ProfileMapper, value: Any, key: str, expected: Any) -> None:
    row = map_one(mapper, value)
    assert row.issues == []
    assert row.attributes is not None
    assert row.attributes[key] == expected
    assert type(row.attributes[key]) is type(expected)


def assert_rejected(mapper: ProfileMapper, value: Any, reason: Reason, field: str = "value") -> None:
    row = map_one(mapper, value)
    assert row.rejected
    assert [(issue.field, issue.reason) for issue in row.issues] == [(field, reason)]


# A mapping of every native field (tests/mapping/test_rows.py, test_properties.py).
FULL_MAPPING = {
    "email": "email",
    "phone": "phone",
    "language": "lang",
    "region": "country",
    "timezone": "tz",
    "email_marketing": "email_optin",
    "sms_marketing": "sms_optin",
    "default_phone_region": "FR",
}
