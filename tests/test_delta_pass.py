"""A delta's one pass over the segment (issue 20, item 1): what it hands over, and how often it reads.

The differ is checked against a plain Python reference on generated segments and states
(null ids, duplicated ids whose copies moved or did not, removed ids, stored ids the
segment never had, unconfirmed ids, a watermark, a budget too small to keep anything),
and a whole run is checked on SQLite and on Firestore state with a source that counts
its reads: one in a delta, and a second only when a stored id became duplicated with
an unchanged copy.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync import local_differ
from sync.config import DuckDBSourceConfig
from sync.delta_pass import KEPT_BUDGET_BYTES
from sync.dev.simulator import BatchSimulator
from sync.diff import SegmentDiff
from sync.differ import DUPLICATE, KEY, RAW, ROW, STORED_ATTRIBUTES, STORED_PAYLOAD, STORED_RAW
from sync.engine import Run, RunOptions, RunResult
from sync.local_pass import SORT_PIECE_ROWS
from sync.local_rows import LISTED_IDS, drop_sparse_rows, sparse_rows
from sync.sources.duckdb import DuckDBSource
from sync.state.base import StateStore
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    PROJECT_KEY,
    make_activation,
    make_client,
    people,
    person,
    write_segment,
)
from tests.test_diff import TableSource, raw_hashes, rows_of, stored_table

POOL = ["a", "b", "é", "日本", "x y", "", "k1", "k2"]


class LocalSource(DuckDBSource):
    """A DuckDB segment written from an Arrow table, its streamed reads noted (the local pass makes none)."""

    def __init__(self, table: pa.Table, directory: Path, *, query: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "segment.duckdb"
        with duckdb.connect(str(path)) as con:
            con.register("rows", table)
            con.execute("CREATE TABLE segment AS SELECT * FROM rows")
        config = DuckDBSourceConfig(database=str(path), **({"query": query} if query else {"table": "segment"}))
        super().__init__(config, activation="local")
        self.reads: list[list[str]] = []
        # The columns of every query of the segment the differ built (each needs its SQL).
        self.queries: list[list[str]] = []

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        self.reads.append(list(columns))
        return super().read_batches(columns)

    def segment_sql(self, columns: list[str]) -> str:
        self.queries.append(list(columns))
        return super().segment_sql(columns)


NEVER_IN_SEGMENT = ["gone", "left", "never"]


def reference_row(
    number: int, cid: str | None, value: int, raw: int, stored: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    fingerprint = stored.get(cid) if cid is not None else None
    return {
        "id": cid,
        "v": value,
        ROW: number,
        KEY: cid,
        RAW: raw,
        STORED_RAW: fingerprint[0] if fingerprint else None,
        STORED_PAYLOAD: fingerprint[1] if fingerprint else None,
        STORED_ATTRIBUTES: None,  # stored_table keeps no attribute sets (and an unconfirmed id has none)
    }


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(POOL)), st.integers(0, 1)), max_size=14),
    modes=st.dictionaries(st.sampled_from(POOL + NEVER_IN_SEGMENT), st.sampled_from(["same", "moved"])),
    unconfirmed=st.sets(st.sampled_from(POOL + NEVER_IN_SEGMENT)),
    intents=st.sets(st.sampled_from(POOL + NEVER_IN_SEGMENT)),
    after=st.one_of(st.none(), st.sampled_from(POOL)),
    budget=st.sampled_from([KEPT_BUDGET_BYTES, 1]),
    local=st.booleans(),
)
def test_the_pass_hands_over_what_a_reference_says_and_reads_the_segment_once(
    rows: list[tuple[str | None, int]],
    modes: dict[str, str],
    unconfirmed: set[str],
    intents: set[str],
    after: str | None,
    budget: int,
    local: bool,
) -> None:
    """Streamed, or in a DuckDB segment's own database (``local``: the pass then reads no stream)."""
    ids = [cid for cid, _ in rows]
    segment = pa.table({"id": pa.array(ids, pa.string()), "v": pa.array([value for _, value in rows], pa.int64())})
    raws = raw_hashes(segment) if rows else []
    first_raw = {cid: raw for cid, raw in reversed(list(zip(ids, raws, strict=True))) if cid is not None}
    # "same": the stored raw hash is the id's first row's ("moved": one off); a duplicated
    # id's other copies may have the same values (unchanged) or not.
    stored = {cid: (first_raw.get(cid, 5) + (1 if mode == "moved" else 0), 9 + len(cid)) for cid, mode in modes.items()}
    # What the differ compares with: an unconfirmed id reads as zero fingerprints.
    effective = {cid: ((0, 0) if cid in unconfirmed else fingerprint) for cid, fingerprint in stored.items()}
    present = [cid for cid in ids if cid is not None]
    duplicated = {cid for cid in present if present.count(cid) > 1}
    singles = set(present) - duplicated
    numbered = [
        (number, cid, value, raw) for number, ((cid, value), raw) in enumerate(zip(rows, raws, strict=True), start=1)
    ]

    def kept(cid: str | None, raw: int) -> bool:
        return cid is None or cid not in effective or effective[cid][0] != raw

    def above(cid: str | None) -> bool:
        return after is None or cid is None or cid > after

    moved = [
        {**reference_row(n, cid, value, raw, effective), DUPLICATE: False}
        for n, cid, value, raw in numbered
        if cid in singles and cid in effective and effective[cid][0] != raw
    ]
    to_send = [
        {**reference_row(n, cid, value, raw, effective), DUPLICATE: cid in duplicated}
        for n, cid, value, raw in numbered
        if (cid is None or cid in duplicated or cid not in effective) and above(cid)
    ]
    every = [
        {**reference_row(n, cid, value, raw, effective), DUPLICATE: cid in duplicated}
        for n, cid, value, raw in numbered
        if above(cid)
    ]
    # Reads: with state, the pass; a read of the duplicated ids when one of their copies
    # was dropped as unchanged. Past the budget, the new rows are let go (the stream reads
    # them again), and past it with the moved rows alone, the earlier two reads follow.
    any_kept = any(kept(cid, raw) for _, cid, _, raw in numbered)
    any_moved = any(cid in effective and effective[cid][0] != raw for _, cid, _, raw in numbered)
    if not stored:
        delta_reads = 2  # the id column, then the stream
    elif budget == 1 and any_moved:
        delta_reads = 3
    elif budget == 1 and any_kept:
        delta_reads = 2  # the pass (the moved rows, none here), then the stream of the new ones
    else:
        delta_reads = 1 + any(cid in duplicated and not kept(cid, raw) for _, cid, _, raw in numbered)

    if local:
        delta_reads = 0  # the segment's database answers the id scan, the pass, the moved rows and the stream
    directory = tempfile.TemporaryDirectory()
    source: TableSource | LocalSource = LocalSource(segment, Path(directory.name)) if local else TableSource(segment)
    told: list[int] = []
    diff = SegmentDiff(
        source,
        columns=["id", "v"],
        schema=segment.schema,
        stored=stored_table(stored),
        intents=sorted(intents),
        unconfirmed=sorted(unconfirmed),
        salt="salt",
        on_rows=told.append,
        after=after,
        kept_budget_bytes=budget,
    )
    try:
        scan = diff.scan_ids()
        got_moved = rows_of(diff.moved_rows())
        got_to_send = rows_of(diff.rows_to_send(full=False))
        reads_of_the_delta = len(source.reads)
        got_every = rows_of(diff.rows_to_send(full=True))
        reads_with_a_full_pass = len(source.reads)
        # As when an id's hash is shared: the exact reads, same answers.
        diff._new_by_hash = False
        exact_moved = rows_of(diff.moved_rows())
        exact_to_send = rows_of(diff.rows_to_send(full=False))
    finally:
        diff.close()
        source.close()
        directory.cleanup()

    assert scan.rows == len(ids)
    assert scan.null_ids == ids.count(None)
    assert scan.duplicates == {cid: present.count(cid) for cid in duplicated}
    assert scan.matched == len(singles & set(stored))
    assert scan.new_ids == len(singles - set(stored))
    assert scan.removed == sorted((set(stored) | intents) - set(present))
    assert scan.synced == len(set(stored) | intents)
    assert scan.below_watermark == (sum(1 for cid in present if cid <= after) if after is not None else 0)
    assert got_moved == moved
    assert got_to_send == to_send
    assert got_every == every
    assert exact_moved == moved
    assert exact_to_send == to_send
    assert reads_of_the_delta == delta_reads
    assert reads_with_a_full_pass == delta_reads + (0 if local else 1)
    assert sum(told) == len(ids)  # the progress hears of each row once, however often it is read
    assert diff.local_problem is None


