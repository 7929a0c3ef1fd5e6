"""Llama 3.1 / 3.2 / 3.3: a call is the whole answer, ``{"name": ..., "parameters": {...}}``.

The templates ask for bare JSON with no marker, so a call is recognised only where the answer
begins with ``{`` and the object's first key is ``name`` (or ``type``) naming a known function;
any other JSON answer stays content. ``<|python_tag|>`` may come first (Llama 3.1's ipython
mode). Several calls may follow one another, separated by ``;`` or whitespace, although the
templates render only one per message.

Not supported: the built-in tools' ``<|python_tag|>brave_search.call(query="...")`` syntax; the
server never passes ``builtin_tools``, and such text is refused and returned as content.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import call_object_rules, choice, functions, grammar, literal
from dialects.jsoncalls import call_object
from dialects.output import Output
from dialects.stream import Input, Reader, choose, peek, skip_ws

PYTHON_TAG = "<|python_tag|>"


def read_calls(trigger: str, inp: Input, out: Output) -> Reader:
    """Call objects, the first bare when ``trigger`` is "" (the answer began with ``{``)."""
    yield from call_object(inp, out, bare=not trigger)
    while True:
        inp.checkpoint()
        yield from skip_ws(inp)
        if (yield from choose(inp, (";",))) is not None:
            yield from skip_ws(inp)
        if (yield from peek(inp)) != "{":
            return None
        yield from call_object(inp, out)


def call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """One ``{"name": ..., "parameters": {...}}``, ``<|python_tag|>`` optional (the templates allow one call)."""
    names, rules = [], []
    for position, function in enumerate(functions(tools)):
        name, text = call_object_rules(function, f"t{position}-", args_key="parameters")
        names.append(name)
        rules.append(text)
    return grammar(f"{literal(PYTHON_TAG)}? {choice(names)}", *rules)


LLAMA3 = Dialect(
    name="llama3",
    call_triggers=(PYTHON_TAG, '{"name"'),
    special_markers=(PYTHON_TAG,),
    call_markers=(PYTHON_TAG,),
    read_call=read_calls,
    bare_start="{",
    grammar=call_grammar,
)
