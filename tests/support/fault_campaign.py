"""A seeded fault campaign: the real CLI against the Batch simulator, faults of every kind, then one clean run.

Each *scenario* is drawn from one integer seed (:func:`plan_scenario`): a sync mode (even
seeds ``upsert``, odd ones ``mirror``), what a changed profile's payload holds (``send``: the
whole profile, or only the changed attributes, as bit 1 XOR bit 2 of the seed says, so that any
eight consecutive seeds cover every combination of the mode, ``send`` and bit 1 of the seed,
which another dimension may draw from), the activation's concurrency and journal window, and a
segment of *versions*: the first is a full load, each later one changes rows (values updated,
new rows, rows leaving and coming back, a few invalid rows: a bad email or phone, a duplicated
id, a row without an id). Each version gets one *action*, run with the simulator's faults on:

* ``run``: one ``cepsync run``;
* ``kill``: one run SIGKILLed (its whole process group) at a random moment, then an
  immediate restart that finds the dead run's lease (it must exit as lease-held, or run if
  the kill came before the lease was taken);
* ``overlap``: two runs of the activation started at once (one must exit as lease-held, or
  both end safely one after the other).

Every action draws HTTP faults (``latency_ms``, ``fail_next``/``fail_status``,
``failure_rate``/``failure_status``, ``drop_before_apply``, ``drop_after_apply``) and random
per-item errors (``item_errors`` kinds ``server``, ``unknown``, ``none``). Value refusals
(``item_errors.value`` and ``reject_custom_ids``) stay on for the whole scenario, the final
run included, because Batch refuses such a value every time. Then one clean run, and the
checks of :meth:`ScenarioRunner.check`, read from the simulator's ``/_sim/`` routes:

* every valid row of the final segment is in Batch with its latest values, unless Batch
  refuses that very payload (asked of the simulator with the payload itself, on a separate
  probe project), and then the final run reports it refused (``--rejects``, reason
  ``batch_rejected``), and its counts say so. A row Batch does not hold is *missing*, one it
  holds with other values *stale*; a row reported refused that Batch does not refuse is
  *wrongly refused* (an update lost to refusal memory, issue 18), and a missing or stale row
  the final run does not even report is *lost* (the state believes Batch has it);
* mirror: every profile that left the segment is cleared (no attribute the activation owns),
  unless Batch refuses the clearing payload, reported the same way; upsert: never cleared;
  a row that is still in the segment but invalid keeps what Batch held;
* no profile exists for an id that was never a valid row;
* redundant re-sends stay within the bound below.

**Redundant re-sends** are measured per action from the simulator's per-profile ``updates``:
an application that left the profile as it was is redundant (an upsert of values Batch
already held). Two causes are legitimate:

* a kill loses the acknowledgements not yet committed by the journal. The journal swaps its
  pending entries out when a flush starts and they become durable when it ends; a task adds
  its request's acknowledged profiles, then flushes if ``flush_every_profiles`` (F) is
  reached, holding its request slot until the flush is done. So at any moment the profiles
  acknowledged but not durable are: those of the flush under way that came from tasks which
  already let go of their slot (fewer than F: each saw the pending count below F), those
  pending from such tasks (fewer than F again), and at most one request's worth (B = 200 on
  ``/profiles/update``) per slot still held (``concurrency``, C), in flight at Batch or waiting
  for the flush. Hence **at most 2F + C x B re-sends per kill**. (F + C x B, the figure of the
  crash test, holds while flushes are quick; a slow commit lets a second window fill.)
* a connection dropped after Batch applied the request (``drop_after_apply``) makes the
  client send it again: **at most B per drop**. These re-sends are necessary, and counted
  apart in the summary.

Overlapping starts add nothing: the lease lets one run send, and a run that exits as
lease-held sends nothing. A cause's re-sends come in the runs after it, so the bound is
checked after every action against the kills and drops so far.

Requests are never cut short by a deadline here (a run that is not killed holds a long
lease; a run that is killed dies before its first request's deadline), so nothing else may
re-send. A clear sent for a profile Batch never held (mirror: an intent left by a killed or
failed request, for a row that then left) changes nothing; it is counted as a *harmless
clear*, and must concern a row that left the segment.

A row that returns to its acknowledged values after a send Batch applied without an
acknowledgement (a kill before the journal flush, a dropped answer; mirror: a clear) is
checked like any other: the campaign found that such rows were never sent again, and the
engine now notes every changing send as an intent and re-sends what a run left noted.

**The audience dimension** (docs/audiences.md): a mirror scenario whose ``seed // 2`` is odd
keeps its membership in a Batch audience too (drawn from the seed without touching its random
stream, so the other scenarios replay as before). Every action's HTTP faults are applied to
the audience routes as well. The audience must then equal the set of valid ids of the final
segment: every present row whose id is valid, value-rejected and duplicated rows included.
Leavers keep their attributes (checked as in upsert mode), and since their fingerprints are
forgotten, a row that comes back sends its profile once more: those re-sends are legitimate
and counted apart (``returned_resends``).

Replay one scenario: ``CEPSYNC_CAMPAIGN_SEED=SEED pytest tests/test_fault_campaign.py``, or
``python -m tests.support.fault_campaign --seed SEED --rows N``. The whole campaign:
``make campaign`` (``--rows``, ``--scenarios``, ``--campaign-seed``, ``--state firestore``,
``--engine DIR`` to run another checkout's engine against this harness and simulator).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from sync.dev.simulator import BatchSimulator, SimulatorThread
from tests.support.engine_support import API_KEY, ENV, PROJECT_KEY, write_segment

ACTIVATION: Final = "campaign"
AUDIENCE: Final = "campaign-members"
# Simulator faults the audience routes take too (sync/dev/audiences.py).
AUDIENCE_FAULTS: Final = (
    "latency_ms",
    "fail_next",
    "fail_status",
    "failure_rate",
    "failure_status",
    "drop_before_apply",
    "drop_after_apply",
)
BATCH: Final = 200  # profiles per /profiles/update request
# The attributes the activation owns: what a mirror removal sets to null.
OWNED: Final = ("$email_address", "$phone_number", "firstname", "points")
BAD_EMAIL: Final = "not-an-email"
BAD_PHONE: Final = "12"
# Answered with the payload alone, so Batch's refusals can be asked without touching the project.
PROBE_PROJECT_KEY: Final = "project_probe_0000000000000000"
SMALL_ROWS: Final = 2_000
SMALL_VERSIONS: Final = 3
BIG_ROWS: Final = 20_000
BIG_VERSIONS: Final = 4
DEFAULT_CAMPAIGN_SEED: Final = 20261207
# A run that is not killed holds its lease long enough that no request meets the lease
# deadline (0.75 x ttl; the backoff of 4 attempts plus a few 429s stays far below).
LONG_LEASE: Final = 60.0
EXIT_OK: Final = 0
EXIT_LEASE_HELD: Final = 5
EXIT_PARTIAL: Final = 6
RUN_TIMEOUT: Final = 180.0
ROOT: Final = Path(__file__).resolve().parents[2]


# A run that is killed: the lease a restart waits out. Kills land before 0.7 x this, before
# the deadline of any of the killed run's requests (0.75 x ttl after it started). A large
# segment gets a longer one, so that its kills can land anywhere in a longer full load.
def kill_lease(rows: int) -> float:
    return 3.0 if rows <= 5_000 else 6.0


# --- the scenario, from its seed ---------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One step of a scenario: what runs, with which simulator faults."""

    kind: str  # "run" | "kill" | "overlap"
    faults: dict[str, Any]
    kill_after_seconds: float = 0.0  # kill: since the process started...
    kill_after_applied: int | None = None  # ...or once this many profiles were applied (whichever first)
    overlap_delay: float = 0.0  # overlap: the second start, after the first

    def describe(self) -> str:
        shown = {k: v for k, v in self.faults.items() if k != "item_errors"}
        errors = {k: v for k, v in self.faults.get("item_errors", {}).items() if v}
        if errors:
            shown["item_errors"] = errors
        what = self.kind
        if self.kind == "kill":
            what += f"(after {self.kill_after_seconds:.2f}s"
            what += f" or {self.kill_after_applied} applied)" if self.kill_after_applied else ")"
        elif self.kind == "overlap":
            what += f"(+{self.overlap_delay:.2f}s)"
        return f"{what} {json.dumps(shown, sort_keys=True)}"


