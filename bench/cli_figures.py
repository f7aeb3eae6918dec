"""The figures of `cepsync run` commands measured end to end, and issue 20's table of them.

Shared by ``bench_sync.py`` (1M profiles, this checkout against a baseline commit) and
``bench_10m.py`` (10M profiles, this checkout). bench/README.md says how to read them.
"""

from __future__ import annotations

import json
import statistics
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
from cli_run import CommandResult

from sync.dev.simulator import kept

# Batch's published rate for /profiles/mass-update, the endpoint a large sync uses: the
# floor of a run is the profiles it must send over this rate (no burst on mass-update).
MASS_UPDATE_PER_SECOND = 10_000
# How many changed, removed and unchanged ids the delta's exactness check reads back from
# the simulator (every id would be 15,000 requests at 1M; the counts cover every id).
SAMPLE_IDS = 50

# Issue 20's targets at 1M profiles: (label, figure key, run, limit or None, how to compare).
RUN_NAMES = ("full", "delta", "no_change")


def summarise_command(
    result: CommandResult, simulator_before: dict[str, Any], simulator_after: dict[str, Any]
) -> dict[str, Any]:
    """One command's figures: the process's, its run record's, and what the simulator saw."""
    record = result.record or {}
    counts = record.get("counts", {})
    timings = record.get("timings", {})
    rows = counts.get("rows", 0)
    return {
        **result.as_dict(),
        "status": record.get("status", "crashed"),
        "run_id": record.get("run_id"),
        "endpoint": record.get("endpoint"),
        "rows": rows,
        "sent": counts.get("sent", 0),
        "acknowledged": counts.get("acknowledged", 0),
        "cpu_us_per_row": round(1e6 * result.cpu_seconds / rows, 2) if rows else None,
        "peak_rss_mb": None if result.peak_rss_bytes is None else result.peak_rss_bytes / 1e6,
        "tree_peak_rss_mb": None if result.tree_peak_rss_bytes is None else result.tree_peak_rss_bytes / 1e6,
        "engine_seconds": timings.get("total_seconds"),
        "first_request_seconds": timings.get("first_request_seconds"),
        "map_workers": timings.get("map_workers"),
        "too_many_requests": simulator_after.get("too_many_requests", 0) - simulator_before.get("too_many_requests", 0),
        "counts": counts,
        "timings": timings,
    }


def succeeded(figures: dict[str, Any]) -> bool:
    """Whether a run ended as a run should (its segment's invalid rows make it ``_with_rejections``)."""
    return figures.get("status") in ("succeeded", "succeeded_with_rejections")


def floor_seconds(profiles: int) -> float:
    """Batch's floor for sending ``profiles`` on mass-update: they cannot arrive faster."""
    return profiles / MASS_UPDATE_PER_SECOND


# --- exactness of a delta ---------------------------------------------------------------------


def _every(percent: float) -> int:
    return max(1, round(100.0 / percent)) if percent > 0 else 0


