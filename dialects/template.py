"""What a chat template reads besides messages and tools, judged from its text alone.

A request's extras reach the template in three ways: ``chat_template_kwargs`` become template
variables (``enable_thinking`` for Qwen3, SmolLM3, Gemma 4, DeepSeek; ``thinking`` for Granite),
``reasoning_effort`` is a variable only gpt-oss reads, and an earlier assistant message's
``reasoning_content`` must be put where the template looks for it: Qwen3/Qwen3.5/Gemma 4 read the
message's ``reasoning_content``, gpt-oss its ``thinking`` field (and refuses content beside thinking
on a call message), Ministral a content part of type ``thinking``; other templates never see it.
Tool call arguments arrive as JSON strings, but most templates filter them (``| tojson``,
``| items``), which wants an object: a string would be written quoted, or refused.

Note for the caller: several templates (QwQ, the DeepSeek R1 distills, DeepSeek V3.1) close the
thinking block in the prompt unless ``enable_thinking`` is truthy, so leaving it undefined turns
thinking off. llama.cpp passes ``enable_thinking=true`` unless told otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CODE = re.compile(r"\{\{(.*?)\}\}|\{%(.*?)%\}", re.DOTALL)
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)
# arguments (or the whole function) put through a filter, or tested for being a mapping
_OBJECT_ARGUMENTS = re.compile(
    r"""arguments['"]?\]?\s*(?:\|\s*(?:tojson|items|dictsort)|is\s+mapping)|function['"]?\]?\s*\|\s*tojson""")


@dataclass(frozen=True)
class TemplateInputs:
    """The extras a template reads.

    ``thinking_switch``: the variable that turns thinking on or off (``enable_thinking`` or
    ``thinking``), or None. ``reasoning_effort``: whether the template reads ``reasoning_effort``.
    ``reasoning_field``: where an assistant message's earlier reasoning goes: "reasoning_content"
    (kept as is), "thinking" (gpt-oss's message field), "thinking_part" (a content part of type
    "thinking", Ministral) or None (dropped: the template never shows it). ``object_arguments``:
    the template wants a tool call's arguments as an object, not as the JSON string the API sends.
    """

    thinking_switch: str | None
    reasoning_effort: bool
    reasoning_field: str | None
    object_arguments: bool = False


def template_uses(template: str, name: str) -> bool:
    """Whether the Jinja ``template`` reads ``name``: as a variable, an attribute or a key.

    Only code counts (``{{ }}`` and ``{% %}``), never prose or comments; a string literal counts
    only where it names a key: ``x['name']``, ``x.get('name')``, ``'name' in x``.
    """
    return _reads_variable(template, name) or _reads_field(template, name)


def template_inputs(template: str | None) -> TemplateInputs:
    """What ``template`` reads, for ``adapt_messages`` and for passing the request's extras on."""
    text = template or ""
    switch = next((n for n in ("enable_thinking", "thinking") if _reads_variable(text, n)), None)
    code = _code(text)
    if _reads_field(text, "reasoning_content"):
        field = "reasoning_content"
    elif re.search(r"==\s*['\"]thinking['\"]", code):
        field = "thinking_part"
    elif _reads_field(text, "thinking"):
        field = "thinking"
    else:
        field = None
    return TemplateInputs(switch, _reads_variable(text, "reasoning_effort"), field,
                          _OBJECT_ARGUMENTS.search(code) is not None)


def render_kwargs(inputs: TemplateInputs, chat_template_kwargs: Mapping[str, Any] | None = None,
                  reasoning_effort: str | None = None) -> dict[str, Any]:
    """The template variables for a request: its ``chat_template_kwargs`` as given, ``reasoning_effort`` where
    the template reads it, and ``enable_thinking=True`` unless the request says otherwise.

    Thinking defaults to on as in llama.cpp: QwQ's, the R1 distills' and DeepSeek V3.1's templates
    close the thinking block when ``enable_thinking`` is left undefined.
    """
    kwargs = dict(chat_template_kwargs or {})
    if inputs.thinking_switch == "enable_thinking":
        kwargs.setdefault("enable_thinking", True)
    if reasoning_effort is not None and inputs.reasoning_effort:
        kwargs.setdefault("reasoning_effort", reasoning_effort)
    return kwargs


def adapt_messages(messages: Sequence[Mapping[str, Any]], inputs: TemplateInputs) -> list[dict[str, Any]]:
    """``messages`` (OpenAI dicts) shaped for the template: earlier reasoning where it reads it, and
    call arguments as objects where it wants them (arguments that are not a JSON object stay strings)."""
    adapted = [_with_reasoning(dict(m), inputs.reasoning_field) for m in messages]
    if inputs.object_arguments:
        adapted = [_with_object_arguments(m) for m in adapted]
    return adapted


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    message["tool_calls"] = [_call_with_object_arguments(c) for c in calls]
    return message


def _call_with_object_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    arguments = function.get("arguments") if isinstance(function, Mapping) else None
    if not isinstance(arguments, str):
        return call
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return call
    if not isinstance(value, dict):
        return call
    return {**call, "function": {**function, "arguments": value}}


def _with_reasoning(message: dict[str, Any], field: str | None) -> dict[str, Any]:
    reasoning = message.get("reasoning_content")
    if message.get("role") != "assistant" or reasoning is None or field == "reasoning_content":
        return message
    del message["reasoning_content"]
    if field == "thinking":
        message["thinking"] = reasoning
        if message.get("tool_calls"):
            message.pop("content", None)  # gpt-oss's template refuses content beside thinking on a call
    elif field == "thinking_part":
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}] if content else []
        message["content"] = [{"type": "thinking", "thinking": reasoning}, *parts]
    return message


def _code(template: str) -> str:
    return "\n".join(a or b for a, b in _CODE.findall(template))


def _reads_variable(template: str, name: str) -> bool:
    code = _STRING.sub('""', _code(template))
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", code) is not None


def _reads_field(template: str, name: str) -> bool:
    code = _code(template)
    quoted = rf"['\"]{re.escape(name)}['\"]"
    patterns = (rf"\.{re.escape(name)}(?!\w)", rf"\[\s*{quoted}\s*\]", rf"\.get\(\s*{quoted}", rf"{quoted}\s+in\s")
    stripped = _STRING.sub('""', code)
    return re.search(patterns[0], stripped) is not None or any(re.search(p, code) for p in patterns[1:])
