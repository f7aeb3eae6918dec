"""A segment's membership kept in a Batch audience (docs/audiences.md), through the real HTTP simulator.

Every run here goes through the engine, the Batch client and the simulator's Audience API
over HTTP, on SQLite and on Firestore (the emulator): the audience must equal the set of
valid ids of the segment after joins, leaves, rejected rows, failed calls and faults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
import yaml

from sync.audience import WHITESPACE, valid_id_sql
from sync.convert import convert_custom_id
from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.engine import Run, RunOptions, RunResult
from sync.errors import ConfigError
from sync.sources.duckdb import DuckDBSource
from sync.state.base import StateStore
from sync.state.sqlite import SQLiteStateStore
from tests.support.engine_support import (
    API_KEY,
    ENV,
    PROJECT_KEY,
    make_activation,
    make_client,
    people,
    person,
    write_segment,
)

AUDIENCE = "VIP-customers_2026"


@pytest.fixture
async def sim() -> AsyncIterator[tuple[BatchSimulator, str]]:
    simulator = BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=True)
    base_url = await simulator.start()
    yield simulator, base_url
    await simulator.stop()


@pytest.fixture(params=["sqlite", pytest.param("firestore", marks=pytest.mark.emulator)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], StateStore]]:
    """Opens the state of one test, as each run does (a fresh store object per run)."""
    opened: list[StateStore] = []
    if request.param == "sqlite":

        def make() -> StateStore:
            opened.append(SQLiteStateStore(tmp_path / "state.db"))
            return opened[-1]
    else:
        factory = request.getfixturevalue("make_firestore_store")

        def make() -> StateStore:
            opened.append(factory())
            return opened[-1]

    yield make
    for store in opened:
        store.close()


def activation(tmp_path: Path, url: str, **overrides: Any) -> Any:
    settings: dict[str, Any] = {"sync_mode": "mirror", "audience": AUDIENCE, "guards": {"max_removed_percent": 60}}
    settings.update(overrides)
    return make_activation(tmp_path, url, **settings)


async def run(act: Any, store: StateStore, **options: Any) -> RunResult:
    source = DuckDBSource(act.source, activation=act.name)
    try:
        return await Run(
            act, source=source, store=store, client=make_client(act), options=RunOptions(**options)
        ).execute()
    finally:
        source.close()


def members(simulator: BatchSimulator) -> set[str] | None:
    """The audience's members once Batch indexed every update it accepted.

    A run that stopped before following its indexing tokens (a failed commit) leaves an
    update the simulator indexes a moment later (``indexing_delay_seconds``): read after it.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        described = simulator.audiences.describe(PROJECT_KEY, AUDIENCE)
        if described is None or not described["pending"]:
            break
        time.sleep(0.01)
    return simulator.audiences.members(PROJECT_KEY, AUDIENCE)


def ids(rows: list[dict[str, Any]]) -> set[str]:
    return {row["customer_id"] for row in rows if row["active"]}


# -- which ids are members ---------------------------------------------------------------------


def test_the_whitespace_list_is_pythons() -> None:
    assert set(WHITESPACE) == {code for code in range(0x110000) if chr(code).isspace()}


def test_the_membership_test_is_the_mappers() -> None:
    tricky = [
        "ok",
        "",
        " ",
        "\u00a0\u2028",
        " padded ",
        "null",
        "NaN",
        "Undefined",
        "nan1",
        "x" * 1024,
        "x" * 1025,
        "é" * 1024,
        "é" * 1025,
        "\u200b",  # zero-width space: not whitespace to Python, so a valid id
        "tab\there",
        "\x1c",
    ]
    with duckdb.connect() as con:
        con.register("ids", pa.table({"k": pa.array(tricky, pa.string())}))
        verdicts = [row[0] for row in con.execute(f"SELECT {valid_id_sql('k')} FROM ids").fetchall()]
    assert verdicts == [isinstance(convert_custom_id(value), str) for value in tricky]


def test_an_audience_needs_mirror_and_a_valid_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="audience needs sync_mode 'mirror'"):
        make_activation(tmp_path, "http://127.0.0.1:1", audience=AUDIENCE)
    with pytest.raises(ConfigError, match="audience name"):
        make_activation(tmp_path, "http://127.0.0.1:1", sync_mode="mirror", audience="no spaces")


# -- runs ------------------------------------------------------------------------------------------


