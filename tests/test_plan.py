"""Planning: outcomes of moved rows, the guards, and the columnar pipeline against the reference.

The columnar pipeline (sync.diff in DuckDB → map only moved rows → sync.plan) must decide
exactly what the row-at-a-time reference planner (tests/support/reference_plan.py, the engine's
previous design) decides: new, changed, unchanged, refreshed, removed, rejected with the
same reasons. The property test drives both on generated segments with nulls, duplicates,
unicode and cosmetic changes, through the real engine (DuckDB file, SQLite state, the
HTTP simulator for the acknowledgements of the first run).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.config import Activation, GuardsConfig, RunType, SyncMode
from sync.dev.simulator import BatchSimulator
from sync.differ import DUPLICATE, RAW, ROW, STORED_PAYLOAD, STORED_RAW
from sync.engine import Run, RunOptions
from sync.errors import ConfigError
from sync.fingerprint import payload_fingerprint
from sync.mapping import ProfileMapper, resolve_attribute_types
from sync.model import PERSISTENT_AFTER_RUNS, Fingerprint, Reason, Refusal, RefusalKind, RowIssue
from sync.plan import Outcome, check_guard_names, evaluate_guards
from sync.sources.duckdb import DuckDBSource
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import API_KEY, PROJECT_KEY, make_activation, make_client
from tests.support.reference_mapping import MappedRow, map_row, plan_reference
from tests.support.reference_plan import Planner

# -- plan_rows on hand-built differ batches ------------------------------------------------


def differ_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """A batch as sync.diff hands it over: row number, raw hash, duplicate flag, stored fingerprint."""
    return pa.RecordBatch.from_pylist(
        [
            {
                ROW: index + 1,
                RAW: row.get("raw", 1),
                DUPLICATE: row.get("duplicate", False),
                STORED_RAW: row.get("stored_raw"),
                STORED_PAYLOAD: row.get("stored_payload"),
            }
            for index, row in enumerate(rows)
        ],
        schema=pa.schema(
            [
                (ROW, pa.int64()),
                (RAW, pa.uint64()),
                (DUPLICATE, pa.bool_()),
                (STORED_RAW, pa.uint64()),
                (STORED_PAYLOAD, pa.uint64()),
            ]
        ),
    )


def mapped(custom_id: str | None, **attributes: Any) -> MappedRow:
    return MappedRow(custom_id, dict(attributes))


def test_new_changed_unchanged_and_refresh_are_told_apart() -> None:
    same = payload_fingerprint({"p": 1})
    batch = differ_batch(
        [
            {},  # no stored fingerprint
            {"stored_raw": 9, "stored_payload": same, "raw": 2},  # payload moved
            {"stored_raw": 9, "stored_payload": same, "raw": 3},  # raw moved, payload equal
        ]
    )
    plan = plan_reference(
        batch, [mapped("a", p=1), mapped("b", p=2), mapped("c", p=1)], full=False, duplicates={}, id_column="id"
    )
    assert [(s.custom_id, s.kind) for s in plan.sends] == [("a", Outcome.NEW), ("b", Outcome.CHANGED)]
    assert plan.sends[0].body == b'{"p":1}'
    assert [(r.custom_id, r.fingerprint) for r in plan.refreshes] == [("c", Fingerprint(3, same))]
    assert plan.tally.summary()["refreshed"] == 1
    assert plan.tally.summary()["unchanged"] == 1


def test_a_full_pass_sends_unchanged_payloads_too() -> None:
    same = payload_fingerprint({"p": 1})
    batch = differ_batch([{"stored_raw": 1, "stored_payload": same}])
    plan = plan_reference(batch, [mapped("a", p=1)], full=True, duplicates={}, id_column="id")
    assert [(s.custom_id, s.kind) for s in plan.sends] == [("a", Outcome.UNCHANGED)]
    assert plan.refreshes == []


def test_every_copy_of_a_duplicated_id_is_rejected_with_its_row_number() -> None:
    batch = differ_batch([{"duplicate": True}, {}, {"duplicate": True}])
    plan = plan_reference(
        batch, [mapped("d", p=1), mapped("e", p=1), mapped("d", p=2)], full=False, duplicates={"d": 2}, id_column="id"
    )
    assert [s.custom_id for s in plan.sends] == ["e"]
    assert [(r.row_number, r.custom_id, r.issues[0].reason) for r in plan.rejected] == [
        (1, "d", Reason.DUPLICATE_CUSTOM_ID),
        (3, "d", Reason.DUPLICATE_CUSTOM_ID),
    ]
    assert plan.rejected[0].issues[0].field == "id"
    assert "appears 2 times" in plan.rejected[0].issues[0].detail
    assert plan.tally.summary()["duplicates"] == 2
    assert plan.tally.summary()["rejected"] == 2


def test_invalid_rows_are_rejected_and_dropped_attributes_counted() -> None:
    bad = MappedRow("x", None, [RowIssue("email", Reason.INVALID_EMAIL, "'nope'")])
    dropped = MappedRow("y", {"p": 1}, [RowIssue("phone", Reason.INVALID_PHONE, "'0'")])
    no_id = MappedRow(None, None, [RowIssue("id", Reason.MISSING_CUSTOM_ID, "custom_id is null")])
    plan = plan_reference(differ_batch([{}, {}, {}]), [bad, dropped, no_id], full=False, duplicates={}, id_column="id")
    assert [s.custom_id for s in plan.sends] == ["y"]
    assert plan.tally.rejected_by_reason == {"invalid_email": 1, "missing_custom_id": 1}
    assert plan.tally.dropped_by_reason == {"invalid_phone": 1}


def test_only_remembered_payloads_are_held_back_each_with_its_own_count_and_reason() -> None:
    payload = payload_fingerprint({"p": 1})
    rows = ["value", "pending", "persistent", "persistent-changed"]
    refused = {
        "value": Refusal("value", payload, "p", "too big"),
        "pending": Refusal("pending", payload, "(profile)", "server: busy", RefusalKind.ITEM_ERROR, 2),
        "persistent": Refusal(
            "persistent", payload, "(profile)", "server: busy", RefusalKind.ITEM_ERROR, PERSISTENT_AFTER_RUNS
        ),
        "persistent-changed": Refusal(
            "persistent-changed", payload + 1, "(profile)", "x", RefusalKind.ITEM_ERROR, PERSISTENT_AFTER_RUNS
        ),
    }
    plan = plan_reference(
        differ_batch([{} for _ in rows]),
        [mapped(custom_id, p=1) for custom_id in rows],
        full=False,
        duplicates={},
        id_column="id",
        refused=refused,
    )
    # An item error not yet persistent, and a persistent one whose payload changed, are sent.
    assert [s.custom_id for s in plan.sends] == ["pending", "persistent-changed"]
    counts = plan.tally.summary()
    assert (counts["refused_unchanged"], counts["persistent_unchanged"], counts["new"]) == (1, 1, 2)
    assert plan.tally.rejected_by_reason == {"batch_rejected": 1, "batch_persistent_error": 1}
    issues = {r.custom_id: r.issues[0] for r in plan.rejected}
    assert issues["value"].reason is Reason.BATCH_REJECTED
    assert issues["persistent"].reason is Reason.BATCH_PERSISTENT_ERROR
    assert f"{PERSISTENT_AFTER_RUNS} runs in a row (server: busy)" in issues["persistent"].detail


# -- guards -------------------------------------------------------------------------------


def verdicts_of(counts: dict[str, int], synced: int, guards: GuardsConfig, mode: SyncMode, **kw: Any) -> dict[str, Any]:
    return {v.name: v for v in evaluate_guards(counts, guards, synced_before=synced, sync_mode=mode, **kw)}


def test_guards_trip_on_an_empty_segment_with_state() -> None:
    verdicts = verdicts_of({"rows": 0, "removed": 1}, 1, GuardsConfig(), SyncMode.MIRROR)
    assert verdicts["empty_segment"].tripped
    assert verdicts["removed_percent"].tripped
    assert "1 of 1" in verdicts["removed_percent"].detail


def test_guards_can_be_overridden_for_one_run() -> None:
    counts = {"rows": 0, "removed": 1}
    verdicts = evaluate_guards(
        counts, GuardsConfig(), synced_before=1, sync_mode=SyncMode.MIRROR, allow=["empty_segment"]
    )
    assert [v.name for v in verdicts if v.tripped and not v.overridden] == ["removed_percent"]
    with pytest.raises(ValueError, match="unknown guard"):
        evaluate_guards(counts, GuardsConfig(), synced_before=1, sync_mode=SyncMode.MIRROR, allow=["everything"])


def test_guard_names_to_override_are_checked_once_for_the_cli_and_the_function() -> None:
    assert check_guard_names(["changed_percent", "empty_segment", "changed_percent"], field="allow") == (
        "changed_percent",
        "empty_segment",
    )
    assert check_guard_names([], field="--allow") == ()
    with pytest.raises(ConfigError) as raised:
        check_guard_names(["empty_segment", "nope", "x" * 100], field="--allow")
    assert raised.value.field == "--allow"
    assert f"unknown guard(s) 'nope', '{'x' * 40}'; known: empty_segment, removed_percent, changed_percent" in str(
        raised.value
    )


def test_removed_percent_threshold_is_strict() -> None:
    counts = {"rows": 8, "removed": 2}
    assert not verdicts_of(counts, 10, GuardsConfig(max_removed_percent=20), SyncMode.MIRROR)["removed_percent"].tripped
    assert verdicts_of(counts, 10, GuardsConfig(max_removed_percent=19), SyncMode.MIRROR)["removed_percent"].tripped


def test_changed_percent_guard() -> None:
    verdicts = verdicts_of({"rows": 4, "changed": 3}, 4, GuardsConfig(max_changed_percent=50), SyncMode.UPSERT)
    assert verdicts["changed_percent"].tripped
    assert "3 of 4" in verdicts["changed_percent"].detail
    assert "removed_percent" not in verdicts  # upsert never removes


def test_no_guard_trips_on_a_first_run() -> None:
    assert not any(
        v.tripped for v in evaluate_guards({"rows": 1}, GuardsConfig(), synced_before=0, sync_mode=SyncMode.MIRROR)
    )


# -- the columnar pipeline against the row-at-a-time reference -----------------------------

SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("email", pa.string()),
        ("language", pa.string()),
        ("points", pa.int64()),
        ("active", pa.bool_()),
    ]
)
IDS = st.one_of(
    st.none(),
    st.sampled_from(["", " ", "null", "a", "b", "c", "d", "é", "ü-1", " e", "e"]),
    st.text(alphabet="abcxyzé ", min_size=1, max_size=4),
)
ROWS = st.fixed_dictionaries(
    {
        "customer_id": IDS,
        "email": st.sampled_from([None, "", "a@example.com", "B@Example.com", "nope", "[/x]@@"]),
        "language": st.sampled_from([None, "fr", "FR", "fr-FR", "xx", "en"]),
        "points": st.one_of(st.none(), st.integers(-3, 3)),
        "active": st.just(True),
    }
)
# A second day: every row may change a little (a cosmetic language change, new points) or
# leave; new rows may join.
CHANGES = st.lists(st.sampled_from(["same", "points", "cosmetic", "leave", "email"]), min_size=0, max_size=12)


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    with duckdb.connect(str(path)) as connection:
        connection.register("incoming", pa.Table.from_pylist(rows, schema=SCHEMA))
        connection.execute("CREATE OR REPLACE TABLE people AS SELECT * FROM incoming")
        connection.unregister("incoming")


def activation_for(directory: Path, base_url: str, mode: SyncMode, run_type: RunType) -> Activation:
    return make_activation(
        directory,
        base_url,
        sync_mode=mode.value,
        run_type=run_type.value,
        mapping={"custom_id": "customer_id", "email": "email", "phone": None, "language": "language"},
        attributes=[{"column": "points"}],
        guards={"max_removed_percent": 100, "max_changed_percent": 100, "abort_on_empty_segment": False},
    )


def reference_decisions(
    activation: Activation, day1: list[dict[str, Any]], day2: list[dict[str, Any]], full: bool
) -> dict[str, Any]:
    """The reference planner, both days: day 1 acknowledged in full, day 2 planned."""
    types = resolve_attribute_types(activation, SCHEMA, source="test")
    mapper = ProfileMapper(activation, types)

    def plan(rows: list[dict[str, Any]], stored: dict[str, Fingerprint], *, full: bool) -> Any:
        planner = Planner(run_type=activation.run_type, sync_mode=activation.sync_mode, full=full, stored=stored)
        for index, row in enumerate(rows):
            planner.add(map_row(mapper, row), raw=hash(repr(sorted(row.items()))) & (2**64 - 1), row_number=index + 1)
        return planner.finish()

    first = plan(day1, {}, full=False)
    stored = {send.custom_id: send.fingerprint for send in first.sends}
    first.spool.close()
    second = plan(day2, stored, full=full)
    second.spool.close()
    return {
        "sends": sorted((send.custom_id, send.kind) for send in second.sends),
        "removals": sorted(second.removals),
        "rejected": Counter(second.rejected_by_reason),
        "rejected_rows": second.counts["rejected"],
        "unchanged": second.counts["unchanged"],
    }


def engine_decisions(
    tmp_path: Path, activation: Activation, day1: list[dict[str, Any]], day2: list[dict[str, Any]], full: bool
) -> dict[str, Any]:
    """The engine: day 1 really sent to the simulator and acknowledged, day 2 planned."""
    segment = tmp_path / "segment.duckdb"
    state = tmp_path / "state.db"

    async def both() -> dict[str, Any]:
        write_table(segment, day1)
        store = SQLiteStateStore(state)
        try:
            source = DuckDBSource(activation.source, activation=activation.name)  # type: ignore[arg-type]
            try:
                first = await Run(activation, source=source, store=store, client=make_client(activation)).execute()
                assert first.status.startswith("succeeded"), first.record["error"]
            finally:
                source.close()
            write_table(segment, day2)
            source = DuckDBSource(activation.source, activation=activation.name)  # type: ignore[arg-type]
            try:
                rejected: list[dict[str, Any]] = []
                run = Run(
                    activation,
                    source=source,
                    store=store,
                    client=None,
                    options=RunOptions(trigger="plan", full=full),
                    rejects=rejected.append,
                )
                preview = await run.plan_only(sample=10_000)
            finally:
                source.close()
        finally:
            store.close()
        counts = preview.record["counts"]
        reasons = Counter(preview.record["rejected_by_reason"])
        return {
            "sends": sorted((change["custom_id"], change["kind"]) for change in preview.sample_changes),
            "removals": sorted(preview.sample_removals),
            "rejected": reasons,
            "rejected_rows": counts["rejected"],
            "unchanged": counts["unchanged"],
        }

    return asyncio.run(both())


def day_two(day1: list[dict[str, Any]], changes: list[str], joiners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for index, row in enumerate(day1):
        change = changes[index] if index < len(changes) else "same"
        if change == "leave":
            continue
        row = dict(row)
        if change == "points":
            row["points"] = (row["points"] or 0) + 10
        elif change == "cosmetic" and row["language"] == "fr":
            row["language"] = "FR"  # maps to the same payload: a refresh
        elif change == "email":
            row["email"] = "changed@example.com"
        rows.append(row)
    return rows + joiners


@pytest.mark.parametrize(
    ("mode", "run_type", "full"),
    [
        (SyncMode.UPSERT, RunType.FULL_THEN_DELTA, False),
        (SyncMode.MIRROR, RunType.FULL_THEN_DELTA, False),
        (SyncMode.UPSERT, RunType.FULL_ONLY, False),
        (SyncMode.MIRROR, RunType.FULL_THEN_DELTA, True),
    ],
    ids=["upsert-delta", "mirror-delta", "full-only", "mirror-forced-full"],
)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    day1=st.lists(ROWS, min_size=0, max_size=14),
    changes=CHANGES,
    joiners=st.lists(ROWS, max_size=4),
)
def test_the_columnar_pipeline_decides_like_the_reference(
    tmp_path_factory: pytest.TempPathFactory,
    mode: SyncMode,
    run_type: RunType,
    full: bool,
    day1: list[dict[str, Any]],
    changes: list[str],
    joiners: list[dict[str, Any]],
) -> None:
    tmp_path = tmp_path_factory.mktemp("plan")
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)

    async def start() -> str:
        return await simulator.start()

    loop = asyncio.new_event_loop()
    try:
        base_url = loop.run_until_complete(start())
        # The simulator serves from its own loop in a thread while the engine runs.
        import threading

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            activation = activation_for(tmp_path, base_url, mode, run_type)
            day2 = day_two(day1, changes, joiners)
            expected = reference_decisions(activation, day1, day2, full)
            assert engine_decisions(tmp_path, activation, day1, day2, full) == expected
        finally:
            asyncio.run_coroutine_threadsafe(simulator.stop(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
    finally:
        loop.close()
