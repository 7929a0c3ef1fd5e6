"""``Dialect``: everything the server needs to know about one family's output format."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dialects.events import ParserOptions, Result
from dialects.parser import CallReader, Parser, Program, parse

GrammarBuilder = Callable[[Sequence[Mapping[str, Any]], bool], str]


@dataclass(frozen=True)
class Dialect:
    """One family's format for thinking and tool calls.

    The public part, for the server:

    * ``reasoning_markers``: (open, close) of a thinking block, or None.
    * ``call_triggers``: the texts a call begins with; the GBNF of ``call_grammar`` starts with
      one of them, so a lazy grammar can wait for a trigger.
    * ``special_markers``: the markers the parser must see. Models write them as control tokens,
      which a plain detokenize drops: the worker must render exactly these as text.
    * ``stop_after_call``: stop strings that end the turn after a call (the model would go on to
      imagine the tool's answer otherwise).

    The rest tells the shared parser how to read the family: ``call_markers`` (texts that start
    a call in the output; the triggers and perhaps more), ``read_call`` (reads one call, or a run
    of them, after a marker), ``bare_start`` (a character that starts a call at the very
    beginning of the output without a marker), ``drop_markers`` (markers removed from content),
    ``reasoning_ends_at_call``, ``id_style`` ("openai" or "mistral") and ``program`` (a whole
    parser of its own, for gpt-oss).
    """

    name: str
    reasoning_markers: tuple[str, str] | None = None
    call_triggers: tuple[str, ...] = ()
    special_markers: tuple[str, ...] = ()
    stop_after_call: tuple[str, ...] = ()
    call_markers: tuple[str, ...] = ()
    read_call: CallReader | None = None
    bare_start: str | None = None
    drop_markers: tuple[str, ...] = ()
    reasoning_ends_at_call: bool = False
    id_style: str = "openai"
    program: Program | None = None
    grammar: GrammarBuilder | None = None

    def parser(self, options: ParserOptions | None = None) -> Parser:
        """A fresh streaming parser for one response."""
        return Parser(self, options or ParserOptions())

    def parse(self, text: str, options: ParserOptions | None = None) -> Result:
        """A whole response read at once (the same as feeding it in pieces)."""
        return parse(self, text, options)

    def call_grammar(self, tools: Sequence[Mapping[str, Any]], parallel: bool = True) -> str:
        """GBNF for this family's call syntax with one of ``tools`` (OpenAI tool dicts), from the trigger on.

        ``parallel`` allows several calls in a row. Raises ``errors.InvalidRequest`` naming
        ``tools[i].function.parameters`` when a schema cannot become a grammar, and when the
        family has no call syntax.
        """
        if self.grammar is None:
            from errors import InvalidRequest

            raise InvalidRequest(f"The {self.name} format has no tool call syntax", param="tools")
        return self.grammar(tools, parallel)

    def starts_in_reasoning(self, prompt: str) -> bool:
        """Whether the rendered ``prompt`` ends inside an open thinking block (the template opened it)."""
        return self.reasoning_markers is not None and prompt.rstrip().endswith(self.reasoning_markers[0])

    def without_reasoning(self) -> Dialect:
        """The same family for a template that never thinks."""
        markers = self.reasoning_markers or ()
        return replace(self, reasoning_markers=None,
                       special_markers=tuple(m for m in self.special_markers if m not in markers))