def test_a_read_of_the_duplicated_ids_is_taken_only_when_a_stored_id_has_an_unchanged_copy() -> None:
    segment = pa.table({"id": pa.array(["a", "b", "b", "c", "c"]), "v": pa.array([1, 2, 2, 3, 4], pa.int64())})
    raws = dict(zip(segment["id"].to_pylist(), raw_hashes(segment), strict=False))
    cases = {
        # "b" was synced and now comes twice with its synced values: a copy the pass drops.
        "stored id, unchanged copies": ({"a": (raws["a"], 1), "b": (raws["b"], 2)}, 2),
        # "b" was synced and now comes twice with new values: the pass keeps every copy.
        "stored id, moved copies": ({"a": (raws["a"], 1), "b": (7, 2)}, 1),
        # Duplicated ids that were never synced are new: every copy is kept.
        "new duplicated ids": ({"a": (raws["a"], 1)}, 1),
    }
    for name, (stored, reads) in cases.items():
        source = TableSource(segment)
        diff = SegmentDiff(source, columns=["id", "v"], schema=segment.schema, stored=stored_table(stored), salt="salt")
        try:
            scan = diff.scan_ids()
            sent = rows_of(diff.rows_to_send(full=False))
        finally:
            diff.close()
        assert scan.duplicates == {"b": 2, "c": 2}, name
        assert [(row[ROW], row["id"], row[DUPLICATE]) for row in sent] == [
            (2, "b", True),
            (3, "b", True),
            (4, "c", True),
            (5, "c", True),
        ], name
        assert len(source.reads) == reads, name


