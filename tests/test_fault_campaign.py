"""The fault campaign, small: kills, overlapping starts, HTTP faults and per-item errors, then one clean run.

Guarantees 1 (no lost update), 2 (convergence), 3 (bounded duplicates), 4 (one run at a
time) and 7 (mirror owns what it may have sent) under random faults; the harness, the
checks and the re-send bound are in ``tests/support/fault_campaign.py``. Each scenario is
one test, named by its seed; ``CEPSYNC_CAMPAIGN_SEED=SEED`` runs that scenario alone
(a failure message prints the command), ``CEPSYNC_CAMPAIGN_ENGINE=DIR`` runs another
checkout's engine (its ``sync/``) against this harness and simulator. ``make campaign`` runs
the big one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.fault_campaign import (
    DEFAULT_CAMPAIGN_SEED,
    SMALL_ROWS,
    SMALL_VERSIONS,
    ScenarioResult,
    Segment,
    StateBackend,
    plan_scenario,
    run_scenario,
    scenario_seeds,
)
from tests.support.firestore_emulator import FirestoreEmulator

SQLITE_SCENARIOS = 10
FIRESTORE_SCENARIOS = 3
FIRESTORE_ROWS = 1_000
# Another checkout's engine (its sync/ first on the runs' PYTHONPATH), against this harness
# and simulator: how the campaign shows a bug of an earlier commit.
ENGINE = Path(os.environ["CEPSYNC_CAMPAIGN_ENGINE"]).resolve() if os.environ.get("CEPSYNC_CAMPAIGN_ENGINE") else None


def _replay(seed: int, label: str) -> str:
    engine = f"CEPSYNC_CAMPAIGN_ENGINE={ENGINE} " if ENGINE else ""
    return f"{engine}CEPSYNC_CAMPAIGN_SEED={seed} python -m pytest tests/test_fault_campaign.py -k {label}"


def _verdict(result: ScenarioResult) -> None:
    if not result.ok:
        pytest.fail(result.failure_message(), pytrace=False)


def _seeds(count: int, offset: int) -> list[int]:
    replay = os.environ.get("CEPSYNC_CAMPAIGN_SEED")
    if replay:
        return [int(replay)]
    return scenario_seeds(DEFAULT_CAMPAIGN_SEED + offset, count)


def test_a_seed_draws_the_same_scenario_and_segments_every_time() -> None:
    # What makes CEPSYNC_CAMPAIGN_SEED a replay: nothing but the seed decides the plan and the data.
    assert plan_scenario(7, 500, versions=3) == plan_scenario(7, 500, versions=3)
    assert {action.kind for action in plan_scenario(7, 500, versions=3).actions} >= {"kill", "overlap"}
    first, again = Segment(7, 500), Segment(7, 500)
    for segment in (first, again):
        segment.change()
        segment.change()
    assert first.table() == again.table()
    assert set(first.changes) >= {"points_updated", "new", "left", "returned", "made_invalid", "fixed", "duplicated"}
    assert first.departed()
    assert first.invalid_present()
    assert first.never_valid


def test_the_suites_scenarios_cover_both_ways_of_sending_in_both_modes() -> None:
    # Changed-attribute sending is a scenario dimension: the SQLite scenarios of the suite
    # run it in upsert and in mirror, and the Firestore ones run it at least once.
    drawn = {
        (plan.mode, plan.send)
        for plan in (
            plan_scenario(seed, SMALL_ROWS) for seed in scenario_seeds(DEFAULT_CAMPAIGN_SEED, SQLITE_SCENARIOS)
        )
    }
    assert drawn == {(mode, send) for mode in ("upsert", "mirror") for send in ("whole_profile", "changed_attributes")}
    on_firestore = {
        plan_scenario(seed, FIRESTORE_ROWS).send
        for seed in scenario_seeds(DEFAULT_CAMPAIGN_SEED + 1, FIRESTORE_SCENARIOS)
    }
    assert on_firestore == {"whole_profile", "changed_attributes"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", _seeds(SQLITE_SCENARIOS, 0), ids=lambda seed: f"sqlite-seed{seed}")
def test_scenario_converges_on_sqlite_state(seed: int, tmp_path: Path) -> None:
    state = StateBackend.sqlite(tmp_path / "state.db")
    result = run_scenario(
        seed, SMALL_ROWS, tmp_path, state, engine=ENGINE, versions=SMALL_VERSIONS, replay=_replay(seed, "sqlite")
    )
    _verdict(result)
    assert result.kills + result.kills_missed >= 1
    assert result.overlaps >= 1


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.parametrize("seed", _seeds(FIRESTORE_SCENARIOS, 1), ids=lambda seed: f"firestore-seed{seed}")
def test_scenario_converges_on_firestore_state(
    seed: int, tmp_path: Path, firestore_emulator: FirestoreEmulator, firestore_prefix: str
) -> None:
    state = StateBackend.firestore(firestore_emulator.host, firestore_emulator.project, firestore_prefix)
    result = run_scenario(
        seed, FIRESTORE_ROWS, tmp_path, state, engine=ENGINE, versions=SMALL_VERSIONS, replay=_replay(seed, "firestore")
    )
    _verdict(result)
