"""Start and stop the local BigQuery emulator (PyPI ``local-bigquery``) for tests.

The emulator lives in ``.venv-bq`` (Python 3.13, see scripts/install-bigquery-emulator.sh) and
is reached over REST and gRPC only, so the tests run the real google-cloud-bigquery client in
the project's own virtualenv against it.

It runs in its own session (``setsid``) and is stopped by process group, so a worker thread or
child it starts cannot outlive the test session. A failure to start is loud (``pytest.fail``
with the tail of its log): a test that needs BigQuery must never pass by being skipped.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery_storage import BigQueryReadClient
from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

from sync.bigquery_clients import GRPC_CHANNEL_OPTIONS

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-bigquery-emulator.sh"
VENV = Path(os.environ.get("CEPSYNC_BQ_VENV", REPO_ROOT / ".venv-bq"))
LAUNCHER = VENV / "bin" / "cepsync-bigquery-emulator"
PROJECT = "cepsync-test"
# The first request opens DuckDB and attaches the catalog (about 1-3 s on 2 cores); a cold
# CI machine may be slower. Past this the emulator is broken, not slow.
READY_TIMEOUT_SECONDS = 60.0
INSTALL_TIMEOUT_SECONDS = 900.0


@dataclass
class BigQueryEmulator:
    """A running emulator: where it listens, and factories for clients pointed at it."""

    rest_url: str
    grpc_address: str
    project: str
    log_path: Path
    process: subprocess.Popen[bytes]
    start_seconds: float
    _channels: list[grpc.Channel] = field(default_factory=list)

    def client(self, project: str | None = None) -> bigquery.Client:
        """A real ``bigquery.Client`` on the emulator's REST endpoint, without credentials."""
        return bigquery.Client(
            project=project or self.project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.rest_url},
        )

    def read_client(self, *, options: Sequence[tuple[str, int]] = GRPC_CHANNEL_OPTIONS) -> BigQueryReadClient:
        """A real Storage Read API client on an insecure gRPC channel to the emulator.

        ``options`` default to the ones cepsync's own channels use (no message size limit);
        a test that needs gRPC's stock 4 MiB receive limit passes its own.
        """
        channel = grpc.insecure_channel(self.grpc_address, options=list(options))
        self._channels.append(channel)
        return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))  # type: ignore[no-untyped-call]

    def log_tail(self, lines: int = 40) -> str:
        return read_log_tail(self.log_path, lines)

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()


