"""Row → Batch payload mapping (sync/mapping.py): every rule, every reason code, schema checks.

The property tests at the end check payloads with a validator written here from
batch-api.md decision 7, independently of the mapper's own code.
"""

from __future__ import annotations

import json
import math
import re
import zoneinfo
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pycountry
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.config import Activation, AttributeType, parse_activation
from sync.errors import ConfigError
from sync.fingerprint import canonical_json
from sync.mapping import ProfileMapper, resolve_attribute_types
from sync.model import MappedRow, Reason

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
    return mapper.map_row({"id": "u1", "value": value})


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


# --- custom_id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("u1", "u1"),
        (" padded id ", " padded id "),  # ids are whitespace-sensitive: never trimmed
        ("MiXeD", "MiXeD"),
        ("nullable", "nullable"),
        ("x" * 1024, "x" * 1024),
        (42, "42"),
        (-7, "-7"),
        (0, "0"),
        (2**70, str(2**70)),
        (Decimal("123"), "123"),
        (Decimal("1.2E+3"), "1200"),
    ],
)
def test_valid_custom_ids(value: Any, expected: str) -> None:
    row = make_mapper().map_row({"id": value})
    assert row.custom_id == expected
    assert row.attributes == {}
    assert row.issues == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.MISSING_CUSTOM_ID),
        ("", Reason.MISSING_CUSTOM_ID),
        ("   ", Reason.MISSING_CUSTOM_ID),
        ("\t\n", Reason.MISSING_CUSTOM_ID),
        ("null", Reason.INVALID_CUSTOM_ID),
        ("NULL", Reason.INVALID_CUSTOM_ID),
        ("Undefined", Reason.INVALID_CUSTOM_ID),
        ("nan", Reason.INVALID_CUSTOM_ID),
        ("NaN", Reason.INVALID_CUSTOM_ID),
        (1.5, Reason.INVALID_CUSTOM_ID),
        (2.0, Reason.INVALID_CUSTOM_ID),
        (True, Reason.INVALID_CUSTOM_ID),
        (Decimal("1.5"), Reason.INVALID_CUSTOM_ID),
        (Decimal("NaN"), Reason.INVALID_CUSTOM_ID),
        (b"u1", Reason.INVALID_CUSTOM_ID),
        (["u1"], Reason.INVALID_CUSTOM_ID),
        (date(2024, 1, 1), Reason.INVALID_CUSTOM_ID),
        ("x" * 1025, Reason.CUSTOM_ID_TOO_LONG),
        (10**1025, Reason.CUSTOM_ID_TOO_LONG),
    ],
)
@pytest.mark.parametrize("policy", ["reject_row", "drop_attribute"])
def test_bad_custom_ids_always_reject_the_row(value: Any, reason: Reason, policy: str) -> None:
    mapper = make_mapper({"email": "email"}, on_invalid_value=policy)
    row = mapper.map_row({"id": value, "email": "ann@example.com"})
    assert row.rejected
    assert row.custom_id is None
    assert [(issue.field, issue.reason) for issue in row.issues] == [("id", reason)]


def test_a_bad_custom_id_still_reports_the_other_problems_of_the_row() -> None:
    mapper = make_mapper({"email": "email", "phone": "phone"})
    row = mapper.map_row({"id": None, "email": "not-an-email", "phone": "+33612345678"})
    assert row.rejected
    assert [(i.field, i.reason) for i in row.issues] == [
        ("id", Reason.MISSING_CUSTOM_ID),
        ("email", Reason.INVALID_EMAIL),
    ]


