"""DeepSeek R1 (and its distills) and V3.1: calls between DeepSeek's own tokens, thinking in ``<think>``.

DeepSeek's tokens are written with fullwidth bars and ``▁`` for spaces; below, ``<|calls begin|>``
stands for ``<\uff5ctool▁calls▁begin\uff5c>`` and so on (see ``token``).

    R1:   <|calls begin|><|call begin|>function<|sep|>NAME
          ```json
          {...}
          ```<|call end|><|calls end|>
    V3.1: <|calls begin|><|call begin|>NAME<|sep|>{...}<|call end|><|calls end|>

One reader takes both: what stands before the separator is the name when the arguments follow
it (V3.1), else the call's type, with the name on the line after it (R1). Distills sometimes
drop the outer calls-begin token, so a lone call-begin token starts a call too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import WS, arguments_rules, choice, functions, grammar, literal, repeated
from dialects.jsoncalls import object_arguments
from dialects.output import Output
from dialects.stream import Input, Reader, Refused, choose, peek, read_until, skip_ws

BAR = "\uff5c"  # FULLWIDTH VERTICAL LINE, spelled out: it looks like "|" but is not


def token(name: str) -> str:
    """One of DeepSeek's special tokens, by its name with spaces: "tool calls begin", "end of sentence"."""
    return f"<{BAR}{name.replace(' ', '▁')}{BAR}>"


CALLS_BEGIN, CALLS_END = token("tool calls begin"), token("tool calls end")
CALL_BEGIN, CALL_END, SEP = token("tool call begin"), token("tool call end"), token("tool sep")
FENCE_OPEN, FENCE_CLOSE = "```json", "```"
THINK = ("<think>", "</think>")


def read_calls(trigger: str, inp: Input, out: Output) -> Reader:
    """The calls after the calls-begin token up to its end, or one call after a lone call-begin token."""
    if trigger == CALL_BEGIN:
        yield from _call(inp, out)
        return None
    while True:
        yield from skip_ws(inp)
        marker = yield from choose(inp, (CALL_BEGIN, CALLS_END))
        if marker != CALL_BEGIN:
            return None  # the end marker, or the model stopped after its last call
        yield from _call(inp, out)
        inp.checkpoint()


def _call(inp: Input, out: Output) -> Reader:
    name = (yield from read_until(inp, (SEP,)))[0].strip()
    yield from skip_ws(inp)
    if (yield from peek(inp)) not in ("{", ""):  # R1: that was the call's type; the name is on this line
        name = (yield from read_until(inp, ("\n",)))[0].strip()
    if not out.book.known(name):
        raise Refused(f"unknown function {name!r}")
    out.book.begin(name)
    yield from skip_ws(inp)
    fenced = (yield from choose(inp, (FENCE_OPEN,))) is not None
    yield from object_arguments(inp, out)
    yield from skip_ws(inp)
    if fenced:
        yield from choose(inp, (FENCE_CLOSE,))
        yield from skip_ws(inp)
    yield from choose(inp, (CALL_END,))


def r1_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """R1's calls: type, separator, name, then the arguments in a json code fence."""
    alternatives, rules = [], []
    for position, function in enumerate(functions(tools)):
        name, text = arguments_rules(function, f"t{position}-")
        alternatives.append(f"{literal(function.name + chr(10) + FENCE_OPEN + chr(10))} {name}")
        rules.append(text)
    call = (f"{literal(CALL_BEGIN + 'function' + SEP)} {choice(alternatives)} "
            f"{literal(chr(10) + FENCE_CLOSE + CALL_END)}")
    return grammar(f"{literal(CALLS_BEGIN)} {repeated('call', parallel, WS)} {literal(CALLS_END)}",
                   f"call ::= {call}", *rules)


def v31_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """V3.1's calls: name, separator, arguments."""
    alternatives, rules = [], []
    for position, function in enumerate(functions(tools)):
        name, text = arguments_rules(function, f"t{position}-")
        alternatives.append(f"{literal(function.name + SEP)} {name}")
        rules.append(text)
    call = f"{literal(CALL_BEGIN)} {choice(alternatives)} {literal(CALL_END)}"
    return grammar(f"{literal(CALLS_BEGIN)} {repeated('call', parallel, WS)} {literal(CALLS_END)}",
                   f"call ::= {call}", *rules)


DEEPSEEK_R1 = Dialect(
    name="deepseek-r1",
    reasoning_markers=THINK,
    call_triggers=(CALLS_BEGIN,),
    special_markers=(*THINK, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP),
    call_markers=(CALLS_BEGIN, CALL_BEGIN),
    read_call=read_calls,
    grammar=r1_grammar,
)

DEEPSEEK_V31 = replace(DEEPSEEK_R1, name="deepseek-v3.1", grammar=v31_grammar)
