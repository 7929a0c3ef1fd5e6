"""Interleaved measurement, and the statistics a comparison reports.

Sides of a comparison run round-robin (A B A B ...), so drift in the machine (thermal,
page cache, a background job) lands on every side alike. Each round passes its index to
every side, so both sides of a pair do the same work (the same prompt, say). A
comparison reports each side's median and the median of the pairwise ratios and
differences, which cancel drift that the two medians alone would keep.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Sample = dict[str, float]
Side = Callable[[int], Sample]


def run_rounds(label: str, sides: dict[str, Side], rounds: int, warmup: int = 1) -> dict[str, list[Sample]]:
    """Run every side once per round, in order, after ``warmup`` unrecorded rounds."""
    samples: dict[str, list[Sample]] = {name: [] for name in sides}
    for index in range(-warmup, rounds):
        for name, side in sides.items():
            sample = side(index)
            if index >= 0:
                samples[name].append(sample)
        log.debug("%s: round %d of %d done", label, index + 1, rounds)
    return samples


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (q in 0..100): a value that was measured."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Target:
    """What a figure must reach: ``kind`` names the quantity compared with ``value``."""

    kind: str  # "ratio>=", "ratio<=", "diff<=" or "a<="
    value: float

    def describe(self) -> str:
        quantity, op = _TARGET_WORDS[self.kind]
        return f"{quantity} {op} {self.value:g}"

    def met(self, row: Row) -> bool:
        return _TARGET_CHECKS[self.kind](row, self.value)


@dataclass
class Row:
    """One comparison: side A against side B on one model, in one unit."""

    figure: str
    model: str
    unit: str
    a_label: str
    b_label: str
    a: list[float]
    b: list[float]
    target: Target | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] | None = None  # cores used meanwhile: {"ours": ..., "others": ...}

    @property
    def a_median(self) -> float:
        return statistics.median(self.a)

    @property
    def b_median(self) -> float:
        return statistics.median(self.b)

    @property
    def ratio(self) -> float:
        """Median of the pairwise ratios A/B."""
        return statistics.median(a / b if b else math.inf for a, b in zip(self.a, self.b, strict=True))

    @property
    def diff(self) -> float:
        """Median of the pairwise differences A-B."""
        return statistics.median(a - b for a, b in zip(self.a, self.b, strict=True))

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure, "model": self.model, "unit": self.unit,
            "a": {"label": self.a_label, "median": self.a_median, "samples": self.a},
            "b": {"label": self.b_label, "median": self.b_median, "samples": self.b},
            "ratio_median": self.ratio, "diff_median": self.diff,
            "target": self.target.describe() if self.target else None, "met": self.met, "notes": self.notes,
            "cpu_cores": self.cpu,
        }


_TARGET_WORDS = {"ratio>=": ("A/B", ">="), "ratio<=": ("A/B", "<="), "diff<=": ("A-B", "<="), "a<=": ("A", "<=")}
_TARGET_CHECKS: dict[str, Callable[[Row, float], bool]] = {
    "ratio>=": lambda row, value: row.ratio >= value,
    "ratio<=": lambda row, value: row.ratio <= value,
    "diff<=": lambda row, value: row.diff <= value,
    "a<=": lambda row, value: row.a_median <= value,
}


def compare(figure: str, model: str, unit: str, samples: dict[str, list[Sample]], a: str, b: str,
            key: str | tuple[str, str], target: Target | None = None) -> Row:
    """A row from two sides' samples; ``key`` names the measured value (one per side if a pair)."""
    key_a, key_b = (key, key) if isinstance(key, str) else key
    return Row(figure, model, unit, a, b, [s[key_a] for s in samples[a]], [s[key_b] for s in samples[b]],
               target)


def median_of(samples: list[Sample], key: str) -> float:
    """The median of one value across a side's samples."""
    return statistics.median(s[key] for s in samples)
