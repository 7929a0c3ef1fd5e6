"""Request schemas of Anthropic's Messages API (pydantic, strict types), and their translation
into the one chat request the completion core answers.

``chat_request`` turns a Messages body into a ``schemas.ChatCompletionRequest``, so judging,
the model's defaults and limits, the chat template, the dialects, grammars and tool calls all
apply exactly as on ``/v1/chat/completions``:

* ``system`` becomes a system message; ``tool_use`` blocks become the assistant's
  ``tool_calls``, ``tool_result`` blocks ``tool`` messages (an ``is_error`` result's text is
  prefixed ``Error: ``), ``thinking`` blocks the assistant's ``reasoning_content``
  (``redacted_thinking`` is dropped: there is nothing to show the template);
* ``tools`` become function tools (``input_schema`` is the ``parameters``); ``tool_choice``
  ``auto``/``any``/``tool``/``none`` becomes ``auto``/``required``/a named function/``none``;
* ``thinking`` ``enabled``/``disabled`` sets the template's ``enable_thinking`` (``adaptive``
  leaves the model's default); reasoning always comes back apart, as ``thinking`` blocks;
* ``output_config.format`` becomes a JSON-schema ``response_format``, ``output_config.effort``
  the ``reasoning_effort``.

Unknown fields are ignored, as Anthropic's clients send fields with no meaning here
(``metadata``, ``service_tier``); ``image`` blocks (base64 or URL sources) become ``image_url``
parts, for models with a projector. Content this server cannot honour (documents, server
tools) is refused. ``grammar``, ``logit_bias``, ``seed`` and ``keep_alive`` are accepted as on
``/v1/chat/completions``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chat_options import ReasoningEffort
from errors import InvalidRequest
from schemas import MAX_STOP_LENGTH, MAX_STOP_STRINGS, ChatCompletionRequest, KeepAlive, validate_body

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
    }},
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: list[TextBlock] | str = ""
    is_error: bool = False

    def text(self) -> str:
        """The result as the tool message's text."""
        text = _joined(self.content)
        return "Error: " + text if self.is_error else text


class ImageSource(_Body):
    type: Literal["base64", "url"]
    media_type: str | None = None  # declared; the server reads the format from the bytes
    data: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _has_data(self) -> ImageSource:
        needed = "data" if self.type == "base64" else "url"
        if getattr(self, needed) is None:
            raise ValueError(f"an image source of type {self.type!r} needs its {needed}")
        return self


class ImageBlock(_Body):
    type: Literal["image"]
    source: ImageSource

    def part(self, param: str) -> dict[str, Any]:
        """The chat request's ``image_url`` part for this picture."""
        source = self.source
        url = source.url if source.type == "url" else f"data:{source.media_type or 'image'};base64,{source.data}"
        return {"type": "image_url", "image_url": {"url": url}, "source": param}


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                         | RedactedThinkingBlock, Field(discriminator="type")]
# Which blocks each role may send (Anthropic's own rule): anything else is refused, not dropped.
_ALLOWED = {"user": (TextBlock, ImageBlock, ToolResultBlock),
            "assistant": (TextBlock, ToolUseBlock, ThinkingBlock, RedactedThinkingBlock)}


class Message(_Body):
    role: Literal["user", "assistant"]
    content: list[ContentBlock] | str


class ToolDef(_Body):
    type: Literal["custom"] | None = None  # server tools (web search, code execution) have other types
    name: str = Field(min_length=1, max_length=64)  # the function name limit of the chat request
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1)
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and self.name is None:
            raise ValueError("a tool_choice of type 'tool' needs the tool's name")
        return self


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)  # accepted; llama.cpp has no thinking budget


class JsonOutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: JsonOutputFormat | None = None
    effort: ReasoningEffort | None = None


class CountTokensRequest(_Body):
    """``POST /v1/messages/count_tokens``: what makes up the prompt."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: list[TextBlock] | str | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    keep_alive: KeepAlive = None  # this server's extension, as on the other APIs


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]] | None = Field(
        None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None  # the extensions /v1/chat/completions takes too
    grammar: str | None = None
    logit_bias: dict[str, float] | None = None


_SAMPLING = ("max_tokens", "stream", "temperature", "top_p", "top_k", "seed", "grammar", "logit_bias")


def chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that asks the model what ``body`` asks it (see the module docstring).

    Only what the client sent is set, so the model's configured defaults fill in the rest.
    """
    data: dict[str, Any] = {"model": body.model, "messages": _messages(body),
                            "reasoning_format": "auto"}  # reasoning always comes back as thinking blocks
    if body.keep_alive is not None:
        data["keep_alive"] = body.keep_alive
    if body.tools:
        data["tools"] = [{"type": "function", "function": {
            "name": tool.name, "parameters": tool.input_schema,
            **({"description": tool.description} if tool.description is not None else {})}}
            for tool in body.tools]
    if body.tool_choice is not None:
        data.update(_tool_choice(body.tool_choice))
    if body.thinking is not None and body.thinking.type != "adaptive":
        data["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    if body.output_config is not None:
        data.update(_output_config(body.output_config))
    if isinstance(body, MessagesRequest):
        data.update({name: getattr(body, name) for name in _SAMPLING if getattr(body, name) is not None})
        if body.stop_sequences:
            data["stop"] = list(body.stop_sequences)
    return validate_body(data, ChatCompletionRequest)


def _messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": _joined(body.system)})
    for at, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        for position, block in enumerate(message.content):
            if not isinstance(block, _ALLOWED[message.role]):
                raise InvalidRequest(f"Invalid 'messages[{at}].content[{position}]': {block.type} blocks cannot "
                                     f"be sent in {message.role} messages", param=f"messages[{at}].content")
        messages.extend(_user(message.content, at) if message.role == "user" else [_assistant(message.content)])
    return messages


def _user(blocks: list[Any], at: int) -> list[dict[str, Any]]:
    """Tool results first, as Anthropic asks clients to send them, then the user's text and
    pictures, in their order."""
    messages: list[dict[str, Any]] = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                                      for b in blocks if isinstance(b, ToolResultBlock)]
    texts = [b for b in blocks if isinstance(b, TextBlock)]
    if any(isinstance(b, ImageBlock) for b in blocks):
        parts = [{"type": "text", "text": b.text} if isinstance(b, TextBlock)
                 else b.part(f"messages[{at}].content[{i}]")
                 for i, b in enumerate(blocks) if isinstance(b, TextBlock | ImageBlock)]
        messages.append({"role": "user", "content": parts})
    elif texts or not messages:
        messages.append({"role": "user", "content": _joined(texts)})
    return messages


def _assistant(blocks: list[Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": _joined([b for b in blocks if isinstance(b, TextBlock)])}
    thinking = "\n".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    if thinking:
        message["reasoning_content"] = thinking
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_choice(choice: ToolChoice) -> dict[str, Any]:
    named = {"type": "function", "function": {"name": choice.name or ""}}
    data: dict[str, Any] = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, named)}
    if choice.disable_parallel_tool_use:
        data["parallel_tool_calls"] = False
    return data


def _output_config(config: OutputConfig) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if config.format is not None:
        data["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": config.format.schema_}}
    if config.effort is not None:
        data["reasoning_effort"] = config.effort
    return data


def _joined(content: list[TextBlock] | str) -> str:
    """Text blocks' text joined by newlines, as chat messages' text parts are."""
    return content if isinstance(content, str) else "\n".join(block.text for block in content)
