"""The run's preload: a module imported on a thread of its own, never in the way of the real import."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from sync.differ import IdScan
from sync.pipeline import Scan
from sync.preload import preload


@pytest.fixture
def modules_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("cepsync_preload_probe", "cepsync_preload_broken"):
        sys.modules.pop(name, None)


def test_a_module_is_imported_on_a_thread_of_its_own(modules_dir: Path) -> None:
    (modules_dir / "cepsync_preload_probe.py").write_text(
        "import threading\nIMPORTED_BY = threading.current_thread().name\n", encoding="utf-8"
    )
    thread = preload("json", "cepsync_preload_probe")
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert sys.modules["cepsync_preload_probe"].IMPORTED_BY == "cepsync-preload"
    assert thread.daemon  # never keeps a finished run's process alive
    # Imported already: nothing is started.
    assert preload("json", "cepsync_preload_probe") is None


def test_a_module_that_fails_is_left_to_the_import_that_uses_it(
    modules_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (modules_dir / "cepsync_preload_broken.py").write_text("raise RuntimeError('broken on import')\n", encoding="utf-8")
    uncaught: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    thread = preload("cepsync_preload_broken")
    assert thread is not None
    thread.join(timeout=30)
    assert uncaught == []  # nothing escaped the thread
    assert "cepsync_preload_broken" not in sys.modules
    with pytest.raises(RuntimeError, match="broken on import"):
        importlib.import_module("cepsync_preload_broken")


def _scan(*, full: bool = False, stale: frozenset[str] = frozenset(), **ids: Any) -> Scan:
    counts: dict[str, Any] = {"rows": 10, "null_ids": 0, "duplicates": {}, "matched": 10, "new_ids": 0, **ids}
    unused = cast(Any, None)
    return Scan(unused, IdScan(**counts), unused, unused, full, None, "v", stale)


@pytest.mark.parametrize(
    ("scan", "may_send"),
    [
        (_scan(moved=0), False),
        (_scan(moved=0, null_ids=2, duplicates={"a": 2}), False),  # rejected, never sent
        (_scan(moved=3), True),
        (_scan(), True),  # a differ that counts the moved rows only as it reads them
        (_scan(moved=0, new_ids=1), False),  # new ids: often the rows rejected on every run
        (_scan(moved=0, removed=["gone"]), True),
        (_scan(moved=0, full=True), True),
        (_scan(moved=0, stale=frozenset({"unsettled"})), True),
    ],
    ids=["nothing", "only rejections", "moved", "moved unknown", "only new", "removed", "full", "unsettled intents"],
)
def test_a_run_warms_its_http_client_when_its_scan_says_it_will_likely_send(scan: Scan, may_send: bool) -> None:
    assert scan.may_send is may_send


@pytest.mark.parametrize(
    ("scan", "may_map"),
    [
        (_scan(moved=0), False),
        (_scan(moved=0, removed=["gone"]), False),  # removals are sent without a mapped row
        (_scan(moved=0, stale=frozenset({"unsettled"})), False),
        (_scan(moved=3), True),
        (_scan(), True),  # moved rows not counted by the differ: maybe some
        (_scan(moved=0, new_ids=1), True),
        (_scan(moved=0, null_ids=1), True),
        (_scan(moved=0, duplicates={"a": 2}), True),
        (_scan(moved=0, full=True), True),
    ],
    ids=["nothing", "only removed", "only unsettled", "moved", "moved unknown", "new", "null id", "duplicated", "full"],
)
def test_a_run_warms_its_validators_when_its_scan_says_it_will_map_rows(scan: Scan, may_map: bool) -> None:
    assert scan.may_map is may_map


# A fresh interpreter: this one may have imported the validators already.
_WARMED = """
import json, sys
from tests.support.mapping_support import make_mapper

mapper = make_mapper(json.loads(sys.argv[1]))
before = {name for name in ("email_validator", "phonenumbers") if name in sys.modules}
thread = mapper.warm()
if thread is not None:
    thread.join(timeout=60)
after = sorted(name for name in ("email_validator", "phonenumbers") if name in sys.modules)
print(json.dumps({"before": sorted(before), "started": thread is not None, "after": after}))
"""


@pytest.mark.parametrize(
    ("mapping", "started", "after"),
    [
        ({"email": "email", "phone": "phone", "default_phone_region": "FR"}, True, ["email_validator", "phonenumbers"]),
        ({"email": "email"}, True, ["email_validator"]),
        ({"language": "language", "timezone": "tz"}, False, []),
    ],
    ids=["email and phone", "email", "neither"],
)
def test_a_mapper_warms_the_validators_its_fields_load_on_first_use(
    mapping: dict[str, str], started: bool, after: list[str]
) -> None:
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _WARMED, json.dumps(mapping)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    found = json.loads(done.stdout)
    assert found["before"] == []  # building the mapper imports neither
    assert (found["started"], found["after"]) == (started, after)
