"""fold_journal: base fingerprints plus journal entries, folded in columns, against a dict reference."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sync.state.fold as state_fold
from sync.differ import FINGERPRINT_SCHEMA
from sync.state.fold import fold_journal

JOURNAL_SCHEMA = FINGERPRINT_SCHEMA.append(pa.field("put", pa.bool_()))
IDS = st.sampled_from(["a", "b", "c", "d", "é", "ü-1", "long-id-0000000001"])
U64 = st.integers(min_value=0, max_value=2**64 - 1)
# An attribute set (send: changed_attributes) or none kept.
SETS = st.one_of(st.none(), st.lists(st.binary(min_size=4, max_size=4), max_size=3).map(b"".join))


def table(
    rows: list[tuple[str, int, int]] | list[tuple[str, int, int, bytes | None]],
    schema: pa.Schema = FINGERPRINT_SCHEMA,
    puts: list[bool] | None = None,
) -> pa.Table:
    columns: list[Any] = [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]]
    columns.append([r[3] if len(r) > 3 else None for r in rows])
    if puts is not None:
        columns.append(puts)
    return pa.table(columns, schema=schema)


def as_dict(folded: pa.Table) -> dict[str, tuple[int, int]]:
    ids = folded.column("custom_id").to_pylist()
    assert len(ids) == len(set(ids))
    return dict(
        zip(ids, zip(folded.column("raw").to_pylist(), folded.column("payload").to_pylist(), strict=True), strict=True)
    )


def sets_of(folded: pa.Table) -> dict[str, bytes | None]:
    return dict(zip(folded.column("custom_id").to_pylist(), folded.column("attributes").to_pylist(), strict=True))


@settings(max_examples=200, deadline=None)
@given(
    base=st.dictionaries(IDS, st.tuples(U64, U64, SETS), max_size=5),
    journal=st.lists(st.lists(st.tuples(IDS, U64, U64, SETS, st.booleans()), max_size=6), max_size=4),
)
def test_the_fold_is_the_last_entry_per_id_applied_to_the_base(
    base: dict[str, tuple[int, int, bytes | None]], journal: list[list[tuple[str, int, int, bytes | None, bool]]]
) -> None:
    expected = {custom_id: (raw, payload) for custom_id, (raw, payload, _) in base.items()}
    expected_sets = {custom_id: attributes for custom_id, (_, _, attributes) in base.items()}
    for entries in journal:
        for custom_id, raw, payload, attributes, put in entries:
            if put:
                expected[custom_id] = (raw, payload)
                expected_sets[custom_id] = attributes
            else:
                expected.pop(custom_id, None)
                expected_sets.pop(custom_id, None)
    base_table = table([(k, *v) for k, v in base.items()])
    journal_tables = [
        table([(e[0], e[1], e[2], e[3]) for e in entries], JOURNAL_SCHEMA, [e[4] for e in entries])
        for entries in journal
    ]
    # The same answer from both ways of folding: a small journal applied a base table at a
    # time (what a load does with a journal left unfolded), and the general fold; the base
    # whole or in several tables, each let go as it is folded.
    for small in (True, False):
        for cut in (base_table.num_rows, 2, 1):
            tables = [base_table.slice(start, cut) for start in range(0, base_table.num_rows, max(cut, 1))]
            saved = state_fold.FOLD_DUE_ROWS
            state_fold.FOLD_DUE_ROWS = saved if small else -1
            try:
                folded = fold_journal(tables, journal_tables)
            finally:
                state_fold.FOLD_DUE_ROWS = saved
            assert tables == []
            assert folded.schema.equals(FINGERPRINT_SCHEMA)
            assert as_dict(folded) == expected
            assert sets_of(folded) == expected_sets


def test_a_journal_of_new_ids_only_is_appended_as_it_is() -> None:
    base = table([("a", 1, 2)])
    journal = [table([("b", 3, 4), ("c", 5, 6)], JOURNAL_SCHEMA, [True, True])]
    folded = fold_journal([base], journal)
    assert folded.column("custom_id").to_pylist() == ["a", "b", "c"]
    assert as_dict(folded) == {"a": (1, 2), "b": (3, 4), "c": (5, 6)}


def test_past_the_overlap_check_limit_the_general_fold_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # Above the limits neither a small journal's path nor the overlap check builds a set
    # of ids; the general fold runs.
    monkeypatch.setattr(state_fold, "_MAX_OVERLAP_SET", 1)
    monkeypatch.setattr(state_fold, "FOLD_DUE_ROWS", 1)
    base = table([("a", 1, 2), ("b", 3, 4), ("c", 5, 6)])
    journal = [table([("d", 7, 8), ("e", 9, 10)], JOURNAL_SCHEMA, [True, True])]
    assert as_dict(fold_journal([base], journal)) == {
        "a": (1, 2),
        "b": (3, 4),
        "c": (5, 6),
        "d": (7, 8),
        "e": (9, 10),
    }
    overlapping = [table([("c", 11, 12), ("f", 13, 14)], JOURNAL_SCHEMA, [True, True])]
    assert as_dict(fold_journal([base], overlapping)) == {"a": (1, 2), "b": (3, 4), "c": (11, 12), "f": (13, 14)}


def test_an_id_repeated_across_journal_tables_keeps_its_last_entry() -> None:
    base = table([("a", 1, 2)])
    journal = [
        table([("b", 3, 4)], JOURNAL_SCHEMA, [True]),
        table([("b", 5, 6), ("a", 0, 0)], JOURNAL_SCHEMA, [True, False]),
    ]
    assert as_dict(fold_journal([base], journal)) == {"b": (5, 6)}


@pytest.mark.parametrize("repeated", range(7))
def test_a_repeat_is_found_wherever_it_falls_among_the_slices_of_sorted_ids(
    monkeypatch: pytest.MonkeyPatch, repeated: int
) -> None:
    # The sorted ids are compared a slice at a time: a repeat on a slice boundary counts too.
    monkeypatch.setattr(state_fold, "_REPEAT_SLICE", 2)
    ids = [f"id-{n}" for n in range(7)]
    journal = [
        table([(cid, n, n) for n, cid in enumerate(ids)], JOURNAL_SCHEMA, [True] * len(ids)),
        table([(ids[repeated], 100, 100)], JOURNAL_SCHEMA, [True]),
    ]
    folded = as_dict(fold_journal([], journal))
    assert folded == {cid: (100, 100) if cid == ids[repeated] else (n, n) for n, cid in enumerate(ids)}


def test_a_journal_applied_to_many_tables_keeps_their_order_and_lets_each_go() -> None:
    """More base tables than are looked up at once (FOLD_THREADS): handed out in order, each consumed."""
    tables = [table([(f"{n}-{i}", n, i) for i in range(3)]) for n in range(7)]
    journal = [
        table([("1-0", 9, 9), ("4-2", 9, 9), ("6-1", 0, 0), ("9-9", 1, 1)], JOURNAL_SCHEMA, [True, False, False, True])
    ]
    assert len(tables) > state_fold.FOLD_THREADS
    folded = fold_journal(tables, journal)
    assert tables == []
    kept = [f"{n}-{i}" for n in range(7) for i in range(3) if f"{n}-{i}" not in {"1-0", "4-2", "6-1"}]
    assert folded.column("custom_id").to_pylist() == [*kept, "1-0", "9-9"]
    assert as_dict(folded)["1-0"] == (9, 9)
