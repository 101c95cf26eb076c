"""A process's peak memory over a stretch of work, from Linux's /proc.

`PeakMemory()` resets the process's peak resident set (VmHWM, by writing 5 to
`/proc/self/clear_refs`) and notes the resident set (VmRSS) at that moment;
`above_start_mb()` is then the peak since, less that start: what the work in between held
at its most, including what the allocator kept and what the process loaded on first use.
Where /proc cannot do this (not Linux, a restricted container) the result is None, not a
guess.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {field}")


class PeakMemory:
    """The peak resident memory of this process from now on, above what it holds now."""

    def __init__(self) -> None:
        self.start_kb: int | None = None
        try:
            _CLEAR_REFS.write_text("5")  # reset VmHWM to the current VmRSS
            self.start_kb = _status_kb("VmRSS")
        except (OSError, ValueError):
            self.start_kb = None

    def above_start_mb(self) -> float | None:
        """MB (10^6 bytes) of the peak since the start above the resident set then; None
        where it cannot be measured."""
        if self.start_kb is None:
            return None
        try:
            peak_kb = _status_kb("VmHWM")
        except (OSError, ValueError):
            return None
        return max(0, peak_kb - self.start_kb) * 1024 / 1e6
