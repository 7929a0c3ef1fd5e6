"""Turning chat messages into a prompt, and knowing how the model will write its answer.

The model's own Jinja template (GGUF ``tokenizer.chat_template``, or the model's
``chat_template`` setting) is used when present, rendered by llama-cpp-python's
``Jinja2ChatFormatter`` (a sandboxed environment with the Hugging Face extensions). A model
without one gets ``FALLBACK_TEMPLATE`` (ChatML), whose end marker becomes a stop string, so
even a base model such as stories260K answers chat.

The template also decides the model's *dialect* (``dialects.detect``): how it writes its
thinking and its tool calls. The prompt carries what reading the answer needs: the dialect,
the parser options (tools, ``reasoning_format``, whether the template opened a thinking block),
and the ids of the dialect's marker tokens, which the worker writes out as text (a plain
detokenize drops control tokens, and the parser must see them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from dialects import GENERIC, Dialect, ParserOptions, adapt_messages, detect, render_kwargs, template_inputs
from engine.protocol import ModelInfo
from errors import InvalidRequest
from gguf_meta import GGUFError, read_metadata
from schemas import ChatCompletionRequest

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_STOPS = ["<|im_end|>", "<|im_start|>"]
Tokenize = Callable[[str], list[int]]


@dataclass
class ChatPrompt:
    """A rendered prompt and what generating and reading its answer need."""

    text: str
    stops: list[str] = field(default_factory=list)
    dialect: Dialect = GENERIC
    parser_options: ParserOptions | None = None  # None: the answer is plain content, nothing to read


def model_dialect(template: str | None, architecture: str | None) -> Dialect:
    """The dialect of a model with this chat template (None: the fallback) and architecture.

    A template that never mentions ``<think>`` gets the generic dialect without reasoning: a
    model that was never taught to think does not write the tags, and reading every answer
    for them would only cost time.
    """
    dialect = detect(template, architecture)
    if dialect is GENERIC and "<think>" not in (template or ""):
        return dialect.without_reasoning()
    return dialect


@lru_cache(maxsize=64)
def _file_dialect(path: Path, mtime_ns: int, size: int, override: str | None) -> Dialect:
    try:
        metadata = read_metadata(path)
    except (OSError, GGUFError):
        metadata = {}
    template = override or metadata.get("tokenizer.chat_template")
    architecture = metadata.get("general.architecture")
    return model_dialect(template if isinstance(template, str) else None,
                         architecture if isinstance(architecture, str) else None)


def file_dialect(path: Path, override: str | None = None) -> Dialect:
    """The dialect of the model file at ``path`` read from its header, before any load (to
    build a tool call grammar while judging a request). Cached per file version."""
    try:
        stat = path.stat()
    except OSError:
        return model_dialect(override, None)
    return _file_dialect(path, stat.st_mtime_ns, stat.st_size, override)


class ChatTemplate:
    """A model's chat template, compiled once per loaded model, with its dialect."""

    def __init__(self, info: ModelInfo, override: str | None = None, tokenize: Tokenize | None = None) -> None:
        template = override or info.chat_template
        self.is_fallback = not template
        self.source = template or FALLBACK_TEMPLATE
        self.bos_text = info.bos_text
        self.formatter = Jinja2ChatFormatter(self.source, eos_token=info.eos_text, bos_token=self.bos_text)
        self.stops = list(FALLBACK_STOPS) if self.is_fallback else []
        architecture = info.metadata.get("general.architecture")
        self.dialect = model_dialect(template, architecture)
        # A template that renders no tool list but writes its family's calls (DeepSeek R1's)
        # still gets tools: described in a system message, as llama.cpp does.
        self.renders_tools = "tools" in self.source
        self.supports_tools = self.renders_tools or self.dialect.name != "generic"
        self.inputs = template_inputs(template)
        self.preserved_tokens = _marker_tokens(self.dialect.special_markers, tokenize)

    def render(self, request: ChatCompletionRequest) -> ChatPrompt:
        """Render the request's messages (and tools) into a prompt."""
        messages = adapt_messages([_message_dict(m) for m in request.messages], self.inputs)
        tools = [t.model_dump(by_alias=True) for t in request.tools or []]
        use_tools = bool(tools) and request.tool_choice != "none"
        if use_tools and not self.supports_tools:
            raise InvalidRequest("This model's chat template does not support tools", param="tools")
        if use_tools and not self.renders_tools:
            messages = _with_tools_described(messages, tools)
        variables = render_kwargs(self.inputs, request.chat_template_kwargs, request.reasoning_effort)
        try:
            rendered = self.formatter(messages=messages, tools=tools if use_tools else None,
                                      tool_choice=None if not use_tools else _choice(request), **variables)
        except Exception as exc:  # templates raise on message orders they do not accept
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}",
                                 param="messages") from None
        dialect = self.dialect
        stops = list(self.stops) + (list(dialect.stop_after_call) if use_tools else [])
        starts_in_reasoning = dialect.starts_in_reasoning(rendered.prompt)
        options = None
        if use_tools or (dialect.reasoning_markers is not None and request.separates_reasoning) \
                or starts_in_reasoning or dialect.program is not None:
            options = ParserOptions(tools=tools if use_tools else (), parse_tools=use_tools,
                                    reasoning_format=request.reasoning_format,
                                    starts_in_reasoning=starts_in_reasoning,
                                    parallel_tool_calls=request.parallel_tool_calls is not False)
        return ChatPrompt(rendered.prompt, stops, dialect, options)


def _with_tools_described(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the tools described in the system message (added first if none)."""
    described = ("You can call the following tools when they help. To call one, write the call in "
                 "your tool call format.\nTools: " + json.dumps(tools, ensure_ascii=False))
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + described}, *messages[1:]]
    return [{"role": "system", "content": described}, *messages]


def _marker_tokens(markers: tuple[str, ...], tokenize: Tokenize | None) -> tuple[int, ...]:
    """The ids of the markers that are one token each in this model's vocabulary."""
    if tokenize is None:
        return ()
    ids = []
    for marker in markers:
        tokens = tokenize(marker)
        if len(tokens) == 1:
            ids.append(tokens[0])
    return tuple(ids)


def _message_dict(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.text()}
    for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
        value = getattr(message, key)
        if value is not None:
            data[key] = value
    return data


def _choice(request: ChatCompletionRequest) -> Any:
    choice = request.tool_choice
    return choice.model_dump() if hasattr(choice, "model_dump") else choice