def read_log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def ensure_installed() -> None:
    """Run the install script (a fast no-op when .venv-bq is up to date); fail loudly if it fails."""
    try:
        result = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{INSTALL_SCRIPT.name} did not finish in {INSTALL_TIMEOUT_SECONDS:.0f} s")
    if result.returncode != 0 or not LAUNCHER.exists():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        pytest.fail(f"{INSTALL_SCRIPT.name} failed (exit {result.returncode}):\n{tail}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_emulator(data_dir: Path, *, project: str = PROJECT) -> BigQueryEmulator:
    """Start the emulator on free ports and wait until both REST and gRPC answer."""
    ensure_installed()
    rest_port, grpc_port = free_port(), free_port()
    while grpc_port == rest_port:
        grpc_port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-emulator.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(LAUNCHER),
                "--host",
                "127.0.0.1",
                "--port",
                str(rest_port),
                "--grpc-port",
                str(grpc_port),
                "--project",
                project,
                "--data-dir",
                str(data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # setsid: stop the whole group later
        )
    emulator = BigQueryEmulator(
        rest_url=f"http://127.0.0.1:{rest_port}",
        grpc_address=f"127.0.0.1:{grpc_port}",
        project=project,
        log_path=log_path,
        process=process,
        start_seconds=0.0,
    )
    try:
        _wait_ready(emulator, deadline=started + READY_TIMEOUT_SECONDS)
    except BaseException:
        stop_emulator(emulator)
        raise
    emulator.start_seconds = time.monotonic() - started
    return emulator


def _wait_ready(emulator: BigQueryEmulator, *, deadline: float) -> None:
    # Listing datasets forces the lazy DuckDB start-up (extensions, catalog), so "ready" means
    # queries can run, not just that the port is open.
    url = f"{emulator.rest_url}/bigquery/v2/projects/{emulator.project}/datasets"
    last_error = "no answer"
    while True:
        if emulator.process.poll() is not None:
            pytest.fail(
                f"the BigQuery emulator exited with code {emulator.process.returncode} while starting:\n"
                f"{emulator.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - fixed http://127.0.0.1 URL
                if response.status == 200:
                    break
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last_error = f"HTTP {error.code}: {error.read()[:300]!r}"
        except OSError as error:
            last_error = str(error)
        if time.monotonic() > deadline:
            pytest.fail(
                f"the BigQuery emulator did not answer on {url} within {READY_TIMEOUT_SECONDS:.0f} s "
                f"(last: {last_error}):\n{emulator.log_tail()}"
            )
        time.sleep(0.1)
    channel = grpc.insecure_channel(emulator.grpc_address)
    try:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
    except grpc.FutureTimeoutError:
        pytest.fail(
            f"the BigQuery emulator's gRPC port {emulator.grpc_address} never became ready:\n{emulator.log_tail()}"
        )
    finally:
        channel.close()


def stop_emulator(emulator: BigQueryEmulator, *, grace_seconds: float = 10.0) -> None:
    """SIGTERM the emulator's process group, then SIGKILL what is left after ``grace_seconds``."""
    emulator.close_channels()
    process = emulator.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace_seconds)


@contextlib.contextmanager
def running_emulator(data_dir: Path, *, project: str = PROJECT) -> Iterator[BigQueryEmulator]:
    emulator = start_emulator(data_dir, project=project)
    try:
        yield emulator
    finally:
        stop_emulator(emulator)


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class InjectedFault:
    method: str
    path_contains: str
    status: int
    reason: str
    message: str
    times: int
    # Only requests whose body contains this text (a statement of a jobs.insert), after skipping
    # the first ``skip`` of them.
    body_contains: str | None = None
    skip: int = 0


class RecordingProxy:
    """A real HTTP reverse proxy on 127.0.0.1 in front of the emulator's REST API.

    It records every request (so a test can prove that a call was, or was not, made) and can
    answer chosen requests with BigQuery-shaped errors the emulator never produces (503, 403,
    ``bytesBilledLimitExceeded``), exercising the client's retries and our error mapping over
    real HTTP.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream_host = parsed.hostname or "127.0.0.1"
        self._upstream_port = parsed.port or 80
        self.requests: list[RecordedRequest] = []
        self._faults: list[InjectedFault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._record(self.command, self.path, body)
                if fault is not None:
                    payload = json.dumps(
                        {
                            "error": {
                                "code": fault.status,
                                "message": fault.message,
                                "errors": [{"reason": fault.reason, "message": fault.message, "domain": "global"}],
                            }
                        }
                    ).encode()
                    self._reply(fault.status, [("Content-Type", "application/json")], payload)
                    return
                connection = http.client.HTTPConnection(proxy._upstream_host, proxy._upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                    self._reply(response.status, kept, data)
                finally:
                    connection.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="bq-proxy", daemon=True)
        self._thread.start()

    def _record(self, method: str, path: str, body: bytes) -> InjectedFault | None:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, body))
            for fault in self._faults:
                if fault.times > 0 and fault.method == method and fault.path_contains in path:
                    if fault.body_contains is not None and fault.body_contains.encode() not in body:
                        continue
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    return fault
        return None

    def inject(
        self,
        method: str,
        path_contains: str,
        *,
        status: int,
        reason: str,
        message: str,
        times: int,
        body_contains: str | None = None,
        skip: int = 0,
    ) -> None:
        """Answer the next ``times`` matching requests with this BigQuery error instead of forwarding."""
        with self._lock:
            self._faults.append(
                InjectedFault(method, path_contains, status, reason, message, times, body_contains, skip)
            )

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()

    def client(self, project: str) -> bigquery.Client:
        return bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.url},
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade", "host"}
)


@dataclass
class GrpcFault:
    method: str
    code: grpc.StatusCode
    details: str
    times: int


class GrpcFaultProxy:
    """A real gRPC server on 127.0.0.1 in front of the emulator's Storage Read port.

    Every call is forwarded byte for byte (no message is decoded, so nothing of the protocol is
    re-implemented here), except the next ``times`` calls of a method given to :meth:`inject`,
    which are answered with that gRPC status instead: the errors BigQuery sends that the
    emulator never does (PERMISSION_DENIED, INVALID_ARGUMENT, quota RESOURCE_EXHAUSTED).
    """

    def __init__(self, upstream: str) -> None:
        self._channel = grpc.insecure_channel(upstream, options=list(GRPC_CHANNEL_OPTIONS))
        self._faults: list[GrpcFault] = []
        self._lock = threading.Lock()
        self.calls: list[str] = []
        proxy = self

        class Handler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no annotations
            def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                method: str = handler_call_details.method
                if method.endswith("/ReadRows"):  # the one server-streaming method of BigQueryRead
                    return grpc.unary_stream_rpc_method_handler(proxy._forward_stream(method))
                return grpc.unary_unary_rpc_method_handler(proxy._forward_unary(method))

        self._server = grpc.server(ThreadPoolExecutor(max_workers=8), options=list(GRPC_CHANNEL_OPTIONS))
        self._server.add_generic_rpc_handlers((Handler(),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self._server.start()

    def inject(self, method: str, code: grpc.StatusCode, details: str, *, times: int = 1) -> None:
        """Answer the next ``times`` calls whose method name ends with ``method`` with ``code``."""
        with self._lock:
            self._faults.append(GrpcFault(method, code, details, times))

    def _fault(self, method: str) -> GrpcFault | None:
        with self._lock:
            self.calls.append(method.rsplit("/", 1)[-1])
            for fault in self._faults:
                if fault.times > 0 and method.endswith(fault.method):
                    fault.times -= 1
                    return fault
        return None

    def _forward_unary(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            fault = self._fault(method)
            if fault is not None:
                context.abort(fault.code, fault.details)
            answer: bytes = self._channel.unary_unary(method)(request, metadata=context.invocation_metadata())
            return answer

        return forward

    def _forward_stream(self, method: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        def forward(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            fault = self._fault(method)
            if fault is not None:
                context.abort(fault.code, fault.details)
            yield from self._channel.unary_stream(method)(request, metadata=context.invocation_metadata())

        return forward

    def close(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()
