"""Pieces of GBNF the families' call grammars are built from.

Arguments grammars come from the server's one schema converter (``grammar.schema``): each
function's parameters are checked and converted on their own (so an error names
``tools[i].function.parameters``), then their rules are prefixed so that several share a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grammar import gbnf
from grammar.schema import convert, prepare

# Bounded: under a grammar a model (a small or random one, say) may otherwise write whitespace
# until max_tokens, where a real model writes a newline or two.
WS = r"[ \t\n]{0,4}"
_CLASS_ESCAPES = {"\\": "\\\\", "]": "\\]", "[": "\\[", "-": "\\-", "^": "\\^", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True)
class Function:
    """A callable function of the request: its position in ``tools``, name and checked parameters schema."""

    index: int
    name: str
    parameters: dict[str, Any]

    @property
    def param(self) -> str:
        return f"tools[{self.index}].function.parameters"


def functions(tools: Sequence[Mapping[str, Any]]) -> list[Function]:
    """The functions of OpenAI tool dicts, each schema checked (``errors.InvalidRequest`` names the tool)."""
    found = []
    for index, tool in enumerate(tools):
        function = tool.get("function") or {}
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        param = f"tools[{index}].function.parameters"
        found.append(Function(index, function["name"], prepare(dict(parameters), param)))
    return found


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + "".join(_LITERAL_ESCAPES.get(c, c) for c in text) + '"'


def arguments_rules(function: Function, prefix: str) -> tuple[str, str]:
    """(rule name, rules) of the JSON text of ``function``'s arguments object."""
    return prefix + "root", gbnf.rename_rules(convert(function.parameters, function.param), prefix)


def value_rules(function: Function, schema: Mapping[str, Any], prefix: str) -> tuple[str, str]:
    """(rule name, rules) of a JSON value matching ``schema``, a part of ``function``'s parameters."""
    defs = function.parameters.get("$defs") or {}
    whole = dict(schema)
    for _ in range(len(defs)):  # the converter cannot start from a bare $ref: start from its target
        ref = whole.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
            break
        whole = {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in whole.items() if k != "$ref"}}
    if defs:
        whole["$defs"] = defs
    return prefix + "root", gbnf.rename_rules(convert(whole, function.param), prefix)


def call_object_rules(function: Function, prefix: str, args_key: str = "arguments",
                      optional: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(rule name, rules) of ``{"name": "<name>", "<args_key>": {...}}`` for ``function``.

    ``optional``: more properties the object may have after those two (Mistral Nemo's ``id``).
    """
    parameters = function.parameters
    call: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"const": function.name},
                       args_key: {k: v for k, v in parameters.items() if k != "$defs"},
                       **(optional or {})},
        "required": ["name", args_key],
    }
    if "$defs" in parameters:
        call["$defs"] = parameters["$defs"]
    return prefix + "root", gbnf.rename_rules(convert(call, function.param), prefix)


def choice(names: Sequence[str]) -> str:
    """A GBNF group matching any one of the rules ``names``."""
    return "( " + " | ".join(names) + " )"


def repeated(item: str, parallel: bool, separator: str = WS) -> str:
    """``item`` once, or (``parallel``) one or more times with ``separator`` between."""
    return f"{item} ( {separator} {item} )*" if parallel else item


def text_without(rule: str, stop: str) -> str:
    """Rules: ``rule`` matches any text that does not contain ``stop``, so ``rule stop`` ends at the first one.

    One rule per character of ``stop`` matched so far; ``stop``'s first character must not recur in
    it (then no text ending inside a partial ``stop`` can make ``rule stop`` match ``stop`` early).
    """
    assert stop and stop[0] not in stop[1:]
    lines = []
    for done in range(len(stop)):
        alternatives = ['""']
        nxt, first = stop[done], stop[0]
        if done + 1 < len(stop):
            alternatives.append(f"{literal(nxt)} {rule}-{done + 1}")
        if nxt != first:
            alternatives.append(f"{literal(first)} {rule}-1")
        excluded = "".join(_CLASS_ESCAPES.get(c, c) for c in sorted({nxt, first}))
        alternatives.append(f"[^{excluded}] {rule}-0")
        lines.append(f"{rule}-{done} ::= " + " | ".join(alternatives))
    lines.append(f"{rule} ::= {rule}-0")
    return "\n".join(lines)


def grammar(root: str, *rules: str) -> str:
    """A whole grammar: ``root ::= <root>`` and the other rules, checked (a bug here must not reach llama.cpp)."""
    text = f"root ::= {root}\n" + "\n".join(r for r in rules if r)
    gbnf.check(text)
    return text
