"""Integer and float attributes: 64-bit integers, finite floats."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config import AttributeType
from sync.mapping import resolve_attribute_types
from sync.model import Reason
from tests.support.mapping_support import (
    assert_maps_to,
    assert_rejected,
    custom_mapper,
    make_activation,
    make_mapper,
    map_one,
)
from tests.support.reference_mapping import map_batch


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


# --- Decimals wider than a double (issue 19, item 4) -------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("19.990000000"), 19.99),
        (Decimal("0.1"), 0.1),
        (Decimal("-7.250000000"), -7.25),
        (Decimal("123456789012.123"), 123456789012.123),
        (2**60, float(2**60)),
        (2**53, float(2**53)),
        (Decimal(2**60), float(2**60)),
    ],
)
def test_numbers_a_double_keeps_whole_are_sent_as_floats(value: Any, expected: float) -> None:
    assert_maps_to(custom_mapper(AttributeType.FLOAT), value, "value", expected)


@pytest.mark.parametrize(
    ("value", "arrives_as"),
    [
        (Decimal("12345678901234567890123456789.123456789"), "1.2345678901234568e+28"),
        (Decimal("0.12345678901234567890"), "0.12345678901234568"),
        (Decimal("1234567890.1234567891"), "1234567890.1234567"),
        (2**53 + 1, "9007199254740992.0"),
        (-(2**63) + 1, "-9.223372036854776e+18"),
    ],
)
def test_numbers_a_double_would_round_are_refused_naming_what_would_arrive(value: Any, arrives_as: str) -> None:
    mapper = custom_mapper(AttributeType.FLOAT)
    assert_rejected(mapper, value, Reason.INEXACT_NUMBER)
    (issue,) = map_one(mapper, value).issues
    assert str(value) in issue.detail
    assert f"it would arrive as {arrives_as}" in issue.detail


@pytest.mark.parametrize(
    ("value", "expected"),
    [(Decimal("42.000000000"), 42), (Decimal("-9223372036854775808.000000000"), -(2**63))],
)
def test_whole_values_of_a_decimal_with_a_scale_are_integers(value: Decimal, expected: int) -> None:
    assert_maps_to(custom_mapper(AttributeType.INTEGER), value, "value", expected)


@pytest.mark.parametrize(
    ("value", "words"),
    [(Decimal("42.500000000"), "not a whole number"), (Decimal("9223372036854775808.000"), "64-bit")],
)
def test_a_fraction_or_a_too_wide_decimal_is_never_rounded_into_an_integer(value: Decimal, words: str) -> None:
    mapper = custom_mapper(AttributeType.INTEGER)
    assert_rejected(mapper, value, Reason.INVALID_INTEGER)
    assert words in map_one(mapper, value).issues[0].detail


def test_duckdb_and_bigquery_decimal_columns_keep_their_digits() -> None:
    """DECIMAL(38,9) (BigQuery NUMERIC) and DECIMAL(76,38) (BIGNUMERIC) through the batch path."""
    values = [Decimal("12345678901234567890123456789.123456789"), Decimal("19.99"), None]
    for arrow_type in (pa.decimal128(38, 9), pa.decimal256(76, 38)):
        batch = pa.record_batch({"id": ["u1", "u2", "u3"], "value": pa.array(values, arrow_type)})
        mapper = make_mapper(
            attributes=[{"column": "value"}],
            types=resolve_attribute_types(make_activation(attributes=[{"column": "value"}]), batch.schema, source="x"),
        )
        rows = map_batch(mapper, batch)
        assert [issue.reason for issue in rows[0].issues] == [Reason.INEXACT_NUMBER]
        assert rows[0].attributes is None
        assert rows[1].attributes == {"value": 19.99}
        assert rows[2].attributes == {"value": None}


@settings(max_examples=500, deadline=None)
@given(value=st.decimals(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(2**64), max_value=2**64))
def test_a_number_is_sent_as_a_float_only_when_no_digit_is_lost(value: Decimal | int) -> None:
    row = map_one(custom_mapper(AttributeType.FLOAT), value)
    if row.attributes is None:
        assert [issue.reason for issue in row.issues] in ([Reason.INEXACT_NUMBER], [Reason.INVALID_FLOAT])
        return
    sent = row.attributes["value"]
    # Either the double is the value, or the JSON text of the double is.
    assert Decimal(sent) == value or Decimal(repr(sent)) == value
