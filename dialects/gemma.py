"""Gemma 4: ``<|tool_call>call:NAME{key:value,...}<tool_call|>``, thinking in ``<|channel>thought...<channel|>``.

Arguments are written in Gemma's own notation, not JSON: keys bare, strings between ``<|"|>``
tokens (which may hold any character, quotes and braces included), numbers, ``true``, ``false``,
``null``, ``{...}`` and ``[...]``. The reader finds the end of the call by counting brackets
outside strings, then converts the whole to JSON, so the arguments arrive as one fragment.
After a call the template expects ``<|tool_response>``: it is a stop string, and dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import choice, functions, grammar, literal, repeated, text_without
from dialects.output import Output
from dialects.stream import Input, Reader, Refused, choose, read_until, skip_ws, text_until

TOOL_CALL, TOOL_CALL_END, CALL = "<|tool_call>", "<tool_call|>", "call:"
QUOTE = '<|"|>'
THOUGHT = ("<|channel>thought", "<channel|>")
CHANNEL = "<|channel>"  # a channel other than thought: its marker is dropped
TOOL_RESPONSE = "<|tool_response>"
MAX_DEPTH = 64
_BARE_END = ",}]"


def read_call(trigger: str, inp: Input, out: Output) -> Reader:
    """``call:NAME{...}`` after ``<|tool_call>``; the closing ``<tool_call|>`` is optional."""
    if (yield from choose(inp, (CALL,))) is None:
        raise Refused("expected call:")
    name = (yield from read_until(inp, ("{",)))[0].strip()
    if not out.book.known(name):
        raise Refused(f"unknown function {name!r}")
    out.book.begin(name)
    text = "{" + (yield from _rest_of_dict(inp))
    value = to_python(text)
    if not isinstance(value, dict):
        raise Refused("the arguments are not an object")
    out.book.args(json.dumps(value, ensure_ascii=False))
    out.book.close()
    yield from skip_ws(inp)
    yield from choose(inp, (TOOL_CALL_END,))


def _rest_of_dict(inp: Input) -> Reader:
    """The text up to the ``}`` closing a dict whose ``{`` was read; brackets inside strings do not count."""
    parts: list[str] = []
    depth, in_string = 1, False
    while True:
        stops = (QUOTE,) if in_string else (QUOTE, "{", "}", "[", "]")
        marker = yield from text_until(inp, stops, parts.append)
        if marker is None:
            raise Refused("the text ends inside the call")
        parts.append(marker)
        if marker == QUOTE:
            in_string = not in_string
        elif marker in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return "".join(parts)


def to_python(text: str) -> Any:
    """Gemma's argument notation as a Python value; ``Refused`` when it is not well-formed."""
    reader = _Notation(text)
    value = reader.value(0)
    reader.space()
    if reader.pos != len(text):
        raise Refused(f"unexpected text after the arguments: {text[reader.pos:reader.pos + 20]!r}")
    return value


class _Notation:
    """A recursive-descent reader of Gemma's notation over a complete text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise Refused("the arguments are nested too deeply")
        self.space()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        if self.text.startswith("{", self.pos):
            return self.mapping(depth)
        if self.text.startswith("[", self.pos):
            return self.sequence(depth)
        return self.bare()

    def string(self) -> str:
        end = self.text.find(QUOTE, self.pos + len(QUOTE))
        if end < 0:
            raise Refused("unterminated string")
        value = self.text[self.pos + len(QUOTE):end]
        self.pos = end + len(QUOTE)
        return value

    def mapping(self, depth: int) -> dict[str, Any]:
        self.pos += 1
        result: dict[str, Any] = {}
        while True:
            self.space()
            if self.take("}"):
                return result
            if result and not self.take(","):
                raise Refused("expected ',' or '}'")
            self.space()
            if self.text.startswith(QUOTE, self.pos):
                key = self.string()
            else:
                end = self.text.find(":", self.pos)
                if end < 0:
                    raise Refused("expected key:")
                key = self.text[self.pos:end].strip()
                if not key or any(c in key for c in ",{}[]"):
                    raise Refused(f"bad key {key!r}")
                self.pos = end
            self.space()
            if not self.take(":"):
                raise Refused("expected ':'")
            result[key] = self.value(depth + 1)

    def sequence(self, depth: int) -> list[Any]:
        self.pos += 1
        result: list[Any] = []
        while True:
            self.space()
            if self.take("]"):
                return result
            if result and not self.take(","):
                raise Refused("expected ',' or ']'")
            result.append(self.value(depth + 1))

    def bare(self) -> Any:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _BARE_END:
            self.pos += 1
        word = self.text[start:self.pos].strip()
        if not word:
            raise Refused("expected a value")
        try:
            return json.loads(word)
        except ValueError:
            return word  # an unquoted word: kept as the string it plainly is

    def take(self, char: str) -> bool:
        if self.text.startswith(char, self.pos):
            self.pos += 1
            return True
        return False


def call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """``<|tool_call>call:NAME{...}<tool_call|>``; the arguments follow Gemma's notation, not the schema."""
    names = [literal(f.name) for f in functions(tools)]
    call = f"{literal(TOOL_CALL + CALL)} {choice(names)} g-dict {literal(TOOL_CALL_END)}"
    rules = [
        f"call ::= {call}",
        'g-dict ::= "{" ( g-kv ( "," g-kv )* )? "}"',
        'g-kv ::= g-key ":" g-value',
        "g-key ::= [a-zA-Z0-9_$.-]+",
        'g-array ::= "[" ( g-value ( "," g-value )* )? "]"',
        'g-value ::= g-string | g-dict | g-array | g-number | "true" | "false" | "null"',
        f"g-string ::= {literal(QUOTE)} g-text {literal(QUOTE)}",
        text_without("g-text", QUOTE),
        'g-number ::= "-"? [0-9]+ ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?',
    ]
    return grammar(repeated("call", parallel, separator=""), *rules)


GEMMA4 = Dialect(
    name="gemma4",
    reasoning_markers=THOUGHT,
    call_triggers=(TOOL_CALL,),
    special_markers=(CHANNEL, THOUGHT[1], TOOL_CALL, TOOL_CALL_END, QUOTE, TOOL_RESPONSE),
    stop_after_call=(TOOL_RESPONSE,),
    call_markers=(TOOL_CALL,),
    read_call=read_call,
    drop_markers=(CHANNEL, TOOL_RESPONSE),
    grammar=call_grammar,
)