# --- natives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("06.12.34.56.78", "FR", "+33612345678"),
        ("+33 6 12 34 56 78", "FR", "+33612345678"),
        ("+33 6 12 34 56 78", None, "+33612345678"),
        ("0033 6 12 34 56 78", "FR", "+33612345678"),
        (" +33612345678 ", None, "+33612345678"),
        ("(650) 253-0000", "US", "+16502530000"),
        ("+1 650-253-0000", "FR", "+16502530000"),
        ("+44 20 7946 0958", None, "+442079460958"),
        ("020 7946 0958", "GB", "+442079460958"),
        (612345678, "FR", "+33612345678"),  # an integer column lost the leading 0
        (33612345678, "FR", "+33612345678"),
        (33612345678, None, "+33612345678"),  # an integer cannot hold the "+"
        (16502530000, None, "+16502530000"),
    ],
)
def test_phones_are_normalised_to_e164(value: Any, region: str | None, expected: str) -> None:
    assert_maps_to(native_mapper("phone", default_phone_region=region), value, "$phone_number", expected)


@pytest.mark.parametrize(
    ("value", "region"),
    [
        ("06 12 34 56 78", None),  # national number, no region to read it with
        ("12", "FR"),
        ("abc", "FR"),
        ("+33 1", None),
        ("+33 6 12 34 56 789 012", None),
        ("+999 123456", None),
        ("0" * 300, "FR"),
        (612345678, None),
        (-612345678, "FR"),
        (True, "FR"),
        (6.12345678e8, "FR"),
        (["+33612345678"], None),
    ],
)
def test_invalid_phones(value: Any, region: str | None) -> None:
    assert_rejected(native_mapper("phone", default_phone_region=region), value, Reason.INVALID_PHONE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ann@example.com", "ann@example.com"),
        ("Alice@Example.COM", "Alice@example.com"),
        ("  bob@example.org  ", "bob@example.org"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        # Internationalised domains go in their ASCII (IDNA) form, the only one Batch
        # accepts; a non-ASCII local part is kept, as Batch's pattern allows it.
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
        ("ab@xn--bcher-kva.de", "ab@xn--bcher-kva.de"),
        ("José@EXAMPLE.com", "José@example.com"),
        ("joë@examplé.fr", "joë@xn--exampl-gva.fr"),
        ("Info@Example.com", "info@example.com"),  # RFC 2142 names are case-insensitive
    ],
)
def test_emails_are_validated_and_normalised(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("email"), value, "$email_address", expected)


@pytest.mark.parametrize(
    "value",
    [
        "not-an-email",
        "a@b",
        "a@@example.com",
        "@example.com",
        "ann@",
        "ann@localhost",
        "ann @example.com",
        "ann@exa_mple.com",
        "a" * 250 + "@example.com",
        "a" * 60 + "@" + ".".join(["b" * 60] * 4) + ".com",
        "用户@例子.广告",  # Batch accepts no internationalised top-level domain (xn--...)
        42,
        True,
        ["ann@example.com"],
    ],
)
def test_invalid_emails(value: Any) -> None:
    assert_rejected(native_mapper("email"), value, Reason.INVALID_EMAIL)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fr", "fr"),
        ("FR", "fr"),
        ("fr-FR", "fr"),
        ("fr_FR", "fr"),
        (" en ", "en"),
        ("en-us", "en"),
        ("zh-Hant-TW", "zh"),
    ],
)
def test_languages(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("language"), value, "$language", expected)


@pytest.mark.parametrize("value", ["fra", "french", "xx", "f", "-fr", "fr-", "12", 33, True])
def test_invalid_languages(value: Any) -> None:
    if value == "fr-":
        # The primary subtag is what counts: "fr-" still names French.
        assert_maps_to(native_mapper("language"), value, "$language", "fr")
        return
    assert_rejected(native_mapper("language"), value, Reason.INVALID_LANGUAGE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("FR", "FR"), ("fr", "FR"), ("FRA", "FR"), ("fra", "FR"), (" us ", "US"), ("DEU", "DE"), ("GBR", "GB")],
)
def test_regions(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("region"), value, "$region", expected)


