"""Keep a run's resident memory near what it holds, not what it once held.

A function instance is sized, and billed, by its peak memory, and the engine's working set is
small (a batch at a time, the stored fingerprints as columns). What grows a long run's
resident set is memory already freed but kept by allocators for reuse:

- pyarrow's default pool (mimalloc in the wheels) keeps freed pages of every batch it built;
  the C library's allocator returns them as soon as the batch is released
  (:func:`use_system_arrow_pool`);
- glibc keeps freed heap below its top and in per-thread arenas until asked to give it back
  (:func:`release_free_memory`, called between stages and every few batches of the stream).

Neither changes what is computed. ``docs/how-a-run-works.md`` ("Memory") gives the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable

import pyarrow as pa


def use_system_arrow_pool() -> None:
    """Make pyarrow allocate from the C library's allocator (idempotent)."""
    pool = pa.system_memory_pool()
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


def release_free_memory() -> None:
    """Hand memory the C allocator holds but nobody uses back to the OS (glibc; else a no-op).

    Costs a walk of the heap (milliseconds), so it is called between stages and every few
    thousand rows, never per row.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
