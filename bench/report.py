"""What a run leaves behind: a table on stdout and one JSON file per figure.

The JSON holds every sample, not only the medians, plus the machine and the settings,
so two runs (or two servers) can be compared later without re-running anything.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, TextIO

import llama_cpp

from bench.stats import Row
from bench.workspace import ROOT

COLUMNS = ("figure", "model", "unit", "A", "B", "A median", "B median", "A/B", "A-B", "target", "met", "others")


def machine() -> dict[str, Any]:
    """The facts that make figures comparable: cores, CPU, versions, the commit."""
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "commit": _git(["rev-parse", "--short", "HEAD"]),
        # The working tree differs from the commit (tracked files only): the figures are of neither.
        "dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_json(directory: Path, figure: str, rows: list[Row], context: dict[str, Any],
               skipped: str | None = None) -> Path:
    """Write ``<directory>/<figure>.json``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {"figure": figure, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                **context, "skipped": skipped, "rows": [row.to_json() for row in rows]}
    path = directory / f"{figure}.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def print_table(rows: list[Row], skipped: dict[str, str], header: str, out: TextIO) -> None:
    """The rows as an aligned text table, then the figures not run or failed, and why.

    ``others`` is the cores' worth of CPU that other processes used while the figure ran.
    """
    cells = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    out.write(header + "\n\n")
    for index, line in enumerate(cells):
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * width for width in widths) + "\n")
    for figure, reason in skipped.items():
        out.write(f"{figure}: {reason}\n")
    out.flush()


def _cells(row: Row) -> tuple[str, ...]:
    met = {None: "-", True: "yes", False: "NO"}[row.met]
    return (row.figure, row.model, row.unit, row.a_label, row.b_label, _num(row.a_median), _num(row.b_median),
            f"{row.ratio:.3f}", _num(row.diff), row.target.describe() if row.target else "report", met,
            "?" if row.cpu is None else f"{row.cpu['others']:.2f}")


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