@pytest.mark.parametrize("value", ["XX", "EU", "F", "FRANCE", "fr-FR", "250", 250, False])
def test_invalid_regions(value: Any) -> None:
    assert_rejected(native_mapper("region"), value, Reason.INVALID_REGION)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Europe/Paris", "Europe/Paris"),
        ("europe/paris", "Europe/Paris"),
        ("EUROPE/PARIS", "Europe/Paris"),
        (" america/new_york ", "America/New_York"),
        ("america/argentina/buenos_aires", "America/Argentina/Buenos_Aires"),
        ("UTC", "UTC"),
        ("utc", "UTC"),
    ],
)
def test_timezones_are_found_case_insensitively(value: str, expected: str) -> None:
    assert_maps_to(native_mapper("timezone"), value, "$timezone", expected)


@pytest.mark.parametrize("value", ["Mars/Olympus", "Paris", "+02:00", "Europe/", "europe paris", 1, True])
def test_invalid_timezones(value: Any) -> None:
    assert_rejected(native_mapper("timezone"), value, Reason.INVALID_TIMEZONE)


SUBSCRIPTION_TABLE = [
    *[
        (value, "subscribed")
        for value in (
            True,
            1,
            "subscribed",
            "SUBSCRIBED",
            " true ",
            "True",
            "yes",
            "Y",
            "1",
            "opt_in",
            "opt-in",
            "optin",
            "OPTED_IN",
            "opted-in",
        )
    ],
    *[
        (value, "unsubscribed")
        for value in (
            False,
            0,
            "unsubscribed",
            "false",
            "FALSE",
            "no",
            "n",
            "0",
            "opt_out",
            "opt-out",
            "optout",
            "opted_out",
            "Opted-Out",
        )
    ],
]


@pytest.mark.parametrize("field", ["email_marketing", "sms_marketing"])
@pytest.mark.parametrize(("value", "expected"), SUBSCRIPTION_TABLE)
def test_subscriptions(field: str, value: Any, expected: str) -> None:
    assert_maps_to(native_mapper(field), value, NATIVE_FIELDS[field], expected)


@pytest.mark.parametrize("value", ["maybe", "reset", "subscribe", 2, -1, 1.0, ["yes"]])
def test_invalid_subscriptions(value: Any) -> None:
    assert_rejected(native_mapper("email_marketing"), value, Reason.INVALID_SUBSCRIPTION)


@pytest.mark.parametrize("field", list(NATIVE_FIELDS))
@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_natives_are_sent_as_null(field: str, value: Any) -> None:
    assert_maps_to(native_mapper(field, default_phone_region="FR"), value, NATIVE_FIELDS[field], None)


# --- custom attributes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Ann", "Ann"),
        (" Ann ", " Ann "),
        ("x" * 300, "x" * 300),
        ("é" * 300, "é" * 300),
        ("line one\nline two", "line one\nline two"),
        ("", None),
        ("   ", None),
        ("\t\n", None),
    ],
)
def test_strings(value: str, expected: str | None) -> None:
    assert_maps_to(custom_mapper(AttributeType.STRING), value, "value", expected)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("x" * 301, Reason.STRING_TOO_LONG),
        ("é" * 301, Reason.STRING_TOO_LONG),
        (5, Reason.INVALID_STRING),
        (True, Reason.INVALID_STRING),
        (["a"], Reason.INVALID_STRING),
    ],
)
def test_invalid_strings(value: Any, reason: Reason) -> None:
    assert_rejected(custom_mapper(AttributeType.STRING), value, reason)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (0, 0),
        (-(2**63), -(2**63)),
        (2**63 - 1, 2**63 - 1),
        (Decimal("12"), 12),
        (Decimal("12.000"), 12),
        (Decimal("1E+3"), 1000),
        (Decimal("-0"), 0),
        ("", None),
        ("  ", None),
    ],
)
def test_integers(value: Any, expected: int) -> None:
    assert_maps_to(custom_mapper(AttributeType.INTEGER), value, "value", expected)


