"""infra/package.py: the Cloud Functions source zip, built for real and served by functions-framework."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_SCRIPT = REPO_ROOT / "infra" / "package.py"
PYTHON = sys.executable
# Development aids: the local Batch simulator and `cepsync demo`; never deployed.
DEV_PACKAGE = REPO_ROOT / "sync" / "dev"
DEV_MODULES = ("simulator.py", "demo.py", "demo_runner.py")
FUNCTIONS_FRAMEWORK = Path(sys.executable).with_name("functions-framework")
DEV_ONLY = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff", "mypy", "python-hcl2", "iniconfig"}
RUNTIME_MUST_HAVE = {
    "functions-framework",
    "google-cloud-bigquery",
    "google-cloud-bigquery-storage",
    "google-cloud-firestore",
    "pydantic",
    "aiohttp",
    "pyarrow",
}


@dataclass(frozen=True)
class Built:
    zip_path: Path
    stdout: str
    unpacked: Path


def _run_package(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(PACKAGE_SCRIPT), "--out", str(out), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("package")
    out = base / "dist" / "function-source.zip"
    completed = _run_package(out)
    assert completed.returncode == 0, f"package.py failed:\n{completed.stdout}\n{completed.stderr}"
    unpacked = base / "unpacked"
    with zipfile.ZipFile(out) as archive:
        archive.extractall(unpacked)
    return Built(zip_path=out, stdout=completed.stdout, unpacked=unpacked)


def _lock_lines() -> dict[str, str]:
    lines = {}
    for line in (REPO_ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if "==" in line:
            lines[line.split("==")[0].lower().replace("_", "-")] = line.strip()
    return lines


def test_zip_holds_entry_points_package_activations_and_requirements(built: Built) -> None:
    with zipfile.ZipFile(built.zip_path) as archive:
        names = archive.namelist()
    assert "main.py" in names
    assert "requirements.txt" in names
    assert any(name == "activations/" or name.startswith("activations/") for name in names)
    expected_modules = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "sync").rglob("*.py")
        if "__pycache__" not in path.parts and "tests" not in path.parts and not path.is_relative_to(DEV_PACKAGE)
    }
    assert expected_modules, "sync/ has no modules"
    assert expected_modules <= set(names), sorted(expected_modules - set(names))
    for name in names:
        assert "__pycache__" not in name, name
        assert not name.endswith((".pyc", ".pyo")), name
        assert "/tests/" not in name, name
        assert name.split("/", 1)[0] in {"main.py", "requirements.txt", "sync", "activations"}, name
    assert (built.unpacked / "main.py").read_bytes() == (REPO_ROOT / "main.py").read_bytes()


def test_zip_holds_neither_the_simulator_nor_the_demo(built: Built) -> None:
    assert {path.name for path in DEV_PACKAGE.glob("*.py")} >= set(DEV_MODULES), "the dev modules moved"
    with zipfile.ZipFile(built.zip_path) as archive:
        names = archive.namelist()
        sources = {name: archive.read(name).decode("utf-8") for name in names if name.endswith(".py")}
    assert not [name for name in names if name.startswith("sync/dev")]
    assert not [name for name in names if name.rsplit("/", 1)[-1] in DEV_MODULES]
    # By content too: a copy of either under another name would still ship.
    for name, text in sources.items():
        assert "class BatchSimulator" not in text, name
        assert "def run_demo" not in text, name
        assert "def generate_segment" not in text, name
    # -S: no site-packages, so the editable install of this checkout cannot supply sync.dev.
    probe = "import importlib.util, sync; print(sync.__file__); print(importlib.util.find_spec('sync.dev'))"
    completed = subprocess.run(
        [PYTHON, "-S", "-c", probe],
        cwd=built.unpacked,
        env={**os.environ, "PYTHONPATH": str(built.unpacked), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    sync_file, dev_spec = completed.stdout.strip().splitlines()
    assert Path(sync_file).resolve().is_relative_to(built.unpacked.resolve()), sync_file
    assert dev_spec == "None"


def test_activations_come_from_the_default_directory(built: Built) -> None:
    for candidate in (REPO_ROOT / "activations", REPO_ROOT / "examples" / "activations"):
        if candidate.is_dir():
            expected = sorted(p.name for p in [*candidate.glob("*.yaml"), *candidate.glob("*.yml")])
            source = candidate.relative_to(REPO_ROOT).as_posix()
            break
    else:
        expected, source = [], "(none: empty activations/)"
    packed = sorted(p.name for p in (built.unpacked / "activations").iterdir())
    assert packed == expected
    assert source in built.stdout


def test_summary_line_names_path_size_and_file_count(built: Built) -> None:
    with zipfile.ZipFile(built.zip_path) as archive:
        file_count = sum(1 for info in archive.infolist() if not info.is_dir())
    first_line = built.stdout.splitlines()[0]
    assert first_line == f"{built.zip_path} {built.zip_path.stat().st_size} bytes, {file_count} files"


def test_zip_is_deterministic(built: Built, tmp_path: Path) -> None:
    again = tmp_path / "again.zip"
    completed = _run_package(again)
    assert completed.returncode == 0, completed.stderr
    assert again.read_bytes() == built.zip_path.read_bytes()
    with zipfile.ZipFile(again) as archive:
        infos = archive.infolist()
    assert [info.filename for info in infos] == sorted(info.filename for info in infos)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {(info.external_attr >> 16) & 0o777 for info in infos if not info.is_dir()} == {0o644}


def test_requirements_are_the_pinned_runtime_closure(built: Built) -> None:
    lines = [
        line
        for line in (built.unpacked / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    lock = _lock_lines()
    names = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert len(names) == len(lines), "a requirement is listed twice"
    for line in lines:
        name = line.split("==")[0].lower().replace("_", "-")
        assert lock.get(name) == line, f"{line} is not the lock's pin"
    assert names >= RUNTIME_MUST_HAVE, sorted(RUNTIME_MUST_HAVE - names)
    assert not (DEV_ONLY & names), sorted(DEV_ONLY & names)


def test_entry_module_imports_from_the_unpacked_directory(built: Built) -> None:
    probe = (
        "import json, main, sync\n"
        "print(json.dumps({'sync': sync.__file__, 'main': main.__file__,"
        " 'pubsub': callable(main.pubsub_sync), 'http': callable(main.http_sync)}))\n"
    )
    completed = subprocess.run(
        [PYTHON, "-c", probe],
        cwd=built.unpacked,
        env={**os.environ, "PYTHONPATH": str(built.unpacked), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(found["sync"]).resolve().is_relative_to(built.unpacked.resolve()), found
    assert Path(found["main"]).resolve().is_relative_to(built.unpacked.resolve()), found
    assert found["pubsub"] is True
    assert found["http"] is True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_seconds: float) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(0.5)
            if client.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"functions-framework did not listen on {port} within {deadline_seconds} s")


def _post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback URL built here
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def test_functions_framework_serves_pubsub_sync_from_the_package(built: Built, tmp_path: Path) -> None:
    port = _free_port()
    log_path = tmp_path / "functions-framework.log"
    environment = {
        **os.environ,
        "PYTHONPATH": str(built.unpacked),
        "PYTHONDONTWRITEBYTECODE": "1",
        # Settings as deployed, but nothing here may reach a real Google API: the requests
        # below are rejected before any state or source is opened.
        "CEPSYNC_STATE": "firestore",
        "GOOGLE_CLOUD_PROJECT": "cepsync-package-test",
        "CEPSYNC_ACTIVATIONS_DIR": "activations",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(FUNCTIONS_FRAMEWORK),
                "--target=pubsub_sync",
                "--signature-type=cloudevent",
                "--host=127.0.0.1",
                f"--port={port}",
            ],
            cwd=built.unpacked,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for_port(port, process, deadline_seconds=60)
            assert process.poll() is None, log_path.read_text(errors="replace")

            # Not a CloudEvent at all: the framework, having loaded main.pubsub_sync as a
            # CloudEvent function, refuses it with 400 (an import failure never gets here:
            # the server would not start, or would answer 500 / 404 for a missing target).
            malformed_status, malformed_body = _post(
                port, b'{"not": "a cloud event"}', {"Content-Type": "application/json"}
            )

            # A well-formed Pub/Sub CloudEvent whose data is not the JSON we expect: the
            # function itself must acknowledge it (2xx, no retry storm) and log why.
            data = base64.b64encode(b"this is not json").decode()
            envelope = {"message": {"data": data, "messageId": "m-1"}, "subscription": "projects/p/subscriptions/s"}
            bad_data_status, _ = _post(
                port,
                json.dumps(envelope).encode(),
                {
                    "Content-Type": "application/json",
                    "ce-id": "m-1",
                    "ce-specversion": "1.0",
                    "ce-source": "//pubsub.googleapis.com/projects/p/topics/cepsync-sync",
                    "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
                },
            )
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    output = log_path.read_text(errors="replace")
    assert malformed_status == 400, output
    assert "cloudevent" in malformed_body.lower(), malformed_body
    assert 200 <= bad_data_status < 300, output
    assert "Traceback" not in output, output
    assert "ImportError" not in output, output
    error_lines = [line for line in output.splitlines() if line.startswith("{") and '"error"' in line]
    assert error_lines, f"the function did not log why it dropped the message:\n{output}"


def _activation(name: str) -> str:
    return (
        f"name: {name}\n"
        "source: {type: bigquery, project: acme-data, table: crm.segment}\n"
        "destination: {api_key_env: BATCH_REST_API_KEY, project_key_env: BATCH_PROJECT_KEY}\n"
        "mapping: {custom_id: user_id}\n"
        "schedule: {cron: '0 * * * *'}\n"
    )


def test_an_invalid_activation_stops_the_build(tmp_path: Path) -> None:
    activations = tmp_path / "activations"
    activations.mkdir()
    (activations / "good.yaml").write_text(_activation("good"))
    (activations / "bad.yaml").write_text(_activation("Bad Name"))
    out = tmp_path / "f.zip"
    completed = _run_package(out, "--activations", str(activations))
    assert completed.returncode == 1
    assert "bad.yaml" in completed.stderr
    assert "name" in completed.stderr
    assert not out.exists()


def test_an_explicit_activation_directory_is_packed_as_activations(tmp_path: Path) -> None:
    activations = tmp_path / "mine"
    activations.mkdir()
    (activations / "hourly.yaml").write_text(_activation("hourly"))
    (activations / "notes.txt").write_text("not packed\n")
    out = tmp_path / "f.zip"
    completed = _run_package(out, "--activations", str(activations))
    assert completed.returncode == 0, completed.stderr
    with zipfile.ZipFile(out) as archive:
        packed = [name for name in archive.namelist() if name.startswith("activations")]
        assert packed == ["activations/hourly.yaml"]
        assert archive.read("activations/hourly.yaml") == (activations / "hourly.yaml").read_bytes()
