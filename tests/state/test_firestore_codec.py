"""The Firestore store's blobs: Arrow IPC as written now, and the zlib packing written before it.

tests/state/legacy_firestore_blobs holds blobs the previous codec wrote (sync/state/firestore.py
as of commit 27558c3, ``_encode_shard`` and ``_pack_journal``), from the records spelled out
in :data:`LEGACY` below. Shards keep that format until a compaction rewrites them, so every
one of them must still decode to the same table.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from sync.state.firestore import StateCorruptError, codec
from sync.state.firestore.layout import FP, INTENTS, Namespace

BLOBS = Path(__file__).parent / "legacy_firestore_blobs"
U64_MAX = 2**64 - 1

# file -> (namespace, is a journal, rows as (custom_id, raw, payload, put)).
LEGACY: dict[str, tuple[Namespace, bool, list[tuple[str, int, int, bool]]]] = {
    "fp_shard_ascii.bin": (
        FP,
        False,
        [("ascii-1", 1, 2, True), ("ascii-2", U64_MAX, 0, True), ("user-0000003", 2**63, 2**63 - 1, True)],
    ),
    "fp_shard_text.bin": (
        FP,
        False,
        [("emoji-🎉", U64_MAX, U64_MAX, True), ("plain", 0, 0, True), ("é-2", 7, 8, True), ("用户-42", 9, 10, True)],
    ),
    "fp_journal.bin": (
        FP,
        True,
        [("ascii-1", 0, 0, False), ("é-2", 11, 12, True), ("new", U64_MAX, 1, True), ("plain", 0, 0, False)],
    ),
    "intent_shard.bin": (INTENTS, False, [("i-1", 0, 0, True), ("ï-2", 0, 0, True)]),
    "intent_journal.bin": (INTENTS, True, [("i-1", 0, 0, False), ("i-3", 0, 0, True)]),
}


def expected_table(ns: Namespace, journal: bool, rows: list[tuple[str, int, int, bool]]) -> pa.Table:
    columns: dict[str, list[object]] = {"custom_id": [r[0] for r in rows]}
    if ns.with_values:
        columns["raw"] = [r[1] for r in rows]
        columns["payload"] = [r[2] for r in rows]
        # Written before attribute sets were kept: none.
        columns["attributes"] = [None] * len(rows)
    if journal:
        columns["put"] = [r[3] for r in rows]
    return pa.table(columns, schema=codec.schema(ns, journal=journal))


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_blobs_of_the_previous_codec_decode_to_the_same_records(name: str) -> None:
    ns, journal, rows = LEGACY[name]
    table = codec.decode((BLOBS / name).read_bytes(), ns, journal=journal, where=name)
    assert table.equals(expected_table(ns, journal, rows))


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_blobs_round_trip_through_arrow_ipc(name: str) -> None:
    ns, journal, rows = LEGACY[name]
    table = expected_table(ns, journal, rows)
    blob = codec.encode(table)
    assert blob[:4] == b"\xff\xff\xff\xff"  # an IPC stream, not the legacy packing
    assert codec.decode(blob, ns, journal=journal, where=name).equals(table)


@pytest.mark.parametrize("journal", [False, True])
def test_ipc_blobs_written_before_attribute_sets_decode_with_none(journal: bool) -> None:
    rows = [("a", 1, 2, True), ("é", U64_MAX, 0, False)]
    table = expected_table(FP, journal, rows).drop_columns(["attributes"])
    decoded = codec.decode(codec.encode(table), FP, journal=journal, where="old")
    assert decoded.equals(expected_table(FP, journal, rows))


def test_attribute_sets_round_trip_through_blobs_and_shards() -> None:
    table = expected_table(FP, True, [("a", 1, 2, True), ("b", 3, 4, True)])
    sets = pa.array([b"\x01\x00\x00\x00\x02\x00\x00\x00", None], pa.binary())
    table = table.set_column(table.schema.get_field_index("attributes"), "attributes", sets)
    assert codec.decode(codec.encode(table), FP, journal=True, where="doc").equals(table)
    assert codec.shard_table(FP, table).column("attributes").to_pylist() == sets.to_pylist()


def test_a_blob_of_the_wrong_kind_is_refused() -> None:
    shard = codec.encode(expected_table(FP, False, LEGACY["fp_shard_ascii.bin"][2]))
    with pytest.raises(StateCorruptError, match="columns"):
        codec.decode(shard, FP, journal=True, where="doc")
    with pytest.raises(StateCorruptError, match="format"):
        codec.decode((BLOBS / "fp_shard_ascii.bin").read_bytes(), FP, journal=True, where="doc")
    with pytest.raises(StateCorruptError, match="doc"):
        codec.decode(b"not a blob", FP, journal=False, where="doc")
    with pytest.raises(StateCorruptError, match="doc"):
        codec.decode(shard[:40], FP, journal=False, where="doc")


def test_shard_tables_and_the_latest_journal_outcome_in_columns() -> None:
    records = expected_table(FP, False, [("b", 3, 4), ("a", 1, 2)])
    table = codec.shard_table(FP, records)
    assert table.column("custom_id").to_pylist() == ["a", "b"]  # sorted: deterministic blobs
    assert table.schema == codec.schema(FP, journal=False)
    journal = [
        expected_table(FP, True, [("a", 5, 6, True), ("b", 0, 0, False)]),
        expected_table(FP, True, [("a", 7, 8, True), ("c", 9, 9, True), ("c", 0, 0, False)]),
    ]

    def outcome(table: pa.Table) -> dict[str, tuple[int, int] | None]:
        rows = table.to_pylist()
        return {r["custom_id"]: (r.get("raw", 0), r.get("payload", 0)) if r["put"] else None for r in rows}

    assert outcome(codec.latest_table(FP, journal)) == {"a": (7, 8), "b": None, "c": None}
    intents = codec.latest_table(
        INTENTS, [codec.intent_table(["x", "y"], put=True), codec.intent_table(["x"], put=False)]
    )
    assert outcome(intents) == {"x": None, "y": (0, 0)}
    assert codec.shard_table(INTENTS, intents).column_names == ["custom_id"]