@dataclass(frozen=True)
class Scenario:
    """Everything a scenario does, drawn from ``seed`` alone (and the segment size)."""

    seed: int
    rows: int
    mode: str
    send: str  # "whole_profile" | "changed_attributes" (the activation's ``send``)
    concurrency: int
    flush_every: int
    flush_seconds: float
    value_rate: float
    refused_ids: tuple[str, ...]
    actions: tuple[Action, ...]  # one per segment version
    audience: bool = False  # mirror only: the membership kept in a Batch audience too

    @property
    def clears(self) -> bool:
        """Mirror removals clear attributes (with an audience, leavers keep theirs)."""
        return self.mode == "mirror" and not self.audience

    @property
    def kill_window(self) -> int:
        """Re-sends one kill may cause (module docstring)."""
        return 2 * self.flush_every + self.concurrency * BATCH

    def base_faults(self) -> dict[str, Any]:
        """What Batch refuses whatever happens: on in every action and in the final run."""
        return {"reject_custom_ids": list(self.refused_ids), "item_errors": {"value": self.value_rate}}

    def describe(self) -> str:
        lines = [
            f"scenario seed={self.seed} rows={self.rows} mode={self.mode} send={self.send} "
            f"concurrency={self.concurrency} "
            f"flush_every={self.flush_every} flush_seconds={self.flush_seconds} value_refusal_rate={self.value_rate} "
            f"refused_ids={list(self.refused_ids)} audience={self.audience}"
        ]
        lines.extend(f"  v{number}: {action.describe()}" for number, action in enumerate(self.actions))
        return "\n".join(lines)


def scenario_seeds(campaign_seed: int, count: int) -> list[int]:
    """The seeds of a campaign's scenarios: consecutive, so sync modes alternate."""
    start = random.Random(campaign_seed).randrange(1_000_000) * 2
    return [start + index for index in range(count)]


def _http_faults(rng: random.Random, kind: str) -> dict[str, Any]:
    faults: dict[str, Any] = {}
    # A killed run gets latency so that its requests are in flight when the kill lands.
    if kind == "kill" or rng.random() < 0.5:
        faults["latency_ms"] = rng.choice([10, 20, 40, 80]) if kind == "kill" else rng.choice([5, 10, 30])
    if rng.random() < 0.4:
        faults["fail_next"] = rng.randint(1, 2)
        faults["fail_status"] = rng.choice([429, 500, 502, 503, 504])
    if rng.random() < 0.5:
        faults["failure_rate"] = round(rng.uniform(0.02, 0.15), 3)
        faults["failure_status"] = rng.choice([500, 502, 503, 504])
    if rng.random() < 0.35:
        faults["drop_before_apply"] = rng.randint(1, 2)
    if rng.random() < 0.35:
        faults["drop_after_apply"] = rng.randint(1, 2)
    errors = {kind: 0.0 for kind in ("server", "unknown", "none")}
    for error in errors:
        if rng.random() < 0.5:
            errors[error] = round(rng.uniform(0.001, 0.008), 4)
    faults["item_errors"] = errors
    return faults


