"""Property tests: payloads checked by a validator written here from batch-api.md decision 7,
independently of the mapper's own code.
"""

from __future__ import annotations

import json
import math
import re
import zoneinfo
from datetime import datetime
from decimal import Decimal
from typing import Any

import pycountry
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.fingerprint import canonical_json
from sync.mapping import ProfileMapper
from sync.model import Reason
from tests.support.mapping_support import FULL_MAPPING, make_mapper
from tests.support.reference_mapping import MappedRow, map_row

# An independent reading of batch-api.md decision 7, deliberately not sharing code with
# sync/mapping.py or sync/convert.py.

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
        mapped = map_row(mapper, row)
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
    first = map_row(mapper, row)
    second = map_row(mapper, dict(reversed(list(row.items()))))
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
        # At most 15 significant digits: what a double always keeps (wider ones are refused,
        # inexact_number: tests/mapping/test_numbers.py).
        | st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**11) + 1, max_value=10**11 - 1),
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
    mapped = map_row(mapper, row)
    assert mapped.issues == []
    assert mapped.attributes is not None
    check_batch_payload(mapped.custom_id, mapped.attributes)
    assert {_WRAPPED.sub(r"\2", key) for key in mapped.attributes} == mapper.owned_keys
