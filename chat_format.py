"""Turning chat messages into a prompt, and tool calls back out of the model's text.

The model's own Jinja template (GGUF ``tokenizer.chat_template``) is used when present,
rendered by llama-cpp-python's ``Jinja2ChatFormatter`` (a sandboxed environment with the
Hugging Face extensions). A model without one gets ``FALLBACK_TEMPLATE`` (ChatML), whose
end marker becomes a stop string, so even a base model such as stories260K answers chat.

Tool calls use the Hermes/Qwen convention: the model writes
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. ``tool_choice`` "required"
or a named function constrains generation with a grammar so the call is well-formed
(``grammar.request.tool_call_grammar``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engine.protocol import ModelInfo
from errors import InvalidRequest
from schemas import ChatCompletionRequest

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_STOPS = ["<|im_end|>", "<|im_start|>"]
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass
class ChatPrompt:
    """A rendered prompt and what generation needs to go with it."""

    text: str
    stops: list[str] = field(default_factory=list)
    parse_tools: bool = False


class ChatTemplate:
    """A model's chat template, compiled once per loaded model."""

    def __init__(self, info: ModelInfo, override: str | None = None) -> None:
        template = override or info.chat_template
        self.is_fallback = not template
        self.source = template or FALLBACK_TEMPLATE
        self.bos_text = info.bos_text
        self.formatter = Jinja2ChatFormatter(self.source, eos_token=info.eos_text, bos_token=self.bos_text)
        self.stops = list(FALLBACK_STOPS) if self.is_fallback else []
        self.supports_tools = "tools" in self.source
        # gpt-oss's template reads an assistant turn's reasoning as ``thinking``, others as
        # ``reasoning_content`` (Qwen3, Qwen3.5) or either (Gemma 4): give each its name.
        self.reasoning_names = ["reasoning_content"] + (["thinking"] if "message.thinking" in self.source else [])

    def render(self, request: ChatCompletionRequest) -> ChatPrompt:
        """Render the request's messages (and tools) into a prompt."""
        messages = [_message_dict(m, self.reasoning_names) for m in request.messages]
        tools = [t.model_dump(by_alias=True) for t in request.tools or []]
        use_tools = bool(tools) and request.tool_choice != "none"
        if use_tools and not self.supports_tools:
            raise InvalidRequest("This model's chat template does not support tools", param="tools")
        try:
            rendered = self.formatter(messages=messages, tools=tools if use_tools else None,
                                      tool_choice=None if not use_tools else _choice(request),
                                      **request.template_variables())
        except Exception as exc:  # templates raise on message orders they do not accept
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}",
                                 param="messages") from None
        return ChatPrompt(rendered.prompt, list(self.stops), use_tools)


def _message_dict(message: Any, reasoning_names: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.text()}
    for key in ("name", "tool_calls", "tool_call_id"):
        value = getattr(message, key)
        if value is not None:
            data[key] = value
    if message.reasoning_content is not None:
        data.update(dict.fromkeys(reasoning_names, message.reasoning_content))
    return data


def _choice(request: ChatCompletionRequest) -> Any:
    choice = request.tool_choice
    return choice.model_dump() if hasattr(choice, "model_dump") else choice


def extract_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into its plain content and OpenAI-shaped tool calls."""
    calls = []
    for match in TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
        })
    if not calls:
        return text, []
    content = TOOL_CALL.sub("", text).strip()
    return content or None, calls
