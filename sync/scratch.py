"""Scratch directories (DuckDB's spill files, a run's rejections spool), and the sweep of a killed run's.

A run removes its scratch directories as it ends. A run that is killed (an out-of-memory
kill, a scheduler's timeout, a SIGKILL) cannot, and what DuckDB had spilled there stays in
the temporary directory: at 10 million profiles a compaction's fold can spill gigabytes.
So each directory's name carries the process that made it, as
``cepsync-<kind>-<pid namespace>-<pid>-<random>``, and the first directory a process makes
sweeps the others whose process no longer runs (``docs/how-a-run-works.md``, "Memory").

A directory is removed only when its process is known to be gone: a process id is looked up
only in the process's own pid namespace (a container sharing the temporary directory with
the host numbers its processes apart), and a live process's directory is never removed,
whoever owns it. Names written by an older cepsync carry no process id
(``cepsync-diff-<random>``); those are removed once nothing in them changed for
:data:`LEGACY_AGE_SECONDS`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

# A scratch directory's name: cepsync-<kind>-<pid namespace>-<pid>-<tempfile's random part>.
_NAMED: Final = re.compile(r"^cepsync-(?P<kind>[a-z]+)-(?P<namespace>[0-9]+)-(?P<pid>[0-9]+)-[a-z0-9_]+$")
# ... and before it carried the process: cepsync-<kind>-<random>, for the kinds cepsync made.
_LEGACY: Final = re.compile(r"^cepsync-(?:diff|source|audience|fold|results)-[a-z0-9_]+$")
# A legacy directory untouched this long is a killed run's (no run of cepsync lasts a day).
LEGACY_AGE_SECONDS: Final = 24 * 3600.0

_swept = threading.Event()
_sweeping = threading.Lock()


def _pid_namespace() -> int:
    """This process's pid namespace (its inode), or 0 where there is none to read (not Linux)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return 0
    digits = re.search(r"\[([0-9]+)\]", link)
    return int(digits.group(1)) if digits else 0


def scratch_prefix(kind: str) -> str:
    """The name prefix of a new scratch directory for ``kind`` (``diff``, ``source``...) of this process.

    The first call in a process sweeps the directories killed processes left (:func:`sweep`).
    """
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"a scratch directory's kind is lowercase letters, not {kind!r}")
    if not _swept.is_set():
        with _sweeping:
            if not _swept.is_set():
                sweep()
                _swept.set()
    return f"cepsync-{kind}-{_pid_namespace()}-{os.getpid()}-"


def scratch_directory(kind: str) -> tempfile.TemporaryDirectory[str]:
    """A new scratch directory for ``kind``, removed with the object (:func:`scratch_prefix`)."""
    return tempfile.TemporaryDirectory(prefix=scratch_prefix(kind))


def sweep(root: Path | None = None, *, now: float | None = None) -> list[Path]:
    """Remove the scratch directories in ``root`` (the temporary directory) that no running process owns.

    Returns:
        The directories removed.
    """
    root = Path(tempfile.gettempdir()) if root is None else root
    moment = time.time() if now is None else now
    namespace = _pid_namespace()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("cepsync-") or not entry.is_dir(follow_symlinks=False):
            continue
        named = _NAMED.match(entry.name)
        if named is not None:
            if int(named.group("namespace")) != namespace:
                continue  # another pid namespace's process: its id means nothing here
            abandoned = not _running(int(named.group("pid")))
        elif _LEGACY.match(entry.name) is not None:
            abandoned = _untouched_since(Path(entry.path), moment - LEGACY_AGE_SECONDS)
        else:
            continue
        if abandoned:
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (this one included; another user's counts as running)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _untouched_since(path: Path, cutoff: float) -> bool:
    """Whether neither ``path`` nor anything directly in it changed after ``cutoff``."""
    try:
        if path.stat().st_mtime > cutoff:
            return False
        with os.scandir(path) as entries:
            return all(entry.stat(follow_symlinks=False).st_mtime <= cutoff for entry in entries)
    except OSError:
        return False
