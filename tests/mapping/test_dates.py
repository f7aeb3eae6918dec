"""Date attributes: ISO-8601 in UTC ending in Z, under ``date(name)``."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from sync.config import AttributeType
from sync.model import Reason
from tests.support.mapping_support import assert_rejected, custom_mapper, map_one

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