@pytest.mark.parametrize(
    "value",
    [2**63, -(2**63) - 1, 10**100, True, False, Decimal("12.5"), Decimal("NaN"), Decimal("1E+999999"), 5.0, "5", [5]],
)
def test_invalid_integers(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.INTEGER), value, Reason.INVALID_INTEGER)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, 1.5),
        (3, 3.0),
        (Decimal("1.25"), 1.25),
        (Decimal("-7"), -7.0),
        (1e308, 1e308),
        (2**63, 2.0**63),
        ("", None),
        (" ", None),
    ],
)
def test_floats(value: Any, expected: float) -> None:
    assert_maps_to(custom_mapper(AttributeType.FLOAT), value, "value", expected)


def test_negative_zero_float_is_sent_as_zero() -> None:
    row = map_one(custom_mapper(AttributeType.FLOAT), -0.0)
    assert row.attributes is not None
    assert math.copysign(1.0, row.attributes["value"]) == 1.0


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("1E+400"),
        10**400,
        True,
        "1.5",
        [1.5],
    ],
)
def test_invalid_floats(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.FLOAT), value, Reason.INVALID_FLOAT)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), (" FALSE ", False), ("True", True), ("", None)],
)
def test_booleans(value: Any, expected: bool | None) -> None:
    assert_maps_to(custom_mapper(AttributeType.BOOLEAN), value, "value", expected)


@pytest.mark.parametrize("value", ["yes", "1", "t", 1, 0, 1.0, ["true"]])
def test_invalid_booleans(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.BOOLEAN), value, Reason.INVALID_BOOLEAN)


PLUS_TWO = timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (date(2024, 1, 2), "2024-01-02T00:00:00Z"),
        (date(1, 1, 1), "0001-01-01T00:00:00Z"),
        (datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05Z"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05Z"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=PLUS_TWO), "2024-01-02T01:04:05Z"),
        (datetime(2024, 1, 2, 1, 0, tzinfo=PLUS_TWO), "2024-01-01T23:00:00Z"),
        (datetime(2024, 7, 1, 12, 0, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")), "2024-07-01T10:00:00Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 678000), "2024-01-02T03:04:05.678Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 123456), "2024-01-02T03:04:05.123Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 999), "2024-01-02T03:04:05Z"),
        ("2024-01-02", "2024-01-02T00:00:00Z"),
        ("2024-01-02T10:00:00Z", "2024-01-02T10:00:00Z"),
        ("2024-01-02T10:00:00+02:00", "2024-01-02T08:00:00Z"),
        ("2024-01-02T10:00:00.5-05:00", "2024-01-02T15:00:00.500Z"),
        ("2024-01-02 10:00:00", "2024-01-02T10:00:00Z"),
        (" 2024-01-02T10:00 ", "2024-01-02T10:00:00Z"),
        ("20240102T100000Z", "2024-01-02T10:00:00Z"),
        ("", None),
    ],
)
def test_dates_become_iso_utc_with_a_wrapped_key(value: Any, expected: str | None) -> None:
    mapper = custom_mapper(AttributeType.DATE, name="birthdate")
    row = map_one(mapper, value)
    assert row.issues == []
    if expected is None:
        assert row.attributes == {"birthdate": None}
    else:
        assert row.attributes == {"date(birthdate)": expected}


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-13-01",
        "31/12/2024",
        "2024-02-30",
        5,
        1.5,
        True,
        datetime(1, 1, 1, 0, 30, tzinfo=PLUS_TWO),
        datetime(9999, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2))),
    ],
)
def test_invalid_dates(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.DATE, name="birthdate"), value, Reason.INVALID_DATE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com", "https://example.com"),
        ("http://example.com/a/b?c=d&e=f#g", "http://example.com/a/b?c=d&e=f#g"),
        ("https://user@example.com:8443/x", "https://user@example.com:8443/x"),
        ("https://bücher.de/straße", "https://bücher.de/straße"),
        ("myapp://home/offers", "myapp://home/offers"),
        ("myapp:///home", "myapp:///home"),  # deep link with an empty authority
        (" https://example.com/padded ", "https://example.com/padded"),
        ("https://example.com/" + "a" * 2028, "https://example.com/" + "a" * 2028),
        ("", None),
        ("  ", None),
    ],
)
def test_urls(value: str, expected: str | None) -> None:
    row = map_one(custom_mapper(AttributeType.URL, name="site"), value)
    assert row.issues == []
    if expected is None:
        assert len(value) == 0 or value.isspace()
        assert row.attributes == {"site": None}
    else:
        assert len(expected) <= 2048
        assert row.attributes == {"url(site)": expected}


