"""The shared machinery of the streaming parsers: a buffer, marker scanning, and readers as generators.

A dialect's parser is written as a generator that reads its input front to back (``yield from
read_until(...)``, ``yield from choose(...)``) and yields whenever it needs more text than has
arrived. ``Parser.feed`` appends text and resumes it; ``Parser.finish`` sets ``Input.final`` and
resumes it once more, and no helper yields after that. Because every decision waits until the
text in hand settles it, the events do not depend on where the stream was cut.

Markers are found by one rule: the earliest match wins, the longest marker among those starting
there, and text is held back only while its tail could still become a marker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from functools import lru_cache

Reader = Generator[None, None, object]
NAME_LIMIT = 256  # a function name, a call id or a header longer than this is not one


class Refused(Exception):
    """The text after a call trigger is not a call this family's parser accepts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotACall(Exception):
    """Text that looked like it could start a call (a bare ``{``) turned out to be plain content."""


class Input:
    """The text received and not yet consumed; optionally records what is consumed (a call's raw text)."""

    def __init__(self) -> None:
        self.buf = ""
        self.final = False
        self._recording: list[str] | None = None

    def push(self, text: str) -> None:
        self.buf += text

    def take(self, count: int) -> str:
        """Consume ``count`` characters and return them."""
        text, self.buf = self.buf[:count], self.buf[count:]
        if self._recording is not None and text:
            self._recording.append(text)
        return text

    def record(self, prefix: str) -> None:
        """Start recording consumed text, beginning with ``prefix`` (the trigger already consumed)."""
        self._recording = [prefix]

    def checkpoint(self) -> None:
        """Forget what was recorded: it belongs to a call that closed well-formed."""
        if self._recording is not None:
            self._recording = []

    def recorded(self) -> str:
        """Stop recording and return the text recorded since ``record`` or the last ``checkpoint``."""
        text = "".join(self._recording or ())
        self._recording = None
        return text


class Markers:
    """A set of marker strings, compiled for ``split``."""

    def __init__(self, markers: Sequence[str]) -> None:
        ordered = sorted(set(markers), key=len, reverse=True)  # longest first: it wins at a shared start
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self.prefixes = {m[:k] for m in ordered for k in range(1, len(m))}
        self.longest = max(map(len, ordered), default=0)

    def split(self, text: str, final: bool) -> tuple[int, str | None]:
        """``(n, marker)``: ``text[:n]`` is plain text; ``marker`` (or None) starts at ``n``.

        With no marker, ``text[n:]`` is a tail that may still grow into one and must wait,
        unless ``final``.
        """
        found = self.pattern.search(text) if self.pattern else None
        if found is not None:
            if not final and text[found.start():] in self.prefixes:
                return found.start(), None  # a longer marker may still start here
            return found.start(), found.group()
        if final:
            return len(text), None
        for start in range(max(0, len(text) - self.longest + 1), len(text)):
            if text[start:] in self.prefixes:
                return start, None
        return len(text), None


@lru_cache(maxsize=256)
def markers(*strings: str) -> Markers:
    """The compiled ``Markers`` for ``strings`` (cached: each dialect asks for the same few sets)."""
    return Markers(strings)


def text_until(inp: Input, stops: Sequence[str], write: Callable[[str], None]) -> Reader:
    """Pass text to ``write`` as it arrives, up to the first of ``stops``; return that stop (consumed).

    Returns None when the input ended first.
    """
    scanner = markers(*stops)
    while True:
        end, marker = scanner.split(inp.buf, inp.final)
        if end:
            write(inp.take(end))
        if marker is not None:
            inp.take(len(marker))
            return marker
        if inp.final:
            return None
        yield


def read_until(inp: Input, stops: Sequence[str], limit: int = NAME_LIMIT) -> Reader:
    """``(text, stop)``: the text before the first of ``stops``, both consumed.

    Refuses a text longer than ``limit`` and one the input ends inside: a header or name
    that never ends is not a header, and holding it back would stall the stream.
    """
    parts: list[str] = []
    size = 0

    def keep(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)

    scanner = markers(*stops)
    while True:
        end, marker = scanner.split(inp.buf, inp.final)
        if size + end > limit:
            raise Refused(f"no {' or '.join(stops)} within {limit} characters")
        if end:
            keep(inp.take(end))
        if marker is not None:
            inp.take(len(marker))
            return "".join(parts), marker
        if inp.final:
            raise Refused(f"the text ends before {' or '.join(stops)}")
        if size + len(inp.buf) > limit:
            raise Refused(f"no {' or '.join(stops)} within {limit} characters")
        yield


def skip_ws(inp: Input) -> Reader:
    """Consume whitespace; return once a non-space character or the end of the input is in hand."""
    while True:
        stripped = inp.buf.lstrip()
        if len(stripped) != len(inp.buf):
            inp.take(len(inp.buf) - len(stripped))
        if inp.buf or inp.final:
            return None
        yield


def peek(inp: Input) -> Reader:
    """The next character without consuming it, or "" at the end of the input."""
    while not inp.buf and not inp.final:
        yield
    return inp.buf[:1]


def choose(inp: Input, options: Sequence[str]) -> Reader:
    """Consume and return the longest of ``options`` the input starts with, or None when none does."""
    while True:
        buf = inp.buf
        if not inp.final and any(len(o) > len(buf) and o.startswith(buf) for o in options):
            yield  # a (longer) option may still match
            continue
        matches = [o for o in options if buf.startswith(o)]
        if not matches:
            return None
        best = max(matches, key=len)
        inp.take(len(best))
        return best
