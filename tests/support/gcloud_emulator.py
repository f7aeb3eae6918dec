"""Start and stop an official Google Cloud CLI emulator (Firestore, Pub/Sub) for tests.

Why it is done this way (ARCHITECTURE.md §7):

* ``gcloud ... emulators X start`` is a Python wrapper that runs a Java server. Killing the
  wrapper leaves the Java child alive and holding the port, so the emulator is started with
  ``start_new_session=True`` (``setsid``) and stopped by signalling the whole process group.
* A scratch ``CLOUDSDK_CONFIG`` keeps the run away from the user's gcloud configuration (no
  account, no state written into ``~/.config/gcloud``), and
  ``CLOUDSDK_CORE_DISABLE_PROMPTS=1`` makes sure nothing waits for a keyboard.
* The ``*_EMULATOR_HOST`` variable is removed from the emulator's own environment and never
  set globally in the test process: it would silently redirect every client created later.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar, Final

DEFAULT_PROJECT: Final = "test-proj"
_LOG_TAIL_BYTES: Final = 4000


class EmulatorError(RuntimeError):
    """The emulator could not start or refused a request (the message carries its log tail)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GcloudEmulator:
    """One emulator process group on 127.0.0.1. Subclasses say which emulator and how to use it.

    Args:
        project: The project id the emulator serves (any string works).
        start_timeout: Seconds to wait for the emulator to answer before giving up.
    """

    label: ClassVar[str] = "gcloud"
    host_variable: ClassVar[str] = ""

    def __init__(self, project: str = DEFAULT_PROJECT, *, start_timeout: float = 60.0) -> None:
        self.project = project
        self.start_timeout = start_timeout
        self.port = 0
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None

    def command(self, gcloud: str, workdir: Path) -> list[str]:
        """The gcloud command line that starts this emulator on ``self.host``."""
        raise NotImplementedError

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the value for the emulator's ``*_EMULATOR_HOST`` variable."""
        return f"127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        """The last few KB of the emulator's combined stdout/stderr."""
        if self._log_path is None or not self._log_path.exists():
            return "(no emulator log)"
        return self._log_path.read_bytes()[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    def start(self) -> None:
        """Start the emulator and wait until it answers.

        Raises:
            EmulatorError: gcloud is missing, the process exited, or it did not answer
                within ``start_timeout`` (the process group is stopped first).
        """
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise EmulatorError(f"the Google Cloud CLI ('gcloud') is not on PATH; it ships the {self.label} emulator")
        self._workdir = Path(tempfile.mkdtemp(prefix=f"cepsync-{self.label.lower().replace('/', '')}-emulator-"))
        self._log_path = self._workdir / "emulator.log"
        config_dir = self._workdir / "gcloud-config"
        config_dir.mkdir()
        env = dict(os.environ)
        env.update(CLOUDSDK_CONFIG=str(config_dir), CLOUDSDK_CORE_DISABLE_PROMPTS="1")
        env.pop(self.host_variable, None)
        self.port = free_port()
        started = time.monotonic()
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.command(gcloud, self._workdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._workdir,
                start_new_session=True,  # own process group: stop() must reach the Java child
            )
        # Registered now, so an interpreter exit (Ctrl-C twice, a crash of the test runner)
        # still stops the Java server.
        atexit.register(self.stop)
        deadline = started + self.start_timeout
        while True:
            if self._process.poll() is not None:
                code, tail = self._process.returncode, self.log_tail()
                self.stop()
                raise EmulatorError(f"{self.label} emulator exited with code {code} before answering:\n{tail}")
            if self._answers():
                self.startup_seconds = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise EmulatorError(
                    f"{self.label} emulator did not answer on {self.host} within {self.start_timeout:.0f}s:\n{tail}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:  # URLError, ConnectionError and TimeoutError are OSErrors
            return False

    def stop(self) -> None:
        """Stop the whole process group (gcloud, its shell and Java children); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            # The group leader is gone; make sure no straggler (the Java server) is left,
            # and wait until init has reaped the group so the port is free again.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        atexit.unregister(self.stop)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._log_path = None