@pytest.mark.parametrize(
    "value",
    [
        "example.com",
        "www.example.com/path",
        "mailto:ann@example.com",
        "https://",
        "http:///path",
        "https:/example.com",
        "https://exa mple.com",
        "https://example.com/\nx",
        "https://example.com/\tx",
        "https://[::1",
        "https://example.com/" + "a" * 2029,
        "//example.com",
        5,
        ["https://example.com"],
    ],
)
def test_invalid_urls(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.URL, name="site"), value, Reason.INVALID_URL)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], ["a", "b"]),
        (("a", "b"), ["a", "b"]),
        ([None, "a", "", "  ", "b", None], ["a", "b"]),
        ([" a "], [" a "]),
        (["x" * 300], ["x" * 300]),
        ([str(i) for i in range(25)], [str(i) for i in range(25)]),
        ([*(str(i) for i in range(25)), None, None, ""], [str(i) for i in range(25)]),
        (["a", "a"], ["a", "a"]),
        ([], None),
        ([None], None),
        (["", " "], None),
        ("", None),
    ],
)
def test_string_arrays(value: Any, expected: list[str] | None) -> None:
    assert_maps_to(custom_mapper(AttributeType.STRING_ARRAY), value, "value", expected)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([str(i) for i in range(26)], Reason.ARRAY_TOO_LONG),
        (["x" * 301], Reason.INVALID_ARRAY),
        (["a", 1], Reason.INVALID_ARRAY),
        (["a", ["b"]], Reason.INVALID_ARRAY),
        ("a,b", Reason.INVALID_ARRAY),
        (5, Reason.INVALID_ARRAY),
        ({"a": "b"}, Reason.INVALID_ARRAY),
    ],
)
def test_invalid_string_arrays(value: Any, reason: Reason) -> None:
    assert_rejected(custom_mapper(AttributeType.STRING_ARRAY), value, reason)


# --- whole rows, nulls, policies ----------------------------------------------------------

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
    row = full_mapper().map_row(GOOD_ROW)
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
    row = full_mapper().map_row({"id": "u1"})
    assert row.issues == []
    assert row.attributes == dict.fromkeys(ALL_BARE_KEYS)


def test_empty_strings_and_arrays_are_null_under_their_bare_keys() -> None:
    empties: dict[str, Any] = {column: "" for column in GOOD_ROW if column != "id"} | {
        "tags": [],
        "vip": None,
        "visits": None,
    }
    row = full_mapper().map_row({"id": "u1", **empties})
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
    row = full_mapper().map_row(bad_row)
    assert row.rejected
    assert row.custom_id == "u1"
    assert [(issue.field, issue.reason) for issue in row.issues] == [
        (column, reason) for column, (_, reason) in BAD_VALUES.items()
    ]


def test_drop_attribute_leaves_bad_keys_out_and_sends_the_rest() -> None:
    row = full_mapper("drop_attribute").map_row({**GOOD_ROW, "phone": "12", "birth": "soon", "tags": ["x"] * 26})
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
    row = full_mapper().map_row({**GOOD_ROW, "visits": True})
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
    row = make_mapper({"email": "email"}).map_row({"id": "u1"})
    assert row.attributes == {"$email_address": None}


