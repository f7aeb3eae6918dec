"""String attributes: 1-300 characters, not blank."""

from __future__ import annotations

from typing import Any

import pytest

from sync.config import AttributeType
from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, custom_mapper


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
