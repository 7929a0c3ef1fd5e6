"""The streaming parser: feeds text to a dialect's program and hands out what it found.

Most families share one program, ``run_markers``: text is content until a marker says
otherwise; a reasoning marker opens thinking until its close marker; a call marker hands the
text to the family's call reader until the call (or the run of calls it began) ends. gpt-oss
brings its own program (``dialects.harmony``).

Malformed calls: a call is announced (``ToolCallStart``) only once its name is read and known,
and its arguments stream only while they are valid JSON so far. When the reader refuses the
text after that (arguments that stop being JSON, a call the text ends inside), the events
already sent stand, the call stays out of ``Result.tool_calls``, and the call's raw text, from
its trigger to where it failed, is passed on as content (unless ``ParserOptions.streaming`` and
the call was announced: the client has it already); the rest of the text is read as content
again. ``Result.malformed`` and the log name the family and what was refused.

Holding back: text streams as it arrives, except a tail that may still grow into a marker and
whitespace at the end of a block (whitespace beside a marker is layout, and dropped). Some
shapes must wait by nature: an answer that starts with ``{`` for Llama 3 (until its first key
says whether it is a call), a harmony header (up to ``<|message|>``), a Mistral Nemo call whose
id comes last, a Qwen3-Coder value that is not a string, Gemma 4's arguments (until the call
closes).

Concurrency: a ``Parser`` serves one response, on one thread at a time; dialects are immutable
and shared freely.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from dialects.events import Event, ParserOptions, Result
from dialects.output import Output
from dialects.stream import Input, NotACall, Reader, Refused, peek, skip_ws, text_until

if TYPE_CHECKING:
    from dialects.dialect import Dialect

log = logging.getLogger(__name__)

CallReader = Callable[[str, Input, Output], Reader]
Program = Callable[["Dialect", Input, Output], Generator[None, None, None]]


class Parser:
    """Reads one response of one dialect, incrementally.

    Streaming: send ``feed(piece)`` for every piece of text, then ``flush()`` when the text is
    complete (held-back text and unfinished calls come out then), then read ``finish()``.
    Nothing a model writes makes these raise.
    """

    def __init__(self, dialect: Dialect, options: ParserOptions) -> None:
        self.dialect = dialect
        self.options = options
        self._inp = Input()
        self._out = Output(options, dialect.name, dialect.id_style)
        self._program = (dialect.program or run_markers)(dialect, self._inp, self._out)
        self._done = False

    def feed(self, text: str) -> list[Event]:
        """Add ``text`` (any piece, cut anywhere); return the events it completes."""
        if text and not self._inp.final:
            self._inp.push(text)
            self._resume()
        return self._out.take_events()

    def flush(self) -> list[Event]:
        """The text is complete: return the last events."""
        if not self._inp.final:
            self._inp.final = True
            self._resume()
        return self._out.take_events()

    def finish(self) -> Result:
        """The whole message (flushes first if needed)."""
        self.flush()
        return self._out.result()

    def _resume(self) -> None:
        if self._done:
            return
        try:
            next(self._program)
        except StopIteration:
            self._done = True
        except Exception:  # a bug here must not cost the response: keep the text as content
            log.exception("%s parser failed; the rest of the text is returned as content", self.dialect.name)
            self._salvage()
            return
        if self._inp.final and not self._done:
            log.error("%s parser asked for more text after the end; the rest is content", self.dialect.name)
            self._salvage()

    def _salvage(self) -> None:
        self._done = True
        self._out.book.abandon()
        self._out.content.write(self._inp.take(len(self._inp.buf)))


def run_markers(dialect: Dialect, inp: Input, out: Output) -> Generator[None, None, None]:
    """The program of the marker-delimited families: content, thinking blocks, call markers."""
    tools = out.options.parse_tools and dialect.read_call is not None
    triggers = dialect.call_markers if tools else ()
    opener, closer = dialect.reasoning_markers or ("", "")
    thinking = bool(opener) and out.options.starts_in_reasoning
    if thinking:
        out.inline_marker(opener)
    bare = dialect.bare_start if tools else None
    # Qwen3.5 may start a call without closing its thinking; only its real trigger ends thinking
    thinking_ends = (closer, opener, *(dialect.call_triggers if tools and dialect.reasoning_ends_at_call else ()))
    while True:
        if thinking:
            marker = yield from text_until(inp, thinking_ends, out.reasoning.write)
            out.reasoning.boundary()
            if marker is None:
                return
            if marker == closer:
                out.inline_marker(closer)
                thinking = False
            elif marker in triggers:
                thinking = False
                yield from read_guarded(dialect, marker, inp, out)
            continue  # a stray opener inside thinking is dropped
        if bare:
            yield from skip_ws(inp)
            starts_bare = (yield from peek(inp)) == bare
            bare = None
            if starts_bare:
                yield from read_guarded(dialect, "", inp, out)
                continue
        stops = (*triggers, *((opener, closer) if opener else ()), *dialect.drop_markers)
        marker = yield from text_until(inp, stops, out.content.write)
        out.content.boundary()
        if marker is None:
            return
        if marker == opener:
            out.inline_marker(opener)
            thinking = True
        elif marker in triggers:
            yield from read_guarded(dialect, marker, inp, out)
        # a stray closer or a drop marker is dropped


def read_guarded(dialect: Dialect, trigger: str, inp: Input, out: Output) -> Reader:
    """Run the dialect's call reader after ``trigger``; text it refuses becomes content."""
    assert dialect.read_call is not None
    inp.record(trigger)
    try:
        yield from dialect.read_call(trigger, inp, out)
    except NotACall:
        out.book.abandon()
        out.content.undo_boundary()
        out.content.write(inp.recorded())
        return None
    except Refused as refusal:
        reason = refusal.reason
    except Exception:  # a reader bug must not cost the response
        log.exception("%s call reader failed", dialect.name)
        reason = "internal parser error"
    else:
        inp.recorded()
        out.content.boundary()
        return None
    announced = out.book.open is not None
    out.book.abandon()
    raw = inp.recorded()
    out.refuse(reason, raw)
    if announced and out.options.streaming:
        out.content.boundary()  # the call went out as it was read (see ParserOptions.streaming)
        return None
    out.content.undo_boundary()
    out.content.write(raw)
    return None


def parse(dialect: Dialect, text: str, options: ParserOptions | None = None) -> Result:
    """The whole ``text`` read at once."""
    parser = Parser(dialect, options or ParserOptions())
    parser.feed(text)
    return parser.finish()