def test_a_pass_whose_new_rows_exceed_the_budget_keeps_its_moved_rows_and_streams_the_new_ones() -> None:
    """A first sync's continuation: most ids are new. The moved rows stay kept; two reads, not three."""
    ids = [f"id{n:04d}" for n in range(400)]
    segment = pa.table({"id": pa.array(ids), "v": pa.array(range(400), pa.int64())})
    raws = dict(zip(ids, raw_hashes(segment), strict=True))
    # 20 ids synced by an earlier leg: 18 unchanged, 2 moved since; 380 new.
    stored = {cid: (raws[cid] + (1 if n < 2 else 0), 3) for n, cid in enumerate(ids[:20])}
    answers = {}
    for budget in (KEPT_BUDGET_BYTES, 4_000):
        source = TableSource(segment)
        diff = SegmentDiff(
            source,
            columns=["id", "v"],
            schema=segment.schema,
            stored=stored_table(stored),
            salt="salt",
            kept_budget_bytes=budget,
        )
        try:
            scan = diff.scan_ids()
            moved = rows_of(diff.moved_rows())
            to_send = rows_of(diff.rows_to_send(full=False))
        finally:
            diff.close()
        assert (scan.matched, scan.new_ids) == (20, 380)
        answers[budget] = (moved, to_send, len(source.reads))
    moved, to_send, reads = answers[4_000]
    assert [row["id"] for row in moved] == ["id0000", "id0001"]
    assert sorted(row["id"] for row in to_send) == ids[20:]
    assert reads == 2  # the pass (kept the 2 moved rows), then the stream of the new ones
    assert answers[KEPT_BUDGET_BYTES][2] == 1  # within the budget: one read
    assert answers[KEPT_BUDGET_BYTES][0] == moved
    assert sorted(map(str, answers[KEPT_BUDGET_BYTES][1])) == sorted(map(str, to_send))


def local_answers(source: DuckDBSource, stored: dict[str, tuple[int, int]], schema: pa.Schema) -> tuple[Any, ...]:
    diff = SegmentDiff(source, columns=schema.names, schema=schema, stored=stored_table(stored), salt="salt")
    try:
        scan = diff.scan_ids()
        answers = (scan.matched, scan.new_ids, scan.removed, rows_of(diff.moved_rows()))
        return (*answers, rows_of(diff.rows_to_send(full=False)), diff.local_problem)
    finally:
        diff.close()


def test_a_column_arrow_carries_as_another_type_keeps_the_streamed_pass(tmp_path: Path) -> None:
    """A UUID streams as a string: hashed natively it would differ from every stored hash."""
    with duckdb.connect(str(tmp_path / "segment.duckdb")) as con:
        con.execute("CREATE TABLE segment AS SELECT 'id' || i AS id, uuidv4() AS u FROM range(6) t(i)")
    config = DuckDBSourceConfig(database=str(tmp_path / "segment.duckdb"), table="segment")
    source = CountingLocalSource(config, activation="local")
    try:
        schema = source.schema()
        streamed = pa.Table.from_batches(list(source.read_batches(["id", "u"])))
        source.reads.clear()
        raws = dict(zip(streamed["id"].to_pylist(), raw_hashes(streamed), strict=True))
        stored = {cid: (raw, 1) for cid, raw in raws.items() if cid != "id5"}
        matched, new_ids, removed, moved, to_send, problem = local_answers(source, stored, schema)
    finally:
        source.close()
    assert problem is not None
    assert "'u' is UUID" in problem
    assert (matched, new_ids, removed, moved) == (5, 1, [], [])  # nothing moved: the streamed hashes agree
    assert [row["id"] for row in to_send] == ["id5"]
    assert len(source.reads) == 1  # the streamed pass


def test_a_local_segments_moved_rows_are_rechecked_by_the_query_that_hands_them_over(tmp_path: Path) -> None:
    """The pass's survivors are ids; a segment whose values differ from one query to the next is re-checked."""
    segment = pa.table({"id": pa.array([f"id{n}" for n in range(50)]), "v": pa.array(range(50), pa.int64())})
    raws = dict(zip(segment["id"].to_pylist(), raw_hashes(segment), strict=True))
    stored = {cid: (raw, 1) for cid, raw in raws.items()}
    # The query adds a random 0 or 1 to v on every read: the pass and the moved rows' query disagree.
    source = LocalSource(segment, tmp_path, query="SELECT id, v + CAST(random() < 0.5 AS BIGINT) AS v FROM segment")
    try:
        schema = source.schema()
        diff = SegmentDiff(source, columns=["id", "v"], schema=schema, stored=stored_table(stored), salt="salt")
        try:
            scan = diff.scan_ids()
            moved = rows_of(diff.moved_rows())
        finally:
            diff.close()
    finally:
        source.close()
    assert (scan.matched, scan.new_ids) == (50, 0)
    assert moved  # some moved (each id had one chance in two, twice)
    assert all(row[RAW] != row[STORED_RAW] for row in moved)  # as read by the query that handed it over
    assert all(row["v"] == int(row["id"][2:]) + 1 for row in moved)
    assert source.reads == []


