"""The differ (sync.diff): keys, the raw hash recipe, the id scan and what comes out of each read.

The segment is a real Arrow table read by DuckDB through the same ``Source`` protocol the
warehouse sources implement; the stored fingerprints are a real Arrow table.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.config_file import parse_activation
from sync.diff import SegmentDiff, key_sql, raw_salt
from sync.differ import (
    DUPLICATE,
    FINGERPRINT_SCHEMA,
    KEY,
    RAW,
    ROW,
    STORED_PAYLOAD,
    STORED_RAW,
    for_the_differ,
    register_stored,
)
from sync.mapping import ProfileMapper, resolve_attribute_types
from tests.support.reference_mapping import map_batch


class TableSource:
    """A segment held in an Arrow table, read in small batches (the Source protocol)."""

    engine = "arrow-table"

    def __init__(self, table: pa.Table, batch_rows: int = 3) -> None:
        self.table = table
        self.batch_rows = batch_rows
        self.reads: list[list[str]] = []

    def schema(self) -> pa.Schema:
        return self.table.schema

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        self.reads.append(columns)
        yield from self.table.select(columns).to_batches(max_chunksize=self.batch_rows)

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def stored_table(rows: dict[str, tuple[int, int]]) -> pa.Table:
    return pa.table(
        [
            pa.array(list(rows), pa.string()),
            pa.array([raw for raw, _ in rows.values()], pa.uint64()),
            pa.array([payload for _, payload in rows.values()], pa.uint64()),
            pa.nulls(len(rows), pa.binary()),
        ],
        schema=FINGERPRINT_SCHEMA,
    )


def differ(table: pa.Table, stored: dict[str, tuple[int, int]] | None = None, **kw: Any) -> SegmentDiff:
    columns = kw.pop("columns", table.schema.names)
    return SegmentDiff(
        TableSource(table),
        columns=columns,
        schema=table.schema,
        stored=stored_table(stored or {}),
        salt=kw.pop("salt", "salt"),
        **kw,
    )


def rows_of(batches: Iterator[pa.RecordBatch]) -> list[dict[str, Any]]:
    return sorted((row for batch in batches for row in batch.to_pylist()), key=lambda row: row[ROW])


def raw_hashes(table: pa.Table, salt: str = "salt") -> list[int]:
    diff = differ(table, salt=salt)
    try:
        return [row[RAW] for row in rows_of(diff.rows_to_send(full=True))]
    finally:
        diff.close()


# -- the key equals the mapper's custom_id --------------------------------------------------

ACTIVATION = parse_activation(
    {
        "name": "keys",
        "source": {"type": "duckdb", "database": "x.duckdb", "table": "t"},
        "destination": {"api_key_env": "K", "project_key_env": "P"},
        "mapping": {"custom_id": "id"},
    },
    source="test",
)


def mapper_ids(column: pa.Array) -> list[str | None]:
    table = pa.table({"id": column})
    mapper = ProfileMapper(ACTIVATION, resolve_attribute_types(ACTIVATION, table.schema, source="test"))
    return [row.custom_id for row in map_batch(mapper, table.to_batches()[0])]


def sql_keys(column: pa.Array) -> list[str | None]:
    table = pa.table({"id": column})
    with duckdb.connect() as con:
        con.register("t", table)
        return [key for (key,) in con.execute(f"SELECT {key_sql('id', column.type)} FROM t").fetchall()]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=20))
def test_integer_keys_are_the_mappers_ids(values: list[int]) -> None:
    column = pa.array(values, pa.int64())
    assert sql_keys(column) == mapper_ids(column)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=20))
def test_string_keys_are_the_strings_themselves(values: list[str]) -> None:
    column = pa.array(values, pa.string())
    valid = mapper_ids(column)
    # Valid ids (not blank, not a placeholder) are keyed exactly as the mapper writes them.
    assert [key for key, ok in zip(sql_keys(column), valid, strict=True) if ok is not None] == [
        v for v in valid if v is not None
    ]


@pytest.mark.parametrize(
    ("values", "arrow_type"),
    [
        ([Decimal("12"), Decimal("-7"), Decimal("0"), None], pa.decimal128(38, 0)),
        ([Decimal("12.00"), Decimal("-7.50"), Decimal("3.000000001"), Decimal("99999999.00")], pa.decimal128(38, 9)),
    ],
)
def test_decimal_keys_are_the_mappers_ids(values: list[Decimal | None], arrow_type: pa.DataType) -> None:
    column = pa.array(values, arrow_type)
    assert sql_keys(column) == mapper_ids(column)


def test_a_column_that_cannot_hold_an_id_is_a_config_error() -> None:
    with pytest.raises(Exception, match="cannot hold a Custom ID"):
        key_sql("id", pa.float64())


# -- the raw hash ----------------------------------------------------------------------------

PEOPLE = pa.table(
    {
        "id": pa.array(["u1", "u2", "u3"], pa.string()),
        "email": pa.array(["a@example.com", None, ""], pa.string()),
        "points": pa.array([1, 2, None], pa.int64()),
        "tags": pa.array([["a"], None, []], pa.list_(pa.string())),
    }
)

# DuckDB's hash() of the rows above under the salt "salt" (DuckDB 2.0.1). The engine salts
# the hash with DuckDB's version, so when an upgrade changes these values every row is
# mapped once again and nothing is sent that did not change (the payload hash decides).
GOLDEN_RAW = [17045747080324308055, 7661877328595765351, 2982685550961011553]


def test_raw_hashes_match_pinned_values_for_this_duckdb() -> None:
    assert duckdb.__version__ == "2.0.1", "a new DuckDB: re-pin GOLDEN_RAW (its version is part of the salt)"
    assert raw_hashes(PEOPLE) == GOLDEN_RAW


def test_a_changed_value_a_null_an_empty_value_and_the_salt_all_move_the_raw_hash() -> None:
    base = raw_hashes(PEOPLE)
    changed = PEOPLE.set_column(2, "points", pa.array([1, 3, None], pa.int64()))
    assert raw_hashes(changed) == [base[0], raw_hashes(changed)[1], base[2]]
    assert raw_hashes(changed)[1] != base[1]
    # "" and null differ; an empty list and null differ.
    assert len(set(base)) == 3
    emptied = PEOPLE.set_column(1, "email", pa.array(["a@example.com", "", None], pa.string()))
    assert raw_hashes(emptied)[1:] != base[1:]
    assert raw_hashes(PEOPLE, salt="other") != base


def test_column_order_matters_in_the_raw_hash() -> None:
    swapped = pa.table({"id": PEOPLE["id"], "a": pa.array(["x"] * 3), "b": pa.array(["y"] * 3)})
    other = pa.table({"id": PEOPLE["id"], "a": pa.array(["y"] * 3), "b": pa.array(["x"] * 3)})
    assert raw_hashes(swapped) != raw_hashes(other)


def test_the_salt_names_the_mapping_version_the_engine_and_the_column_types() -> None:
    salt = raw_salt("v1", PEOPLE.schema, PEOPLE.schema.names, "DuckDBSource")
    assert "v1" in salt
    assert "DuckDBSource" in salt
    assert duckdb.__version__ in salt
    retyped = PEOPLE.schema.set(2, pa.field("points", pa.int32()))
    assert raw_salt("v1", retyped, PEOPLE.schema.names, "DuckDBSource") != salt


def test_each_source_states_the_engine_its_raw_hashes_are_salted_with(tmp_path: Path) -> None:
    # Issue 23: the salt took the source's class name, which for DuckDB was the CLI's private
    # wrapper; a rename would have re-mapped every profile. The strings are pinned here: they
    # are the ones states written so far were salted with, and changing one maps every row again.
    from sync.runtime import open_source
    from sync.sources.bigquery import BigQuerySource
    from sync.sources.duckdb import DuckDBSource
    from tests.support.engine_support import make_activation, people, write_segment

    assert DuckDBSource.engine == "_DuckDBSegment"
    assert BigQuerySource.engine == "BigQuerySource"
    write_segment(tmp_path / "segment.duckdb", people(3))
    source = open_source(make_activation(tmp_path, "http://127.0.0.1:1"))
    try:
        assert source.engine == "_DuckDBSegment"  # the wrapper the CLI opens says its source's name
        schema = source.schema()
    finally:
        source.close()
    salt = raw_salt("v1", schema, ["customer_id", "points"], source.engine)
    assert salt == f"cepsync/raw/2|v1|_DuckDBSegment|duckdb {duckdb.__version__}|customer_id:string;points:int64"


# -- the id scan and the reads ------------------------------------------------------------------

SEGMENT = pa.table(
    {
        "id": pa.array(["a", "b", "b", None, "c", "new", "  "], pa.string()),
        "points": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int64()),
    }
)


def hashes_by_id(table: pa.Table) -> dict[str, int]:
    ids = table.column("id").to_pylist()
    return {cid: raw for cid, raw in zip(ids, raw_hashes(table), strict=True) if cid is not None}


def test_the_id_scan_counts_duplicates_nulls_matches_and_removals() -> None:
    diff = differ(SEGMENT, {"a": (1, 10), "b": (2, 20), "gone": (3, 30)}, intents=["left-too", "c"])
    try:
        scan = diff.scan_ids()
    finally:
        diff.close()
    assert scan.rows == 7
    assert scan.null_ids == 1
    assert scan.duplicates == {"b": 2}
    assert scan.duplicate_rows == 2
    assert scan.matched == 1  # "a" only: a duplicated id never counts as matched
    assert scan.new_ids == 3  # "c", "new", "  " (the mapper rejects the blank one later)
    assert scan.removed == ["gone", "left-too"]  # synced (stored or intent) and no longer present
    assert scan.synced == 5


def test_moved_rows_are_stored_ids_whose_raw_hash_moved_and_nothing_else() -> None:
    raws = hashes_by_id(SEGMENT)
    stored = {"a": (raws["a"] + 1, 10), "c": (raws["c"], 30), "b": (0, 20)}
    diff = differ(SEGMENT, stored)
    try:
        diff.scan_ids()
        moved = rows_of(diff.moved_rows())
    finally:
        diff.close()
    assert [(row["id"], row[STORED_PAYLOAD], row[DUPLICATE]) for row in moved] == [("a", 10, False)]


def test_stored_fingerprints_without_attribute_sets_are_held_without_the_column_and_read_as_nulls() -> None:
    """An activation that keeps no attribute set holds no attributes column while it diffs
    (its offsets are 4 bytes a profile), yet every query sees all four columns; one set kept
    keeps the column; an unconfirmed id is distrusted either way."""
    plain = stored_table({"a": (1, 10), "b": (2, 20)})
    kept = plain.set_column(3, "attributes", pa.array([b"\x01\x00\x00\x00", b"\x02\x00\x00\x00"], pa.binary()))
    held_plain, held_kept = for_the_differ(plain, ["b"]), for_the_differ(kept, ["b"])
    assert held_plain.column_names == ["custom_id", "raw", "payload"]
    assert held_plain.nbytes < plain.nbytes
    assert held_kept.column_names == FINGERPRINT_SCHEMA.names
    for held, sets in ((held_plain, [None, None]), (held_kept, [b"\x01\x00\x00\x00", None])):  # "b" distrusted
        with duckdb.connect() as con:
            register_stored(con, held)
            rows = con.execute("SELECT custom_id, raw, payload, attributes FROM stored ORDER BY custom_id").fetchall()
        assert rows == [("a", 1, 10, sets[0]), ("b", 0, 0, sets[1])]
    with duckdb.connect() as con:
        register_stored(con, for_the_differ(kept, []))
        assert con.execute("SELECT attributes FROM stored WHERE custom_id = 'b'").fetchall() == [(b"\x02\x00\x00\x00",)]


def test_a_delta_read_hands_over_new_duplicated_and_unkeyed_rows_with_their_row_numbers() -> None:
    raws = hashes_by_id(SEGMENT)
    stored = {"a": (raws["a"], 10), "c": (raws["c"] + 1, 30)}
    diff = differ(SEGMENT, stored)
    try:
        diff.scan_ids()
        rows = rows_of(diff.rows_to_send(full=False))
    finally:
        diff.close()
    assert [(row[ROW], row["id"], row[KEY], row[DUPLICATE]) for row in rows] == [
        (2, "b", "b", True),
        (3, "b", "b", True),
        (4, None, None, False),
        (6, "new", "new", False),
        (7, "  ", "  ", False),
    ]


def test_a_delta_read_gives_a_duplicated_stored_id_the_stored_fingerprint_a_full_read_gives_it() -> None:
    raws = hashes_by_id(SEGMENT)
    stored = {"a": (raws["a"], 10), "b": (7, 20), "c": (raws["c"] + 1, 30)}
    reads = {}
    for full in (False, True):
        diff = differ(SEGMENT, stored)
        try:
            diff.scan_ids()
            reads[full] = {row[ROW]: row for row in rows_of(diff.rows_to_send(full=full))}
        finally:
            diff.close()
    delta, every = reads[False], reads[True]
    assert [(row["id"], row[DUPLICATE], row[STORED_RAW], row[STORED_PAYLOAD]) for row in delta.values()] == [
        ("b", True, 7, 20),
        ("b", True, 7, 20),
        (None, False, None, None),
        ("new", False, None, None),
        ("  ", False, None, None),
    ]
    assert all(every[number] == row for number, row in delta.items())


def test_with_nothing_stored_the_rows_and_their_types_are_those_of_a_join_that_matches_nothing() -> None:
    reads = []
    for stored in ({}, {"not in the segment": (1, 2)}):
        diff = differ(SEGMENT, stored)
        try:
            diff.scan_ids()
            batches = list(diff.rows_to_send(full=False))
        finally:
            diff.close()
        reads.append((batches[0].schema, rows_of(iter(batches))))
    assert reads[0] == reads[1]
    assert reads[0][0].field(STORED_RAW).type == pa.uint64()
    assert len(reads[0][1]) == SEGMENT.num_rows


def test_a_full_read_in_order_hands_over_every_row_sorted_by_key() -> None:
    diff = differ(SEGMENT, {"a": (0, 10)})
    try:
        diff.scan_ids()
        rows = [row for batch in diff.rows_to_send(full=True, ordered=True) for row in batch.to_pylist()]
    finally:
        diff.close()
    keys = [row[KEY] for row in rows if row[KEY] is not None]
    assert keys == sorted(keys)
    assert len(rows) == SEGMENT.num_rows
    assert {row["id"]: row[STORED_PAYLOAD] for row in rows if row["id"] == "a"} == {"a": 10}


def test_a_continued_full_pass_leaves_out_ids_at_or_below_its_watermark_and_counts_them() -> None:
    stored = {"a": (0, 10), "c": (0, 30)}
    diff = differ(SEGMENT, stored, after="b")
    everything = differ(SEGMENT, stored)
    try:
        scan = diff.scan_ids()
        everything.scan_ids()
        rows = [row for batch in diff.rows_to_send(full=True, ordered=True) for row in batch.to_pylist()]
        reference = [row for batch in everything.rows_to_send(full=True, ordered=True) for row in batch.to_pylist()]
    finally:
        diff.close()
        everything.close()
    # Byte order, as the send checkpoint records it: "  " and "a" sort before "b".
    assert scan.below_watermark == 4
    assert rows == [row for row in reference if row[KEY] is None or row[KEY] > "b"]
    assert [row["id"] for row in rows] == ["c", "new", None]


def test_the_stream_is_read_as_batches_and_each_read_asks_only_for_what_it_needs() -> None:
    source = TableSource(SEGMENT, batch_rows=2)
    diff = SegmentDiff(source, columns=["id", "points"], schema=SEGMENT.schema, stored=stored_table({}), salt="s")
    try:
        diff.scan_ids()
        list(diff.moved_rows())  # nothing stored: no read at all
        list(diff.rows_to_send(full=False))
    finally:
        diff.close()
    assert source.reads == [["id"], ["id", "points"]]


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "é", "日本", "x y", "", "k1", "k2"])), max_size=14),
    stored_ids=st.sets(st.sampled_from(["a", "b", "é", "日本", "x y", "", "k1", "k2", "gone", "left"])),
    moved=st.sets(st.sampled_from(["a", "b", "é", "日本", "x y", "", "k1", "k2"])),
    intents=st.sets(st.sampled_from(["a", "gone", "left", "never", "k2"])),
)
def test_the_scan_and_the_reads_agree_with_a_reference_on_generated_segments(
    ids: list[str | None], stored_ids: set[str], moved: set[str], intents: set[str]
) -> None:
    """The id scan's counts, the moved rows and a delta's stream (by hashes, and by the exact
    join it falls back to) against a plain Python reference: nulls, duplicates, unicode."""
    segment = pa.table({"id": pa.array(ids, pa.string()), "v": pa.array([f"v{i}" for i in range(len(ids))])})
    raws = dict(zip(ids, raw_hashes(segment), strict=True)) if ids else {}
    stored = {cid: ((raws[cid] + 1) if cid in moved and cid in raws else raws.get(cid, 5), 9) for cid in stored_ids}
    present = [cid for cid in ids if cid is not None]
    duplicated = {cid for cid in present if present.count(cid) > 1}
    singles = set(present) - duplicated
    diff = differ(segment, stored, intents=sorted(intents))  # an intent may also be stored
    try:
        scan = diff.scan_ids()
        assert diff._new_by_hash is bool(stored_ids)  # no collision among so few ids: the hash path
        moved_rows = rows_of(diff.moved_rows())
        by_hash = rows_of(diff.rows_to_send(full=False))
        diff._new_by_hash = False  # the exact join, as when an id's hash collides with a stored one's
        exact = rows_of(diff.rows_to_send(full=False))
    finally:
        diff.close()
    assert scan.rows == len(ids)
    assert scan.null_ids == ids.count(None)
    assert scan.duplicates == {cid: present.count(cid) for cid in duplicated}
    assert scan.matched == len(singles & stored_ids)
    assert scan.new_ids == len(singles - stored_ids)
    assert scan.removed == sorted((stored_ids | intents) - set(present))
    assert scan.synced == len(stored_ids | intents)
    assert sorted(row["id"] for row in moved_rows) == sorted(
        cid for cid in singles & stored_ids if stored[cid][0] != raws[cid]
    )
    expected = [
        row for row, cid in enumerate(ids, start=1) if cid is None or cid in duplicated or cid not in stored_ids
    ]
    assert [row[ROW] for row in by_hash] == expected
    assert by_hash == exact
