"""What a dialect parser is told (``ParserOptions``), what it streams (events) and what it returns (``Result``).

The events are the streaming vocabulary the server turns into SSE deltas: plain text (``Content``),
thinking (``Reasoning``), and tool calls as a start (index, id, name) followed by fragments of the
JSON text of the call's arguments object. Concatenating the fragments of one index gives valid JSON
once the call has closed. ``Result`` is what a non-streamed response needs; it is built from the
very same events, so a streamed and a non-streamed response to the same text agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ReasoningFormat = Literal["none", "auto", "deepseek"]


@dataclass(frozen=True)
class Content:
    """Text for the message's ``content``."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """Text for the message's ``reasoning_content``."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its position among this message's calls, its id and the function's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A piece of the JSON text of call ``index``'s arguments object."""

    index: int
    fragment: str


Event = Content | Reasoning | ToolCallStart | ToolCallArgs


@dataclass(frozen=True)
class ParserOptions:
    """How to read one response.

    ``tools`` are the request's OpenAI tool dicts (``{"type": "function", "function": {...}}``): a
    call naming another function is refused. ``parse_tools`` off leaves call syntax in the content,
    as written. ``reasoning_format`` "none" keeps thinking inline in the content, markers included;
    "auto" and "deepseek" move it to ``reasoning_content``. ``starts_in_reasoning``: the rendered
    prompt ended inside an open thinking block (see ``Dialect.starts_in_reasoning``).
    ``parallel_tool_calls`` shapes the call grammar; the parser keeps every call a model writes.
    ``id_factory`` replaces the dialect's call-id generator (tests use it for stable ids).
    ``streaming``: the events go out as they come, so a call refused after its ``ToolCallStart``
    was sent is not repeated as content: the client already has it, cut where it broke (as
    OpenAI streams a call that ``max_tokens`` cuts). A whole reading puts it in the content.
    """

    tools: Sequence[Mapping[str, Any]] = ()
    parse_tools: bool = True
    reasoning_format: ReasoningFormat = "auto"
    starts_in_reasoning: bool = False
    parallel_tool_calls: bool = True
    id_factory: Callable[[], str] | None = None
    streaming: bool = False

    @property
    def separate_reasoning(self) -> bool:
        return self.reasoning_format != "none"


@dataclass
class Result:
    """The whole message, in the shape of an OpenAI chat completion's ``message`` plus two hints.

    ``content`` and ``reasoning`` are None when nothing but whitespace was written. ``tool_calls``
    holds only calls that closed well-formed. ``finish_reason_hint`` is "tool_calls" when there is
    one, else "stop" (the server still says "length" when the token limit cut the text).
    ``malformed`` names the family and what its parser refused; the refused text is in ``content``.
    """

    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason_hint: str = "stop"
    malformed: str | None = None
