"""Date attributes: ISO-8601 in UTC ending in Z, under ``date(name)``."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from sync.config import AttributeType
from sync.model import Reason, RowIssue
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


# --- Columns DuckDB and Parquet writers produce (issue 19, items 1 and 2) ---------------------


def _duckdb_batch(select: str) -> pa.RecordBatch:
    """The record batch DuckDB hands the run for ``select`` (columns id, value)."""
    with duckdb.connect() as connection:
        return connection.sql(select).to_arrow_table().combine_chunks().to_batches()[0]


def _convert(select: str) -> tuple[list[Any], dict[int, list[RowIssue]]]:
    mapper = custom_mapper(AttributeType.DATE, name="birthdate")
    converted = mapper.convert_batch(_duckdb_batch(select))
    (field,) = converted.fields
    return field.results(), converted.issues


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        # Nanoseconds and microseconds are cut to the millisecond, never rounded up.
        ("'2024-01-02 03:04:05.123456789'::TIMESTAMP_NS", "2024-01-02T03:04:05.123Z"),
        ("'2024-12-31 23:59:59.999999999'::TIMESTAMP_NS", "2024-12-31T23:59:59.999Z"),
        ("'1969-12-31 23:59:59.999999999'::TIMESTAMP_NS", "1969-12-31T23:59:59.999Z"),
        ("'1900-01-01 00:00:00.000000001'::TIMESTAMP_NS", "1900-01-01T00:00:00Z"),
        ("'2024-01-02 03:04:05'::TIMESTAMP_S", "2024-01-02T03:04:05Z"),
        ("'2024-01-02 03:04:05.5'::TIMESTAMP_MS", "2024-01-02T03:04:05.500Z"),
        ("'2024-01-02 03:04:05.123456'::TIMESTAMP", "2024-01-02T03:04:05.123Z"),
        ("'2024-01-02 03:04:05.123456+02'::TIMESTAMPTZ", "2024-01-02T01:04:05.123Z"),
        ("'2024-01-02'::DATE", "2024-01-02T00:00:00Z"),
    ],
)
def test_every_duckdb_timestamp_precision_is_read(literal: str, expected: str) -> None:
    values, issues = _convert(f"SELECT 'u1' AS id, {literal} AS value UNION ALL SELECT 'u2', NULL")
    assert issues == {}
    assert values == [expected, None]


def test_nanosecond_timestamps_zoned_outside_utc_are_cut_too() -> None:
    timestamps = pa.array([1_704_164_645_123_456_789, -1], pa.timestamp("ns", "Europe/Paris"))
    batch = pa.record_batch({"id": ["u1", "u2"], "value": timestamps})
    mapper = custom_mapper(AttributeType.DATE, name="birthdate")
    converted = mapper.convert_batch(batch)
    (field,) = converted.fields
    assert field.results() == ["2024-01-02T03:04:05.123Z", "1969-12-31T23:59:59.999Z"]


@pytest.mark.parametrize(
    ("literal", "words"),
    [
        ("'infinity'::TIMESTAMP", "infinity, which is not a date"),
        ("'-infinity'::TIMESTAMP", "-infinity, which is not a date"),
        ("'infinity'::TIMESTAMPTZ", "infinity, which is not a date"),
        ("'-infinity'::TIMESTAMPTZ", "-infinity, which is not a date"),
        ("'infinity'::DATE", "infinity, which is not a date"),
        ("'-infinity'::DATE", "-infinity, which is not a date"),
        ("'infinity'::TIMESTAMP_NS", "infinity, which is not a date"),
        ("'infinity'::TIMESTAMP_S", "infinity, which is not a date"),
        ("'infinity'::TIMESTAMP_MS", "infinity, which is not a date"),
        ("'10000-01-01'::DATE", "outside the years 1 to 9999"),
        ("'10000-01-01'::TIMESTAMP", "outside the years 1 to 9999"),
    ],
)
def test_infinite_and_far_dates_reject_their_row_only(literal: str, words: str) -> None:
    values, issues = _convert(
        f"SELECT * FROM (VALUES ('u1', {literal}), ('u2', '2024-01-02'::DATE::{literal.split('::')[-1]}), "
        "('u3', NULL)) AS t(id, value)"
    )
    assert list(issues) == [0]
    (issue,) = issues[0]
    assert (issue.field, issue.reason) == ("value", Reason.INVALID_DATE)
    assert words in issue.detail
    assert values[1] == "2024-01-02T00:00:00Z"
    assert values[2] is None