def test_one_column_can_feed_several_keys() -> None:
    mapper = make_mapper(
        {"email": "email"},
        [{"column": "email", "name": "contact", "type": "string"}, {"column": "id", "name": "crm_id"}],
        types={"email": AttributeType.STRING, "id": AttributeType.STRING},
    )
    row = mapper.map_row({"id": "u1", "email": "ann@example.com"})
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
    rows = [mapper.map_row(row) for row in batch.to_pylist()]
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


# --- resolve_attribute_types --------------------------------------------------------------


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
    ("integer", pa.decimal128(10, 2)),
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
    row = mapper.map_row({"id": "u1", "seen": datetime(2024, 1, 2, tzinfo=UTC), "visits": Decimal("3")})
    assert row.attributes == {"date(seen)": "2024-01-02T00:00:00Z", "visits": 3}


# --- properties -----------------------------------------------------------------------------
# An independent reading of batch-api.md decision 7, deliberately not sharing code with
# sync/mapping.py.

_ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3})?Z$")
_E164 = re.compile(r"^\+[0-9]{1,15}$")
_NAME = re.compile(r"^[a-z0-9_]{1,30}$")
_WRAPPED = re.compile(r"^(date|url)\(([a-z0-9_]{1,30})\)$")
_URL_SHAPE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S*$")
_TIMEZONES = zoneinfo.available_timezones()


def _is_batch_string(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 300 and value.strip() != ""


def _check_native(key: str, value: Any) -> None:
    if key == "$email_address":
        assert isinstance(value, str)
        assert len(value) <= 256
        local, _, domain = value.rpartition("@")
        assert local
        assert "." in domain
    elif key == "$phone_number":
        assert isinstance(value, str)
        assert _E164.match(value)
    elif key == "$language":
        assert isinstance(value, str)
        assert re.fullmatch(r"[a-z]{2}", value)
        assert pycountry.languages.get(alpha_2=value) is not None
    elif key == "$region":
        assert isinstance(value, str)
        assert re.fullmatch(r"[A-Z]{2}", value)
        assert pycountry.countries.get(alpha_2=value) is not None
    elif key == "$timezone":
        assert value in _TIMEZONES
        zoneinfo.ZoneInfo(value)
    elif key in ("$email_marketing", "$sms_marketing"):
        assert value in ("subscribed", "unsubscribed")
    else:
        pytest.fail(f"unknown native key {key}")


def _check_custom(kind: str, value: Any) -> None:
    if kind == "date":
        assert isinstance(value, str)
        assert _ISO_UTC.match(value)
        datetime.fromisoformat(value)
    elif kind == "url":
        assert isinstance(value, str)
        assert len(value) <= 2048
        assert _URL_SHAPE.match(value)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        assert -(2**63) <= value < 2**63
    elif isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, list):
        assert 1 <= len(value) <= 25
        assert all(_is_batch_string(item) for item in value)
    else:
        assert _is_batch_string(value), value


def check_batch_payload(custom_id: Any, attributes: dict[str, Any]) -> None:
    assert isinstance(custom_id, str)
    assert 1 <= len(custom_id) <= 1024
    assert custom_id.strip() != ""
    assert custom_id.lower() not in ("null", "undefined", "nan")
    json.dumps(attributes, allow_nan=False)
    custom_count = 0
    bare_names: list[str] = []
    for key, value in attributes.items():
        if key.startswith("$"):
            bare_names.append(key)
            if value is not None:
                _check_native(key, value)
            continue
        wrapped = _WRAPPED.match(key)
        custom_count += 1
        if wrapped:
            assert value is not None, "null values use the bare key"
            bare_names.append(wrapped.group(2))
            _check_custom(wrapped.group(1), value)
        else:
            assert _NAME.match(key)
            bare_names.append(key)
            if value is not None:
                _check_custom("plain", value)
    assert custom_count <= 50
    assert len(bare_names) == len(set(bare_names)), "one key per attribute"


