"""From token bytes to text deltas: incremental UTF-8 and stop strings with holdback."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Finds stop strings in streamed text, holding back only what could begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None  # the stop string that was hit (the first one in the text)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return what is safe to emit and whether a stop string was hit."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.pending = self.pending[:at], ""
            return out, True
        keep = self._partial_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Token bytes in, safe text out: never splits a multi-byte character, never leaks a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)
        self.decoded = 0  # characters decoded so far, emitted or held back
        self.emitted = 0  # characters handed out so far

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; return the text now safe to emit and whether a stop string was hit."""
        text = self._decoder.decode(piece)
        self.decoded += len(text)
        out, stopped = self._stops.feed(text)
        self.emitted += len(out)
        return out, stopped

    @property
    def stop(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stops.matched

    def flush(self) -> str:
        """What is held back at the end (an incomplete character becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        self.decoded += len(text)
        out, _ = self._stops.feed(text)
        out += self._stops.flush()
        self.emitted += len(out)
        return out