def test_a_local_pass_out_of_memory_streams_the_segment_with_the_same_answers(tmp_path: Path) -> None:
    """Under a cap too small for the segment's database, the differ streams, and says why."""
    ids = [f"id{n:06d}" for n in range(60_000)]
    segment = pa.table({"id": pa.array(ids), "v": pa.array(range(60_000), pa.int64())})
    raws = raw_hashes(segment)
    stored = {
        cid: (raw + (1 if n % 7 == 0 else 0), 1)
        for n, (cid, raw) in enumerate(zip(ids[:50_000], raws[:50_000], strict=True))
    }
    answers = []
    for cap in (None, "1MB"):
        source = LocalSource(segment, tmp_path / (cap or "default"))
        diff = SegmentDiff(
            source,
            columns=["id", "v"],
            schema=source.schema(),
            stored=stored_table(stored),
            salt="salt",
            local_memory=cap,
        )
        try:
            scan = diff.scan_ids()
            moved = rows_of(diff.moved_rows())
            to_send = rows_of(diff.rows_to_send(full=False))
            every = rows_of(diff.rows_to_send(full=True, ordered=True))
            answers.append((scan.matched, scan.new_ids, len(moved), moved[:3], len(to_send), to_send[:3], every[:3]))
            problems = (diff.local_problem, diff.compared_in)
        finally:
            diff.close()
            source.close()
        if cap is None:
            assert problems == (None, "segment_database")
        else:
            assert problems[0] is not None
            assert problems[0].startswith("the segment's database ran out of memory")
            assert problems[1] == "stream"
    assert answers[0] == answers[1]
    assert answers[0][:3] == (50_000, 10_000, 7_143)


def test_a_local_delta_with_nothing_to_stream_queries_no_segment_rows(tmp_path: Path) -> None:
    """No null, new or duplicated id: the stream runs no query of the segment; one null id, and it does."""
    ids: list[str | None] = [f"id{n:03d}" for n in range(40)]
    segment = pa.table({"id": pa.array(ids, pa.string()), "v": pa.array(range(40), pa.int64())})
    stored = {cid: (raw, 1) for cid, raw in zip(ids, raw_hashes(segment), strict=True) if cid is not None}
    answers = []
    for extra in ([], [None]):
        table = pa.table({"id": pa.array(ids + extra, pa.string()), "v": pa.array(range(40 + len(extra)), pa.int64())})
        source = LocalSource(table, tmp_path / str(len(extra)))
        diff = SegmentDiff(source, columns=["id", "v"], schema=table.schema, stored=stored_table(stored), salt="salt")
        try:
            scan = diff.scan_ids()
            moved = rows_of(diff.moved_rows())
            source.queries.clear()
            to_send = rows_of(diff.rows_to_send(full=False))
            answers.append((scan.rows, scan.matched, moved, [(row[ROW], row["id"]) for row in to_send], source.queries))
        finally:
            diff.close()
            source.close()
    assert answers[0] == (40, 40, [], [], [])  # nothing to stream, and no query of the segment for it
    rows, matched, moved, to_send, queries = answers[1]
    assert (rows, matched, moved, to_send) == (41, 40, [], [(41, None)])
    assert queries  # the null id's row was fetched from the segment