@pytest.mark.parametrize(
    ("custom_id", "attributes"),
    [
        ("", {}),
        ("null", {}),
        ("x" * 1025, {}),
        ("u1", {"$phone_number": "0612345678"}),
        ("u1", {"$email_address": "nope"}),
        ("u1", {"$language": "FR"}),
        ("u1", {"$region": "fr"}),
        ("u1", {"$timezone": "europe/paris"}),
        ("u1", {"$email_marketing": "yes"}),
        ("u1", {"name": ""}),
        ("u1", {"name": "x" * 301}),
        ("u1", {"Name": "x"}),
        ("u1", {"score": math.nan}),
        ("u1", {"big": 2**63}),
        ("u1", {"date(d)": "2024-01-02T00:00:00+02:00"}),
        ("u1", {"date(d)": None}),
        ("u1", {"url(u)": "example.com"}),
        ("u1", {"tags": []}),
        ("u1", {"tags": ["a"] * 26}),
        ("u1", {"d": None, "date(d)": "2024-01-02T00:00:00Z"}),
    ],
)
def test_the_independent_validator_refuses_bad_payloads(custom_id: str, attributes: dict[str, Any]) -> None:
    with pytest.raises((AssertionError, ValueError)):
        check_batch_payload(custom_id, attributes)


EVERY_TYPE_ATTRIBUTES = [
    {"column": "c_string", "type": "string"},
    {"column": "c_integer", "type": "integer"},
    {"column": "c_float", "type": "float"},
    {"column": "c_boolean", "type": "boolean"},
    {"column": "c_date", "type": "date"},
    {"column": "c_url", "type": "url"},
    {"column": "c_array", "type": "string_array"},
]
EVERY_COLUMN = ["id", "email", "phone", "lang", "country", "tz", "email_optin", "sms_optin"] + [
    a["column"] for a in EVERY_TYPE_ATTRIBUTES
]

any_scalar = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(min_size=290, max_size=310, alphabet="ab "),
    st.integers(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(),
    st.booleans(),
    st.decimals(),
    st.dates(),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.binary(max_size=5),
)
plausible = st.sampled_from(
    [
        "u1",
        " u 2 ",
        "null",
        "ann@example.com",
        "A@bücher.de",
        "06 12 34 56 78",
        "+33612345678",
        33612345678,
        "fr-FR",
        "FRA",
        "europe/paris",
        "yes",
        "opt_out",
        "true",
        "2024-01-02T10:00:00+02:00",
        "https://example.com/x",
        "myapp:///home",
        "x" * 300,
        "",
        "   ",
        Decimal("12"),
        Decimal("1.5"),
        -0.0,
        math.nan,
        2**63,
    ]
)
any_value = st.one_of(
    plausible,
    any_scalar,
    st.lists(st.one_of(st.none(), st.text(max_size=10), st.integers(), plausible), max_size=30),
)
any_row = st.fixed_dictionaries({column: any_value for column in EVERY_COLUMN})


@pytest.fixture(scope="module")
def property_mappers() -> dict[str, ProfileMapper]:
    return {
        policy: make_mapper(FULL_MAPPING, EVERY_TYPE_ATTRIBUTES, on_invalid_value=policy)
        for policy in ("reject_row", "drop_attribute")
    }


PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY_SETTINGS
@given(row=any_row)
def test_map_row_never_raises_and_payloads_obey_batch_rules(
    property_mappers: dict[str, ProfileMapper], row: dict[str, Any]
) -> None:
    for policy, mapper in property_mappers.items():
        mapped = mapper.map_row(row)
        assert isinstance(mapped, MappedRow)
        for issue in mapped.issues:
            assert issue.field in EVERY_COLUMN
            assert isinstance(issue.reason, Reason)
            assert len(issue.detail) < 200
        if mapped.attributes is None:
            assert mapped.issues, "a rejected row says why"
            continue
        check_batch_payload(mapped.custom_id, mapped.attributes)
        bare = {_WRAPPED.sub(r"\2", key) for key in mapped.attributes}
        assert bare <= mapper.owned_keys
        if policy == "reject_row":
            assert mapped.issues == []
            assert bare == mapper.owned_keys
        else:
            # Exactly the keys with an issue are left out.
            assert len(mapper.owned_keys - bare) == len(mapped.issues)


