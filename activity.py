"""Recent generation activity per model, for the status page's live charts.

A small bounded ring per model of the completions that ended in the last few minutes:
when, how many tokens, how long, the time to the first token. Summaries are computed
from it on demand (tokens per second per time bucket, the last and the median time to
first token). Nothing is stored anywhere else and nothing outlives the process.

Concurrency: completions are recorded from request threads and summaries read from
``/admin/stats``; one lock guards the rings, held only for list work (no I/O).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW_SECONDS = 300  # how far back the charts go
BUCKET_SECONDS = 10  # one chart point per bucket
PER_MODEL = 1000  # completions kept per model at most (a busy model's ring drops its oldest)


@dataclass(frozen=True)
class Completion:
    """One finished completion, as the ring keeps it."""

    ended: float  # wall clock
    tokens: int
    seconds: float  # request to end
    first_token_seconds: float | None  # request to first token; None when nothing was generated


class ActivityLog:
    """Recent completions per model, bounded in time and count."""

    def __init__(self, window: float = WINDOW_SECONDS, bucket: float = BUCKET_SECONDS, per_model: int = PER_MODEL,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.bucket = bucket
        self._per_model = per_model
        self._clock = clock
        self._lock = threading.Lock()
        self._rings: dict[str, deque[Completion]] = {}

    def record(self, model: str, completion_tokens: int, first_token_seconds: float | None, seconds: float) -> None:
        """Note one finished completion of ``model`` (its generated tokens, time to first token, duration)."""
        entry = Completion(self._clock(), max(0, completion_tokens), max(0.0, seconds), first_token_seconds)
        with self._lock:
            ring = self._rings.get(model)
            if ring is None:
                ring = self._rings[model] = deque(maxlen=self._per_model)
            ring.append(entry)

    def summary(self) -> dict[str, Any]:
        """Every model with completions in the window: tokens per second per bucket (oldest
        first; the current bucket over its elapsed part), and the time to first token."""
        now = self._clock()
        start = self._first_bucket_start(now)
        with self._lock:
            self._forget_older_than(now - self.window - self.bucket)
            recent = {model: [c for c in ring if c.ended >= start] for model, ring in self._rings.items()}
        models = {model: self._model_summary(entries, start, now) for model, entries in recent.items() if entries}
        return {"window_seconds": self.window, "bucket_seconds": self.bucket, "start": round(start, 3),
                "models": models}

    def _first_bucket_start(self, now: float) -> float:
        current = math.floor(now / self.bucket) * self.bucket
        return current - (self.buckets - 1) * self.bucket

    @property
    def buckets(self) -> int:
        """Points per chart."""
        return max(1, round(self.window / self.bucket))

    def _forget_older_than(self, horizon: float) -> None:
        """Caller holds the lock. Drops what no chart shows any more, and rings left empty
        (a model that was removed or has been quiet)."""
        for model in list(self._rings):
            ring = self._rings[model]
            while ring and ring[0].ended < horizon:
                ring.popleft()
            if not ring:
                del self._rings[model]

    def _model_summary(self, entries: list[Completion], start: float, now: float) -> dict[str, Any]:
        tokens = [0.0] * self.buckets
        for entry in entries:
            self._spread(entry, start, tokens)
        current_elapsed = max(1.0, now - (start + (self.buckets - 1) * self.bucket))
        rates = [t / self.bucket for t in tokens[:-1]] + [tokens[-1] / current_elapsed]
        ttfts = [e.first_token_seconds for e in entries if e.first_token_seconds is not None]
        last = entries[-1]
        decode = last.seconds - (last.first_token_seconds or 0.0)
        return {
            "tokens_per_second": [round(r, 2) for r in rates],
            "completions": len(entries),
            "tokens": sum(e.tokens for e in entries),
            "ttft_seconds": {"last": _round(ttfts[-1] if ttfts else None),
                             "median": _round(statistics.median(ttfts) if ttfts else None)},
            "last": {"ended": round(last.ended, 3), "tokens": last.tokens, "seconds": round(last.seconds, 3),
                     "tokens_per_second": round(last.tokens / decode, 2) if last.tokens and decode > 0 else None},
        }

    def _spread(self, entry: Completion, start: float, tokens: list[float]) -> None:
        """Add ``entry``'s tokens to the buckets its generation overlapped, evenly over its
        generating time (from its first token to its end)."""
        if not entry.tokens:
            return
        generating = max(0.0, entry.seconds - (entry.first_token_seconds or 0.0))
        begin, end = entry.ended - generating, entry.ended
        if generating <= 0:
            index = int((end - start) // self.bucket)
            if 0 <= index < len(tokens):
                tokens[index] += entry.tokens
            return
        first = max(0, int((begin - start) // self.bucket))
        last = min(len(tokens) - 1, int((end - start) // self.bucket))
        for index in range(first, last + 1):
            low = start + index * self.bucket
            overlap = min(end, low + self.bucket) - max(begin, low)
            if overlap > 0:
                tokens[index] += entry.tokens * overlap / generating


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
