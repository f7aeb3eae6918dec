"""Whole rows: every key of a mapping, nulls, the invalid-value policies, rows straight from Arrow."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from sync.config import AttributeType
from sync.errors import ConfigError
from sync.mapping import ProfileMapper
from sync.model import Reason
from tests.support.mapping_support import (
    FULL_MAPPING,
    NATIVE_FIELDS,
    assert_maps_to,
    custom_mapper,
    make_activation,
    make_mapper,
    map_one,
    native_mapper,
)
from tests.support.reference_mapping import MappedRow, map_row


@pytest.mark.parametrize("field", list(NATIVE_FIELDS))
@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_natives_are_sent_as_null(field: str, value: Any) -> None:
    assert_maps_to(native_mapper(field, default_phone_region="FR"), value, NATIVE_FIELDS[field], None)


FULL_ATTRIBUTES = [
    {"column": "first_name", "type": "string"},
    {"column": "visits", "type": "integer"},
    {"column": "score", "type": "float"},
    {"column": "vip", "type": "boolean"},
    {"column": "birth", "name": "birthdate", "type": "date"},
    {"column": "site", "type": "url"},
    {"column": "tags", "type": "string_array"},
]
GOOD_ROW: dict[str, Any] = {
    "id": "u1",
    "email": "Ann@Example.com",
    "phone": "06 12 34 56 78",
    "lang": "fr-FR",
    "country": "FRA",
    "tz": "europe/paris",
    "email_optin": "yes",
    "sms_optin": False,
    "first_name": "Ann",
    "visits": 42,
    "score": Decimal("1.50"),
    "vip": True,
    "birth": date(1990, 1, 2),
    "site": "https://example.com/ann",
    "tags": ["a", None, "b"],
}
GOOD_PAYLOAD = {
    "$email_address": "Ann@example.com",
    "$phone_number": "+33612345678",
    "$language": "fr",
    "$region": "FR",
    "$timezone": "Europe/Paris",
    "$email_marketing": "subscribed",
    "$sms_marketing": "unsubscribed",
    "first_name": "Ann",
    "visits": 42,
    "score": 1.5,
    "vip": True,
    "date(birthdate)": "1990-01-02T00:00:00Z",
    "url(site)": "https://example.com/ann",
    "tags": ["a", "b"],
}
ALL_BARE_KEYS = {
    "$email_address",
    "$phone_number",
    "$language",
    "$region",
    "$timezone",
    "$email_marketing",
    "$sms_marketing",
    "first_name",
    "visits",
    "score",
    "vip",
    "birthdate",
    "site",
    "tags",
}


def full_mapper(policy: str = "reject_row") -> ProfileMapper:
    return make_mapper(FULL_MAPPING, FULL_ATTRIBUTES, on_invalid_value=policy)


def test_a_good_row_maps_to_the_full_payload() -> None:
    row = map_row(full_mapper(), GOOD_ROW)
    assert row == MappedRow(custom_id="u1", attributes=GOOD_PAYLOAD, issues=[])
    assert not row.rejected


def test_columns_and_owned_keys() -> None:
    mapper = full_mapper()
    assert mapper.columns == [
        "id",
        "email",
        "phone",
        "lang",
        "country",
        "tz",
        "email_optin",
        "sms_optin",
        "first_name",
        "visits",
        "score",
        "vip",
        "birth",
        "site",
        "tags",
    ]
    assert mapper.owned_keys == frozenset(ALL_BARE_KEYS)


def test_a_row_of_nulls_sends_every_bare_key_as_null() -> None:
    row = map_row(full_mapper(), {"id": "u1"})
    assert row.issues == []
    assert row.attributes == dict.fromkeys(ALL_BARE_KEYS)


def test_empty_strings_and_arrays_are_null_under_their_bare_keys() -> None:
    empties: dict[str, Any] = {column: "" for column in GOOD_ROW if column != "id"} | {
        "tags": [],
        "vip": None,
        "visits": None,
    }
    row = map_row(full_mapper(), {"id": "u1", **empties})
    assert row.issues == []
    assert row.attributes == dict.fromkeys(ALL_BARE_KEYS)
    assert "date(birthdate)" not in row.attributes
    assert "url(site)" not in row.attributes


BAD_VALUES = {
    "email": ("nope", Reason.INVALID_EMAIL),
    "phone": ("12", Reason.INVALID_PHONE),
    "lang": ("xx", Reason.INVALID_LANGUAGE),
    "country": ("XX", Reason.INVALID_REGION),
    "tz": ("Mars/Olympus", Reason.INVALID_TIMEZONE),
    "email_optin": ("maybe", Reason.INVALID_SUBSCRIPTION),
    "first_name": ("x" * 301, Reason.STRING_TOO_LONG),
    "visits": (2**64, Reason.INVALID_INTEGER),
    "score": (math.nan, Reason.INVALID_FLOAT),
    "vip": ("yes", Reason.INVALID_BOOLEAN),
    "birth": ("soon", Reason.INVALID_DATE),
    "site": ("example.com", Reason.INVALID_URL),
    "tags": ([1], Reason.INVALID_ARRAY),
}


def test_reject_row_lists_every_problem_of_the_row() -> None:
    bad_row = {**GOOD_ROW, **{column: value for column, (value, _) in BAD_VALUES.items()}}
    row = map_row(full_mapper(), bad_row)
    assert row.rejected
    assert row.custom_id == "u1"
    assert [(issue.field, issue.reason) for issue in row.issues] == [
        (column, reason) for column, (_, reason) in BAD_VALUES.items()
    ]


def test_drop_attribute_leaves_bad_keys_out_and_sends_the_rest() -> None:
    row = map_row(full_mapper("drop_attribute"), {**GOOD_ROW, "phone": "12", "birth": "soon", "tags": ["x"] * 26})
    assert not row.rejected
    assert row.custom_id == "u1"
    assert [(issue.field, issue.reason) for issue in row.issues] == [
        ("phone", Reason.INVALID_PHONE),
        ("birth", Reason.INVALID_DATE),
        ("tags", Reason.ARRAY_TOO_LONG),
    ]
    expected = {k: v for k, v in GOOD_PAYLOAD.items() if k not in {"$phone_number", "date(birthdate)", "tags"}}
    assert row.attributes == expected
    # Neither the bare nor the wrapped key: Batch keeps what it had.
    assert "birthdate" not in row.attributes
    assert "$phone_number" not in row.attributes


def test_a_bad_value_under_reject_row_with_the_rest_good_still_rejects() -> None:
    row = map_row(full_mapper(), {**GOOD_ROW, "visits": True})
    assert row.rejected
    assert row.issues[0].field == "visits"
    assert row.issues[0].reason is Reason.INVALID_INTEGER


def test_issue_details_quote_the_value_truncated() -> None:
    long_value = "https-not-a-url-" + "z" * 5000
    row = map_one(custom_mapper(AttributeType.URL, name="site"), long_value)
    (issue,) = row.issues
    assert "https-not-a-url-" in issue.detail
    assert "…" in issue.detail
    assert len(issue.detail) < 100


def test_a_missing_column_in_the_row_reads_as_null() -> None:
    row = map_row(make_mapper({"email": "email"}), {"id": "u1"})
    assert row.attributes == {"$email_address": None}


def test_one_column_can_feed_several_keys() -> None:
    mapper = make_mapper(
        {"email": "email"},
        [{"column": "email", "name": "contact", "type": "string"}, {"column": "id", "name": "crm_id"}],
        types={"email": AttributeType.STRING, "id": AttributeType.STRING},
    )
    row = map_row(mapper, {"id": "u1", "email": "ann@example.com"})
    assert row.attributes == {"$email_address": "ann@example.com", "contact": "ann@example.com", "crm_id": "u1"}
    assert mapper.columns == ["id", "email"]


def test_mapper_requires_a_type_for_every_attribute() -> None:
    activation = make_activation(attributes=[{"column": "first_name"}])
    with pytest.raises(ConfigError, match="crm-sync") as caught:
        ProfileMapper(activation, {})
    assert caught.value.field == "attributes.0.type"


def test_rows_straight_from_arrow_map_as_expected() -> None:
    mapper = make_mapper(
        {"phone": "phone"},
        [
            {"column": "seen", "type": "date"},
            {"column": "day", "type": "date"},
            {"column": "amount", "type": "float"},
            {"column": "count", "type": "integer"},
            {"column": "tags", "type": "string_array"},
        ],
    )
    batch = pa.RecordBatch.from_pydict(
        {
            "id": pa.array([1, 2], pa.int64()),
            "phone": pa.array([33612345678, None], pa.int64()),
            "seen": pa.array(
                [datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC), None], pa.timestamp("us", tz="Europe/Paris")
            ),
            "day": pa.array([date(2024, 1, 2), None], pa.date32()),
            "amount": pa.array([Decimal("12.50"), None], pa.decimal128(10, 2)),
            "count": pa.array([Decimal("7"), None], pa.decimal128(20, 0)),
            "tags": pa.array([["a", None], []], pa.list_(pa.string())),
        }
    )
    rows = [map_row(mapper, row) for row in batch.to_pylist()]
    assert rows[0] == MappedRow(
        custom_id="1",
        attributes={
            "$phone_number": "+33612345678",
            "date(seen)": "2024-01-02T03:04:05.006Z",
            "date(day)": "2024-01-02T00:00:00Z",
            "amount": 12.5,
            "count": 7,
            "tags": ["a"],
        },
    )
    assert rows[1] == MappedRow(
        custom_id="2",
        attributes={"$phone_number": None, "seen": None, "day": None, "amount": None, "count": None, "tags": None},
    )
