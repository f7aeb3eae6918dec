"""sync.memory: the allocator settings a run starts with."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
import weakref

import pyarrow as pa
import pytest

from sync.memory import EASED_YOUNG_THRESHOLD, collector_eased, release_free_memory, tune_allocators

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_tuning_puts_pyarrow_on_the_system_allocator_and_is_idempotent() -> None:
    first = tune_allocators()
    second = tune_allocators()
    assert pa.default_memory_pool().backend_name == "system"
    assert first == second == GLIBC
    release_free_memory()  # never raises, glibc or not


@pytest.mark.skipif(not GLIBC, reason="glibc's mmap threshold only")
def test_a_freed_request_sized_block_goes_back_to_the_os_after_tuning() -> None:
    """Untuned, glibc raises its mmap threshold when a 3 MB block is freed and carves the
    next ones from the heap, which keeps them; tuned, each one is mapped and unmapped."""
    probe = """
import sys
from sync.memory import tune_allocators
if sys.argv[1] == "tuned":
    tune_allocators()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
blocks = [bytearray(3_000_000) for _ in range(40)]  # 120 MB, mapped: above the default threshold
del blocks  # frees them: glibc now raises its threshold to 3 MB
blocks, kept = [], []
for _ in range(40):  # 120 MB again, each block followed by a small one that stays
    blocks.append(bytearray(3_000_000))
    kept.append(bytearray(100_000))
del blocks
print(rss())
"""
    resident = {
        mode: int(
            subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout
        )
        for mode in ("untuned", "tuned")
    }
    assert resident["untuned"] - resident["tuned"] > 60_000_000


def test_the_collector_is_eased_while_held_and_given_back_after_the_last_holder() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with collector_eased():
        assert gc.get_threshold() == (EASED_YOUNG_THRESHOLD, *before[1:])
        frozen = gc.get_freeze_count()
        assert frozen > 0  # the objects alive on entry are out of the collector's walks
        with collector_eased():  # a second run in the same process shares the easing
            assert gc.get_threshold()[0] == EASED_YOUNG_THRESHOLD
        assert gc.get_threshold()[0] == EASED_YOUNG_THRESHOLD  # still held by the outer one
        assert gc.get_freeze_count() == frozen
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0  # handed back: a warm process leaks no frozen garbage


def test_a_cycle_made_while_eased_is_collected_once_the_easing_ends() -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    with collector_eased():
        first, second = Node(), Node()
        first.other, second.other = second, first
        probe = weakref.ref(first)
        del first, second
    gc.collect()
    assert probe() is None
