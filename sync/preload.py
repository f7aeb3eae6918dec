"""Modules a run will need in a moment, imported now on a thread of their own.

A run that will send imports aiohttp at its first request (:mod:`sync.batch.transport`):
~0.2 s on this project's benchmark machine, TLS contexts included, spent between mapping
the last moved row and sending the first one. Begun on a thread as soon as the delta's pass
says something will be sent, the import overlaps the moved rows' queries, which run in
DuckDB without holding the GIL (``docs/how-a-run-works.md``, "Start-up"). A run with
nothing to send never starts it. Likewise the validators a mapper loads at its first value
(email-validator, phonenumbers: ~0.06 s), begun once the pass says rows will be mapped
(``ProfileMapper.warm``); a run with no row to map never imports them.

Python's import lock keeps this safe: a module another thread is importing is waited for,
never imported twice. Whatever goes wrong here is left for the real import to report.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading

__all__ = ["preload"]


def preload(*modules: str) -> threading.Thread | None:
    """Import ``modules`` on a daemon thread; None when every one is already imported."""
    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return None
    thread = threading.Thread(target=_import, args=(missing,), name="cepsync-preload", daemon=True)
    thread.start()
    return thread


def _import(modules: list[str]) -> None:
    for name in modules:
        with contextlib.suppress(Exception):  # the import where the module is used reports it
            importlib.import_module(name)
