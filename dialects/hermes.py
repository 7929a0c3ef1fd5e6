"""Hermes / Qwen2.5 / Qwen3 / QwQ: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, ``<think>``.

Also the generic dialect, for a model whose template is unknown or missing: it is what this
server read before dialects existed, plus ``<think>`` blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import WS, call_object_rules, choice, functions, grammar, literal, repeated
from dialects.jsoncalls import call_object
from dialects.output import Output
from dialects.stream import Input, Reader, choose, skip_ws

OPEN, CLOSE = "<tool_call>", "</tool_call>"
THINK = ("<think>", "</think>")


def read_call(trigger: str, inp: Input, out: Output) -> Reader:
    """One call object after ``<tool_call>``; the closing tag is optional (models often stop before it)."""
    yield from call_object(inp, out)
    yield from skip_ws(inp)
    yield from choose(inp, (CLOSE,))


def call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """``<tool_call>`` JSON object ``</tool_call>``, once or (``parallel``) repeated."""
    names, rules = [], []
    for position, function in enumerate(functions(tools)):
        name, text = call_object_rules(function, f"t{position}-")
        names.append(name)
        rules.append(text)
    call = f"{literal(OPEN)} {WS} {choice(names)} {WS} {literal(CLOSE)}"
    return grammar(repeated("call", parallel), f"call ::= {call}", *rules)


HERMES = Dialect(
    name="hermes",
    reasoning_markers=THINK,
    call_triggers=(OPEN,),
    special_markers=(*THINK, OPEN, CLOSE),
    call_markers=(OPEN,),
    read_call=read_call,
    grammar=call_grammar,
)

GENERIC = replace(HERMES, name="generic")  # the same reading, under the name of a fallback
