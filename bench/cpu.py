"""Who used the CPU while a figure ran: the benchmark, the server, everyone else (Linux only).

On a small machine another process's test run can halve a figure, so every figure
records how many cores' worth of CPU other processes used meanwhile. Reads /proc:
the machine's busy time from ``/proc/stat``, each of our processes' from
``/proc/<pid>/stat``; all in the same clock ticks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _machine_busy_ticks() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]  # everything but idle and iowait


def _process_ticks(pid: int) -> int:
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


class CpuMeter:
    """Cores used between ``start`` and ``stop``: by ``pids`` together, and by every other process."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start: tuple[float, int, int] | None = None

    def _read(self) -> tuple[float, int, int]:
        return time.monotonic(), _machine_busy_ticks(), sum(_process_ticks(pid) for pid in self.pids)

    def start(self) -> None:
        try:
            self._start = self._read()
        except (OSError, ValueError, IndexError):
            self._start = None  # not Linux, or a process already gone: nothing to report

    def stop(self) -> dict[str, float] | None:
        """``{"ours": cores, "others": cores}`` averaged over the interval, or None if unknown."""
        if self._start is None:
            return None
        try:
            end = self._read()
        except (OSError, ValueError, IndexError):
            return None
        seconds = end[0] - self._start[0]
        if seconds <= 0:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        machine, ours = (end[1] - self._start[1]) / tick, (end[2] - self._start[2]) / tick
        return {"ours": round(ours / seconds, 2), "others": round(max(0.0, machine - ours) / seconds, 2)}


def cores_busy(seconds: float = 0.5) -> float | None:
    """Cores' worth of CPU the whole machine used over the next ``seconds`` (None if unknown)."""
    meter = CpuMeter([])
    meter.start()
    time.sleep(seconds)
    used = meter.stop()
    return None if used is None else used["others"]
