"""Which grammar a completion request asks for, checked: the one entry point for request handling.

A request constrains its output in one of three ways, and the first that applies wins
(as before this module existed): ``tool_choice`` "required" or a named function (a
grammar for one well-formed ``<tool_call>``), then ``response_format`` json_object or
json_schema, then llama-server's ``grammar`` extension (GBNF text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF

from errors import InvalidRequest
from grammar import gbnf
from grammar.checker import GrammarChecker
from grammar.schema import convert, prepare, schema_grammar


def grammar_for(request: Any, model_path: Path, checker: GrammarChecker) -> str | None:
    """The final GBNF grammar for ``request`` on the model file ``model_path``, or None for none.

    Raises ``InvalidRequest`` naming the parameter at fault (``grammar``, ``response_format``,
    ``tools[i].function.parameters``, ``tool_choice``). Needs no loaded model: call it before
    leasing one, so a refused grammar never loads a model. The verdict is cached, so a
    client sending the same schema with every request pays a dictionary lookup.
    """
    text = _requested(request)
    if text is None:
        return None
    checker.check(text, model_path, grammar_param(request))
    return text


def grammar_param(request: Any) -> str:
    """The request parameter a grammar problem should name (``tools``, ``response_format`` or ``grammar``)."""
    if _tool_functions(request):
        return "tools"
    fmt = getattr(request, "response_format", None)
    if fmt is not None and fmt.type != "text":
        return "response_format"
    return "grammar"


def _requested(request: Any) -> str | None:
    functions = _tool_functions(request)
    if functions:
        return tool_call_grammar(functions)
    fmt = getattr(request, "response_format", None)
    if fmt is not None and fmt.type != "text":
        return _format_grammar(fmt)
    return request.grammar or None  # "" means no grammar, as llama.cpp reads it


def _format_grammar(fmt: Any) -> str:
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else fmt.schema_
    if fmt.type == "json_object" and not schema:
        return JSON_GBNF
    if not schema:
        raise InvalidRequest("response_format json_schema needs a schema", param="response_format")
    return schema_grammar(schema, "response_format")


def _tool_functions(request: Any) -> list[tuple[int, Any]]:
    """The (index, function) pairs a call must choose from, or [] when no call is forced."""
    choice = getattr(request, "tool_choice", None)
    tools = getattr(request, "tools", None) or []
    if choice is None or choice in ("none", "auto"):
        return []
    if not tools:
        raise InvalidRequest("tool_choice asks for a tool call but no tools are given", param="tool_choice")
    if choice == "required":
        return list(enumerate(t.function for t in tools))
    name = choice.function.get("name")
    named = [(i, t.function) for i, t in enumerate(tools) if t.function.name == name]
    if not named:
        raise InvalidRequest(f"tool_choice names an unknown function: {name}", param="tool_choice")
    return named


def tool_call_grammar(functions: list[tuple[int, Any]]) -> str:
    """A grammar for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` with one of ``functions``.

    Each function's parameters become their own grammar (so an error names
    ``tools[i].function.parameters`` and ``$ref`` resolves against its own root), whose
    rules are then prefixed so that the grammars can share one file.
    """
    calls, rules = [], []
    for position, (index, function) in enumerate(functions):
        param = f"tools[{index}].function.parameters"
        parameters = prepare(function.parameters, param)
        call = {"type": "object", "properties": {"name": {"const": function.name},
                                                 "arguments": {k: v for k, v in parameters.items() if k != "$defs"}},
                "required": ["name", "arguments"]}
        if "$defs" in parameters:
            call["$defs"] = parameters["$defs"]
        prefix = f"t{position}-"
        rules.append(gbnf.rename_rules(convert(call, param), prefix))
        calls.append(prefix + "root")
    return f'root ::= "<tool_call>" ( {" | ".join(calls)} ) "</tool_call>"\n' + "\n".join(rules)