def _sample(rows: int, every: int, offset: int, keep_every: int = 1) -> list[int]:
    """Up to SAMPLE_IDS of the generated ids ``i < rows`` with ``(i + offset) % every == 0``, spread out.

    With ``keep_every`` above 1, only ids whose attributes the simulator keeps (``sync.dev.simulator.kept``).
    """
    if not every:
        return []
    hits: Sequence[int] = range((every - offset) % every, rows, every)
    if keep_every > 1:
        hits = [i for i in hits if kept(_cid(i), keep_every)]
    step = max(1, len(hits) // SAMPLE_IDS)
    return list(hits[::step][:SAMPLE_IDS])


def _cid(i: int) -> str:
    return f"cust-{i:07d}"


def expected_delta(rows: int, changed_percent: float, removed_percent: float) -> tuple[int, int]:
    """The rows bench_sync's ``_CHANGE_SQL`` changes and ``_LEAVE_SQL`` removes (a row both is removed)."""
    every_changed, every_removed = _every(changed_percent), _every(removed_percent)
    removed = len(range(every_removed - 1, rows, every_removed)) if every_removed else 0
    changed = (
        sum(1 for i in range(0, rows, every_changed) if not (every_removed and (i + 1) % every_removed == 0))
        if every_changed
        else 0
    )
    return changed, removed


def check_delta(
    figures: dict[str, Any],
    *,
    database: Path,
    rows: int,
    changed_percent: float,
    removed_percent: float,
    profile: Callable[[str], dict[str, Any] | None],
    keep_every: int = 1,
) -> dict[str, Any]:
    """Whether a mirror delta did exactly what the segment asked, and nothing else.

    The run's counts must say every changed row was sent as changed and every row that left
    as removed, nothing new, nothing failed, and every profile sent acknowledged. Then a
    sample read back from the simulator (``profile``: custom id -> its stored record):
    changed ids hold the segment's new loyalty points and were updated twice (the full load,
    this delta), removed ids hold no attributes, and unchanged ids were updated once. A
    simulator that keeps one profile in ``keep_every`` is read back on kept ids only.
    """
    counts = figures.get("counts", {})
    problems: list[str] = []
    every_changed, every_removed = _every(changed_percent), _every(removed_percent)
    expected_changed, expected_removed = expected_delta(rows, changed_percent, removed_percent)
    expected = {"changed": expected_changed, "removed": expected_removed, "new": 0, "failed": 0}
    for key, want in expected.items():
        if counts.get(key, 0) != want:
            problems.append(f"{key} {counts.get(key, 0):,} (expected {want:,})")
    if counts.get("acknowledged", 0) != expected_changed + expected_removed:
        problems.append(
            f"acknowledged {counts.get('acknowledged', 0):,} (expected {expected_changed + expected_removed:,})"
        )
    changed_ids = [
        _cid(i)
        for i in _sample(rows, every_changed, 0, keep_every)
        if not (every_removed and (i + 1) % every_removed == 0)
    ]
    removed_ids = [_cid(i) for i in _sample(rows, every_removed, 1, keep_every)]
    unchanged_ids = [
        _cid(i)
        for i in _sample(rows, 7, 3, keep_every)
        if not (every_changed and i % every_changed == 0) and not (every_removed and (i + 1) % every_removed == 0)
    ]
    points: dict[str, int] = {}
    if changed_ids:
        with duckdb.connect(str(database), read_only=True) as connection:
            found = connection.execute(
                "SELECT customer_id, loyalty_points FROM customers WHERE customer_id IN (SELECT unnest($ids))",
                {"ids": changed_ids},
            ).fetchall()
        points = {str(cid): int(value) for cid, value in found}
    for cid in changed_ids:
        stored = profile(cid) or {}
        if stored.get("attributes", {}).get("loyalty_points") != points.get(cid) or stored.get("updates") != 2:
            problems.append(f"changed {cid}: Batch holds {_short(stored)}, the segment {points.get(cid)}")
    for cid in removed_ids:
        stored = profile(cid) or {}
        if stored.get("attributes"):
            problems.append(f"removed {cid}: Batch still holds {_short(stored)}")
    for cid in unchanged_ids:
        stored = profile(cid) or {}
        if stored.get("updates") != 1:
            problems.append(f"unchanged {cid}: updated {stored.get('updates')} times")
    return {
        "exact": not problems,
        "expected": {"changed": expected_changed, "removed": expected_removed},
        "problems": problems[:20],
        "checked_ids": {"changed": len(changed_ids), "removed": len(removed_ids), "unchanged": len(unchanged_ids)},
    }


def _short(stored: dict[str, Any]) -> str:
    attributes = stored.get("attributes", {})
    points = attributes.get("loyalty_points")
    return f"{len(attributes)} attributes, loyalty_points {points}, {stored.get('updates')} updates"


def simulator_profile(base_url: str, project_key: str) -> Callable[[str], dict[str, Any] | None]:
    """Read one stored profile from the simulator's inspection API (None when Batch has none)."""

    def read(custom_id: str) -> dict[str, Any] | None:
        url = f"{base_url}/_sim/projects/{urllib.parse.quote(project_key)}/profiles/{urllib.parse.quote(custom_id)}"
        try:
            # Only ever our own simulator on 127.0.0.1 over http.
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - fixed local http URL
                body: dict[str, Any] = json.loads(response.read())
                return body
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    return read


# --- issue 20's table -------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    clean = [v for v in values if v is not None]
    return float(statistics.median(clean)) if clean else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def issue_table(
    cli: dict[str, dict[str, dict[str, Any]]],
    *,
    engines: list[tuple[str, str]],
    floors: dict[str, float],
    rows: int,
) -> list[str]:
    """Issue 20's rows for each engine (medians), their ratio, Batch's floor and the target.

    ``cli[engine][run]`` holds a run's lists of figures (one value per repetition);
    ``engines`` is ``[(key, label)]`` in column order; ``floors`` is Batch's floor in
    seconds per run. A target is marked ``met`` or ``NOT met`` for the last engine (this
    checkout); the targets are issue 20's, set for 1M profiles.
    """

    def med(engine: str, run: str, key: str) -> float | None:
        return median(cli.get(engine, {}).get(run, {}).get(key, []))

    def total(engine: str, key: str) -> float | None:
        values = [med(engine, run, key) for run in RUN_NAMES]
        present = [v for v in values if v is not None]
        return sum(present) if present else None

    def exact(engine: str) -> str:
        marks = cli.get(engine, {}).get("delta", {}).get("exact", [])
        return "-" if not marks else "exact" if all(marks) else "NOT exact"

    full_floor = floors["full"]
    delta_floor = floors["delta"]
    # (label, value of an engine, format, floor text, target text, target check or None)
    lines_spec: list[tuple[str, Callable[[str], float | None], str, str, str, Callable[[float], bool] | None]] = [
        (
            "full load, wall s",
            lambda e: med(e, "full", "wall_seconds"),
            ".1f",
            f"{full_floor:.1f}",
            f"<= {1.03 * full_floor:.1f} (1.03 x floor)",
            lambda v: v <= 1.03 * full_floor,
        ),
        ("full load, CPU µs/row", lambda e: med(e, "full", "cpu_us_per_row"), ".1f", "-", "<= 15", lambda v: v <= 15),
        ("full load, CPU s", lambda e: med(e, "full", "cpu_seconds"), ".1f", "-", "-", None),
        ("peak RSS MB, full", lambda e: med(e, "full", "peak_rss_mb"), ".0f", "-", "<= 200", lambda v: v <= 200),
        ("peak RSS MB, delta", lambda e: med(e, "delta", "peak_rss_mb"), ".0f", "-", "<= 200", lambda v: v <= 200),
        (
            "peak RSS MB, no change",
            lambda e: med(e, "no_change", "peak_rss_mb"),
            ".0f",
            "-",
            "<= 200",
            lambda v: v <= 200,
        ),
        (
            "delta, wall s",
            lambda e: med(e, "delta", "wall_seconds"),
            ".2f",
            f"{delta_floor:.2f}",
            f"<= {1.3 * delta_floor:.2f} (1.3 x floor)",
            lambda v: v <= 1.3 * delta_floor,
        ),
        ("delta, CPU s", lambda e: med(e, "delta", "cpu_seconds"), ".2f", "-", "-", None),
        ("no change, wall s", lambda e: med(e, "no_change", "wall_seconds"), ".2f", "0", "<= 1.0", lambda v: v <= 1.0),
        ("no change, CPU s", lambda e: med(e, "no_change", "cpu_seconds"), ".2f", "-", "-", None),
        ("429s (all runs)", lambda e: total(e, "too_many_requests"), ".0f", "-", "0", lambda v: v == 0),
    ]
    names = [label for _, label in engines]
    width = max(14, *(len(n) + 2 for n in names))
    header = (
        f"{f'{rows:,} profiles, CLI end to end':<30}"
        + "".join(f"{n:>{width}}" for n in names)
        + (f"{'ratio':>8}" if len(engines) == 2 else "")
        + f"{'floor':>9}  {'target':<28}"
    )
    out = [header, "-" * len(header)]
    for label, value, spec, floor, target, check in lines_spec:
        values = [value(key) for key, _ in engines]
        ratio = ""
        if len(values) == 2:
            ratio = f"{values[0] / values[1]:>7.2f}x" if values[0] is not None and values[1] else f"{'':>8}"
        mark = ""
        if check is not None and values[-1] is not None:
            mark = "met" if check(values[-1]) else "NOT met"
        out.append(
            f"{label:<30}"
            + "".join(f"{_fmt(v, spec):>{width}}" for v in values)
            + ratio
            + f"{floor:>9}  {target:<28}{mark}"
        )
    out.append(
        f"{'delta exact':<30}"
        + "".join(f"{exact(key):>{width}}" for key, _ in engines)
        + (f"{'':>8}" if len(engines) == 2 else "")
        + f"{'':>9}  {'exact':<28}"
        + ("met" if exact(engines[-1][0]) == "exact" else "NOT met" if exact(engines[-1][0]) != "-" else "")
    )
    return out