def plan_scenario(seed: int, rows: int, *, versions: int = BIG_VERSIONS) -> Scenario:
    """Draw one scenario: ``versions`` segment versions, one action each (the first a full load).

    Every scenario kills at least once and starts two runs at once at least once.
    """
    rng = random.Random(seed)
    mode = ("upsert", "mirror")[seed % 2]
    kinds = [rng.choice(["run", "run", "kill", "overlap"]) for _ in range(versions)]
    free = [index for index, kind in enumerate(kinds) if kind == "run"]
    rng.shuffle(free)
    for needed in ("kill", "overlap"):
        if needed not in kinds and free:
            kinds[free.pop()] = needed
    planned: list[Action] = []
    for version, kind in enumerate(kinds):
        # Profiles the action sends, roughly: the whole segment first, then a delta.
        expected = rows if version == 0 else max(1, rows // 6)
        planned.append(
            Action(
                kind=kind,
                faults=_http_faults(rng, kind),
                kill_after_seconds=round(rng.uniform(0.3, 0.7 * kill_lease(rows)), 2),
                kill_after_applied=rng.randint(1, expected) if rng.random() < 0.5 else None,
                overlap_delay=round(rng.choice([0.0, rng.uniform(0.0, 0.4)]), 2),
            )
        )
    value_rate = rng.choice([0.0, round(rng.uniform(0.002, 0.01), 4)])
    refused = tuple(sorted({_custom_id(rng.randrange(rows)) for _ in range(rng.choice([0, 0, 3]))}))
    send = ("whole_profile", "changed_attributes")[((seed >> 1) ^ (seed >> 2)) & 1]
    if send == "changed_attributes":
        # The simulator's value refusal is a hash of the body it receives, and a changed
        # profile's body is then only its changed attributes, while the check asks the probe
        # project with the whole payload: the two would disagree for reasons of the simulator,
        # not of Batch. Refusals stay exercised through refused_ids (every payload of an id).
        value_rate = 0.0
    return Scenario(
        seed=seed,
        rows=rows,
        mode=mode,
        send=send,
        concurrency=rng.choice([2, 3, 4]),
        flush_every=rng.choice([50, 100, 200, 400]),
        flush_seconds=rng.choice([0.5, 3600.0]),
        value_rate=value_rate,
        refused_ids=refused,
        actions=tuple(planned),
        audience=mode == "mirror" and (seed // 2) % 2 == 1,
    )


# --- the segment --------------------------------------------------------------------------


def _custom_id(number: int) -> str:
    return f"c{number:06d}"


def payload_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes the activation sends for a valid row (every owned key; null deletes)."""
    return {
        "$email_address": row["email"],
        "$phone_number": row["phone"],
        "firstname": row["first_name"],
        "points": row["points"],
    }


def view_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What Batch holds after applying ``payload`` to an empty profile."""
    return {key: value for key, value in payload.items() if value is not None}


class Segment:
    """The segment of one scenario, changed version by version from its own random stream.

    Rows are ``engine_support.SCHEMA`` rows; ``active = false`` rows are out of the segment
    (the activation reads ``WHERE active``), like deleted ones. Values only move forward
    (points grow, names and emails carry a version), so a profile never goes back to an
    earlier state: an application that leaves a profile as it was is a re-send.
    """

    def __init__(self, seed: int, rows: int) -> None:
        self.rng = random.Random(f"segment:{seed}")
        self.version = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.extra: list[dict[str, Any]] = []  # rows without an id, and second copies of an id
        self.next_number = 0
        # Every valid state each id had, in any version: what Batch may still hold for an id
        # that is no longer valid (upsert never clears; a rejected row keeps what Batch has).
        self.past_views: dict[str, list[dict[str, Any]]] = {}
        self.never_valid: set[str] = set()
        self.returned: set[str] = set()  # ids that left the segment and came back
        self.changes: Counter[str] = Counter()
        for _ in range(rows):
            self._new_row()
        for _ in range(max(2, rows // 500)):
            self._spoil(self.rng.choice(list(self.rows)))
        self._add_fresh_invalid(2)
        self._remember()

    # -- rows --
    def _new_row(self) -> dict[str, Any]:
        number = self.next_number
        self.next_number += 1
        row = {
            "customer_id": _custom_id(number),
            "email": f"p{number}.v{self.version}@example.com",
            "phone": f"+3361{number % 10_000_000:07d}",
            "first_name": f"N{number}v{self.version}" if self.rng.random() < 0.9 else None,
            "points": self.rng.randint(0, 1000),
            "active": True,
        }
        self.rows[row["customer_id"]] = row
        return row

    def _spoil(self, custom_id: str) -> None:
        row = self.rows[custom_id]
        if self.rng.random() < 0.5:
            row["email"] = BAD_EMAIL
        else:
            row["phone"] = BAD_PHONE
        self.changes["made_invalid"] += 1

    def _add_fresh_invalid(self, count: int) -> None:
        """Ids that are never valid: Batch must never hear of them."""
        for _ in range(count):
            row = self._new_row()
            row["email"] = BAD_EMAIL
            self.never_valid.add(row["customer_id"])
        # A row with no id at all, rejected with a reason.
        self.extra.append({**self.rows[self.rng.choice(list(self.rows))], "customer_id": None})

    def duplicated(self) -> set[str]:
        return {row["customer_id"] for row in self.extra if row["customer_id"] is not None}

    @staticmethod
    def is_clean(row: Mapping[str, Any]) -> bool:
        return row["email"] != BAD_EMAIL and row["phone"] != BAD_PHONE

    def present(self) -> dict[str, dict[str, Any]]:
        return {cid: row for cid, row in self.rows.items() if row["active"]}

    def valid(self) -> dict[str, dict[str, Any]]:
        """custom_id -> payload of every row the activation must sync."""
        duplicated = self.duplicated()
        return {
            cid: payload_of(row) for cid, row in self.present().items() if self.is_clean(row) and cid not in duplicated
        }

    def invalid_present(self) -> set[str]:
        return set(self.present()) - set(self.valid())

    def departed(self) -> set[str]:
        """Ids that were valid rows once and are out of the segment now."""
        return set(self.past_views) - set(self.present())

    def table(self) -> list[dict[str, Any]]:
        return [*self.rows.values(), *self.extra]

    def _remember(self) -> None:
        for cid, payload in self.valid().items():
            views = self.past_views.setdefault(cid, [])
            view = view_of(payload)
            if not views or views[-1] != view:
                views.append(view)

    # -- a new version --
    def change(self) -> None:
        """Update some rows, add some, drop some, bring some back, spoil and fix a few."""
        rng = self.rng
        self.version += 1
        present = sorted(self.present())
        size = len(present)
        for cid in rng.sample(present, k=int(size * rng.uniform(0.03, 0.10))):
            self.rows[cid]["points"] += rng.randint(1, 50)
            self.changes["points_updated"] += 1
        for cid in rng.sample(present, k=int(size * rng.uniform(0.01, 0.03))):
            row = self.rows[cid]
            row["first_name"] = None if rng.random() < 0.3 else f"{cid}v{self.version}"
            if rng.random() < 0.3:
                row["email"] = None if rng.random() < 0.3 else f"{cid}.v{self.version}@example.com"
            self.changes["attributes_updated"] += 1
        for _ in range(int(size * rng.uniform(0.02, 0.05))):
            self._new_row()
            self.changes["new"] += 1
        leaving = rng.sample(present, k=int(size * rng.uniform(0.02, 0.05)))
        for cid in leaving:
            if rng.random() < 0.5:
                self.rows[cid]["active"] = False
            else:
                del self.rows[cid]
            self.changes["left"] += 1
        gone = sorted(cid for cid, row in self.rows.items() if not row["active"] and cid not in leaving)
        for cid in rng.sample(gone, k=min(len(gone), max(1, size // 200))):
            row = self.rows[cid]
            row["active"] = True
            if rng.random() < 0.5:
                row["points"] += rng.randint(1, 50)
            self.returned.add(cid)
            self.changes["returned"] += 1
        # A few invalid rows: spoil some, fix some spoiled earlier, a duplicated id.
        still = sorted(self.present())
        for cid in rng.sample(still, k=rng.randint(1, 3)):
            self._spoil(cid)
        spoiled = sorted(cid for cid, row in self.present().items() if not self.is_clean(row))
        for cid in rng.sample(spoiled, k=min(len(spoiled), rng.randint(1, 3))):
            if cid in self.never_valid:
                continue
            row = self.rows[cid]
            row["email"] = f"{cid}.fixed{self.version}@example.com"
            row["phone"] = f"+3362{int(cid[1:]) % 10_000_000:07d}"
            self.changes["fixed"] += 1
        self.extra = [row for row in self.extra if row["customer_id"] is None]
        copy = self.rows[rng.choice(still)]
        self.extra.append({**copy, "points": copy["points"] + 1})
        self.changes["duplicated"] += 1
        self._add_fresh_invalid(1)
        self._remember()

    def write(self, path: Path) -> None:
        write_segment(path, self.table())


# --- the simulator, over HTTP ---------------------------------------------------------------


class SimulatorControl:
    """The simulator's ``/_sim/`` routes and the Profile API, as plain HTTP calls."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def _call(self, path: str, body: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the local simulator's http URL
            self.base_url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - same
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return dict(self._call("/_sim/stats"))

    def faults(self) -> dict[str, Any]:
        return dict(self._call("/_sim/faults"))

    def set_faults(self, settings: Mapping[str, Any]) -> None:
        self._call("/_sim/faults", dict(settings))

    def clear_faults(self, base: Mapping[str, Any]) -> None:
        self.set_faults(
            {
                "latency_ms": 0,
                "fail_next": 0,
                "failure_rate": 0.0,
                "drop_before_apply": 0,
                "drop_after_apply": 0,
                **base,
            }
        )

    def profiles(self) -> dict[str, dict[str, Any]]:
        return dict(self._call(f"/_sim/projects/{PROJECT_KEY}/profiles")["profiles"])

    def set_audience_faults(self, settings: Mapping[str, Any]) -> None:
        defaults = {"latency_ms": 0, "fail_next": 0, "failure_rate": 0.0, "drop_before_apply": 0, "drop_after_apply": 0}
        self._call("/_sim/audiences/faults", {**defaults, **{k: settings[k] for k in AUDIENCE_FAULTS if k in settings}})

    def audience_members(self) -> set[str]:
        """The audience's indexed members (empty when it does not exist)."""
        if AUDIENCE not in self._call(f"/_sim/projects/{PROJECT_KEY}/audiences")["audiences"]:
            return set()
        return set(self._call(f"/_sim/projects/{PROJECT_KEY}/audiences/{AUDIENCE}")["members"])

    def refused(self, payloads: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """The ids whose payload Batch refuses, asked on the probe project (the main one is untouched)."""
        refused: set[str] = set()
        ids = sorted(payloads)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            items = [{"identifiers": {"custom_id": cid}, "attributes": payloads[cid]} for cid in chunk]
            answer = self._call(
                "/2.11/profiles/update",
                items,
                {"Authorization": f"Bearer {API_KEY}", "X-Batch-Project": PROBE_PROJECT_KEY},
            )
            refused.update(chunk[error["bulk_index"]] for error in answer.get("errors", []))
        return refused


# --- where the state lives ------------------------------------------------------------------


@dataclass(frozen=True)
class StateBackend:
    """Where a scenario's runs keep their state: the CLI's ``--state`` URL and the environment it needs."""

    url: str
    env: dict[str, str]
    label: str

    @classmethod
    def sqlite(cls, path: Path) -> StateBackend:
        return cls(f"sqlite:///{path}", {}, "sqlite")

    @classmethod
    def firestore(cls, host: str, project: str, prefix: str) -> StateBackend:
        env = {"FIRESTORE_EMULATOR_HOST": host, "GOOGLE_CLOUD_PROJECT": project}
        return cls(f"firestore://{project}/(default)?prefix={prefix}", env, "firestore")


# --- running one scenario ----------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """What one scenario did and found. ``problems`` maps a check to the ids that failed it."""

    scenario: Scenario
    problems: dict[str, list[str]] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    item_errors: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    kills_missed: int = 0
    overlaps: int = 0
    overlaps_lease_held: int = 0
    lease_held_exits: int = 0
    partial_runs: int = 0
    redundant: int = 0
    returned_resends: int = 0
    harmless_clears: int = 0
    refused: int = 0
    segment_changes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    replay: str = ""

    @property
    def drops_after_apply(self) -> int:
        """Connections dropped after Batch applied the request: each may re-send one request."""
        return self.faults["drop_after_apply"]

    @property
    def resend_bound(self) -> int:
        return self.kills * self.scenario.kill_window + self.drops_after_apply * BATCH

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def failure_message(self) -> str:
        lines = [f"fault campaign scenario seed={self.scenario.seed} FAILED; replay: {self.replay}"]
        for check, ids in sorted(self.problems.items()):
            if ids:
                shown = ", ".join(ids[:20]) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
                lines.append(f"  {check}: {len(ids)}: {shown}")
        lines.append(self.scenario.describe())
        lines.append(f"  faults injected: {dict(sorted(self.faults.items()))}")
        lines.append(f"  per-item errors injected: {dict(sorted(self.item_errors.items()))}")
        lines.append(
            f"  kills {self.kills} (+{self.kills_missed} ended first), overlaps {self.overlaps} "
            f"({self.overlaps_lease_held} lease-held), lease-held exits {self.lease_held_exits}, "
            f"redundant re-sends {self.redundant} <= bound {self.resend_bound}?"
        )
        lines.extend(f"  {detail}" for detail in self.details)
        lines.extend(f"  {note}" for note in self.notes[-40:])
        return "\n".join(lines)


class ScenarioFailed(AssertionError):
    """A run of the scenario ended in a way no fault explains (the message says how)."""


class ScenarioRunner:
    """Runs one scenario's actions with the real CLI, then the clean run, then the checks.

    Args:
        scenario: What to do.
        workdir: An empty directory for the segment, the activation and the rejects files.
        simulator_url: The simulator (project ``PROJECT_KEY`` and the probe project).
        state: Where the runs keep their state.
        engine: A checkout whose ``sync`` the child runs import (default: this one).
        replay: The command that replays this scenario, for failure messages.
    """

    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        simulator_url: str,
        state: StateBackend,
        *,
        engine: Path | None = None,
        replay: str = "",
    ) -> None:
        self.scenario = scenario
        self.workdir = workdir
        self.sim = SimulatorControl(simulator_url)
        self.simulator_url = simulator_url
        self.state = state
        self.engine = engine
        self.segment = Segment(scenario.seed, scenario.rows)
        self.result = ScenarioResult(scenario, replay=replay)
        self.config = workdir / f"{ACTIVATION}.yaml"
        self._lease_free_at = 0.0
        self._runs = 0
        self._started: dict[int, float] = {}

    # -- processes --
    def _write_activation(self) -> None:
        scenario = self.scenario
        config = {
            "name": ACTIVATION,
            "source": {"type": "duckdb", "database": "segment.duckdb", "query": "SELECT * FROM people WHERE active"},
            "destination": {
                "api_key_env": "BATCH_REST_API_KEY",
                "project_key_env": "BATCH_PROJECT_KEY",
                "base_url": self.simulator_url,
                "endpoint": "update",
                "concurrency": scenario.concurrency,
                "max_attempts": 4,
                "rate_limit": False,
            },
            "run_type": "full_then_delta",
            "sync_mode": scenario.mode,
            # Written only when not the default, so an older engine (--engine) runs the others.
            **({"send": scenario.send} if scenario.send != "whole_profile" else {}),
            "mapping": {"custom_id": "customer_id", "email": "email", "phone": "phone"},
            "attributes": [{"column": "first_name", "name": "firstname"}, {"column": "points"}],
            "journal": {"flush_every_profiles": scenario.flush_every, "flush_every_seconds": scenario.flush_seconds},
            # Guards are not under test: a quarter of a small segment may move between versions.
            "guards": {"max_removed_percent": 100, "max_changed_percent": 100},
        }
        if scenario.audience:
            config["audience"] = AUDIENCE
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")

    def _start(self, lease_ttl: float) -> tuple[subprocess.Popen[str], Path]:
        self._runs += 1
        rejects = self.workdir / f"rejects-{self._runs}.jsonl"
        env = {**os.environ, **ENV, **self.state.env}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (self.engine or ROOT, ROOT))
        command = [
            sys.executable,
            "-m",
            "sync.cli",
            "run",
            str(self.config),
            "--state",
            self.state.url,
            "--lease-ttl",
            str(lease_ttl),
            "--json",
            "--rejects",
            str(rejects),
        ]
        # Its own process group, so that a kill takes the whole run (mapping workers included).
        process = subprocess.Popen(
            command,
            env=env,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._started[process.pid] = time.monotonic()
        return process, rejects

    def _finish(self, process: subprocess.Popen[str], what: str) -> tuple[int, dict[str, Any] | None]:
        """Wait for a run; return its exit code and its run record (None if it printed none)."""
        try:
            out, err = process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise ScenarioFailed(f"{what}: no end after {RUN_TIMEOUT:g} s\n{err[-3000:]}") from None
        record = None
        with contextlib.suppress(ValueError):
            record = json.loads(out)
        code = process.returncode
        status = record.get("status") if isinstance(record, dict) else None
        seconds = time.monotonic() - self._started.pop(process.pid, time.monotonic())
        counts = record.get("counts", {}) if isinstance(record, dict) else {}
        sent = ", ".join(
            f"{k} {counts[k]}" for k in ("sent", "acknowledged", "rejected_by_batch", "failed") if k in counts
        )
        self.result.notes.append(f"{what}: exit {code} {status or ''}, done by {seconds:.1f}s {sent}".rstrip())
        if code not in (EXIT_OK, EXIT_LEASE_HELD, EXIT_PARTIAL):
            raise ScenarioFailed(f"{what}: unexpected exit {code}\n{out[-2000:]}\n{err[-3000:]}")
        if code == EXIT_LEASE_HELD:
            self.result.lease_held_exits += 1
        if code == EXIT_PARTIAL:
            self.result.partial_runs += 1
        return code, record

    def _wait_for_lease(self) -> None:
        pause = self._lease_free_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)

    def _run_until_done(self, what: str) -> tuple[int, dict[str, Any] | None, Path]:
        """One run; started again while another run's lease is held (a dead one's may outlive the wait)."""
        for attempt in range(20):
            process, rejects = self._start(LONG_LEASE)
            code, record = self._finish(process, f"{what} (attempt {attempt + 1})" if attempt else what)
            if code != EXIT_LEASE_HELD:
                return code, record, rejects
            time.sleep(0.5)
        raise ScenarioFailed(f"{what}: the lease stayed held for 20 attempts")

    def _kill(self, action: Action) -> None:
        lease = kill_lease(self.scenario.rows)
        process, _ = self._start(lease)
        started = time.monotonic()
        applied_at_start = self.sim.stats()["profiles_applied"]
        target = action.kill_after_applied
        while process.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed >= action.kill_after_seconds:
                break
            if target is not None and self.sim.stats()["profiles_applied"] - applied_at_start >= target:
                break
            time.sleep(0.01)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            self.result.kills += 1
            self.result.notes.append(f"killed after {time.monotonic() - started:.2f}s")
            self._lease_free_at = time.monotonic() + lease + 0.2
        else:
            self._finish(process, "run meant to be killed (ended first)")
            self.result.kills_missed += 1
        # Requests the dead run had in flight are still being answered to nobody: let the
        # simulator apply them before anything is measured.
        time.sleep(0.3 + 2 * action.faults.get("latency_ms", 0) / 1000)
        # A restart at once meets the dead run's lease (unless the kill came before it was taken).
        restart, _ = self._start(LONG_LEASE)
        self._finish(restart, "restart right after the kill")

    def _overlap(self, action: Action) -> None:
        self._wait_for_lease()
        first, _ = self._start(LONG_LEASE)
        time.sleep(action.overlap_delay)
        second, _ = self._start(LONG_LEASE)
        codes = [self._finish(first, "overlap, first")[0], self._finish(second, "overlap, second")[0]]
        self.result.overlaps += 1
        if EXIT_LEASE_HELD in codes:
            self.result.overlaps_lease_held += 1
        if codes == [EXIT_LEASE_HELD, EXIT_LEASE_HELD]:
            raise ScenarioFailed("overlap: both runs exited as lease-held, with no other run alive")

    # -- one action, measured --
    def _act(self, number: int, action: Action) -> None:
        base = self.scenario.base_faults()
        self._wait_for_lease()
        before = self.sim.profiles()
        stats_before = self.sim.stats()
        faults = {**action.faults, "item_errors": {**action.faults["item_errors"], **base["item_errors"]}}
        self.sim.set_faults({**faults, "reject_custom_ids": base["reject_custom_ids"]})
        if self.scenario.audience:
            self.sim.set_audience_faults(action.faults)
        try:
            if action.kind == "kill":
                self._kill(action)
            elif action.kind == "overlap":
                self._overlap(action)
            else:
                self._run_until_done("run")
        finally:
            left = self.sim.faults()
            self.sim.clear_faults(base)
            if self.scenario.audience:
                self.sim.set_audience_faults({})
        self._count_faults(action, stats_before, self.sim.stats(), left)
        self._count_resends(before, self.sim.profiles())
        if self.result.redundant > self.result.resend_bound:
            # Re-sends come in the runs after their cause: the kills and drops so far must explain them.
            self.result.problems.setdefault("redundant_resends_over_bound", []).append(
                f"{self.result.redundant} re-sent by the end of v{number} > {self.result.resend_bound}"
            )

    def _count_faults(
        self, action: Action, before: Mapping[str, Any], after: Mapping[str, Any], left: Mapping[str, Any]
    ) -> None:
        faults = self.result.faults
        codes_before, codes_after = before["status_codes"], after["status_codes"]
        for code in ("429", "500", "502", "503", "504"):
            answered = codes_after.get(code, 0) - codes_before.get(code, 0)
            if answered:
                faults[f"http_{code}"] += answered
        faults["drop_before_apply"] += action.faults.get("drop_before_apply", 0) - left["drop_before_apply"]
        faults["drop_after_apply"] += action.faults.get("drop_after_apply", 0) - left["drop_after_apply"]
        if action.faults.get("latency_ms"):
            faults["latency_actions"] += 1
        for kind, count in after["item_errors"].items():
            self.result.item_errors[kind] += count - before["item_errors"].get(kind, 0)
        rejected = after["profiles_rejected"] - before["profiles_rejected"]
        injected = sum(after["item_errors"].values()) - sum(before["item_errors"].values())
        self.result.item_errors["reject_custom_ids"] += rejected - injected

    def _count_resends(self, before: Mapping[str, dict[str, Any]], after: Mapping[str, dict[str, Any]]) -> None:
        stray: list[str] = []
        departed = self.segment.departed() if self.scenario.clears else set()
        for cid, record in after.items():
            earlier = before.get(cid)
            applied = record["updates"] - (earlier["updates"] if earlier else 0)
            if applied <= 0:
                continue
            held_before = earlier["attributes"] if earlier is not None else {}
            if earlier is None and not record["attributes"]:
                # A clear for a profile Batch never held (it exists now, empty): harmless, and
                # only for a row that left the segment after a request may have created it
                # (guarantee 7: an intent outlives a request that was not acknowledged).
                self.result.harmless_clears += applied
                if cid not in departed:
                    stray.append(cid)
            elif record["attributes"] != held_before:
                self.result.redundant += applied - 1
            elif self.scenario.audience and cid in self.segment.returned:
                # Its fingerprint was forgotten when it left (it kept its attributes): sent once more.
                self.result.returned_resends += applied
            else:
                self.result.redundant += applied
        self.result.problems.setdefault("clear_of_a_profile_never_synced", []).extend(stray)

    # -- the scenario --
    def run(self) -> ScenarioResult:
        started = time.monotonic()
        segment_file = self.workdir / "segment.duckdb"
        self._write_activation()
        self.sim.clear_faults(self.scenario.base_faults())
        try:
            for number, action in enumerate(self.scenario.actions):
                if number:
                    self.segment.change()
                self.segment.write(segment_file)
                self.result.notes.append(f"v{number}: {len(self.segment.valid())} valid rows")
                self._act(number, action)
            self.check()
        except ScenarioFailed as failure:
            self.result.problems.setdefault("run_failures", []).append(str(failure))
        self.result.segment_changes = self.segment.changes
        self.result.seconds = time.monotonic() - started
        return self.result

    def check(self) -> None:
        """The clean run, then what Batch must hold."""
        scenario, segment, problems = self.scenario, self.segment, self.result.problems
        self._wait_for_lease()
        code, record, rejects = self._run_until_done("final clean run")
        if code != EXIT_OK or record is None:
            raise ScenarioFailed(f"final clean run: exit {code}, record {record}")
        counts = record["counts"]
        if counts.get("failed"):
            problems["final_run_failed_profiles"] = [str(counts["failed"])]
        reported = set()
        if rejects.exists():
            for line in rejects.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if any(issue.get("reason") == "batch_rejected" for issue in entry.get("issues", [])):
                    reported.add(entry["custom_id"])
        said = counts.get("refused_unchanged", 0) + counts.get("rejected_by_batch", 0)
        if said != len(reported):
            problems["refusal_counts_mismatch"] = [f"record says {said}, rejects file lists {len(reported)}"]

        held = {cid: profile["attributes"] for cid, profile in self.sim.profiles().items()}
        valid = segment.valid()
        departed = segment.departed()
        clears = {cid: dict.fromkeys(OWNED) for cid in departed} if scenario.clears else {}
        # Batch's answer for each payload the final state calls for: the probe project asks the
        # simulator with the payload itself (value refusals depend on nothing else).
        refusable = self.sim.refused(valid) | self.sim.refused(clears)

        missing = sorted(cid for cid, payload in valid.items() if cid not in refusable and not held.get(cid))
        stale = sorted(
            cid
            for cid, payload in valid.items()
            if cid not in refusable and held.get(cid) and held[cid] != view_of(payload)
        )
        problems["missing"] = missing
        problems["stale"] = stale
        problems["wrongly_refused"] = sorted(reported - refusable)
        must_report = {cid for cid in valid if cid in refusable}
        if scenario.clears:
            must_report |= {cid for cid in departed if cid in refusable and held.get(cid)}
        problems["refusal_not_reported"] = sorted(must_report - reported)
        problems["lost"] = sorted((set(missing) | set(stale)) - reported)
        self.result.refused = len(must_report)
        if scenario.clears:
            problems["not_cleared"] = sorted(cid for cid in departed if held.get(cid) and cid not in refusable)
        else:
            problems["changed_after_leaving"] = sorted(
                cid for cid in departed if cid in held and held[cid] not in segment.past_views[cid]
            )
        for cid in segment.invalid_present():
            allowed = segment.past_views.get(cid, [])
            if cid in held and held[cid] not in allowed and (held[cid] or not scenario.clears):
                problems.setdefault("invalid_row_changed", []).append(cid)
        problems["never_valid_but_created"] = sorted(set(held) - set(segment.past_views))
        if scenario.audience:
            # The audience is the set of valid ids of the segment (value-rejected and duplicated rows included).
            members, expected = self.sim.audience_members(), set(segment.present())
            problems["audience_missing"] = sorted(expected - members)
            problems["audience_extra"] = sorted(members - expected)
        if self.result.redundant > self.result.resend_bound:
            problems.setdefault("redundant_resends_over_bound", []).append(
                f"{self.result.redundant} re-sent by the end > {self.result.resend_bound}"
            )
        for name, ids in problems.items():
            for cid in ids[:3]:
                if cid in segment.past_views or cid in segment.rows:
                    self.result.details.append(
                        f"{name} {cid}: segment {valid.get(cid, 'not a valid row')}; Batch "
                        f"{held.get(cid, 'no profile')}; earlier valid states {segment.past_views.get(cid, [])}"
                        f"{'; left and came back' if cid in segment.returned else ''}"
                    )


# --- the campaign ----------------------------------------------------------------------------


def replay_command(seed: int, rows: int, versions: int, state: str, engine: Path | None) -> str:
    """The campaign CLI's command that runs one scenario again."""
    command = (
        f"python -m tests.support.fault_campaign --seed {seed} --rows {rows} --versions {versions} --state {state}"
    )
    return command + (f" --engine {engine}" if engine else "")


@contextlib.contextmanager
def running_simulator(seed: int) -> Iterator[str]:
    """A simulator (Batch's rate limits off: the campaign is about faults) on a free port."""
    credentials = {PROJECT_KEY: API_KEY, PROBE_PROJECT_KEY: API_KEY}
    with SimulatorThread(BatchSimulator(credentials, rate_limit=False, seed=seed)) as running:
        yield running.base_url


def run_scenario(
    seed: int,
    rows: int,
    workdir: Path,
    state: StateBackend,
    *,
    engine: Path | None = None,
    versions: int = BIG_VERSIONS,
    replay: str | None = None,
) -> ScenarioResult:
    """Plan and run one scenario on its own simulator (``replay``: the command a failure message shows)."""
    scenario = plan_scenario(seed, rows, versions=versions)
    with running_simulator(seed) as url:
        runner = ScenarioRunner(
            scenario,
            workdir,
            url,
            state,
            engine=engine,
            replay=replay or replay_command(seed, rows, versions, state.label, engine),
        )
        return runner.run()


@dataclass
class CampaignSummary:
    """Totals over the scenarios of a campaign."""

    results: list[ScenarioResult] = field(default_factory=list)

    def add(self, result: ScenarioResult) -> None:
        self.results.append(result)

    def render(self) -> str:
        results = self.results
        modes = Counter(r.scenario.mode for r in results)
        faults: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        changes: Counter[str] = Counter()
        for r in results:
            faults.update(r.faults)
            errors.update(r.item_errors)
            changes.update(r.segment_changes)
            for check, ids in r.problems.items():
                problems[check] += len(ids)
        failed = [r for r in results if not r.ok]
        redundant = sum(r.redundant for r in results)
        bound = sum(r.resend_bound for r in results)
        drops = sum(r.drops_after_apply for r in results)
        lines = [
            f"scenarios: {len(results)} ({', '.join(f'{m} {n}' for m, n in sorted(modes.items()))}), "
            f"rows: {sorted({r.scenario.rows for r in results})}, failed: {len(failed)}",
            f"time: {sum(r.seconds for r in results):.0f} s",
            f"segment changes: {dict(sorted(changes.items()))}",
            f"faults injected: {dict(sorted(faults.items()))}",
            f"kills: {sum(r.kills for r in results)} (+{sum(r.kills_missed for r in results)} runs ended before "
            f"their kill), overlaps: {sum(r.overlaps for r in results)} "
            f"({sum(r.overlaps_lease_held for r in results)} with a lease-held exit), "
            f"lease-held exits: {sum(r.lease_held_exits for r in results)}, "
            f"partial runs: {sum(r.partial_runs for r in results)}",
            f"per-item errors injected: {dict(sorted(errors.items()))}",
            f"refused by value in the final state (reported): {sum(r.refused for r in results)}",
            "final: "
            + ", ".join(
                f"{check} {problems.get(check, 0)}"
                for check in ("lost", "missing", "stale", "not_cleared", "wrongly_refused", "refusal_not_reported")
            ),
            f"redundant re-sends: {redundant} (bound {bound} = kills x (2F + C x B) "
            f"{sum(r.kills * r.scenario.kill_window for r in results)} + {drops} drops after apply x B); "
            f"at most {sum(min(r.redundant, r.drops_after_apply * BATCH) for r in results)} of them after "
            f"dropped answers (necessary); "
            f"harmless clears: {sum(r.harmless_clears for r in results)}",
            f"returned (audience) re-sends: {sum(r.returned_resends for r in results)}",
            f"max redundant in one scenario: {max((r.redundant for r in results), default=0)}, "
            f"max share of its bound: "
            f"{max((r.redundant / r.resend_bound for r in results if r.resend_bound), default=0):.2f}",
        ]
        shown = {"lost", "missing", "stale", "not_cleared", "wrongly_refused", "refusal_not_reported"}
        other = {k: v for k, v in problems.items() if v and k not in shown}
        if other:
            lines.append(f"other findings: {dict(sorted(other.items()))}")
        for r in failed:
            lines.append("")
            lines.append(r.failure_message())
        return "\n".join(lines)


def _verdict(result: ScenarioResult) -> str:
    return "ok" if result.ok else "FAILED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=BIG_ROWS, help="segment rows per scenario (default 20,000)")
    parser.add_argument("--scenarios", type=int, default=50, help="how many scenarios (default 50)")
    parser.add_argument("--campaign-seed", type=int, default=None, help="the campaign's seed (default: random)")
    parser.add_argument("--seed", type=int, action="append", help="run only this scenario (repeatable)")
    parser.add_argument(
        "--versions", type=int, default=BIG_VERSIONS, help=f"segment versions (one action each; {BIG_VERSIONS})"
    )
    parser.add_argument("--state", choices=["sqlite", "firestore"], default="sqlite")
    parser.add_argument("--engine", type=Path, default=None, help="a checkout whose sync/ the runs import")
    parser.add_argument("--workdir", type=Path, default=None, help="keep each scenario's files here")
    parser.add_argument("--verbose", action="store_true", help="print every scenario's plan and runs")
    args = parser.parse_args(argv)

    campaign_seed = args.campaign_seed if args.campaign_seed is not None else random.SystemRandom().randrange(10**9)
    seeds = args.seed or scenario_seeds(campaign_seed, args.scenarios)
    engine = args.engine.resolve() if args.engine else None
    print(
        f"fault campaign: campaign seed {campaign_seed}, {len(seeds)} scenarios of {args.rows} rows, "
        f"{args.state} state, engine {engine or 'this checkout'}",
        flush=True,
    )
    summary = CampaignSummary()
    with contextlib.ExitStack() as stack:
        emulator = None
        if args.state == "firestore":
            from tests.support.firestore_emulator import FirestoreEmulator

            emulator = FirestoreEmulator()
            emulator.start()
            stack.callback(emulator.stop)
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="campaign-")))
        for number, seed in enumerate(seeds, 1):
            workdir = root / f"seed-{seed}"
            # A scenario starts from nothing: state left by an earlier campaign would claim
            # profiles this simulator never received.
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            if emulator is not None:
                state = StateBackend.firestore(emulator.host, emulator.project, f"campaign{seed}")
            else:
                state = StateBackend.sqlite(workdir / "state.db")
            result = run_scenario(seed, args.rows, workdir, state, engine=engine, versions=args.versions)
            summary.add(result)
            print(
                f"[{number}/{len(seeds)}] seed {seed} {result.scenario.mode}: {_verdict(result)} "
                f"in {result.seconds:.0f} s (kills {result.kills}, overlaps {result.overlaps}, "
                f"redundant {result.redundant}/{result.resend_bound})",
                flush=True,
            )
            if args.verbose:
                print(result.scenario.describe(), *(f"  {note}" for note in result.notes), sep="\n", flush=True)
    print()
    print(summary.render())
    print(
        f"\nreplay the campaign: python -m tests.support.fault_campaign --campaign-seed {campaign_seed} "
        f"--scenarios {len(seeds)} --rows {args.rows} --state {args.state}"
    )
    return 0 if all(r.ok for r in summary.results) else 1


if __name__ == "__main__":
    sys.exit(main())