async def test_the_audience_follows_joins_leaves_and_rejections_and_leavers_keep_attributes(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    simulator, url = sim
    rows = people(120)
    rows[5]["email"] = "not-an-email"  # rejected for a value: still a person of the segment
    rows[6]["customer_id"] = ""  # no valid id: never a member
    rows[7]["customer_id"] = "null"  # a placeholder the SDKs refuse
    write_segment(tmp_path / "segment.duckdb", rows)
    act = activation(tmp_path, url)

    first = await run(act, open_store())
    assert first.run.status.value == "succeeded_with_rejections", first.run.error
    expected = ids(rows) - {"", "null"}
    assert members(simulator) == expected
    record = first.run.audience
    assert record is not None
    assert record["created"] is True
    assert (record["joined"], record["left"], record["invalid_id_rows"]) == (118, 0, 2)
    assert record["indexed"] is True
    assert all(token["state"] == "APPLIED" for token in record["tokens"])  # type: ignore[union-attr]
    assert "c00005" in members(simulator)
    assert "c00005" not in simulator.profiles(PROJECT_KEY)

    # 10 leave, 15 join, one rejected row is fixed.
    for row in rows[20:30]:
        row["active"] = False
    rows += people(15, start=500)
    rows[5]["email"] = "fixed@example.com"
    write_segment(tmp_path / "segment.duckdb", rows)
    second = await run(act, open_store())
    assert second.run.status.value == "succeeded_with_rejections", second.run.error
    assert members(simulator) == ids(rows) - {"", "null"}
    record = second.run.audience
    assert record is not None
    assert (record["joined"], record["left"], record["added"], record["removed"]) == (15, 10, 15, 10)
    held = simulator.profiles(PROJECT_KEY)
    # No attribute of a leaver was nulled.
    assert held["c00020"]["points"] == 20
    assert held["c00020"]["firstname"] == "Name20"

    # A leaver who comes back is a member again, and its profile is sent whole (it was forgotten).
    rows[20]["active"] = True
    rows[20]["points"] = 999
    write_segment(tmp_path / "segment.duckdb", rows)
    third = await run(act, open_store())
    assert third.run.status.value == "succeeded_with_rejections", third.run.error
    assert "c00020" in members(simulator)
    assert simulator.profiles(PROJECT_KEY)["c00020"]["points"] == 999
    unchanged = await run(act, open_store())
    assert unchanged.run.audience is not None
    assert unchanged.run.audience["calls"] == 1
    store = open_store()
    assert store.load_members(act.name).unconfirmed.to_pylist() == []
    assert set(store.load_members(act.name).ids.to_pylist()) == members(simulator)


def test_with_an_audience_on_remove_defaults_to_keep_and_may_say_clear(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1"
    assert activation(tmp_path, url).removal_policy.value == "keep"
    assert activation(tmp_path, url, on_remove="clear").removal_policy.value == "clear"
    assert make_activation(tmp_path, url, sync_mode="mirror").removal_policy.value == "clear"


async def test_on_remove_clear_with_an_audience_removes_the_leaver_and_clears_its_attributes(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    simulator, url = sim
    rows = people(40)
    write_segment(tmp_path / "segment.duckdb", rows)
    act = activation(tmp_path, url, on_remove="clear")
    first = await run(act, open_store())
    assert first.run.status.value == "succeeded", first.run.error
    for row in rows[10:14]:
        row["active"] = False
    write_segment(tmp_path / "segment.duckdb", rows)
    second = await run(act, open_store())
    assert second.run.status.value == "succeeded", second.run.error
    assert members(simulator) == ids(rows)
    assert second.run.counts["removed"] == 4
    held = simulator.profiles(PROJECT_KEY)
    # Cleared: every key the activation owns was sent as null (Batch drops it), and the leaver left the audience.
    assert "points" not in held["c00010"]
    assert "firstname" not in held["c00010"]
    assert held["c00011"] == {}
    assert "c00010" not in members(simulator)  # type: ignore[operator]
    assert "c00010" not in open_store().load_fingerprints(act.name)


async def test_membership_guards_stop_a_mass_exodus_until_allowed(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    simulator, url = sim
    rows = people(100)
    write_segment(tmp_path / "segment.duckdb", rows)
    act = activation(tmp_path, url, guards={"max_removed_percent": 20})
    assert (await run(act, open_store())).run.status.value == "succeeded"
    for row in rows[:40]:
        row["active"] = False
    write_segment(tmp_path / "segment.duckdb", rows)
    blocked = await run(act, open_store())
    assert blocked.run.status.value == "aborted_by_guard"
    audience_guards = [g for g in blocked.run.guards if str(g["detail"]).startswith("audience")]
    assert any(g["guard"] == "removed_percent" and g["tripped"] for g in audience_guards)
    assert len(members(simulator) or ()) == 100  # nothing sent
    allowed = await run(act, open_store(), allow_guards=("removed_percent",))
    assert allowed.run.status.value == "succeeded", allowed.run.error
    assert members(simulator) == ids(rows)

    for row in rows:
        row["active"] = False
    write_segment(tmp_path / "segment.duckdb", rows)
    empty = await run(act, open_store())
    assert empty.run.status.value == "aborted_by_guard"
    assert any(g["guard"] == "empty_segment" and g["tripped"] for g in empty.run.guards)
    assert members(simulator) == ids(people(100)[40:])


async def test_faults_and_a_failed_call_converge_on_the_next_run(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    simulator, url = sim
    rows = people(25_000)  # three calls
    write_segment(tmp_path / "segment.duckdb", rows)
    act = activation(tmp_path, url)
    # Transient faults are retried within the call; a drop after apply is resent.
    simulator.audiences.faults.update({"fail_next": 3, "fail_status": 429, "drop_after_apply": 1})
    first = await run(act, open_store())
    assert first.run.status.value == "succeeded", first.run.error
    assert members(simulator) == ids(rows)
    assert first.run.audience is not None
    assert first.run.audience["attempts"] > first.run.audience["calls"]

    # Now every call fails past its retries: the run is partial, the ids stay unconfirmed.
    for row in rows[:3000]:
        row["active"] = False
    rows += people(2000, start=90_000)
    write_segment(tmp_path / "segment.duckdb", rows)
    # Every update is dropped unanswered (the view still answers): the call fails after its retries.
    simulator.audiences.faults.update({"drop_before_apply": 1000, "drop_after_apply": 0})
    failed = await run(act, open_store())
    assert failed.run.status.value == "partial"
    assert failed.run.audience is not None
    assert failed.run.audience["failed"] == 5000
    assert len(open_store().load_members(act.name).unconfirmed) == 5000

    simulator.audiences.faults.update({"drop_before_apply": 0})
    healed = await run(act, open_store())
    assert healed.run.status.value == "succeeded", healed.run.error
    assert healed.run.audience is not None
    assert healed.run.audience["resent"] == 5000
    assert members(simulator) == ids(rows)
    assert open_store().load_members(act.name).unconfirmed.to_pylist() == []


async def test_an_audience_deleted_in_batch_is_recreated_with_the_whole_segment(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    simulator, url = sim
    rows = people(50)
    write_segment(tmp_path / "segment.duckdb", rows)
    act = activation(tmp_path, url)
    await run(act, open_store())
    simulator.audiences.delete(PROJECT_KEY, AUDIENCE)
    rows[0]["active"] = False
    write_segment(tmp_path / "segment.duckdb", rows)
    again = await run(act, open_store())
    assert again.run.status.value == "succeeded", again.run.error
    assert members(simulator) == ids(rows)
    assert again.run.audience is not None
    assert again.run.audience["created"] is True


async def test_a_renamed_audience_starts_from_nothing_and_the_old_one_is_left_alone(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    simulator, url = sim
    rows = people(30)
    write_segment(tmp_path / "segment.duckdb", rows)
    await run(activation(tmp_path, url), open_store())
    renamed = activation(tmp_path, url, audience="other")
    result = await run(renamed, open_store())
    assert result.run.status.value == "succeeded", result.run.error
    assert simulator.audiences.members(PROJECT_KEY, "other") == ids(rows)
    assert members(simulator) == ids(rows)  # the old audience is not emptied
    assert open_store().load_members(renamed.name).audience == "other"


async def test_a_run_whose_state_failed_mid_call_resends_the_unconfirmed_ids(
    sim: tuple[BatchSimulator, str], tmp_path: Path, open_store: Callable[[], StateStore]
) -> None:
    """Batch applied a call whose acknowledgement was never committed (the commit failed, as in a crash)."""
    simulator, url = sim
    rows = people(40)
    write_segment(tmp_path / "segment.duckdb", rows)
    act = activation(tmp_path, url)
    await run(act, open_store())

    class CommitFails:
        """The state store, except that committing members fails once: what a kill at that point leaves."""

        def __init__(self, store: StateStore) -> None:
            self._store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self._store, name)

        def commit_members(self, *args: Any) -> None:
            raise OSError("disk gone")

    for row in rows[:10]:
        row["active"] = False
    rows.append(person(777))
    write_segment(tmp_path / "segment.duckdb", rows)
    crashed = await run(act, CommitFails(open_store()))  # type: ignore[arg-type]
    assert crashed.run.status.value == "failed"
    assert members(simulator) == ids(rows)  # Batch applied it
    store = open_store()
    assert len(store.load_members(act.name).unconfirmed) == 11  # noted before the call
    # The segment moves back before the next run: the unconfirmed ids are sent as they are now.
    for row in rows[:10]:
        row["active"] = True
    rows[-1]["active"] = False
    write_segment(tmp_path / "segment.duckdb", rows)
    healed = await run(act, open_store())
    assert healed.run.status.value == "succeeded", healed.run.error
    assert members(simulator) == ids(rows)
    assert open_store().load_members(act.name).unconfirmed.to_pylist() == []


# -- a real kill -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_during_the_audience_calls_leaves_nothing_unknown(
    tmp_path: Path, open_store: Callable[[], StateStore], request: pytest.FixtureRequest
) -> None:
    """SIGKILL of the real CLI between audience calls, then a changed segment: the audience converges."""
    rows = people(45_000)  # five calls of 10,000 ids
    write_segment(tmp_path / "segment.duckdb", rows)
    env = {**os.environ, **ENV}
    store = open_store()
    if isinstance(store, SQLiteStateStore):
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        emulator = request.getfixturevalue("firestore_emulator")
        url = f"firestore://{emulator.project}/(default)?prefix={request.getfixturevalue('firestore_prefix')}"
        env["FIRESTORE_EMULATOR_HOST"] = emulator.host
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as running:
        simulator = running.simulator
        config = {
            "name": "test_people",
            "source": {
                "type": "duckdb",
                "database": str(tmp_path / "segment.duckdb"),
                "query": "SELECT * FROM people WHERE active",
            },
            "destination": {
                "api_key_env": "BATCH_REST_API_KEY",
                "project_key_env": "BATCH_PROJECT_KEY",
                "base_url": running.base_url,
                "rate_limit": False,
            },
            "sync_mode": "mirror",
            "audience": AUDIENCE,
            "mapping": {"custom_id": "customer_id"},
            "guards": {"max_removed_percent": 90},
        }
        path = tmp_path / "test_people.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        command = [sys.executable, "-m", "sync.cli", "run", str(path), "--state", url, "--lease-ttl", "2"]
        simulator.audiences.faults.update({"latency_ms": 400})
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while simulator.audiences.calls["update"] < 2:  # one call taken, the second in flight
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "the run never reached its audience calls"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()
        time.sleep(0.6)  # the call in flight lands at Batch: applied, never acknowledged

        state = open_store().load_members("test_people")
        acknowledged, unconfirmed = set(state.ids.to_pylist()), set(state.unconfirmed.to_pylist())
        in_batch = simulator.audiences.members(PROJECT_KEY, AUDIENCE) or set()
        assert acknowledged <= in_batch  # nothing committed that Batch did not take
        assert in_batch <= acknowledged | unconfirmed  # nothing in Batch the state does not know of
        assert unconfirmed, "the kill should have left a call noted and unacknowledged"

        # The segment moves: some of the unconfirmed ids leave, others stay.
        for row in rows[::3]:
            row["active"] = False
        write_segment(tmp_path / "segment.duckdb", rows)
        time.sleep(2.2)  # the killed run's lease expires
        simulator.audiences.faults.update({"latency_ms": 0})
        finished = subprocess.run(command, env=env, capture_output=True, timeout=300, check=False)
        assert finished.returncode == 0, finished.stdout.decode() + finished.stderr.decode()
        assert simulator.audiences.members(PROJECT_KEY, AUDIENCE) == ids(rows)
        after = open_store().load_members("test_people")
        assert set(after.ids.to_pylist()) == ids(rows)
        assert after.unconfirmed.to_pylist() == []
