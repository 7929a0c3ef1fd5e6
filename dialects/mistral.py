"""Mistral: ``[TOOL_CALLS]`` then a JSON list (Nemo) or ``name[ARGS]{...}`` (Small 3.2, Devstral, Ministral 3).

    Nemo:       [TOOL_CALLS][{"name": "f", "arguments": {...}, "id": "a1b2c3d4e"}]
    Small 3.2:  [TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{...}   ([CALL_ID] as its template writes it)
    Ministral:  [TOOL_CALLS]f[ARGS]{...}                     (thinks in [THINK]...[/THINK])

One reader takes both shapes (the text after the marker says which); the grammar writes the
shape the template uses. A call id the model writes is kept; otherwise one is made in Mistral's
shape (nine letters and digits), which its templates insist on when the call comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import WS, arguments_rules, call_object_rules, choice, functions, grammar, literal, repeated
from dialects.jsoncalls import call_list, object_arguments
from dialects.output import Output
from dialects.stream import Input, Reader, Refused, peek, read_until, skip_ws

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
THINK = ("[THINK]", "[/THINK]")
NEMO_ID = {"id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}}


def read_call(trigger: str, inp: Input, out: Output) -> Reader:
    """After ``[TOOL_CALLS]``: a JSON list of calls, or one ``name[CALL_ID]id[ARGS]{...}``."""
    yield from skip_ws(inp)
    if (yield from peek(inp)) == "[":
        yield from call_list(inp, out, expect_id=True)
        return None
    name, marker = yield from read_until(inp, (ARGS, CALL_ID))
    name = name.strip()
    if not out.book.known(name):
        raise Refused(f"unknown function {name!r}")
    call_id = None
    if marker == CALL_ID:
        call_id = (yield from read_until(inp, (ARGS,)))[0].strip() or None
    out.book.begin(name, call_id)
    yield from object_arguments(inp, out)


def named_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """``[TOOL_CALLS]name[ARGS]{...}``, once or repeated; Small 3.2 writes ``[CALL_ID]`` and an id before ``[ARGS]``."""
    alternatives, rules = [], []
    for position, function in enumerate(functions(tools)):
        name, text = arguments_rules(function, f"t{position}-")
        alternatives.append(f"{literal(function.name)} call-id? {literal(ARGS)} {name}")
        rules.append(text)
    call = f"{literal(TOOL_CALLS)} {choice(alternatives)}"
    return grammar(repeated("call", parallel, separator=""), f"call ::= {call}",
                   f"call-id ::= {literal(CALL_ID)} [a-zA-Z0-9]{{9}}", *rules)


def list_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]``; without an id the parser makes one."""
    names, rules = [], []
    for position, function in enumerate(functions(tools)):
        name, text = call_object_rules(function, f"t{position}-", optional=NEMO_ID)
        names.append(name)
        rules.append(text)
    calls = repeated("call", parallel, separator=f'"," {WS}')
    return grammar(f'{literal(TOOL_CALLS)} "[" {WS} {calls} {WS} "]"', f"call ::= {choice(names)}", *rules)


MISTRAL = Dialect(
    name="mistral",
    reasoning_markers=THINK,
    call_triggers=(TOOL_CALLS,),
    special_markers=(*THINK, TOOL_CALLS, ARGS, CALL_ID),
    call_markers=(TOOL_CALLS,),
    read_call=read_call,
    id_style="mistral",
    grammar=named_grammar,
)

MISTRAL_NEMO = replace(MISTRAL, name="mistral-nemo", reasoning_markers=None,
                       special_markers=(TOOL_CALLS,), grammar=list_grammar)
