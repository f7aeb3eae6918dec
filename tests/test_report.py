"""The report's summaries and HTML without a browser: thousands of runs, stage timings, escaping."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import pytest

from sync.dev.simulator import BatchSimulator, SimulatorThread
from sync.report.html import render_report
from sync.report.summary import MAX_BUCKETS, RECENT_RUNS, stage_names, stage_times, timeline
from tests.support.engine_support import API_KEY, PROJECT_KEY
from tests.support.report_support import History, build_history

T0 = datetime(2026, 7, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as simulator:
        return build_history(tmp_path_factory.mktemp("report-unit"), simulator)


def many_runs(history: History, count: int) -> list[dict[str, Any]]:
    """``count`` copies of the real records, one an hour, newest first (as the store lists them)."""
    runs = []
    for index in range(count):
        record = copy.deepcopy(history.records[index % len(history.records)])
        started = T0 + timedelta(hours=index)
        record["run_id"] = started.strftime("%Y%m%dT%H%M%SZ") + f"-{index:06x}"
        record["started_at"] = started.isoformat()
        record["ended_at"] = (started + timedelta(seconds=30)).isoformat()
        runs.append(record)
    return list(reversed(runs))


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.rows_in_recent = 0
        self._in_recent = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "table":
            self._in_recent = ("id", "recent-runs") in attrs
        if tag == "tr" and self._in_recent:
            self.rows_in_recent += 1


def test_thousands_of_runs_are_aggregated_not_listed(history: History) -> None:
    records = many_runs(history, 3_000)  # 125 days of hourly runs
    line = timeline(records)
    assert not line.per_run
    assert len(line.buckets) <= MAX_BUCKETS
    assert sum(bucket.runs for bucket in line.buckets) == 3_000
    assert sum(bucket.sent for bucket in line.buckets) == sum(r["counts"].get("sent", 0) for r in records)
    html = render_report("report_people", records, state_kind="sqlite")
    assert len(html) < 1_000_000
    parser = _Tags()
    parser.feed(html)
    assert parser.rows_in_recent == RECENT_RUNS + 1  # a header row and the latest runs
    assert "3000 runs grouped into" in html
    assert 'id="chart-outcomes"' in html  # runs per window by outcome, only when grouped


def test_few_runs_get_one_point_each(history: History) -> None:
    line = timeline(history.records)
    assert line.per_run
    assert [bucket.runs for bucket in line.buckets] == [1] * len(history.records)


def test_stage_timings_new_keys_first_and_old_records_tolerated(history: History) -> None:
    newer = copy.deepcopy(history.records[0])
    newer["run_id"] = "20991231T000000Z-aaaaaa"
    newer["timings"]["stages"] = {"batch_wait": 1.5, "send": 2.0, "read": 3.0, "hash_and_diff": 0.5, "custom": 0.1}
    older = copy.deepcopy(history.records[1])
    older["timings"] = {}  # a record from before timings existed
    legacy = copy.deepcopy(history.records[2])
    legacy["timings"] = {"read_and_plan_seconds": 2.5, "send_seconds": 1.0}  # the engine before per-stage timings
    times = stage_times([newer, older, legacy, *history.records[3:]])
    assert times[-1].run_id == newer["run_id"]  # newest last (oldest on the left)
    assert list(times[-1].seconds) == ["read", "hash + diff", "send", "waiting on Batch", "custom"]
    assert older["run_id"] not in [t.run_id for t in times]
    assert stage_names(times)[:4] == ["read + plan", "read", "hash + diff", "map"]
    html = render_report("report_people", [newer, older], state_kind="sqlite")
    assert "waiting on Batch (s)" in html


def test_an_empty_history_and_a_hostile_name_render_safely() -> None:
    name = "<script>alert(1)</script><b>x</b>"
    html = render_report(name, [], state_kind="firestore")
    parser = _Tags()
    parser.feed(html)
    assert "script" not in parser.tags
    assert "b" not in parser.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "No run recorded" in html


# -- issue 19, item 25: grouped sums count what reached Batch; per-run labels are unique ------------


def test_a_guard_aborted_plan_is_not_summed_as_changed(history: History) -> None:
    aborted = [r for r in history.records if r["status"] == "aborted_by_guard"]
    assert len(aborted) == 1
    assert aborted[0]["counts"]["changed"] + aborted[0]["counts"].get("removed", 0) > 0
    assert aborted[0]["counts"].get("sent", 0) == 0
    # One window holding every run: the aborted plan must not be in the sums.
    line = timeline(history.records, max_buckets=1)
    assert not line.per_run
    [window] = line.buckets
    sending = [r for r in history.records if r["counts"].get("sent")]
    assert window.changed == sum(r["counts"].get("changed", 0) for r in sending)
    assert window.removed == sum(r["counts"].get("removed", 0) for r in sending)
    assert window.changed < sum(r["counts"].get("changed", 0) for r in history.records)
    assert window.sent == sum(r["counts"].get("sent", 0) for r in history.records)
    assert window.acknowledged == sum(r["counts"].get("acknowledged", 0) for r in history.records)
    assert window.unsent_plans == 1
    html = render_report("report_people", history.records, state_kind="sqlite")
    assert "1 run(s) planned changes that never reached Batch" in " ".join(html.split())
    assert "changed (planned, runs that sent)" in html


def test_runs_in_the_same_minute_get_distinct_labels(history: History) -> None:
    base = history.records[0]
    moments = [T0, T0 + timedelta(seconds=5), T0 + timedelta(seconds=5, milliseconds=1), T0 + timedelta(minutes=1)]
    records = []
    for index, moment in enumerate(moments):
        record = copy.deepcopy(base)
        record["run_id"] = f"run-{index}"
        record["started_at"] = moment.isoformat()
        records.append(record)
    labels = [bucket.label for bucket in timeline(records).buckets]
    assert labels == ["07-01 00:00:00", "07-01 00:00:05", "07-01 00:00:05 #2", "07-01 00:01:00"]
    # Minutes alone while they tell the runs apart.
    assert [b.label for b in timeline([records[0], records[3]]).buckets] == ["07-01 00:00", "07-01 00:01"]


@pytest.mark.parametrize("count", [1, 5, 12, 20, 30, 45, 60])
def test_x_labels_are_laid_out_without_overlap(count: int) -> None:
    from sync.report.charts import _CHAR_WIDTH, _PLOT_WIDTH, _ROTATED_SPACING, x_axis_layout

    for label in ("07-01 10:00", "07-01 10:00:05 #2", "20260701T100000Z-00abcd"):
        layout = x_axis_layout([label] * count)
        space = _PLOT_WIDTH / count
        if layout["x_label_rotation"] == 0:
            assert len(label) * _CHAR_WIDTH + 8 <= space
        else:
            shown_every = layout["x_labels_major_every"] or 1
            assert isinstance(shown_every, int)
            assert shown_every * space >= _ROTATED_SPACING
