"""String-array attributes: 1-25 valid strings."""

from __future__ import annotations

from typing import Any

import pytest

from sync.config import AttributeType
from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, custom_mapper


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
