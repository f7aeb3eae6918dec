"""Decode: Arrow columns -> the Python values the converters read, once per distinct value.

The batch path reads each mapped column out of a record batch whole. A string, boolean,
date or timestamp column is dictionary-encoded, so its converter (:mod:`sync.convert`)
runs once per distinct value and every row points at its result; a date or timestamp
column is first made readable by Python (nanoseconds cut, DuckDB's ``infinity`` and
years beyond 1-9999 taken out as :class:`sync.convert.Unrepresentable`), and is often
formatted in Arrow without a Python value at all (:func:`dates_in_columns`). Its own
module because it is all Arrow and nothing of Batch's rules: the converters decide what a
value becomes, this only decides how few times they are asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from sync.convert import Failure, Unrepresentable

# --- Temporal values Python's datetime cannot hold -------------------------------------------
# DuckDB writes TIMESTAMP/DATE 'infinity' and '-infinity' into Arrow as the largest and
# (almost) smallest value of the storage integer; a year beyond 9999 or before 1 is an
# ordinary value there. Python's datetime holds years 1-9999 only, so pyarrow raises
# OverflowError for these: one such cell used to fail the whole run. They are found in
# columns, before any value reaches Python, and become an ``invalid_date`` rejection of
# their row (docs/mapping.md, "Dates and timestamps").

# The instants of datetime.min and datetime.max (naive, read as UTC), in epoch seconds.
_FIRST_SECOND: Final = -62_135_596_800
_LAST_SECOND: Final = 253_402_300_799
_SECONDS_PER_DAY: Final = 86_400
_UNIT_PER_SECOND: Final[Mapping[str, int]] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _storage_bounds(arrow_type: pa.DataType) -> tuple[pa.DataType, int, int]:
    """The integer type a temporal column is stored as, and the stored values Python can read."""
    if pa.types.is_date32(arrow_type):
        return pa.int32(), _FIRST_SECOND // _SECONDS_PER_DAY, _LAST_SECOND // _SECONDS_PER_DAY
    if pa.types.is_date64(arrow_type):
        return pa.int64(), _FIRST_SECOND * 1_000, (_LAST_SECOND + 1) * 1_000 - 1
    # A nanosecond value of 2**63 - 1 is a real instant (2262-04-11) but, in practice, only
    # ever DuckDB's 'infinity': the bounds leave both infinities out for every unit.
    per_second = _UNIT_PER_SECOND[arrow_type.unit]
    first, last = _FIRST_SECOND, _LAST_SECOND
    if arrow_type.tz is not None and arrow_type.tz not in _UTC_ZONES:
        # pyarrow builds an aware value in UTC, then moves it into its zone: a day's margin
        # keeps that move inside datetime's range whatever the zone's offset. (A UTC column
        # is read as naive: decode_column.)
        first, last = first + _SECONDS_PER_DAY, last - _SECONDS_PER_DAY
    low, high = first * per_second, (last + 1) * per_second - 1
    return pa.int64(), max(low, -(2**63) + 2), min(high, 2**63 - 2)


def _unrepresentable_detail(stored: int, arrow_type: pa.DataType) -> str:
    largest = 2**31 - 1 if pa.types.is_date32(arrow_type) else 2**63 - 1
    if stored == largest:
        return "infinity, which is not a date Batch can store"
    if stored in (-largest, -largest - 1):
        return "-infinity, which is not a date Batch can store"
    return f"outside the years 1 to 9999 (stored value {stored} of Arrow type {arrow_type})"


def readable_temporal(array: pa.Array) -> tuple[pa.Array, list[tuple[int, Unrepresentable]]]:
    """A date or timestamp column Python can read, and the rows it could not, with why.

    Nanosecond timestamps (pandas' and Spark's Parquet, DuckDB's TIMESTAMP_NS) are cut to
    microseconds, toward the past: Batch keeps milliseconds, and the millisecond is cut
    the same way from microseconds (:func:`sync.convert.convert_date`), so a value is never rounded up
    into the next second, day or year. A cell outside the years 1-9999 (DuckDB's
    ``infinity``) is set to null in the returned array and listed with its row.
    """
    arrow_type = array.type
    storage_type, low, high = _storage_bounds(arrow_type)
    stored = array.view(storage_type)
    outside = pc.fill_null(pc.or_(pc.less(stored, low), pc.greater(stored, high)), False)
    bad: list[tuple[int, Unrepresentable]] = []
    if pc.any(outside).as_py():
        rows = pc.indices_nonzero(outside)
        values = stored.take(rows).to_pylist()
        bad = [
            (row, Unrepresentable(_unrepresentable_detail(value, arrow_type)))
            for row, value in zip(rows.to_pylist(), values, strict=True)
        ]
        array = pc.if_else(outside, pa.scalar(None, arrow_type), array)
    if pa.types.is_timestamp(arrow_type) and arrow_type.unit == "ns":
        # floor_temporal on the naive instants: a zoned value would be floored in its local
        # time, which may not exist (a DST gap); a microsecond is the same in both.
        naive = array.cast(pa.timestamp("ns")) if arrow_type.tz is not None else array
        floored = pc.floor_temporal(naive, unit="microsecond").cast(pa.timestamp("us"))
        array = floored.cast(pa.timestamp("us", arrow_type.tz)) if arrow_type.tz is not None else floored
    return array, bad


class DecodedColumn(NamedTuple):
    """One column as Python values: ``values[codes[i]]`` is row i's value when ``codes``
    is set (a dictionary-encoded column; nulls point at a trailing None), else ``values[i]``."""

    values: list[object]
    codes: pa.Int64Array | None


def is_temporal(arrow_type: pa.DataType) -> bool:
    return bool(pa.types.is_date(arrow_type) or pa.types.is_timestamp(arrow_type))


def with_unrepresentable(decoded: DecodedColumn, unreadable: list[tuple[int, Unrepresentable]]) -> DecodedColumn:
    """``decoded`` with each unreadable row pointing at its own :class:`Unrepresentable`."""
    if not unreadable:
        return decoded
    values = list(decoded.values)
    first = len(values)
    values.extend(marker for _, marker in unreadable)
    rows = pa.array([row for row, _ in unreadable], pa.int64())
    codes = decoded.codes if decoded.codes is not None else pa.array(range(len(decoded.values)), pa.int64())
    mask = pc.is_in(pa.array(range(len(codes)), pa.int64()), value_set=rows)
    patched: pa.Int64Array = pc.replace_with_mask(codes, mask, pa.array(range(first, len(values)), pa.int64()))
    return DecodedColumn(values, patched)


def zeros(rows: int) -> pa.Int64Array:
    zeros: pa.Int64Array = pc.fill_null(pa.nulls(rows, pa.int64()), 0)
    return zeros


def failed_rows(converted: Sequence[object], codes: pa.Int64Array | None) -> list[int]:
    """The rows whose result is a Failure, in row order."""
    failed = [index for index, result in enumerate(converted) if type(result) is Failure]
    if codes is None:
        return failed
    rows: list[int] = pc.indices_nonzero(pc.is_in(codes, pa.array(failed, pa.int64()))).to_pylist()
    return rows


def dates_in_columns(array: pa.Array) -> pa.StringArray | None:
    """What :func:`sync.convert.convert_date` returns for each value of a date or timestamp column, in Arrow.

    None when the column is not one this covers (a string or dictionary column, a
    nanosecond timestamp not yet cut by :func:`readable_temporal`, a year outside
    2..9998 where Python's datetime or the UTC conversion reach their limits): the
    converter then runs per distinct value, as for any column. The property tests of
    the batch path against the row-at-a-time reference (``tests/support/reference_mapping.py``)
    hold the two paths together.
    """
    arrow_type = array.type
    if pa.types.is_date(arrow_type):
        naive = array
    elif pa.types.is_timestamp(arrow_type) and arrow_type.unit in ("s", "ms", "us"):
        # The values of a zoned timestamp are UTC instants: read without the zone they have
        # the UTC fields convert_date formats after astimezone(UTC).
        naive = array.cast(pa.timestamp(arrow_type.unit)) if arrow_type.tz is not None else array
    else:
        return None
    if array.null_count == len(array):
        nulls: pa.StringArray = pa.nulls(len(array), pa.string())
        return nulls
    years = pc.min_max(pc.year(naive))
    if years["min"].as_py() < 2 or years["max"].as_py() > 9998:
        return None
    # Arrow's cast to string writes ISO-8601 with the year padded to four digits, the fields
    # convert_date formats, at a fraction of strftime's cost (strftime goes through a
    # locale-aware stream per value). Years 2..9998 always have four digits, so the date and
    # time are split at the same place in every value.
    if pa.types.is_date(arrow_type):
        days: pa.StringArray = pc.binary_join_element_wise(naive.cast(pa.string()), "T00:00:00Z", "")
        return days
    seconds = pc.floor_temporal(naive, unit="second")
    # "YYYY-MM-DD HH:MM:SS" -> "YYYY-MM-DDTHH:MM:SS"
    base = pc.utf8_replace_slice(seconds.cast(pa.timestamp("s")).cast(pa.string()), start=10, stop=11, replacement="T")
    # Milliseconds when there are any (microseconds are cut, as convert_date cuts them).
    millis = pc.milliseconds_between(seconds, naive)
    fraction = pc.binary_join_element_wise(".", pc.utf8_lpad(millis.cast(pa.string()), 3, "0"), "Z", "")
    moments: pa.StringArray = pc.binary_join_element_wise(base, pc.if_else(pc.equal(millis, 0), "Z", fraction), "")
    return moments


def _dedupes(arrow_type: pa.DataType) -> bool:
    # Strings repeat (codes, flags, names) and cost a converter call each; dates and
    # timestamps repeat and cost a datetime each. Numbers are cheaper to convert than
    # to hash, and lists cannot be dictionary-encoded. Equal Arrow values of one type
    # are equal Python values of one type, so a converter sees exactly what it sees row by row.
    return bool(
        is_string_type(arrow_type)
        or pa.types.is_date(arrow_type)
        or pa.types.is_timestamp(arrow_type)
        or pa.types.is_boolean(arrow_type)
    )


# Time zones whose offset is always zero.
_UTC_ZONES: Final = frozenset({"UTC", "Etc/UTC", "+00:00"})


def decode_column(array: pa.Array) -> DecodedColumn:
    if pa.types.is_timestamp(array.type) and array.type.tz in _UTC_ZONES:
        # A UTC timestamp read as naive has the same fields, and convert_date formats an
        # aware value's UTC fields and a naive value's own fields alike, so the result is
        # the same; pyarrow builds naive datetimes several times faster than aware ones.
        # Only convert_date reads temporal columns (resolve_attribute_types).
        array = array.cast(pa.timestamp(array.type.unit))
    if pa.types.is_dictionary(array.type):
        encoded = array
    elif _dedupes(array.type):
        encoded = pc.dictionary_encode(array)
    else:
        return DecodedColumn(array.to_pylist(), None)
    values = encoded.dictionary.to_pylist()
    # A null row points past the dictionary, at the None appended there.
    codes = pc.fill_null(encoded.indices.cast(pa.int64()), len(values))
    values.append(None)
    return DecodedColumn(values, codes)


def is_string_type(arrow_type: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)
    )
