"""A node's peak memory over a stretch of work (fedprune.memory)."""

import mmap

from fedprune.memory import PeakMemory


def test_the_peak_counts_memory_held_and_freed_in_between():
    memory = PeakMemory()
    if memory.start_kb is None:  # no /proc here: it says so, it does not guess
        assert memory.above_start_mb() is None
        return
    # 40 MB of fresh pages, touched, then handed back. An anonymous mapping, not a numpy
    # array: the allocator may serve an array from pages the process already holds (a
    # CI run of the whole suite once measured 0 MB above the start with one).
    block = mmap.mmap(-1, 40_000_000)
    block.write(b"\x01" * len(block))
    block.close()
    assert memory.above_start_mb() >= 35
    again = PeakMemory()  # a new stretch starts from what the process holds now
    assert again.above_start_mb() < 35
