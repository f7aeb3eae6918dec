"""The bench's own measuring is right: a command's peak memory is its own, and a delta's
expected counts are what the bench's SQL changes (bench/cli_run.py, bench/cli_figures.py).

Structure, not speed: no figure here is compared with a time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_sync import change_rows, generate_segment, remove_rows  # noqa: E402 - bench/ is not a package
from cli_figures import expected_delta  # noqa: E402
from cli_run import run_command  # noqa: E402


def test_a_commands_peak_rss_is_its_own_vmhwm_read_at_its_exit(tmp_path: Path) -> None:
    # The bench holds far more than the command will: a figure inherited from the parent
    # (ru_maxrss carries a peak across fork) would show it.
    ballast = bytearray(400 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    result = run_command(["--help"], tree=ROOT, env=dict(os.environ), workdir=tmp_path, label="help")
    assert result.exit_code == 0
    assert "run" in result.stdout_path.read_text(encoding="utf-8")
    assert result.peak_rss_from == "exit"
    assert result.peak_rss_bytes is not None
    assert 10e6 < result.peak_rss_bytes < 300e6
    assert result.cpu_seconds > 0
    assert result.wall_seconds > 0
    del ballast


def test_a_failed_command_reports_what_it_said(tmp_path: Path) -> None:
    result = run_command(
        ["run", str(tmp_path / "missing.yml"), "--json"], tree=ROOT, env=dict(os.environ), workdir=tmp_path, label="bad"
    )
    assert result.exit_code == 2
    assert result.record is None
    assert result.error is not None
    assert "missing.yml" in result.error


def test_the_expected_delta_is_what_the_bench_sql_changes(tmp_path: Path) -> None:
    database = tmp_path / "segment.duckdb"
    rows = 5_000
    generate_segment(database, rows)
    with duckdb.connect(str(database)) as connection:
        before = dict(connection.execute("SELECT customer_id, loyalty_points FROM customers").fetchall())
    change_rows(database, rows, 1.0)
    remove_rows(database, rows, 0.5)
    with duckdb.connect(str(database)) as connection:
        after = connection.execute("SELECT customer_id, loyalty_points, is_active FROM customers").fetchall()
    # The generated customers only: the demo's invalid rows follow them (one id twice).
    generated = [(cid, points, active) for cid, points, active in after if cid and int(cid[5:]) < rows]
    assert len(generated) == rows
    removed = sum(1 for _, _, active in generated if not active)
    changed = sum(1 for cid, points, active in generated if active and points != before[cid])
    assert (changed, removed) == expected_delta(rows, 1.0, 0.5)
    assert (changed, removed) == (50, 25)
