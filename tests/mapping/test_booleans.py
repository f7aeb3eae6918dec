"""Boolean attributes, from booleans and from the strings true and false."""

from __future__ import annotations

from typing import Any

import pytest

from sync.config import AttributeType
from sync.model import Reason
from tests.support.mapping_support import assert_maps_to, assert_rejected, custom_mapper


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), (" FALSE ", False), ("True", True), ("", None)],
)
def test_booleans(value: Any, expected: bool | None) -> None:
    assert_maps_to(custom_mapper(AttributeType.BOOLEAN), value, "value", expected)


@pytest.mark.parametrize("value", ["yes", "1", "t", 1, 0, 1.0, ["true"]])
def test_invalid_booleans(value: Any) -> None:
    assert_rejected(custom_mapper(AttributeType.BOOLEAN), value, Reason.INVALID_BOOLEAN)
