"""The child of bench_firestore.py: one engine run on SQLite or Firestore state, measured.

    python bench/engine_child.py --_child run SPEC.json

A script of its own, not a mode of bench_firestore.py, because it runs the engine of any
commit: bench_firestore.py puts a baseline's checkout first on ``PYTHONPATH``, and that
commit has no Firestore bench of its own. So this file imports only the standard library
and measured_run at the top, and then only what every engine since a0d5929 has:
``sync.engine.Run``, ``sync.runtime``, ``sync.config.parse_activation`` and the two state
stores. Newer counters (``contention_retries``, ``document_writes()``) are read when the
store has them.

The Firestore store runs on a real client connected to the emulator the spec names. The
child also notes every document each successful commit RPC of that client wrote
(:class:`CommitTap`), so the hottest document's write rate is known for engines whose
store does not count it itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from measured_run import child_main

WINDOW_SHORT_SECONDS = 1.0
WINDOW_SUSTAINED_SECONDS = 10.0


def open_state(spec: dict[str, Any]) -> tuple[Any, Callable[[], dict[str, Any]]]:
    """The state store ``spec["state"]`` names, and what to read from it after the run."""
    state = spec["state"]
    if state["kind"] == "sqlite":
        from sync.state.sqlite import SQLiteStateStore

        sqlite = SQLiteStateStore(state["path"])
        return sqlite, lambda: {"sqlite": sqlite.stats() if hasattr(sqlite, "stats") else None}
    if state["kind"] != "firestore":
        raise SystemExit(f"unknown state kind {state['kind']!r}")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    from sync.state.firestore import FirestoreStateStore

    # The client finds the emulator through this variable when it is built; this process
    # talks to no other Firestore.
    os.environ["FIRESTORE_EMULATOR_HOST"] = state["host"]
    client = firestore.Client(project=state["project"], credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]  # google-auth is unannotated
    tap = CommitTap(client)
    store = FirestoreStateStore(client, prefix=state["prefix"], close_client=True)

    def counters() -> dict[str, Any]:
        document_writes = getattr(store, "document_writes", None)
        return {
            "ops": store.op_counts(),
            "document_writes": document_writes() if callable(document_writes) else None,
            "observed_document_writes": tap.summary(),
        }

    return store, counters


class CommitTap:
    """Every document a successful commit RPC of one Firestore client wrote, and when.

    Every write the store makes goes through the client's ``commit`` RPC (transactions and
    write batches) or ``batch_write`` (BulkWriter), so wrapping those two methods of the
    client's API object sees them all, the same way for any engine. A commit that fails
    (contention aborts it) wrote nothing and is not counted.
    """

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self._writes: list[tuple[float, str]] = []
        # The generated API client every write of the google-cloud-firestore client goes
        # through; a private attribute, fine for a bench that pins its client library.
        api = client._firestore_api
        api.commit = self._tapped(api.commit, lambda response, count: [True] * count)
        api.batch_write = self._tapped(api.batch_write, lambda response, count: [s.code == 0 for s in response.status])

    def _tapped(self, rpc: Callable[..., Any], applied: Callable[[Any, int], list[bool]]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            response = rpc(*args, **kwargs)
            request = kwargs.get("request") or (args[0] if args else None) or {}
            writes = request.get("writes", ()) if isinstance(request, dict) else request.writes
            now = time.monotonic()
            names = [
                document_of(write) for write, ok in zip(writes, applied(response, len(writes)), strict=False) if ok
            ]
            with self._lock:
                self._writes.extend((now, name) for name in names)
            return response

        return call

    def summary(self) -> dict[str, Any]:
        """The figures of :func:`write_rate_summary` over everything written so far."""
        with self._lock:
            return write_rate_summary(list(self._writes))


def document_of(write: Any) -> str:
    """The path (below ``documents/``) of the document one ``Write`` message sets or deletes."""
    message = getattr(write, "_pb", write)  # proto-plus wrapper or raw protobuf
    operation = message.WhichOneof("operation")
    name: str = (
        message.update.name
        if operation == "update"
        else message.transform.document
        if operation == "transform"
        else getattr(message, operation)
    )
    return name.split("/documents/", 1)[-1]


def write_rate_summary(writes: list[tuple[float, str]]) -> dict[str, Any]:
    """The hottest document of ``(time, document)`` writes, as ``document_writes()`` reports it.

    ``peak_writes_1s``: the most writes any one document received within any 1-second
    window; ``peak_writes_per_second_10s``: the most any one document received within any
    10-second window, divided by 10 (Firestore's guidance is about one sustained write per
    second per document).
    """
    times: dict[str, list[float]] = {}
    for at, name in writes:
        times.setdefault(name, []).append(at)
    if not times:
        return {
            "writes": 0,
            "documents": 0,
            "hottest": None,
            "hottest_writes": 0,
            "peak_writes_1s": 0,
            "peak_writes_per_second_10s": 0.0,
        }
    hottest = max(times, key=lambda name: len(times[name]))
    return {
        "writes": len(writes),
        "documents": len(times),
        "hottest": hottest,
        "hottest_writes": len(times[hottest]),
        "peak_writes_1s": max(_most_in_window(sorted(t), WINDOW_SHORT_SECONDS) for t in times.values()),
        "peak_writes_per_second_10s": round(
            max(_most_in_window(sorted(t), WINDOW_SUSTAINED_SECONDS) for t in times.values())
            / WINDOW_SUSTAINED_SECONDS,
            2,
        ),
    }


def _most_in_window(times: list[float], width: float) -> int:
    """The most of the sorted ``times`` that fall within one window ``[t, t + width)``."""
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--_child", nargs=2, metavar=("KIND", "SPEC"), required=True, help=argparse.SUPPRESS)
    kind, spec_path = parser.parse_args(argv)._child
    if kind != "run":
        raise SystemExit(f"unknown child kind {kind!r}")
    return child_main(spec_path, open_state)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
