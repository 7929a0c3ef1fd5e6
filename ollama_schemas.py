"""Ollama's request bodies, and their translation into the core's requests.

An Ollama chat (or a templated ``/api/generate``) becomes a ``ChatCompletionRequest``, a raw
generate a ``CompletionRequest``, an embed an ``EmbeddingRequest``, so judging, defaults,
limits, grammars and dialects apply exactly as on ``/v1``. What the core refuses it names by
our field; ``ollama_name`` gives the client's name for it (``max_tokens`` is
``options.num_predict`` here).

``options``: the sampling options in ``OPTION_FIELDS`` are honoured; the load-time ones
(``num_ctx``, ``num_gpu``, ``num_thread``, ``num_batch``, ``use_mmap``...) and samplers that
llama.cpp's loop here lacks (``mirostat``, ``tfs_z``, ``typical_p``, ``repeat_last_n``) are
accepted and ignored, as Ollama itself ignores options it does not know: a model's context and
offload come from the server's config, and a per-request reload would stall every other user.
``grammar`` (llama.cpp's GBNF) is accepted beside ``format`` as our extension.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from errors import InvalidRequest
from schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, KeepAlive, _Body, validate_body

# Ollama's option -> our sampling field.
OPTION_FIELDS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "min_p": "min_p", "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}
_NAMES = {ours: f"options.{theirs}" for theirs, ours in OPTION_FIELDS.items()} | {
    "response_format": "format", "chat_template_kwargs": "think", "reasoning_effort": "think"}
Think = bool | Literal["low", "medium", "high"] | None


class ToolCallFunction(_Body):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(_Body):
    id: str | None = None
    function: ToolCallFunction


class Message(_Body):
    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class _Generation(_Body):
    model: str = Field(min_length=1)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: Think = None
    grammar: str | None = None  # our extension: a GBNF grammar, as on /v1
    logprobs: bool | None = None


class ChatRequest(_Generation):
    """``POST /api/chat``."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Generation):
    """``POST /api/generate``."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class EmbedRequest(_Body):
    """``POST /api/embed``; ``truncate`` is accepted, but an input over the model's limit is refused."""

    model: str = Field(min_length=1)
    input: str | list[str]
    keep_alive: KeepAlive = None
    dimensions: int | None = Field(None, ge=1)
    truncate: bool = True
    options: dict[str, Any] | None = None


class EmbeddingsRequest(_Body):
    """``POST /api/embeddings`` (Ollama's older, one-prompt endpoint)."""

    model: str = Field(min_length=1)
    prompt: str
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class ShowRequest(_Body):
    """``POST /api/show``: ``model`` (older clients send ``name``)."""

    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    verbose: bool = False


def ollama_name(param: str | None) -> str | None:
    """The Ollama client's name for one of our request fields."""
    return _NAMES.get(param, param) if param is not None else None


def renamed(error: InvalidRequest) -> InvalidRequest:
    """``error`` naming the field (and the endpoint to use instead) as an Ollama client knows them."""
    if error.code == "model_not_generative":
        error.message = error.message.replace("/v1/embeddings", "/api/embed")
    error.rename_param(ollama_name(error.param))
    return error


def chat_request(body: ChatRequest, model_id: str) -> ChatCompletionRequest:
    """The chat completion an Ollama chat asks for."""
    data = {"model": model_id, "messages": [_message(m, i) for i, m in enumerate(body.messages)],
            **_common(body)}
    if body.tools:
        data["tools"] = [{"type": "function", **tool} for tool in body.tools]
    return validate_body(data, ChatCompletionRequest)


def generate_request(body: GenerateRequest, model_id: str,
                     templated: bool) -> ChatCompletionRequest | CompletionRequest:
    """The completion an Ollama generate asks for: a one-turn chat through the model's template,
    or (``raw``, or a model without a template) the prompt as it is."""
    _refuse(body.suffix, "suffix", "suffix (fill-in-the-middle) is not supported")
    _refuse(body.template, "template", "a per-request template is not supported; set the model's chat_template "
                                       "in the server's config")
    _refuse(body.context, "context", "context (the deprecated token history) is not supported; use /api/chat")
    if templated and not body.raw:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": _with_images(body.prompt, body.images, "images")}]
        return validate_body({"model": model_id, "messages": messages, **_common(body)}, ChatCompletionRequest)
    _refuse(body.images, "images", "pictures go through the model's chat template; a raw prompt cannot hold them")
    data = {"model": model_id, "prompt": body.prompt, **_common(body, chat=False)}
    request = validate_body(data, CompletionRequest)
    if "max_tokens" not in data:
        # Ollama generates until the end of the turn unless num_predict says otherwise; /v1's
        # completions default to 16 tokens. Unset (not None-as-sent), so the model's default applies.
        request.max_tokens = None
        request.model_fields_set.discard("max_tokens")
    return request


def embedding_request(body: EmbedRequest | EmbeddingsRequest, model_id: str) -> EmbeddingRequest:
    """The embedding request an Ollama embed asks for."""
    text = body.input if isinstance(body, EmbedRequest) else body.prompt
    data: dict[str, Any] = {"model": model_id, "input": text, "keep_alive": body.keep_alive}
    if isinstance(body, EmbedRequest) and body.dimensions is not None:
        data["dimensions"] = body.dimensions
    return validate_body(data, EmbeddingRequest)


def _common(body: _Generation, chat: bool = True) -> dict[str, Any]:
    """The fields every completion takes: stream, keep_alive, options, format, think, grammar."""
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported on /api yet; use /v1/chat/completions", param="logprobs")
    data: dict[str, Any] = {"stream": body.stream, "keep_alive": body.keep_alive}
    for theirs, ours in OPTION_FIELDS.items():
        value = (body.options or {}).get(theirs)
        if value is None or (theirs == "num_predict" and isinstance(value, int) and value <= 0):
            continue  # num_predict -1 (forever) or -2 (fill the context): until the turn or the context ends
        data[ours] = value
    if body.format == "json":
        data["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        data["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": body.format}}
    if body.grammar is not None:
        data["grammar"] = body.grammar
    if chat and isinstance(body.think, bool):
        data["chat_template_kwargs"] = {"enable_thinking": body.think}
    elif chat and isinstance(body.think, str):
        data["reasoning_effort"] = body.think
    return data


def _message(message: Message, index: int) -> dict[str, Any]:
    """An Ollama message as an OpenAI one: thinking as ``reasoning_content``, call arguments as JSON text."""
    data: dict[str, Any] = {"role": message.role,
                            "content": _with_images(message.content, message.images, f"messages[{index}].images")}
    if message.thinking:
        data["reasoning_content"] = message.thinking
    if message.tool_calls:
        data["tool_calls"] = [{"id": call.id or f"call_{index}_{n}", "type": "function",
                               "function": {"name": call.function.name,
                                            "arguments": json.dumps(call.function.arguments, ensure_ascii=False)}}
                              for n, call in enumerate(message.tool_calls)]
    if message.tool_name:
        data["name"] = message.tool_name
    return data


def _with_images(text: str, images: list[str] | None, param: str) -> str | list[dict[str, Any]]:
    """A message's content with its pictures (base64, as Ollama sends them) before its text, as
    Ollama places them; each part remembers where the client put it, for errors."""
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": "data:image;base64," + image},
                                    "source": f"{param}[{n}]"} for n, image in enumerate(images)]
    return [*parts, {"type": "text", "text": text}] if text else parts


def _refuse(value: Any, param: str, message: str) -> None:
    if value:
        raise InvalidRequest(f"Invalid '{param}': {message}", param=param)
