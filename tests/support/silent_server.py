"""A TCP server that accepts every connection and never answers: a stuck Batch host.

It reads what arrives (so the client's request is fully sent) and keeps each connection
open until it stops. Real sockets, in a thread, so a CLI run in the test's own thread meets it
as it would a live machine whose port hangs.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType


class SilentServer:
    """``with SilentServer() as server:`` listens on 127.0.0.1; ``server.base_url`` points at it."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        peers: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        with contextlib.suppress(BlockingIOError):
                            peer, _ = self._listener.accept()
                            peer.setblocking(False)
                            peers.append(peer)
                            self.connections += 1
                            selector.register(peer, selectors.EVENT_READ)
                        continue
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self.received += data
                    else:  # the client gave up: forget the connection, still say nothing
                        selector.unregister(sock)
                        sock.close()
        finally:
            selector.close()
            for peer in peers:
                with contextlib.suppress(OSError):
                    peer.close()
            self._listener.close()
