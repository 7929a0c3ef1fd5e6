"""Shared by the dialect tests: the tools of the recorded outputs, a case type, and the streaming checks.

Every recorded output is read three ways, whole, cut in two at every position, and one character
at a time, and the three must agree: the same content, reasoning and calls, in the same order
(events of one kind merged), and the same ``Result``. Well-formed outputs must also never show a
marker in their content or reasoning.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialects import Content, Dialect, Event, ParserOptions, Reasoning, Result, ToolCallArgs, ToolCallStart

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "shared" / "chat-templates"

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "days": {"type": "integer"},
            "units": {"type": "string", "enum": ["metric", "imperial"]},
        }, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "filters": {"type": "object", "properties": {"site": {"type": "string"}, "year": {"type": "integer"}}},
            "exact": {"type": "boolean"},
        }, "required": ["query"]}}},
]


@dataclass
class Case:
    """A recorded output and what reading it must give. ``calls``: (name, arguments[, id])."""

    id: str
    text: str
    content: str | None = None
    reasoning: str | None = None
    calls: Sequence[tuple[Any, ...]] = ()
    malformed: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def options(**overrides: Any) -> ParserOptions:
    """Options with ``TOOLS`` and a fresh counter for call ids, so two readings give the same ids."""
    counter = itertools.count()
    return ParserOptions(**{"tools": TOOLS, "id_factory": lambda: f"gen{next(counter)}", **overrides})


def read(dialect: Dialect, pieces: Sequence[str], **overrides: Any) -> tuple[list[Event], Result]:
    """Feed ``pieces`` one after another; return every event and the result."""
    parser = dialect.parser(options(**overrides))
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.flush()
    return events, parser.finish()


def merged(events: Sequence[Event]) -> list[tuple[Any, ...]]:
    """Events with neighbours of one kind joined: the stream as a client assembles it."""
    out: list[list[Any]] = []
    for event in events:
        if isinstance(event, Content | Reasoning):
            kind = type(event).__name__
            if out and out[-1][0] == kind:
                out[-1][1] += event.text
            else:
                out.append([kind, event.text])
        elif isinstance(event, ToolCallStart):
            out.append(["call", event.index, event.id, event.name, ""])
        elif isinstance(event, ToolCallArgs):
            call = next(item for item in reversed(out) if item[0] == "call" and item[1] == event.index)
            call[4] += event.fragment
    return [tuple(item) for item in out]


def check_case(dialect: Dialect, case: Case) -> None:
    """The whole reading gives what the case expects, and every other reading agrees with it."""
    events, result = read(dialect, [case.text], **case.options)
    assert result.content == case.content
    assert result.reasoning == case.reasoning
    assert [_call_view(call, len(expected)) for call, expected in zip(result.tool_calls, case.calls, strict=False)] \
        == [tuple(c) for c in case.calls]
    assert len(result.tool_calls) == len(case.calls)
    assert (result.malformed is not None) == case.malformed, result.malformed
    assert result.finish_reason_hint == ("tool_calls" if case.calls else "stop")
    if case.malformed:
        assert result.malformed.startswith(dialect.name + ":")
    else:
        _check_no_markers(dialect, events)
    _check_agree(dialect, case, events, result, [[case.text[:i], case.text[i:]] for i in range(len(case.text) + 1)])
    _check_agree(dialect, case, events, result, [list(case.text)])


def check_streams_agree(dialect: Dialect, text: str, cuts: Sequence[int], **overrides: Any) -> Result:
    """``text`` read whole and cut at ``cuts`` give the same events (merged) and result; returns the result."""
    events, result = read(dialect, [text], **overrides)
    bounds = [0, *sorted(set(cuts)), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    cut_events, cut_result = read(dialect, pieces, **overrides)
    assert merged(cut_events) == merged(events)
    assert cut_result == result
    return result


def _check_agree(dialect: Dialect, case: Case, events: list[Event], result: Result,
                 readings: list[list[str]]) -> None:
    for pieces in readings:
        piece_events, piece_result = read(dialect, pieces, **case.options)
        assert piece_result == result, pieces
        if not case.malformed:  # a refused call's events depend on where it was cut; its result does not
            assert merged(piece_events) == merged(events), pieces


def _check_no_markers(dialect: Dialect, events: list[Event]) -> None:
    markers = set(dialect.special_markers) | set(dialect.reasoning_markers or ())
    for kind, text, *_ in merged(events):
        if kind in ("Content", "Reasoning"):
            leaked = [m for m in markers if m in text]
            assert not leaked, (kind, text)


def _call_view(call: dict[str, Any], width: int) -> tuple[Any, ...]:
    function = call["function"]
    view = (function["name"], json.loads(function["arguments"]), call["id"])
    return view[:width]


def template(name: str) -> str:
    """The text of a chat template from ../shared/chat-templates."""
    return (TEMPLATES / name).read_text()
