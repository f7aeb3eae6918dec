"""Scratch directories (sync.scratch): a killed run's are swept, a live one's never.

Real processes: a child makes a scratch directory, writes a spill file in it, and is killed
with SIGKILL, as an out-of-memory kill would; the temporary directory is the test's own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sync.scratch import LEGACY_AGE_SECONDS, scratch_directory, scratch_prefix, sweep

REPO = Path(__file__).resolve().parents[1]

# A child that makes a scratch directory (sweeping first, as every process's first one
# does), writes into it, prints its path, and waits to be killed.
_CHILD = """
import sys, time
from sync.scratch import scratch_directory
directory = scratch_directory(sys.argv[1])
with open(directory.name + "/spill.tmp", "wb") as handle:
    handle.write(b"x" * 4096)
print(directory.name, flush=True)
time.sleep(600)
"""


def _child(tmp: Path, kind: str = "diff") -> tuple[subprocess.Popen[str], Path]:
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", _CHILD, kind], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line, "the child printed no directory"
    return process, Path(line)


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


def test_a_killed_runs_directory_is_swept_by_the_next_process_and_a_live_ones_never(tmp_path: Path) -> None:
    killed, killed_dir = _child(tmp_path)
    live, live_dir = _child(tmp_path, "source")
    try:
        assert re.fullmatch(rf"cepsync-diff-[0-9]+-{killed.pid}-[a-z0-9_]+", killed_dir.name)
        assert killed_dir.parent == tmp_path
        _kill(killed)
        assert (killed_dir / "spill.tmp").exists()  # nobody removed it: the process was killed
        # The next process's first scratch directory sweeps it, and leaves the live one's.
        following, following_dir = _child(tmp_path, "fold")
        try:
            assert not killed_dir.exists()
            assert (live_dir / "spill.tmp").exists()
            assert following_dir.exists()
        finally:
            _kill(following)
    finally:
        _kill(live)
    # Both are now dead: a sweep takes them, and only them.
    (tmp_path / "not-ours").mkdir()
    (tmp_path / "cepsync-notes.txt").write_text("a file, not a directory")
    assert sorted(sweep(tmp_path)) == sorted([live_dir, following_dir])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cepsync-notes.txt", "not-ours"]


def test_a_directory_of_this_process_or_of_another_pid_namespace_is_kept(tmp_path: Path) -> None:
    prefix = scratch_prefix("diff")
    namespace = prefix.split("-")[2]
    own = tmp_path / f"{prefix}abc123"
    own.mkdir()
    # A pid that is surely not running here, in another namespace (a container sharing the
    # temporary directory numbers its processes apart): its owner may well be alive.
    foreign = tmp_path / f"cepsync-diff-{int(namespace) + 1}-999999999-abc123"
    foreign.mkdir()
    gone = tmp_path / f"cepsync-diff-{namespace}-999999999-abc123"
    gone.mkdir()
    assert sweep(tmp_path) == [gone]
    assert own.exists()
    assert foreign.exists()


def test_an_older_cepsyncs_directory_is_swept_once_untouched_for_a_day(tmp_path: Path) -> None:
    now = time.time()
    old, recent, touched = (tmp_path / f"cepsync-{kind}-abc{kind}1" for kind in ("diff", "source", "fold"))
    for directory in (old, recent, touched):
        directory.mkdir()
        (directory / "spill.tmp").write_bytes(b"x")
    day_ago = now - LEGACY_AGE_SECONDS - 60
    for path in (old, old / "spill.tmp", touched):
        os.utime(path, (day_ago, day_ago))  # touched: its file changed recently
    assert sweep(tmp_path, now=now) == [old]
    assert recent.exists()
    assert touched.exists()


def test_a_scratch_directory_is_removed_with_its_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    with scratch_directory("audience") as name:
        assert Path(name).parent == tmp_path
        assert Path(name).name.startswith(scratch_prefix("audience"))
    assert not Path(name).exists()
    with pytest.raises(ValueError, match="lowercase letters"):
        scratch_directory("../escape")
