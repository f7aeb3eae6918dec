"""The planner and the guards, on hand-built mapped rows (pure: no source, no Batch)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from sync.config import GuardsConfig, RunType, SyncMode, parse_activation
from sync.fingerprint import payload_fingerprint
from sync.mapping import ProfileMapper, resolve_attribute_types
from sync.model import Fingerprint, MappedRow, Reason, RowIssue
from sync.plan import Plan, Planner, evaluate_guards, hashable_columns, plan_batch, raw_salt

VERSION = "v1"
_open_plans: list[Plan] = []


@pytest.fixture(autouse=True)
def _close_spools() -> Iterator[None]:
    yield
    while _open_plans:
        _open_plans.pop().spool.close()


def row(custom_id: str | None, **attributes: Any) -> MappedRow:
    return MappedRow(custom_id, dict(attributes))


def bad(custom_id: str | None, reason: Reason = Reason.INVALID_EMAIL) -> MappedRow:
    return MappedRow(custom_id, None, [RowIssue("email", reason, "'nope'")])


def stored_for(attributes: dict[str, Any], raw: int = 1) -> Fingerprint:
    return Fingerprint(raw=raw, payload=payload_fingerprint(attributes))


def make_plan(
    rows: list[tuple[MappedRow, int]],
    *,
    stored: dict[str, Fingerprint] | None = None,
    intents: set[str] | None = None,
    run_type: RunType = RunType.FULL_THEN_DELTA,
    sync_mode: SyncMode = SyncMode.UPSERT,
    full: bool = False,
) -> Plan:
    planner = Planner(
        run_type=run_type,
        sync_mode=sync_mode,
        full=full,
        stored=stored or {},
        intents=intents or set(),
    )
    for mapped, raw in rows:
        planner.add(mapped, raw)
    plan = planner.finish()
    _open_plans.append(plan)
    return plan


def test_first_run_sends_every_valid_row_as_new_sorted_by_id() -> None:
    plan = make_plan([(row("b", points=1), 1), (row("a", points=2), 2)])
    assert [s.custom_id for s in plan.sends] == ["a", "b"]
    assert {s.kind for s in plan.sends} == {"new"}
    assert plan.counts["new"] == 2
    assert plan.spool.read(plan.sends[0].offset, plan.sends[0].length) == {"points": 2}


def test_delta_sends_only_new_and_changed() -> None:
    stored = {"same": stored_for({"points": 1}), "moved": stored_for({"points": 1})}
    plan = make_plan(
        [(row("same", points=1), 1), (row("moved", points=2), 1), (row("fresh", points=3), 1)], stored=stored
    )
    assert {s.custom_id: s.kind for s in plan.sends} == {"moved": "changed", "fresh": "new"}
    assert plan.summary() == {
        "rows": 3,
        "new": 1,
        "changed": 1,
        "unchanged": 1,
        "skipped_unmapped": 0,
        "removed": 0,
        "rejected": 0,
        "duplicates": 0,
        "refreshed": 0,
    }


def test_a_cosmetic_source_change_is_a_refresh_not_a_send() -> None:
    stored = {"a": stored_for({"lang": "fr"}, raw=10)}
    plan = make_plan([(row("a", lang="fr"), 11)], stored=stored)
    assert plan.sends == []
    assert plan.counts["refreshed"] == 1
    assert plan.refreshes[0].custom_id == "a"
    assert plan.refreshes[0].fingerprint == Fingerprint(raw=11, payload=stored["a"].payload)


@pytest.mark.parametrize("how", ["full_only", "forced"])
def test_full_runs_send_unchanged_rows_too(how: str) -> None:
    stored = {"a": stored_for({"points": 1})}
    plan = make_plan(
        [(row("a", points=1), 1)],
        stored=stored,
        run_type=RunType.FULL_ONLY if how == "full_only" else RunType.FULL_THEN_DELTA,
        full=how == "forced",
    )
    assert [(s.custom_id, s.kind) for s in plan.sends] == [("a", "unchanged")]
    assert plan.full


def test_try_skip_accounts_unchanged_rows_without_mapping() -> None:
    planner = Planner(
        run_type=RunType.FULL_THEN_DELTA,
        sync_mode=SyncMode.MIRROR,
        full=False,
        stored={"a": Fingerprint(5, 6), "7": Fingerprint(8, 9)},
    )
    assert planner.try_skip("a", 5)
    assert planner.try_skip(7, 8)  # integer ids are compared as their decimal string
    assert not planner.try_skip("a", 99)
    assert not planner.try_skip("unknown", 5)
    assert not planner.try_skip(None, 5)
    plan = planner.finish()
    _open_plans.append(plan)
    assert plan.counts["unchanged"] == 2
    assert plan.counts["skipped_unmapped"] == 2
    assert plan.removals == []  # skipped rows are present in the segment


def test_full_runs_never_skip() -> None:
    planner = Planner(
        run_type=RunType.FULL_ONLY,
        sync_mode=SyncMode.UPSERT,
        full=False,
        stored={"a": Fingerprint(5, 6)},
    )
    assert not planner.try_skip("a", 5)
    _open_plans.append(planner.finish())


def test_every_copy_of_a_duplicated_id_is_rejected_and_not_removed() -> None:
    stored = {"twin": stored_for({"points": 1})}
    plan = make_plan(
        [(row("twin", points=2), 1), (row("solo", points=1), 1), (row("twin", points=3), 2)],
        stored=stored,
        sync_mode=SyncMode.MIRROR,
    )
    assert [s.custom_id for s in plan.sends] == ["solo"]
    assert plan.counts["duplicates"] == 2
    assert plan.counts["rejected"] == 2
    assert plan.rejected_by_reason[Reason.DUPLICATE_CUSTOM_ID.value] == 2
    assert plan.removals == []
    assert plan.rejected_samples[0].custom_id == "twin"


def test_a_duplicate_where_one_copy_is_also_invalid_counts_each_row_once() -> None:
    plan = make_plan([(bad("x"), 1), (row("x", points=1), 2), (row("x", points=2), 3)])
    assert plan.counts["rejected"] == 3
    assert plan.counts["duplicates"] == 3
    assert plan.sends == []


def test_a_rejected_row_is_not_a_removal_even_in_mirror_mode() -> None:
    stored = {"kept": stored_for({"points": 1}), "gone": stored_for({"points": 1})}
    plan = make_plan([(bad("kept"), 1)], stored=stored, sync_mode=SyncMode.MIRROR)
    assert plan.removals == ["gone"]
    assert plan.counts["rejected"] == 1
    assert plan.rejected_samples[0].issues[0].reason is Reason.INVALID_EMAIL


def test_mirror_removes_synced_and_intended_ids_that_left() -> None:
    stored = {"a": stored_for({"p": 1}), "b": stored_for({"p": 1})}
    plan = make_plan([(row("a", p=1), 1)], stored=stored, intents={"c", "a"}, sync_mode=SyncMode.MIRROR)
    assert plan.removals == ["b", "c"]
    assert plan.synced_before == 3


def test_upsert_never_removes() -> None:
    plan = make_plan([], stored={"a": stored_for({"p": 1})}, sync_mode=SyncMode.UPSERT)
    assert plan.removals == []


def test_rows_without_a_usable_id_are_rejected_and_sampled() -> None:
    plan = make_plan([(bad(None, Reason.MISSING_CUSTOM_ID), 1)])
    assert plan.counts["rejected"] == 1
    assert plan.rejected_samples[0].as_record() == {
        "row": 1,
        "custom_id": None,
        "issues": [{"field": "email", "reason": "missing_custom_id", "detail": "'nope'"}],
    }


def test_dropped_attributes_are_counted_but_the_row_is_sent() -> None:
    mapped = MappedRow("a", {"points": 1}, [RowIssue("phone", Reason.INVALID_PHONE, "'12'")])
    plan = make_plan([(mapped, 1)])
    assert len(plan.sends) == 1
    assert plan.dropped_by_reason == {"invalid_phone": 1}


# -- guards -------------------------------------------------------------------------------


def test_guards_trip_on_an_empty_segment_with_state() -> None:
    plan = make_plan([], stored={"a": stored_for({"p": 1})}, sync_mode=SyncMode.MIRROR)
    verdicts = {v.name: v for v in evaluate_guards(plan, GuardsConfig(), sync_mode=SyncMode.MIRROR)}
    assert verdicts["empty_segment"].tripped
    assert verdicts["removed_percent"].tripped
    assert "1 of 1" in verdicts["removed_percent"].detail


def test_guards_can_be_overridden_for_one_run() -> None:
    plan = make_plan([], stored={"a": stored_for({"p": 1})}, sync_mode=SyncMode.MIRROR)
    verdicts = evaluate_guards(plan, GuardsConfig(), sync_mode=SyncMode.MIRROR, allow=["empty_segment"])
    assert [v.name for v in verdicts if v.tripped and not v.overridden] == ["removed_percent"]
    with pytest.raises(ValueError, match="unknown guard"):
        evaluate_guards(plan, GuardsConfig(), sync_mode=SyncMode.MIRROR, allow=["everything"])


def test_removed_percent_threshold_is_strict() -> None:
    stored = {str(i): stored_for({"p": 1}) for i in range(10)}
    rows = [(row(str(i), p=1), 1) for i in range(8)]
    plan = make_plan(rows, stored=stored, sync_mode=SyncMode.MIRROR)
    at_limit = {
        v.name: v for v in evaluate_guards(plan, GuardsConfig(max_removed_percent=20), sync_mode=SyncMode.MIRROR)
    }
    below = {v.name: v for v in evaluate_guards(plan, GuardsConfig(max_removed_percent=19), sync_mode=SyncMode.MIRROR)}
    assert not at_limit["removed_percent"].tripped
    assert below["removed_percent"].tripped


def test_changed_percent_guard() -> None:
    stored = {str(i): stored_for({"p": 1}) for i in range(4)}
    rows = [(row(str(i), p=2 if i < 3 else 1), 1) for i in range(4)]
    plan = make_plan(rows, stored=stored)
    verdicts = {
        v.name: v for v in evaluate_guards(plan, GuardsConfig(max_changed_percent=50), sync_mode=SyncMode.UPSERT)
    }
    assert verdicts["changed_percent"].tripped
    assert "3 of 4" in verdicts["changed_percent"].detail
    assert "removed_percent" not in verdicts  # upsert never removes


def test_no_guard_trips_on_a_first_run() -> None:
    plan = make_plan([(row("a", p=1), 1)])
    assert not any(v.tripped for v in evaluate_guards(plan, GuardsConfig(), sync_mode=SyncMode.MIRROR))


def test_a_skipped_row_seen_twice_is_a_duplicate_and_other_rows_are_unaffected() -> None:
    planner = Planner(
        run_type=RunType.FULL_THEN_DELTA,
        sync_mode=SyncMode.MIRROR,
        full=False,
        stored={"a": Fingerprint(5, 6), "b": Fingerprint(7, 8), "c": Fingerprint(9, 10)},
    )
    assert planner.try_skip("a", 5)
    assert planner.try_skip("b", 7)
    assert planner.try_skip("a", 5)  # the same id again, skipped again
    planner.add(row("b", p=1), 99)  # and b again, mapped this time
    plan = planner.finish()
    _open_plans.append(plan)
    assert plan.counts["duplicates"] == 4
    assert plan.counts["rejected"] == 4
    assert plan.counts["unchanged"] == 0
    assert plan.removals == ["c"]


# -- plan_batch: the engine's per-batch loop ------------------------------------------------


def _mapper_and_batch(rows: list[dict[str, Any]]) -> tuple[Any, pa.RecordBatch]:
    activation = parse_activation(
        {
            "name": "plan_batch",
            "source": {"type": "duckdb", "database": "x.duckdb", "table": "t"},
            "destination": {"api_key_env": "K", "project_key_env": "P"},
            "mapping": {"custom_id": "id", "email": "email"},
            "attributes": [{"column": "seen_at"}, {"column": "born"}, {"column": "amount"}],
        },
        source="test",
    )
    batch = pa.RecordBatch.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("email", pa.string()),
                ("seen_at", pa.timestamp("us", tz="UTC")),
                ("born", pa.date32()),
                ("amount", pa.decimal128(10, 2)),
            ]
        ),
    )
    mapper = ProfileMapper(activation, resolve_attribute_types(activation, batch.schema, source="test"))
    return mapper, batch


def _rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"p{i}",
            "email": f"p{i}@example.com",
            "seen_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=i),
            "born": date(1990, 1, 1) + timedelta(days=i),
            "amount": Decimal(f"{i}.50"),
        }
        for i in range(count)
    ]


def _plan_batch(batch: pa.RecordBatch, mapper: Any, stored: dict[str, Fingerprint]) -> Plan:
    planner = Planner(run_type=RunType.FULL_THEN_DELTA, sync_mode=SyncMode.UPSERT, full=False, stored=stored)
    plan_batch(planner, mapper, batch, columns=mapper.columns, id_column="id", mapping_version="v1", first_row_number=1)
    plan = planner.finish()
    _open_plans.append(plan)
    return plan


def test_hashable_columns_are_plain_values() -> None:
    _, batch = _mapper_and_batch(_rows(2))
    seen_at, born, amount = hashable_columns(batch, ["seen_at", "born", "amount"])
    assert seen_at == [1_767_225_600_000_000, 1_767_229_200_000_000]  # µs since the epoch
    assert born == [7305, 7306]  # days since the epoch
    assert amount == ["0.50", "1.50"]


def test_the_raw_salt_follows_column_types() -> None:
    as_int = pa.schema([("x", pa.int64())])
    as_time = pa.schema([("x", pa.timestamp("us"))])
    assert raw_salt("v1", as_int, ["x"]) != raw_salt("v1", as_time, ["x"])
    assert raw_salt("v1", as_int, ["x"]) != raw_salt("v2", as_int, ["x"])
    assert raw_salt("v1", as_int, ["x"]) == raw_salt("v1", as_int, ["x"])


def test_plan_batch_skips_unchanged_rows_and_maps_moved_ones_in_place() -> None:
    rows = _rows(5)
    mapper, batch = _mapper_and_batch(rows)
    first = _plan_batch(batch, mapper, {})
    assert first.counts["new"] == 5
    stored = {send.custom_id: send.fingerprint for send in first.sends}

    rows[1]["seen_at"] += timedelta(seconds=1)
    rows[3]["email"] = "broken"
    mapper, batch = _mapper_and_batch(rows)
    second = _plan_batch(batch, mapper, stored)
    assert second.counts["skipped_unmapped"] == 3
    assert [send.custom_id for send in second.sends] == ["p1"]
    assert second.spool.read(second.sends[0].offset, second.sends[0].length)["date(seen_at)"] == "2026-01-01T01:00:01Z"
    assert [(sample.row_number, sample.custom_id) for sample in second.rejected_samples] == [(4, "p3")]
