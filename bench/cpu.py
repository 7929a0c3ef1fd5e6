"""Who used the CPU while a figure ran: the benchmark and its servers, everyone else (Linux only).

On a small machine another process's test run can halve a figure, so every figure
records how many cores' worth of CPU other processes used meanwhile. Reads /proc:
the machine's busy time from ``/proc/stat``, each process's from ``/proc/<pid>/stat``;
all in the same clock ticks.

"Ours" is the benchmark's whole process tree: the servers it started, and their
children (our server runs every model in a worker process of its own). Each live
process counts its own time plus that of its children already reaped, so a worker
that exits during a figure (an unload) moves its time to its parent instead of
losing it to "others".
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _machine_busy_ticks() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]  # everything but idle and iowait


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _process_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    # utime + stime (all threads) + cutime + cstime (children reaped by this process)
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_ticks(root: int) -> int:
    """CPU ticks of ``root``'s process tree (see the module docstring)."""
    total = 0
    for pid in process_tree(root):
        try:
            total += _process_ticks(pid)
        except (OSError, ValueError, IndexError):
            continue  # exited between the listing and the read
    return total


class CpuMeter:
    """Cores used between ``start`` and ``stop``: by the trees of ``roots``, and by every other process."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self._start: tuple[float, int, int] | None = None

    def _read(self) -> tuple[float, int, int]:
        return time.monotonic(), _machine_busy_ticks(), sum(tree_ticks(root) for root in self.roots)

    def start(self) -> None:
        try:
            self._start = self._read()
        except (OSError, ValueError, IndexError):
            self._start = None  # not Linux: nothing to report

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


def wait_idle(root: int, below: float = 0.1, window: float = 0.2, limit: float = 5.0) -> float:
    """Wait until ``root``'s tree uses under ``below`` cores over ``window`` seconds, or ``limit``
    seconds have passed; returns the seconds waited.

    Used where a server keeps working after answering (our server starts its next spare
    worker after a load), so that work does not land on the other side's measurement.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        meter = CpuMeter([root])
        meter.start()
        time.sleep(window)
        used = meter.stop()
        if used is None or used["ours"] < below:
            break
    return time.monotonic() - started