@pytest.mark.parametrize("new_ids", [5, 3 * LISTED_IDS], ids=["ids listed", "ids joined"])
def test_a_local_deltas_few_rows_come_out_with_their_read_order_numbers(tmp_path: Path, new_ids: int) -> None:
    """The stream's and the moved rows' numbers, fetched without numbering every row, are the streamed differ's."""
    count = 3_000
    # Ids out of order; a null id every 97th row; the stored ids are all but ``new_ids`` of them.
    ids: list[str | None] = [None if n % 97 == 5 else f"id{(n * 7919) % count:05d}" for n in range(count)]
    # A new id twice (both copies new), a stored id twice (one copy unchanged).
    ids += ["id00003", f"id{(11 * 7919) % count:05d}"]
    values = list(range(len(ids)))
    values[-1] = values[11]  # the stored id's second copy: its first's values (unchanged)
    segment = pa.table({"id": pa.array(ids, pa.string()), "v": pa.array(values, pa.int64())})
    raws = raw_hashes(segment)
    present = sorted({cid for cid in ids if cid is not None})
    new = set(present[:: len(present) // new_ids][:new_ids]) | {"id00003"}
    first_raw = {cid: raw for cid, raw in reversed(list(zip(ids, raws, strict=True))) if cid is not None}
    # Every 50th stored id moved (one off), the others did not.
    shifted = {cid for n, cid in enumerate(present) if n % 50 == 0} - new
    stored = {cid: (first_raw[cid] + (cid in shifted), 4) for cid in present if cid not in new}
    answers = []
    for local in (True, False):
        source: LocalSource | TableSource = LocalSource(segment, tmp_path) if local else TableSource(segment)
        diff = SegmentDiff(source, columns=["id", "v"], schema=segment.schema, stored=stored_table(stored), salt="salt")
        try:
            scan = diff.scan_ids()
            answers.append((scan, rows_of(diff.moved_rows()), rows_of(diff.rows_to_send(full=False))))
            assert diff.compared_in == ("segment_database" if local else "stream")
        finally:
            diff.close()
            source.close()
    (local_scan, local_moved, local_sent), (scan, moved, sent) = answers
    assert local_scan == scan
    assert local_moved == moved
    assert local_sent == sent
    assert {row["id"] for row in moved} == shifted - {ids[-1]}  # a duplicated id is sent (rejected), not moved
    assert all(row[ROW] == ids.index(row["id"]) + 1 for row in moved)  # read order, from 1
    assert [row[ROW] for row in sent if row["id"] is None] == [n + 1 for n, cid in enumerate(ids) if cid is None]
    assert {row["id"] for row in sent if row["id"] is not None} == new | {ids[-1]}
    assert all(values[row[ROW] - 1] == row["v"] and ids[row[ROW] - 1] == row["id"] for row in sent)


def test_a_segment_read_otherwise_each_time_gets_every_row_numbered(tmp_path: Path) -> None:
    """Rows in another order on each read: the few rows and their numbers disagree, so every row is numbered."""
    ids: list[str | None] = [f"id{n:03d}" for n in range(300)] + [None, None, "new1", "new2"]
    segment = pa.table({"id": pa.array(ids, pa.string()), "v": pa.array(range(len(ids)), pa.int64())})
    stored = {cid: (raw, 1) for cid, raw in zip(ids[:300], raw_hashes(segment)[:300], strict=True)}
    source = LocalSource(segment, tmp_path, query="SELECT id, v FROM segment ORDER BY random()")
    try:
        schema = source.schema()
        diff = SegmentDiff(source, columns=["id", "v"], schema=schema, stored=stored_table(stored), salt="salt")
        try:
            diff.scan_ids()
            sent = rows_of(diff.rows_to_send(full=False))
        finally:
            diff.close()
    finally:
        source.close()
    expected = [(300, "None"), (301, "None"), (302, "new1"), (303, "new2")]
    assert sorted((row["v"], str(row["id"])) for row in sent) == expected
    numbers = [row[ROW] for row in sent]
    assert len(set(numbers)) == 4  # each row its own number, as the one read that handed them over gave them
    assert all(1 <= number <= len(ids) for number in numbers)
    assert source.reads == []


def test_the_few_rows_meet_their_numbers_by_id_whatever_order_each_read_hands_them_over() -> None:
    """The numbers (one read of the ids) and the rows (another, of every column) meet on the id and its copy.

    Past :data:`LISTED_IDS` ids, the second read is filtered by a hash join on two threads,
    which hands its rows over in any order: each row must still get its own number.
    """
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET threads = 2")
        # Row groups of their own, so that both threads filter the rows; every 50th has no id,
        # and 'id0100' comes twice, its two copies alike.
        con.execute(
            "CREATE TABLE segment AS SELECT CASE WHEN i % 50 = 7 THEN NULL ELSE 'id' || lpad(i::VARCHAR, 6, '0') END "
            "AS id, i % 1000 AS v FROM range(300000) t(i)"
        )
        con.execute("UPDATE segment SET id = 'id000100', v = 100 WHERE id = 'id001100'")
        wanted = [f"id{n:06d}" for n in range(3, 300000, 97)]  # thousands of ids, among them the copies'
        wanted.append("id000100")
        con.execute("CREATE TABLE wanted AS SELECT unnest($ids) AS k", {"ids": wanted})
        key, raw = 'CAST("id" AS VARCHAR)', 'hash(\'salt\', "id", "v")'
        among = set(wanted)
        expected = [
            (n + 1, f"id{n:06d}" if n != 1100 else "id000100", n % 1000)
            for n in range(300000)
            if n % 50 != 7 and (f"id{n:06d}" in among or n == 1100)
        ]
        for attempt in range(3):  # a lucky order would pass an order-bound meeting by chance
            selected = sparse_rows(
                con, "SELECT id, v FROM segment", ["id", "v"], key, raw, ids="SELECT k FROM wanted", nulls=False
            )
            assert selected is not None, attempt
            got = con.sql(f"SELECT {ROW}, id, v FROM ({selected}) ORDER BY {ROW}").fetchall()
            assert got == expected, attempt
            drop_sparse_rows(con)
    finally:
        con.close()


def test_the_few_rows_are_refused_when_copies_differ_or_two_reads_of_the_segment_disagree() -> None:
    """Two copies of an id (here, rows without one) that differ cannot be told apart; nor reads that disagree."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(
            "CREATE TABLE segment AS SELECT CASE WHEN i % 50 = 7 THEN NULL ELSE 'id' || lpad(i::VARCHAR, 4, '0') END "
            "AS id, i AS v FROM range(2000) t(i)"
        )
        wanted = [f"id{n:04d}" for n in range(3, 2000, 61)]  # 33 ids (none null)
        ids = "SELECT k FROM (VALUES " + ", ".join(f"('{k}')" for k in wanted) + ") t(k)"
        key, raw = 'CAST("id" AS VARCHAR)', 'hash(\'salt\', "id", "v")'
        selected = sparse_rows(con, "SELECT id, v FROM segment", ["id", "v"], key, raw, ids=ids, nulls=False)
        assert selected is not None
        got = con.sql(f"SELECT {ROW}, id, v FROM ({selected}) ORDER BY {ROW}").fetchall()
        assert got == [(n + 1, f"id{n:04d}", n) for n in range(2000) if n % 50 != 7 and f"id{n:04d}" in wanted]
        drop_sparse_rows(con)
        # Read in another order each time, the rows meet their numbers by id, but the rows
        # without an id differ (their values): which number is whose is unknown.
        shuffled = "SELECT id, v FROM segment ORDER BY random()"
        assert sparse_rows(con, shuffled, ["id", "v"], key, raw, ids=ids, nulls=True) is None
        selected = sparse_rows(con, shuffled, ["id", "v"], key, raw, ids=ids, nulls=False)
        assert selected is not None
        got = con.sql(f"SELECT id, v FROM ({selected}) ORDER BY id").fetchall()
        assert got == [(f"id{n:04d}", n) for n in range(2000) if n % 50 != 7 and f"id{n:04d}" in wanted]
        drop_sparse_rows(con)
        # Another set of rows on each read: the ids do not meet as often, and nothing is left behind.
        changing = "SELECT id, v FROM segment WHERE random() < 0.5"
        assert sparse_rows(con, changing, ["id", "v"], key, raw, ids=ids, nulls=False) is None
        assert con.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'sparse%'").fetchall() == [(0,)]
    finally:
        con.close()


def segment_source(local: bool, path: Path, table: pa.Table) -> DuckDBSource | TableSource:
    """The ``segment`` table of the database at ``path`` where it lies (``local``), or ``table`` streamed."""
    if local:
        return DuckDBSource(DuckDBSourceConfig(database=str(path), table="segment"), activation="local")
    return TableSource(table, batch_rows=50_000)


def scrambled_segment(path: Path, rows: int, *, twice_every: int, twice_from: int, copy_value: str) -> pa.Table:
    """A ``segment`` table of ``rows`` ids out of order (every 1,000th row has none), and every
    ``twice_every``-th id from ``twice_from`` again, its ``v`` the SQL ``copy_value`` of ``i``."""
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE segment AS SELECT CASE WHEN i % 1000 = 7 THEN NULL "
            "ELSE 'id' || lpad(CAST((i * 7919) % $rows AS VARCHAR), 8, '0') END AS id, i AS v "
            "FROM range($rows) t(i) UNION ALL "
            f"SELECT 'id' || lpad(CAST((i * 7919) % $rows AS VARCHAR), 8, '0'), {copy_value} "
            "FROM range($first, $rows, $every) t(i)",
            {"rows": rows, "first": twice_from, "every": twice_every},
        )
        return con.sql("SELECT * FROM segment").to_arrow_table()


@pytest.mark.parametrize("full", [True, False], ids=["full pass", "continuation"])
def test_an_id_ordered_stream_in_pieces_comes_out_as_one_sort_would(tmp_path: Path, full: bool) -> None:
    """Past SORT_PIECE_ROWS, a local segment's ordered stream is cut into pieces of consecutive ids.

    It must hand over what the streamed differ's one sort does, in the same order: every row
    above the watermark (or, in a continuation, the new ones), null ids last, duplicated ids
    flagged.
    """
    path = tmp_path / "segment.duckdb"
    table = scrambled_segment(path, 3 * SORT_PIECE_ROWS, twice_every=5_000, twice_from=0, copy_value="-i")
    ids = [cid for cid in table["id"].to_pylist() if cid is not None]
    # Half the ids below the watermark were synced by earlier legs (and a few above it).
    after = sorted(ids)[len(ids) // 3]
    stored = {cid: (5, 1) for cid in sorted(set(ids))[: len(ids) // 3 : 2]}
    stored.update({cid: (5, 1) for cid in sorted(set(ids))[len(ids) // 2 :: 97]})
    answers = []
    for local in (True, False):
        source = segment_source(local, path, table)
        diff = SegmentDiff(
            source, columns=["id", "v"], schema=table.schema, stored=stored_table(stored), salt="salt", after=after
        )
        try:
            diff.scan_ids()
            got = [
                (row[KEY], row[ROW], row[DUPLICATE], row[STORED_RAW])
                for batch in diff.rows_to_send(full=full, ordered=True)
                for row in batch.to_pylist()
            ]
        finally:
            diff.close()
            source.close()
        answers.append(got)
    pieced, sorted_once = answers
    keys = [key for key, *_ in pieced]
    assert keys == [key for key, *_ in sorted_once]  # the same order: by id, null ids last
    assert sorted(pieced, key=str) == sorted(sorted_once, key=str)
    assert keys[-1] is None
    assert all(key is None or key > after for key in keys)
    assert len(pieced) > SORT_PIECE_ROWS  # enough rows for pieces


@pytest.mark.parametrize("stored_ids", [150_000, 330_000], ids=["tested by the stored ids", "tested by the new ids"])
def test_a_local_deltas_large_stream_comes_out_in_parts_as_the_streamed_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored_ids: int
) -> None:
    """Past SPARSE_ROWS, a delta's stream is cut by id hash into parts whose id tests fit the cap.

    A first sync's second leg is such a delta: hundreds of thousands of new ids beside as
    many stored ones. Each part must test its rows against the fewer of the two sets, and
    the parts together must hand over what the streamed differ does: every new, null and
    duplicated id's row once, with its read-order number; nothing stored and unchanged.
    """
    monkeypatch.setattr("sync.local_pass.STREAM_IDS_PER_MIB", 700)  # ~85k ids a part under 128 MB
    parts: list[tuple[int, int, bool]] = []
    condition = local_differ.part_condition

    def noted(after: str | None, part: int, count: int, *, by_stored: bool) -> str:
        parts.append((part, count, by_stored))
        return condition(after, part, count, by_stored=by_stored)

    monkeypatch.setattr(local_differ, "part_condition", noted)
    path = tmp_path / "segment.duckdb"
    table = scrambled_segment(path, 600_000, twice_every=20_000, twice_from=3, copy_value="i")
    ids = table["id"].to_pylist()
    hashing = SegmentDiff(
        TableSource(table, batch_rows=50_000),
        columns=["id", "v"],
        schema=table.schema,
        stored=stored_table({}),
        salt="s",
    )
    try:
        first_raw: dict[str, int] = {}
        for row in rows_of(hashing.rows_to_send(full=True)):
            if row["id"] is not None:
                first_raw.setdefault(row["id"], row[RAW])
    finally:
        hashing.close()
    present = sorted(first_raw)
    # Every 2nd, then 3rd, ... id up to ``stored_ids``: unchanged, but every 50th moved; and
    # three stored ids the segment no longer has.
    chosen = present[::2][:stored_ids] + present[1::2][: max(0, stored_ids - len(present[::2]))]
    stored = {cid: (first_raw[cid] + (n % 50 == 0), 1) for n, cid in enumerate(chosen)}
    stored.update({f"zz-gone-{n}": (5, 1) for n in range(3)})
    new = set(present) - set(stored)
    by_stored = len(stored) < len(new)
    assert len(new) > 250_000  # past SPARSE_ROWS: the stream is queried whole, in parts
    answers = []
    for local in (True, False):
        source = segment_source(local, path, table)
        diff = SegmentDiff(source, columns=["id", "v"], schema=table.schema, stored=stored_table(stored), salt="s")
        try:
            scan = diff.scan_ids()
            moved = rows_of(diff.moved_rows())
            sent = [
                (row[ROW], row[KEY], row["v"], row[DUPLICATE], row[STORED_RAW])
                for batch in diff.rows_to_send(full=False)
                for row in batch.to_pylist()
            ]
            assert diff.local_problem is None
        finally:
            diff.close()
            source.close()
        answers.append((scan, moved, sent))
    (local_scan, local_moved, local_sent), (scan, moved, sent) = answers
    assert local_scan == scan
    assert local_moved == moved
    assert len(local_sent) == len({number for number, *_ in local_sent})  # each row once
    assert sorted(local_sent) == sorted(sent)
    duplicated = {cid for cid, copies in Counter(ids).items() if cid is not None and copies > 1}
    assert duplicated
    assert set(scan.duplicates) == duplicated
    assert {key for _, key, *_ in local_sent} == new | duplicated | {None}
    assert all(ids[number - 1] == key for number, key, *_ in local_sent)  # read-order numbers
    assert len({count for _, count, _ in parts}) == 1
    assert {part for part, _, _ in parts} == set(range(parts[0][1]))
    assert parts[0][1] > 1
    assert all(stored_side == by_stored for *_, stored_side in parts)


def test_a_local_delta_with_a_hundred_thousand_new_wide_rows_is_answered_where_the_segment_lies(
    tmp_path: Path,
) -> None:
    """The few rows' temporary tables hold every mapped column: past WIDE_ROWS, the larger cap.

    300,000 rows of ~150 bytes with 126,000 stored ids: under 32 MB, meeting the 174,000 new
    rows with their numbers ran out of memory, and the differ streamed the whole segment.
    The answers must still be the streamed differ's.
    """
    rows = 300_000
    path = tmp_path / "segment.duckdb"
    text = ", ".join(f"repeat(chr(CAST(97 + (i * {n}) % 26 AS INTEGER)), 24) AS s{n}" for n in range(1, 6))
    with duckdb.connect(str(path)) as con:
        con.execute(
            f"CREATE TABLE segment AS SELECT 'id' || lpad(CAST(i AS VARCHAR), 8, '0') AS id, i AS v, {text} "
            "FROM range($rows) t(i)",
            {"rows": rows},
        )
        table = con.sql("SELECT * FROM segment").to_arrow_table()
    columns = table.schema.names
    source = TableSource(table, batch_rows=50_000)
    hashing = SegmentDiff(source, columns=columns, schema=table.schema, stored=stored_table({}), salt="s")
    try:
        raws = {row["id"]: row[RAW] for row in rows_of(hashing.rows_to_send(full=True))}
    finally:
        hashing.close()
    stored = {cid: (raws[cid] + (n % 100 == 0), 1) for n, cid in enumerate(sorted(raws)[:126_000])}
    answers = []
    for local in (True, False):
        segment = segment_source(local, path, table)
        diff = SegmentDiff(segment, columns=columns, schema=table.schema, stored=stored_table(stored), salt="s")
        try:
            scan = diff.scan_ids()
            moved = [(row[ROW], row[KEY]) for row in rows_of(diff.moved_rows())]
            sent = sorted((row[ROW], row[KEY]) for batch in diff.rows_to_send(full=False) for row in batch.to_pylist())
            assert diff.local_problem is None
        finally:
            diff.close()
            segment.close()
        answers.append((scan, moved, sent))
    assert answers[0] == answers[1]
    (scan, moved, sent) = answers[0]
    assert scan.new_ids == len(sent) == rows - 126_000
    assert len(moved) == 1_260
    assert all(key == f"id{number - 1:08d}" for number, key in sent + moved)  # read-order numbers


# -- whole runs ------------------------------------------------------------------------------


class CountingSource:
    """The DuckDB segment, with every read's columns noted (the Source protocol, delegated)."""

    def __init__(self, inner: DuckDBSource) -> None:
        self.inner = inner
        self.engine = inner.engine
        self.reads: list[list[str]] = []

    def schema(self) -> pa.Schema:
        return self.inner.schema()

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        self.reads.append(list(columns))
        return self.inner.read_batches(columns)

    def stats(self) -> dict[str, object]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


class CountingLocalSource(DuckDBSource):
    """The DuckDB segment itself (its delta's pass runs in its database), streamed reads noted."""

    def __init__(self, config: DuckDBSourceConfig, *, activation: str) -> None:
        super().__init__(config, activation=activation)
        self.reads: list[list[str]] = []

    def read_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        self.reads.append(list(columns))
        return super().read_batches(columns)


async def counted_run(
    store: StateStore, activation: Any, *, local: bool = False, **options: Any
) -> tuple[RunResult, list[list[str]]]:
    source: CountingSource | CountingLocalSource = (
        CountingLocalSource(activation.source, activation=activation.name)
        if local
        else CountingSource(DuckDBSource(activation.source, activation=activation.name))
    )
    try:
        result = await Run(
            activation, source=source, store=store, client=make_client(activation), options=RunOptions(**options)
        ).execute()
    finally:
        source.close()
    return result, source.reads


@pytest.fixture(params=["sqlite", "firestore"])
def state_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        store: StateStore = SQLiteStateStore(tmp_path / "state.db")
    else:
        make: Callable[..., StateStore] = request.getfixturevalue("make_firestore_store")
        store = make()
    try:
        yield store
    finally:
        if request.param == "sqlite":
            store.close()


@pytest.fixture
async def sim_url() -> AsyncIterator[str]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)
    url = await simulator.start()
    yield url
    await simulator.stop()


@pytest.mark.emulator
@pytest.mark.parametrize("local", [False, True], ids=["streamed", "local"])
async def test_runs_read_the_segment_once_in_a_delta_on_sqlite_and_firestore_state(
    state_store: StateStore, sim_url: str, tmp_path: Path, local: bool
) -> None:
    """Streamed, a delta reads the segment once; local, the segment's database is queried and nothing streamed."""
    mapped = ["customer_id", "email", "phone", "first_name", "points"]
    # The pass, a first sync's id read, and any stream, when they read the segment as a
    # stream (a local segment's are queries where it lies).
    the_pass = [] if local else [mapped]
    ids = [] if local else [["customer_id"]]
    stream = [] if local else [mapped]
    activation = make_activation(
        tmp_path,
        sim_url,
        sync_mode="mirror",
        guards={"max_removed_percent": 100, "max_changed_percent": 100},
    )
    segment = tmp_path / "segment.duckdb"
    write_segment(segment, people(200))
    first, reads = await counted_run(state_store, activation, local=local)
    assert first.record["status"] == "succeeded", first.record.get("error")
    assert reads == [*ids, *stream]  # nothing stored: the ids, then every row

    # A delta: 3 moved, 2 cosmetic (the same phone written otherwise), 2 left, 1 new, a
    # null id, and a synced id now twice with its synced values.
    rows = people(198)
    for index in (10, 11, 12):
        rows[index] = person(index, points=index + 1_000)
    for index in (20, 21):
        rows[index] = person(index, phone=f"+33 6 12 34 {index // 100 % 100:02d} {index % 100:02d}")
    rows += [person(500), {**person(501), "customer_id": None}, person(30)]
    write_segment(segment, rows)
    delta, reads = await counted_run(state_store, activation, local=local)
    counts = delta.record["counts"]
    assert delta.record["status"] == "succeeded_with_rejections", delta.record.get("error")
    assert (counts["changed"], counts["refreshed"], counts["new"], counts["removed"]) == (3, 2, 1, 2)
    assert delta.record["rejected_by_reason"] == {"duplicate_custom_id": 2, "missing_custom_id": 1}
    assert counts["sent"] == 6  # 3 changed, 1 new, 2 removals
    assert reads == [*the_pass, *stream]  # the pass, then the duplicated id's own read
    missing = next(s for s in delta.record["rejected_samples"] if s["issues"][0]["reason"] == "missing_custom_id")
    assert missing["row"] == 200  # numbered in read order, on either path
    assert delta.record["delta_pass"] == {"ran_in": "segment_database" if local else "stream"}

    rows.pop()  # c00030 once again
    write_segment(segment, rows)
    delta, reads = await counted_run(state_store, activation, local=local)
    assert delta.record["counts"]["sent"] == 0
    assert delta.record["rejected_by_reason"] == {"missing_custom_id": 1}
    assert reads == the_pass  # one read, or none streamed

    full, reads = await counted_run(state_store, activation, local=local, full=True)
    assert full.record["counts"]["acknowledged"] == 199  # every valid row
    assert reads == [*the_pass, *stream]  # a full pass: the pass, then every row
