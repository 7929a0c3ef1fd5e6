"""Which grammar a completion request asks for, checked: the one entry point for request handling.

A request constrains its output in one of three ways, and the first that applies wins
(as before this module existed): ``tool_choice`` "required" or a named function (a
grammar for well-formed calls in the model's own dialect, from its call marker on), then
``response_format`` json_object or json_schema, then llama-server's ``grammar`` extension
(GBNF text).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF

from dialects import GENERIC, Dialect
from dialects.gbnf_rules import text_without
from errors import InvalidRequest
from grammar import gbnf
from grammar.checker import GrammarChecker
from grammar.schema import schema_grammar


def grammar_for(request: Any, model_path: Path, checker: GrammarChecker, dialect: Dialect = GENERIC) -> str | None:
    """The final GBNF grammar for ``request`` on the model file ``model_path``, or None for none.

    Raises ``InvalidRequest`` naming the parameter at fault (``grammar``, ``response_format``,
    ``tools[i].function.parameters``, ``tool_choice``). Needs no loaded model: call it before
    leasing one, so a refused grammar never loads a model. The verdict is cached, so a
    client sending the same schema with every request pays a dictionary lookup.
    """
    text = _requested(request, dialect)
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


def _requested(request: Any, dialect: Dialect) -> str | None:
    functions = _tool_functions(request)
    if functions:
        return tool_call_grammar(functions, dialect, getattr(request, "parallel_tool_calls", None) is not False)
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


def tool_call_grammar(functions: list[tuple[int, Any]], dialect: Dialect = GENERIC, parallel: bool = True) -> str:
    """A grammar for well-formed calls in ``dialect``'s syntax to one of ``functions``
    ((index in the request's ``tools``, function) pairs). A family that thinks may first write
    any text without its call marker (its thinking, a sentence), and the answer cannot end
    before a call: a lazy grammar's freedom (llama.cpp's, free text until a trigger) with the
    guarantee ``"required"`` promises, which a lazy grammar cannot give. Other families get
    the call at once, as llama.cpp forces it: a weak model given free text may never get to
    the call within ``max_tokens``. So does a family whose calls are only read as the whole
    answer (Llama 3's bare JSON).

    A schema that cannot become a grammar is refused naming ``tools[i].function.parameters``
    with the request's own index ``i``.
    """
    tools = [{"type": "function", "function": function.model_dump(by_alias=True)} for _, function in functions]
    try:
        calls = dialect.call_grammar(tools, parallel)
    except InvalidRequest as exc:
        position = re.match(r"tools\[(\d+)\]", exc.param or "")
        if position is not None and int(position.group(1)) < len(functions):
            index = functions[int(position.group(1))][0]
            exc.param = f"tools[{index}]" + (exc.param or "")[position.end():]
        raise
    if dialect.reasoning_markers is None or len(dialect.call_triggers) != 1 or dialect.bare_start is not None:
        return calls
    return (f"root ::= before-call call-root\n{text_without('before-call', dialect.call_triggers[0])}\n"
            + gbnf.rename_rules(calls, "call-"))
