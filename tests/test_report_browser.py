"""`cepsync report` opened in a real browser: Debian's headless Chromium, driven by selenium.

The history has successes, a partial failure, refused credentials, a guard abort and
rejections (ours and Batch's), with ``<script>`` and markup in ids, values and config.
The browser and its driver are the Debian packages ``chromium`` and ``chromium-driver``
(``make test`` installs them); nothing is downloaded at run time, and a missing browser
fails the test instead of skipping it.

The screenshot is saved in the test's output directory; with ``CEPSYNC_UPDATE_SCREENSHOT=1``
it also replaces ``docs/report.png``, the picture in the README.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from typer.testing import CliRunner

from sync.cli import app
from sync.dev.simulator import BatchSimulator, SimulatorThread
from tests.support.engine_support import API_KEY, PROJECT_KEY
from tests.support.report_support import (
    DESCRIPTION,
    MARKUP_EMAIL,
    NAME,
    QUERY_INJECTION,
    SCRIPT_ID,
    History,
    build_history,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,1400",
)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    with SimulatorThread(BatchSimulator({PROJECT_KEY: API_KEY}, rate_limit=False)) as simulator:
        return build_history(tmp_path_factory.mktemp("report"), simulator)


@pytest.fixture(scope="module")
def report_file(history: History, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-out") / "report.html"
    result = CliRunner().invoke(app, ["report", NAME, "--state", history.state_url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output.replace("\n", "")
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert os.access(binary, os.X_OK), (
            f"{binary} is missing: `make test` installs Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(browser: webdriver.Chrome, report_file: Path) -> webdriver.Chrome:
    browser.get(report_file.as_uri())
    assert browser.title == f"cepsync report: {NAME}"
    return browser


def js(driver: webdriver.Chrome, script: str) -> Any:
    return driver.execute_script(script)


def test_the_report_is_self_contained_and_runs_no_script(page: webdriver.Chrome, report_file: Path) -> None:
    assert js(page, "return document.querySelectorAll('script').length") == 0
    assert js(page, "return typeof window.__pwned") == "undefined"
    # Nothing was fetched: no stylesheet, image, font or script from anywhere.
    assert js(page, "return performance.getEntriesByType('resource').length") == 0
    # ...and nothing could be: no element refers to another resource.
    assert js(page, "return document.querySelectorAll('[src], [href], [*|href], link, iframe, object').length") == 0
    assert "Content-Security-Policy" in report_file.read_text(encoding="utf-8")


def test_the_charts_render_one_point_or_bar_per_run(page: webdriver.Chrome, history: History) -> None:
    runs = len(history.records)
    assert runs == 6
    # Profiles: 5 series (sent, acknowledged, changed, removed, rejected), one dot per run each.
    assert js(page, "return document.querySelectorAll('#chart-profiles svg .series .dot').length") == 5 * runs
    # Duration: one bar per run, in the colour of its outcome; three runs failed or stopped.
    bars = js(
        page,
        """return [0, 1, 2].map(i => [...document.querySelectorAll(
             '#chart-duration svg .serie-' + i + ' rect.rect')].map(r => r.getBBox().height))""",
    )
    # pygal lays out an empty (zero-height) bar where a series has no value for a run.
    drawn = [[height for height in series if height > 0] for series in bars]
    assert [len(series) for series in drawn] == [3, 3, 0]  # succeeded, failed or stopped, no sync
    # Stage timings: one group per run that timed a stage, every bar laid out.
    widths = js(page, "return [...document.querySelectorAll('#chart-stages rect.rect')].map(r => r.getBBox().width)")
    assert widths
    assert all(width > 0 for width in widths)
    # A point's tooltip is a native SVG title.
    assert js(page, "return document.querySelectorAll('#chart-profiles svg .dots > title').length") == 5 * runs


def reason_table(page: webdriver.Chrome, table_id: str) -> dict[str, int]:
    rows = page.find_elements(By.CSS_SELECTOR, f"#{table_id} tr[data-reason]")
    return {row.get_attribute("data-reason") or "": int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows}


def test_the_reason_tables_match_the_latest_run_record(page: webdriver.Chrome, history: History) -> None:
    latest = history.records[0]
    by_reason = latest["rejected_by_reason"]
    assert reason_table(page, "reasons-ours") == {k: v for k, v in by_reason.items() if k != "batch_rejected"}
    assert reason_table(page, "reasons-batch") == {"batch_rejected": by_reason["batch_rejected"]}
    assert reason_table(page, "reasons-batch") == {"batch_rejected": 1}
    counts = {
        row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[1].text
        for row in page.find_elements(By.CSS_SELECTOR, "#latest-counts tr")[1:]
    }
    assert counts["rows read"] == f"{latest['counts']['rows']:,}"
    assert counts["value refused by Batch (remembered)"] == "1"


def test_failures_guards_and_statuses_are_listed(page: webdriver.Chrome, history: History) -> None:
    failures = page.find_element(By.ID, "failure-table").text
    for record in history.records:
        if record["status"] in ("partial", "auth_error", "aborted_by_guard"):
            assert record["run_id"] in failures
    assert "removed_percent" in failures
    statuses = {
        row.find_elements(By.TAG_NAME, "td")[0].text: int(row.find_elements(By.TAG_NAME, "td")[1].text)
        for row in page.find_elements(By.CSS_SELECTOR, "#status-table tr")[1:]
    }
    assert statuses == {"succeeded_with_rejections": 2, "succeeded": 1, "partial": 1, "auth_error": 1,
                        "aborted_by_guard": 1}  # fmt: skip
    failed_rows = page.find_elements(By.CSS_SELECTOR, "#recent-runs tr.failure")
    assert len(failed_rows) == 3


def test_injected_markup_is_shown_as_text(page: webdriver.Chrome) -> None:
    body = page.find_element(By.TAG_NAME, "body").text
    assert SCRIPT_ID in body  # a custom_id among the samples
    assert MARKUP_EMAIL[:30] in body  # the sample's detail quotes it, cut
    config = page.find_element(By.ID, "config-yaml").text
    assert QUERY_INJECTION in config
    assert DESCRIPTION in config
    # None of it became an element.
    assert js(page, "return document.querySelectorAll('img, b, i').length") == 0


def test_the_config_shown_is_the_one_recorded_without_secrets(page: webdriver.Chrome) -> None:
    config = page.find_element(By.ID, "config-yaml").text
    assert "api_key_env: BATCH_REST_API_KEY" in config
    assert API_KEY not in config
    assert PROJECT_KEY not in page.page_source
    assert API_KEY not in page.page_source


def test_a_screenshot_is_saved(page: webdriver.Chrome, tmp_path: Path) -> None:
    height = int(js(page, "return document.documentElement.scrollHeight"))
    page.set_window_size(1000, min(height + 100, 2400))
    shot = tmp_path / "report.png"
    assert page.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, tall = struct.unpack(">II", data[16:24])
    assert width >= 900
    assert tall >= 1400
    if os.environ.get("CEPSYNC_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO_ROOT / "docs" / "report.png")


@pytest.mark.parametrize("count", [8, 20, 60])
def test_per_run_x_labels_are_distinct_and_do_not_overlap(
    browser: webdriver.Chrome, history: History, tmp_path: Path, count: int
) -> None:
    """Issue 19, item 25: runs a few seconds apart once all read "07-01 10:00", drawn over each other."""
    import copy
    from datetime import UTC, datetime, timedelta

    from sync.report.html import render_report

    start = datetime(2026, 7, 1, 10, tzinfo=UTC)
    records = []
    for index in range(count):
        record = copy.deepcopy(history.records[index % len(history.records)])
        record["run_id"] = f"run-{index:03d}"
        record["started_at"] = (start + timedelta(seconds=7 * index)).isoformat()
        records.append(record)
    out = tmp_path / "report.html"
    out.write_text(render_report(NAME, list(reversed(records)), state_kind="sqlite"), encoding="utf-8")
    browser.get(out.as_uri())
    for chart in ("chart-profiles", "chart-duration"):
        boxes = js(
            browser,
            f"""return [...document.querySelectorAll('#{chart} svg .axis.x .guides text')]
                 .filter(t => t.textContent && getComputedStyle(t).display !== 'none')
                 .map(t => {{ const r = t.getBoundingClientRect();
                   return [t.textContent, r.left, r.top, r.right, r.bottom]; }})""",
        )
        texts = [box[0] for box in boxes]
        assert len(texts) == len(set(texts)), texts
        assert len(texts) >= min(count, 10), texts  # thinned, not emptied
        for (_, l1, t1, r1, b1), (_, l2, _t2, _r2, _b2) in itertools.pairwise(boxes):
            if b1 - t1 < 20:  # horizontal labels: side by side, never overlapping
                assert l2 >= r1, (chart, boxes)
            else:
                # Rotated by 40 degrees, parallel labels lie (horizontal step) x sin 40 apart: more
                # than the 11 px font is tall, or their glyphs touch.
                assert (l2 - l1) * math.sin(math.radians(40)) >= 12, (chart, boxes)
