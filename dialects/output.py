"""Where a parser's findings go: text sinks, the book of tool calls, and the ``Result`` built from both.

Everything a parser finds becomes an event first; ``Result`` is folded from those events (plus
which calls closed well-formed), so a non-streamed response is exactly the concatenation of a
streamed one.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from dialects.events import Content, Event, ParserOptions, Reasoning, Result, ToolCallArgs, ToolCallStart
from dialects.stream import Refused

log = logging.getLogger(__name__)

_ALNUM = string.ascii_letters + string.digits
EXCERPT = 120  # characters of refused text quoted in the log and in Result.malformed


def openai_call_id() -> str:
    """An id in OpenAI's shape, ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def mistral_call_id() -> str:
    """Nine letters and digits: Mistral's templates refuse any other tool call id."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


ID_STYLES: dict[str, Callable[[], str]] = {"openai": openai_call_id, "mistral": mistral_call_id}


class TextSink:
    """Passes one block of text on, without the whitespace at the block's two ends.

    A block ends at a marker; whitespace next to a marker belongs to the layout of the format
    (``</think>\\n\\n``, ``text\\n<tool_call>``), not to the text. Trailing whitespace is held
    until more text shows it is inside the block.
    """

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._pending = ""
        self._fresh = True
        self._before: tuple[str, bool] | None = None

    def write(self, text: str) -> None:
        self._before = None
        if self._fresh:
            text = text.lstrip()
            if not text:
                return
            self._fresh = False
        body = text.rstrip()
        if body:
            self._emit(self._pending + body)
            self._pending = text[len(body):]
        else:
            self._pending += text

    def boundary(self) -> None:
        """A marker: drop held whitespace and start a new block."""
        self._before = (self._pending, self._fresh)
        self._pending = ""
        self._fresh = True

    def undo_boundary(self) -> None:
        """The marker was text after all (a refused call): its block goes on, whitespace included."""
        if self._before is not None:
            self._pending, self._fresh = self._before
            self._before = None


class CallBook:
    """The tool calls of one message: announces them as events and remembers which closed well-formed."""

    def __init__(self, events: list[Event], options: ParserOptions, id_style: str) -> None:
        self._events = events
        self._new_id = options.id_factory or ID_STYLES[id_style]
        self.schemas = _parameter_schemas(options.tools)
        self._args: list[list[str]] = []
        self._names: list[str] = []
        self._ids: list[str] = []
        self._closed: list[int] = []
        self.open: int | None = None

    def known(self, name: str) -> bool:
        """Whether ``name`` may be called: any name when the request listed no tools."""
        return not self.schemas or name in self.schemas

    def begin(self, name: str, call_id: str | None = None) -> int:
        """Announce a call to ``name`` (already checked with ``known``); returns its index."""
        index = len(self._names)
        self._names.append(name)
        self._ids.append(call_id or self._new_id())
        self._args.append([])
        self.open = index
        self._events.append(ToolCallStart(index, self._ids[index], name))
        return index

    def args(self, fragment: str) -> None:
        """Pass on a piece of the open call's arguments text."""
        if fragment and self.open is not None:
            self._args[self.open].append(fragment)
            self._events.append(ToolCallArgs(self.open, fragment))

    def close(self) -> None:
        """The open call ended; refuse it unless its arguments are one JSON object."""
        index, self.open = self.open, None
        if index is None:
            return
        text = "".join(self._args[index])
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise Refused(f"the arguments of {self._names[index]} are not valid JSON") from None
        if not isinstance(value, dict):
            raise Refused(f"the arguments of {self._names[index]} are not a JSON object")
        self._closed.append(index)

    def abandon(self) -> None:
        """The open call will not close: it stays out of the result (its events were sent)."""
        self.open = None

    def tool_calls(self) -> list[dict[str, Any]]:
        return [{"id": self._ids[i], "type": "function",
                 "function": {"name": self._names[i], "arguments": "".join(self._args[i])}}
                for i in self._closed]


class Output:
    """The events of one message so far, the sinks and call book that produce them, and refusals."""

    def __init__(self, options: ParserOptions, family: str, id_style: str) -> None:
        self.options = options
        self.family = family
        self.events: list[Event] = []
        self._sent = 0
        self.content = TextSink(lambda text: self.events.append(Content(text)))
        kind = Reasoning if options.separate_reasoning else Content
        self.reasoning = TextSink(lambda text: self.events.append(kind(text)))
        self.book = CallBook(self.events, options, id_style)
        self.refusals: list[str] = []

    def inline_marker(self, marker: str) -> None:
        """With reasoning_format "none", thinking stays in the content, delimited by its markers."""
        if not self.options.separate_reasoning:
            self.events.append(Content(marker))

    def refuse(self, reason: str, raw: str) -> None:
        excerpt = raw if len(raw) <= EXCERPT else raw[:EXCERPT] + "..."
        note = f"{self.family}: {reason} (in {excerpt!r})"
        self.refusals.append(note)  # the server logs them with the model's id (``Result.malformed``)

    def take_events(self) -> list[Event]:
        """The events not yet handed out."""
        fresh = self.events[self._sent:]
        self._sent = len(self.events)
        return fresh

    def result(self) -> Result:
        content = "".join(e.text for e in self.events if isinstance(e, Content))
        reasoning = "".join(e.text for e in self.events if isinstance(e, Reasoning))
        calls = self.book.tool_calls()
        return Result(content=content if content.strip() else None,
                      reasoning=reasoning if reasoning.strip() else None,
                      tool_calls=calls,
                      finish_reason_hint="tool_calls" if calls else "stop",
                      malformed="; ".join(self.refusals) or None)


def _parameter_schemas(tools: Any) -> dict[str, Mapping[str, Any]]:
    """Function name to its parameters schema, for the OpenAI tool dicts given (odd entries skipped)."""
    schemas: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            schemas[function["name"]] = parameters if isinstance(parameters, Mapping) else {}
    return schemas