@PROPERTY_SETTINGS
@given(row=any_row)
def test_mapping_is_deterministic(property_mappers: dict[str, ProfileMapper], row: dict[str, Any]) -> None:
    mapper = property_mappers["drop_attribute"]
    first = mapper.map_row(row)
    second = mapper.map_row(dict(reversed(list(row.items()))))
    assert first == second
    if first.attributes is not None:
        assert canonical_json(first.attributes) == canonical_json(second.attributes)


LANGUAGE_CODES = sorted(lang.alpha_2 for lang in pycountry.languages if hasattr(lang, "alpha_2"))
COUNTRIES = list(pycountry.countries)
SAFE_DATETIMES = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.one_of(st.none(), st.timezones())
)
valid_row = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=60).filter(
            lambda s: s.strip() != "" and s.lower() not in ("null", "undefined", "nan")
        )
        | st.integers(),
        "email": st.none()
        | st.sampled_from(["ann@example.com", " Bob.Smith+x@Example.ORG ", "user@bücher.de", "ab@xn--bcher-kva.de"]),
        "phone": st.none() | st.sampled_from(["06 12 34 56 78", "+1 650-253-0000", "0033612345678", 612345678]),
        "lang": st.builds(
            lambda code, upper, suffix: (code.upper() if upper else code) + suffix,
            st.sampled_from(LANGUAGE_CODES),
            st.booleans(),
            st.sampled_from(["", "-FR", "_us", "-Hant-TW"]),
        ),
        "country": st.builds(
            lambda country, alpha3, upper: (
                (country.alpha_3 if alpha3 else country.alpha_2).upper()
                if upper
                else (country.alpha_3 if alpha3 else country.alpha_2).lower()
            ),
            st.sampled_from(COUNTRIES),
            st.booleans(),
            st.booleans(),
        ),
        "tz": st.builds(
            lambda name, case: {"lower": name.lower(), "upper": name.upper(), "same": name}[case],
            st.sampled_from(sorted(_TIMEZONES)),
            st.sampled_from(["lower", "upper", "same"]),
        ),
        "email_optin": st.none() | st.booleans() | st.sampled_from(["yes", "NO", " opt-in ", "Unsubscribed", "1"]),
        "sms_optin": st.none() | st.booleans() | st.sampled_from([0, 1, "y", "opted_out"]),
        "c_string": st.none() | st.text(max_size=300),
        "c_integer": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "c_float": st.none()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.integers(min_value=-(2**53), max_value=2**53)
        | st.decimals(allow_nan=False, allow_infinity=False, places=4),
        "c_boolean": st.none() | st.booleans() | st.sampled_from(["true", "FALSE"]),
        "c_date": st.none() | st.dates() | SAFE_DATETIMES | SAFE_DATETIMES.map(lambda d: d.isoformat()),
        "c_url": st.none()
        | st.builds(
            lambda scheme, path: f"{scheme}://example.com/{path}",
            st.sampled_from(["http", "https", "ftp", "myapp"]),
            st.text(alphabet="abcxyz0123456789-._~/?=&#%", max_size=100),
        ),
        "c_array": st.none() | st.lists(st.none() | st.text(max_size=300), max_size=25),
    }
)


@PROPERTY_SETTINGS
@given(row=valid_row)
def test_valid_rows_are_never_rejected_and_obey_batch_rules(
    property_mappers: dict[str, ProfileMapper], row: dict[str, Any]
) -> None:
    mapper = property_mappers["reject_row"]
    mapped = mapper.map_row(row)
    assert mapped.issues == []
    assert mapped.attributes is not None
    check_batch_payload(mapped.custom_id, mapped.attributes)
    assert {_WRAPPED.sub(r"\2", key) for key in mapped.attributes} == mapper.owned_keys
