"""Qwen3-Coder and Qwen3.5: XML-ish calls, values typed by the tool's parameter schema.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A value is text up to ``</parameter>`` (the newlines the template puts around it are not part of
it). It becomes JSON by the parameter's schema type: a string parameter stays text (and streams as
it arrives); a number, boolean, object or array is read as JSON, and kept as a string when it does
not parse, rather than refusing the whole call. Qwen3-Coder sometimes leaves out ``<tool_call>``
and starts with ``<function=``, which is then a call only if it names a known function. Qwen3.5
thinks in ``<think>`` and may start a call without closing its thinking.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import Function, choice, functions, grammar, literal, repeated, text_without, value_rules
from dialects.output import Output
from dialects.stream import Input, NotACall, Reader, Refused, choose, read_until, skip_ws, text_until

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
VALUE_ENDS = ("\n" + PARAMETER_END, PARAMETER_END)
THINK = ("<think>", "</think>")
JSON_TYPES = {"number": (int, float), "integer": (int,), "boolean": (bool,), "object": (dict,),
              "array": (list,), "null": (type(None),)}


def read_call(trigger: str, inp: Input, out: Output) -> Reader:
    """One ``<function=...>`` block after ``<tool_call>`` (or a bare ``<function=``)."""
    bare = trigger == FUNCTION
    if not bare:
        yield from skip_ws(inp)
        if (yield from choose(inp, (FUNCTION,))) is None:
            raise Refused("expected <function=")
    name = (yield from read_until(inp, (">",)))[0].strip()
    if not out.book.known(name):
        raise NotACall() if bare else Refused(f"unknown function {name!r}")
    out.book.begin(name)
    yield from _parameters(inp, out, out.book.schemas.get(name, {}))
    out.book.close()
    yield from skip_ws(inp)
    yield from choose(inp, (CLOSE,))


def _parameters(inp: Input, out: Output, schema: Mapping[str, Any]) -> Reader:
    out.book.args("{")
    count = 0
    while True:
        yield from skip_ws(inp)
        tag = yield from choose(inp, (PARAMETER, FUNCTION_END, CLOSE))
        if tag is None:
            raise Refused("expected <parameter= or </function>")
        if tag != PARAMETER:
            break
        name = (yield from read_until(inp, (">",)))[0].strip()
        out.book.args((", " if count else "") + json.dumps(name, ensure_ascii=False) + ": ")
        count += 1
        yield from _value(inp, out, _types(schema, name))
    out.book.args("}")


def _value(inp: Input, out: Output, types: set[str] | None) -> Reader:
    """Read one value, up to ``</parameter>``, and pass it on as JSON."""
    yield from choose(inp, ("\n",))  # the template's newline after <parameter=...>
    if types == {"string"}:
        out.book.args('"')
        end = yield from text_until(inp, VALUE_ENDS, lambda text: out.book.args(_escaped(text)))
        out.book.args('"')
    else:
        parts: list[str] = []
        end = yield from text_until(inp, VALUE_ENDS, parts.append)
        out.book.args(json.dumps(convert("".join(parts), types), ensure_ascii=False))
    if end is None:
        raise Refused("the text ends inside a parameter value")


def convert(text: str, types: set[str] | None) -> Any:
    """A parameter's text as the JSON value its schema types ask for; the text itself when it is not one.

    ``types`` None: the schema does not name the parameter, so it stays text.
    An empty set: the schema names it without a type, so anything JSON goes.
    """
    if types is None or types == {"string"}:
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not types or any(isinstance(value, JSON_TYPES.get(t, ())) for t in types):
        if isinstance(value, bool) and "boolean" not in types and types:
            return text  # json's True is an int to Python; only a boolean parameter takes it
        return value
    return text


def _types(schema: Mapping[str, Any], name: str) -> set[str] | None:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or not isinstance(properties.get(name), Mapping):
        return None
    return _schema_types(properties[name])


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    found: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            if isinstance(option, Mapping):
                found |= _schema_types(option)
    if "enum" in schema and not found:
        found = {_json_type(v) for v in schema["enum"]}
    return found


def _json_type(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    return "boolean" if isinstance(value, bool) else "number" if isinstance(value, int | float) else "object"


def _escaped(text: str) -> str:
    """``text`` escaped for the inside of a JSON string (pieces escape the same as the whole)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


# ------------------------------------------------------------------ grammar


def call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """``<tool_call>\\n<function=NAME>\\n`` parameters ``</function>\\n</tool_call>``, as the template writes it."""
    names, rules = [], [text_without("xml-text", "\n" + PARAMETER_END)]
    for position, function in enumerate(functions(tools)):
        name = f"f{position}"
        rules.append(_function_rules(function, name))
        names.append(name)
    call = f"{literal(OPEN + chr(10))} {choice(names)} {literal(CLOSE)}"
    return grammar(repeated("call", parallel), f"call ::= {call}", *rules)


def _function_rules(function: Function, name: str) -> str:
    properties = function.parameters.get("properties") or {}
    required = set(function.parameters.get("required") or ())
    rules, fixed, optional = [], [], []
    for position, (param, schema) in enumerate(properties.items()):
        rule = f"{name}-p{position}"
        types = _schema_types(schema) if isinstance(schema, Mapping) else set()
        words = _string_choices(schema)
        if words:
            value = choice([literal(w) for w in words])
        elif types == {"string"}:
            value = "xml-text"
        else:
            value, text = value_rules(function, schema, f"{rule}-v-")
            rules.append(text)
        opener = literal(f"{PARAMETER}{param}>\n")
        rules.append(f"{rule} ::= {opener} {value} {literal(chr(10) + PARAMETER_END + chr(10))}")
        (fixed if param in required else optional).append(rule)
    body = " ".join(fixed) + (f" {choice(optional)}*" if optional else "")
    head = literal(f"{FUNCTION}{function.name}>\n")
    rules.append(f"{name} ::= {head} {body} {literal(FUNCTION_END + chr(10))}")
    return "\n".join(rules)


def _string_choices(schema: Any) -> list[str]:
    """The values of a string parameter limited by ``enum`` or ``const`` (written bare, as text)."""
    if not isinstance(schema, Mapping):
        return []
    values = schema.get("enum") if "enum" in schema else [schema["const"]] if "const" in schema else []
    return values if values and all(isinstance(v, str) and "</parameter>" not in v for v in values) else []


CODER = Dialect(
    name="qwen3-coder",
    reasoning_markers=THINK,
    call_triggers=(OPEN,),
    special_markers=(*THINK, OPEN, CLOSE),
    call_markers=(OPEN, FUNCTION),
    read_call=read_call,
    reasoning_ends_at_call=True,
    grammar=call_grammar,
)
