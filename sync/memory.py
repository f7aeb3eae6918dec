"""Keep a run's resident memory near what it holds, not what it once held.

A function instance is sized, and billed, by its peak memory, and the engine's working set is
small (a batch at a time, the stored fingerprints as columns). What grows a long run's
resident set is memory already freed but kept by allocators for reuse:

- pyarrow's default pool (mimalloc in the wheels) keeps freed pages of every batch it built;
  the C library's allocator returns them as soon as the batch is released
  (:func:`use_system_arrow_pool`);
- glibc keeps freed heap below its top and in per-thread arenas until asked to give it back
  (:func:`release_free_memory`, called between stages and every few batches of the stream);
- glibc also raises its mmap threshold each time a large block is freed (up to 32 MB), after
  which the multi-megabyte request bodies and Arrow buffers of the stream are carved from
  the heap and fragment it, and it opens up to eight arenas a core for the worker threads.
  :func:`tune_allocators` fixes the threshold and caps the arenas.

Python's cycle collector is eased while a run streams (:func:`collector_eased`): with its
default threshold it ran about every 700 container objects a batch allocates, walking the
young objects each time and, every so often, the whole heap (the imported modules and their
schemas, ~70,000 objects) for the few cycles a run makes; about 1.2 µs a row of a full load.

Neither changes what is computed. ``docs/how-a-run-works.md`` ("Memory") gives the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

import pyarrow as pa

# glibc's mallopt() parameters (<malloc.h>).
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8
# Blocks from this size up get pages of their own, returned to the OS when freed. Fixing it
# also turns off glibc's dynamic threshold. A 2,048-row Arrow column stays below it; a
# request body (~2.8 MB) and a batch's payloads (~2 MB) are above it.
MMAP_THRESHOLD_BYTES: Final = 256 * 1024
# Arenas for every thread of the process: the event loop's, the mapping thread's, the
# journal's and DuckDB's. glibc's default (8 a core) keeps each one's freed memory apart.
ARENA_MAX: Final = 2


def use_system_arrow_pool() -> None:
    """Make pyarrow allocate from the C library's allocator (idempotent)."""
    pool = pa.system_memory_pool()
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)


def tune_allocators() -> bool:
    """pyarrow on the C library's allocator, and glibc's mmap threshold and arenas fixed.

    Process-wide and idempotent; called when a run starts (``docs/how-a-run-works.md``,
    "Memory").

    Returns:
        Whether glibc took both settings (False elsewhere: musl, macOS).
    """
    use_system_arrow_pool()
    libc = _glibc()
    if libc is None:
        return False
    # mallopt() returns 1 on success; both are set whatever the other returned.
    taken = [libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), libc.mallopt(_M_ARENA_MAX, ARENA_MAX)]
    return taken == [1, 1]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it alone has ``malloc_trim`` and these mallopt knobs)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - musl has no malloc_trim: not glibc
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_trim() -> Callable[[int], int] | None:
    libc = _glibc()
    if libc is None:
        return None
    trim: Callable[[int], int] = libc.malloc_trim
    return trim


def release_free_memory() -> None:
    """Hand memory the C allocator holds but nobody uses back to the OS (glibc; else a no-op).

    Costs a walk of the heap (milliseconds), so it is called between stages and every few
    thousand rows, never per row.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# While a run streams, the youngest generation is collected every this many container objects
# (Python's default: 700). The objects a batch builds are freed by reference counting as soon
# as the batch is done; the collector only has the rare cycle to find, and a larger young
# generation costs at most a few megabytes between two collections.
EASED_YOUNG_THRESHOLD: Final = 10_000


class _CollectorEasing:
    """How many streams ease the collector now, and the thresholds to restore after the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.saved: tuple[int, int, int] | None = None


_easing: Final = _CollectorEasing()


@contextmanager
def collector_eased() -> Iterator[None]:
    """Python's cycle collector, eased for the duration (the module docstring says why).

    Every object alive on entry (the imported modules, the run's setup) is frozen out of the
    collector's walks (:func:`gc.freeze`), and the young generation is collected every
    :data:`EASED_YOUNG_THRESHOLD` container objects. On the last exit the objects are handed
    back to the collector (:func:`gc.unfreeze`, so a warm process that runs again leaks
    nothing) and the thresholds restored. Reentrant and thread-safe: concurrent runs in one
    process share one easing.
    """
    with _easing.lock:
        if _easing.holders == 0:
            _easing.saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(EASED_YOUNG_THRESHOLD, *_easing.saved[1:])
        _easing.holders += 1
    try:
        yield
    finally:
        with _easing.lock:
            _easing.holders -= 1
            if _easing.holders == 0 and _easing.saved is not None:
                gc.set_threshold(*_easing.saved)
                gc.unfreeze()
                _easing.saved = None
