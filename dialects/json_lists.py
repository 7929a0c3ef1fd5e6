"""Families that write a marker and then a JSON list of call objects: Granite 3.x and Phi-4-mini.

    Granite 3.3:  <|tool_call|>[{"name": "f", "arguments": {...}}]
                  thinking: <think>...</think><response>...</response>, when the template's
                  ``thinking`` switch is on; the <response> wrapper is dropped from the content.
    Phi-4-mini:   functools[{"name": "f", "arguments": {...}}]
                  (from Microsoft's documentation: no Phi-4 template is among the test templates;
                  Phi-3.5's template has no tools at all). ``<|tool_call|>...<|/tool_call|>`` is
                  read too. ``functools`` not followed by ``[`` is plain text (Python's module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import WS, call_object_rules, choice, functions, grammar, literal, repeated
from dialects.jsoncalls import call_list, calls_in_json
from dialects.output import Output
from dialects.stream import Input, NotACall, Reader, choose, peek, skip_ws

TOOL_CALL = "<|tool_call|>"
PHI_CLOSE = "<|/tool_call|>"
FUNCTOOLS = "functools"
THINK = ("<think>", "</think>")
RESPONSE = ("<response>", "</response>")


def read_tagged(trigger: str, inp: Input, out: Output) -> Reader:
    """A list (or a single object) of calls after ``<|tool_call|>``, then Phi's optional close tag."""
    yield from calls_in_json(inp, out)
    yield from skip_ws(inp)
    yield from choose(inp, (PHI_CLOSE,))


def read_phi(trigger: str, inp: Input, out: Output) -> Reader:
    """``functools[...]``, or what follows ``<|tool_call|>``; ``functools`` not opening a list of objects is text."""
    if trigger != FUNCTOOLS:
        yield from read_tagged(trigger, inp, out)
        return None
    if (yield from choose(inp, ("[",))) is None:
        raise NotACall()
    yield from skip_ws(inp)
    if (yield from peek(inp)) != "{":
        raise NotACall()  # functools[0] in Python code, say
    yield from call_list(inp, out, opened=True)


def _list_grammar(opener: str) -> Any:
    def build(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
        names, rules = [], []
        for position, function in enumerate(functions(tools)):
            name, text = call_object_rules(function, f"t{position}-")
            names.append(name)
            rules.append(text)
        calls = repeated("call", parallel, separator=f'"," {WS}')
        return grammar(f'{literal(opener)} "[" {WS} {calls} {WS} "]"', f"call ::= {choice(names)}", *rules)

    build.__doc__ = f"``{opener}[{{call}}, ...]``, one call unless ``parallel``."
    return build


GRANITE = Dialect(
    name="granite",
    reasoning_markers=THINK,
    call_triggers=(TOOL_CALL,),
    special_markers=(*THINK, *RESPONSE, TOOL_CALL),
    call_markers=(TOOL_CALL,),
    read_call=read_tagged,
    drop_markers=RESPONSE,
    grammar=_list_grammar(TOOL_CALL),
)

PHI4 = Dialect(
    name="functools",
    reasoning_markers=THINK,
    call_triggers=(FUNCTOOLS,),
    special_markers=(*THINK, TOOL_CALL, PHI_CLOSE),
    call_markers=(FUNCTOOLS, TOOL_CALL),
    read_call=read_phi,
    grammar=_list_grammar(FUNCTOOLS),
)
