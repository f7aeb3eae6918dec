"""sync.memory: the allocator settings a run starts with."""

from __future__ import annotations

import platform
import subprocess
import sys

import pyarrow as pa
import pytest

from sync.memory import release_free_memory, tune_allocators

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
