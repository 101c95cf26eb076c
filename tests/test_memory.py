"""A node's peak memory over a stretch of work (fedprune.memory)."""

import numpy as np

from fedprune.memory import PeakMemory


def test_the_peak_counts_memory_held_and_freed_in_between():
    memory = PeakMemory()
    if memory.start_kb is None:  # no /proc here: it says so, it does not guess
        assert memory.above_start_mb() is None
        return
    block = np.ones(40_000_000 // 8)  # 40 MB, touched
    del block
    assert memory.above_start_mb() >= 35
    again = PeakMemory()  # a new stretch starts from what the process holds now
    assert again.above_start_mb() < 35
