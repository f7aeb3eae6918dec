"""sync.attributes: attribute hashes, their packed sets, and the bodies of only what changed.

The collision rules are checked with hashes chosen by hand (a real 32-bit collision cannot
be found on purpose in a test): each case says what a collision would otherwise hide, and
the last one pins the residual case docs/mapping.md gives the probability of.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from sync.attributes import AttributeColumns, attribute_columns, changed_bodies, fragment_hashes, pack_sets
from sync.config import AttributeType
from sync.encode import encode_batch
from sync.mapping import ProfileMapper
from tests.support.engine_support import make_activation


def packed(*hashes: int) -> bytes:
    return b"".join(value.to_bytes(4, "little") for value in sorted(hashes))


def test_fragments_hash_alike_when_equal_and_empty_ones_are_null() -> None:
    hashes = fragment_hashes(pa.array([',"a":1', "", ',"a":1', ',"a":2', ',"b":1'], pa.string())).to_pylist()
    assert hashes[0] == hashes[2]
    assert hashes[1] is None
    assert len({hashes[0], hashes[3], hashes[4]}) == 3
    assert all(0 <= value < 2**32 for value in hashes if value is not None)


def test_sets_are_sorted_packed_and_leave_absent_fragments_out() -> None:
    first = pa.array([5, None, 7], pa.uint32())
    second = pa.array([3, None, None], pa.uint32())
    third = pa.array([2**32 - 1, 1, None], pa.uint32())
    sets = pack_sets([first, second, third], 3).to_pylist()
    assert sets == [packed(3, 5, 2**32 - 1), packed(1), packed(7)]
    assert pack_sets([], 2).to_pylist() == [b"", b""]


def test_the_set_of_an_encoded_batch_is_its_bodys_attributes(tmp_path: Path) -> None:
    activation = make_activation(tmp_path, "http://127.0.0.1:1", on_invalid_value="drop_attribute")
    types = {"customer_id": AttributeType.STRING, "first_name": AttributeType.STRING, "points": AttributeType.INTEGER}
    mapper = ProfileMapper(activation, types)
    batch = pa.RecordBatch.from_pylist(
        [
            {"customer_id": "a", "email": "a@example.com", "phone": "+33612345678", "first_name": "A", "points": 1},
            {"customer_id": "b", "email": "bad", "phone": None, "first_name": None, "points": 2},
        ],
        schema=pa.schema(
            [
                ("customer_id", pa.string()),
                ("email", pa.string()),
                ("phone", pa.string()),
                ("first_name", pa.string()),
                ("points", pa.int64()),
            ]
        ),
    )
    encoded = encode_batch(mapper.convert_batch(batch), keep_slots=True)
    columns = attribute_columns(encoded)
    for row, body in enumerate(encoded.bodies.to_pylist()):
        fragments = [f",{json.dumps(k, ensure_ascii=False)}:{json.dumps(v)}" for k, v in json.loads(body).items()]
        expected = fragment_hashes(pa.array(fragments, pa.string())).to_pylist()
        assert columns.sets[row].as_py() == packed(*expected)
    # The invalid email of "b" is dropped: not in its body, not in its set (Batch keeps its own).
    assert "$email_address" not in json.loads(encoded.bodies[1].as_py())
    assert len(columns.sets[1].as_py()) == 3 * 4


def columns_of(rows: list[dict[str, tuple[str, int] | None]]) -> AttributeColumns:
    """Hand-made columns: per row, slot key -> (JSON value, hash) or None (absent)."""
    keys = sorted({key for row in rows for key in row})
    slots = []
    hashes = []
    for key in keys:
        cells = [row.get(key) for row in rows]
        fragments = ["" if cell is None else f',"{key}":{cell[0]}' for cell in cells]
        slots.append((key, pa.array(fragments, pa.string())))
        hashes.append(pa.array([None if cell is None else cell[1] for cell in cells], pa.uint32()))
    return AttributeColumns(slots, hashes, pack_sets(hashes, len(rows)))


def decide(columns: AttributeColumns, stored: list[bytes | None], candidates: list[bool]) -> list[object]:
    """Per row: the changed body as a dict, "whole", or "nothing"."""
    result = changed_bodies(columns, pa.array(stored, pa.binary()), pa.array(candidates, pa.bool_()))
    decided: list[object] = []
    for body, nothing in zip(result.bodies.to_pylist(), result.nothing.to_pylist(), strict=True):
        decided.append("nothing" if nothing else "whole" if body is None else json.loads(body))
    return decided


def test_only_the_attributes_whose_hash_is_not_stored_are_sent() -> None:
    columns = columns_of(
        [
            {"a": ("1", 10), "b": ("2", 20), "c": ("4", 31)},  # c changed (30 -> 31)
            {"a": ("1", 10), "b": ("3", 21), "c": ("4", 31)},  # b and c changed
            {"a": ("1", 10), "b": ("2", 20), "c": ("4", 31)},  # no stored set: whole
            {"a": ("1", 10), "b": ("2", 20), "c": ("4", 31)},  # not a candidate (new, full pass)
        ]
    )
    stored = [packed(10, 20, 30), packed(10, 20, 30), None, packed(10, 20, 30)]
    assert decide(columns, stored, [True, True, True, False]) == [{"c": 4}, {"b": 3, "c": 4}, "whole", "whole"]


def test_a_mapping_change_sends_what_is_new_and_nothing_when_an_attribute_only_left() -> None:
    columns = columns_of(
        [
            {"a": ("1", 10), "b": ("2", 20), "d": ("true", 40)},  # d is a new mapping
            {"a": ("1", 10), "b": ("2", 20)},  # c's mapping was removed: Batch keeps it
        ]
    )
    stored = [packed(10, 20), packed(10, 20, 30)]
    assert decide(columns, stored, [True, True]) == [{"d": True}, "nothing"]


def test_a_changed_attribute_hashing_to_its_old_value_is_sent_whole() -> None:
    # c moved but its new hash is its old one: every attribute found while the payload moved.
    columns = columns_of([{"a": ("1", 10), "b": ("2", 20), "c": ("5", 30)}])
    assert decide(columns, [packed(10, 20, 30)], [True]) == ["whole"]


def test_a_changed_attribute_hashing_to_another_attributes_entry_is_sent_whole() -> None:
    # c's new hash is b's stored one: two attributes on one entry.
    columns = columns_of([{"a": ("1", 10), "b": ("2", 20), "c": ("5", 20)}])
    assert decide(columns, [packed(10, 20, 30)], [True]) == ["whole"]
    # The same with a mapping change on top (sizes differ): still caught by the double match.
    columns = columns_of([{"a": ("1", 10), "b": ("2", 20), "c": ("5", 20), "d": ("7", 70)}])
    assert decide(columns, [packed(10, 20, 30)], [True]) == ["whole"]


def test_the_residual_case_two_changes_one_hashing_to_the_others_old_entry() -> None:
    # b and c both moved, and c's new hash is b's OLD one (20): the counts add up, so only b
    # is sent and c's change is missed. This is the c**2 / 2**32 case docs/mapping.md states.
    columns = columns_of([{"a": ("1", 10), "b": ("3", 21), "c": ("5", 20)}])
    assert decide(columns, [packed(10, 20, 30)], [True]) == [{"b": 3}]
