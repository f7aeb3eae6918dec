"""The deployment docs list what the code reads and answers (docs/function.md)."""

from __future__ import annotations

import re
from pathlib import Path

from sync.function import ANSWERED_STATUSES

ROOT = Path(__file__).resolve().parent.parent
FUNCTION_DOC = (ROOT / "docs" / "function.md").read_text(encoding="utf-8")


def test_every_cepsync_variable_of_the_code_and_infra_is_documented() -> None:
    sources = [*ROOT.joinpath("sync").rglob("*.py"), ROOT / "main.py", *ROOT.joinpath("infra").glob("*.tf")]
    names = set()
    for path in sources:
        names |= set(re.findall(r"CEPSYNC_[A-Z][A-Z_]*[A-Z]", path.read_text(encoding="utf-8")))
    names.discard("CEPSYNC_FIRESTORE")  # the family CEPSYNC_FIRESTORE_* named in a help text
    assert "CEPSYNC_STATE" in names
    undocumented = sorted(name for name in names if f"`{name}`" not in FUNCTION_DOC)
    assert undocumented == []


def test_every_http_status_of_http_sync_is_documented() -> None:
    for status in ANSWERED_STATUSES:
        code = status.http_status
        assert re.search(rf"^\| {code} \| [^|]*`{status}`", FUNCTION_DOC, re.MULTILINE), (status, code)
    assert "| 503 |" in FUNCTION_DOC
    assert "Idempotency-Key" in FUNCTION_DOC


def test_the_readme_links_only_files_of_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if target.startswith("http"):
            continue
        assert (ROOT / target).exists(), target
    assert "../shared" not in readme


def test_the_license_is_an_spdx_string_with_its_file() -> None:
    """setuptools deprecates ``license = {text = ...}`` (issue 19, item 29): an SPDX string and the file."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"
    for name in project["project"]["license-files"]:
        assert (ROOT / name).is_file(), name
    # PEP 639 metadata needs setuptools 77 or later in the isolated build.
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in project["build-system"]["requires"])


def test_the_quick_start_says_what_make_test_needs_and_how_long_things_take() -> None:
    """Issue 19, item 27: it said only "Python ≥ 3.11 and make"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    text = " ".join(quick_start.split())
    for needed in ("Python ≥ 3.11", "`sudo`", "`apt-get`", "Python 3.13", "`gcloud`", "Java", "root"):
        assert needed in text, needed
    assert "scripts/check-prerequisites.sh" in text
    assert (ROOT / "scripts" / "check-prerequisites.sh").is_file()
    assert re.search(r"It took \d+ min \d+ s the first time .*?, then \d+ s\.", text)
    assert "10–13 minutes" in text
