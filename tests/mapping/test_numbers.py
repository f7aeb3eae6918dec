"""Integer and float attributes: 64-bit integers, finite floats."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest

from sync.config import AttributeType
from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, custom_mapper, map_one


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
