"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``): a thin adapter
over the completion core.

A request is translated into the chat request ``/v1/chat/completions`` takes
(``anthropic_schemas.chat_request``), judged, prepared and run by ``completions`` exactly as
that one is (leases, lazy loading, ``keep_alive``, queueing, hang-ups, metrics, the log line),
and its answer written back in Anthropic's shapes: a ``message`` with ``thinking``, ``text``
and ``tool_use`` blocks, or Anthropic's event stream (``message_start``, one
``content_block_start``/``_delta``/``_stop`` run per block, ``message_delta``,
``message_stop``; ``ping`` while the model loads or the request queues).

Every error on these paths, the auth hook's and routing's included, is written as
``{"type": "error", "error": {"type", "message"}}`` (``errors.register_error_shape``); one
that happens once a stream has started is an ``error`` event. Keys come as ``x-api-key`` or
a bearer token (``auth``); ``anthropic-version`` is accepted and not needed.

What ``stop_reason`` says: ``tool_use`` when the answer holds a tool call, ``max_tokens`` when
``max_tokens`` cut it, ``stop_sequence`` (with ``stop_sequence`` set) when one of the request's
``stop_sequences`` ended it (the worker reports the stop string it matched), else ``end_turn``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

import completions
from anthropic_schemas import CountTokensRequest, MessagesRequest, chat_request
from completions import ChoiceEvent, ChoiceResult, Finished, Job, StreamRenderer
from dialects import Content, Reasoning, ToolCallArgs, ToolCallStart
from errors import ServiceError, register_error_shape
from model_manager import Mode
from request_checks import apply_defaults, decode_media, judge
from schemas import parse_body
from state import app_state

PREFIX = "/v1/messages"
bp = Blueprint("anthropic", __name__, url_prefix=PREFIX)
bp.record_once(lambda setup: register_error_shape(setup.app, PREFIX, error_body))

# Anthropic's error types by HTTP status; other 4xx are invalid requests, other 5xx API errors.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 529: "overloaded_error"}


def error_body(error: ServiceError) -> dict[str, Any]:
    """Anthropic's error object for ``error``."""
    fallback = "invalid_request_error" if error.status < 500 else "api_error"
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(error.status, fallback), "message": error.message}}


@bp.post("")
def create_message() -> Response:
    """A message from the model, streamed as Anthropic's events when ``stream`` is true."""
    body = parse_body(request.get_data(), MessagesRequest)
    chat = chat_request(body)
    state = app_state()
    manager, observer = state.manager, state.metrics.observe_completion
    verdict = judge(manager, chat, state.grammars)  # before any lease: a refused request loads nothing
    disconnected = request.environ.get("waitress.client_disconnected") or (lambda: False)
    if chat.stream:
        renderer = MessageStream(body.stop_sequences or [])
        return completions.stream_with(manager, "chat", chat, verdict, disconnected, state.pool, renderer, observer)
    job = completions.prepare(manager, "chat", chat, verdict, disconnected, observer)
    result = completions.results(job)[0]
    reason, sequence = stop_reason(result.finish_reason, job, body.stop_sequences or [])
    return jsonify({**_message_head(job), "content": _blocks(result), "stop_reason": reason,
                    "stop_sequence": sequence, "usage": _usage(job)})


@bp.post("/count_tokens")
def count_tokens() -> Response:
    """How many tokens the request's prompt (system, messages, tools) takes with the model's template."""
    chat = chat_request(parse_body(request.get_data(), CountTokensRequest))
    manager = app_state().manager
    model_id = manager.resolve(chat.model)
    manager.check_mode(model_id, Mode.GENERATE)
    apply_defaults(chat, manager.model_settings(model_id).default)  # a default enable_thinking shapes the prompt
    media = decode_media(manager, model_id, chat)
    return jsonify({"input_tokens": completions.count_prompt_tokens(manager, model_id, chat, media)})


def stop_reason(finish: str, job: Job, asked: list[str]) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a choice that ended with ``finish``."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    matched = job.streams[0].result.stop
    if matched is not None and matched in asked:  # not the template's own end marker
        return "stop_sequence", matched
    return "end_turn", None


def _message_head(job: Job) -> dict[str, Any]:
    return {"id": "msg_" + job.id, "type": "message", "role": "assistant", "model": job.lease.model_id}


def _usage(job: Job) -> dict[str, int]:
    """Anthropic's usage: prompt tokens read from the KV cache are counted apart, as its own cache's are."""
    usage = job.usage()
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": usage["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": usage["completion_tokens"]}


def _blocks(result: ChoiceResult) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if result.reasoning:
        blocks.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    if result.content:
        blocks.append({"type": "text", "text": result.content})
    blocks.extend({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                   "input": _input(call["function"]["arguments"])} for call in result.tool_calls)
    return blocks or [{"type": "text", "text": ""}]


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as ``tool_use.input``: the dialects hand over a JSON object's text."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return (f"event: {name}\ndata: ".encode() + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            + b"\n\n")


_EMPTY_BLOCKS = {"text": {"type": "text", "text": ""},
                 "thinking": {"type": "thinking", "thinking": "", "signature": ""}}


class MessageStream(StreamRenderer):
    """Anthropic's event stream for one message: one content block per run of text, of
    thinking, or per tool call, opened when its first piece arrives."""

    def __init__(self, stop_sequences: list[str]) -> None:
        self.asked = stop_sequences
        self.blocks = 0  # blocks opened so far; the open one is blocks - 1
        self.open: str | None = None  # the open block's type
        self.finish = "stop"

    def keepalive(self, job: Job | None) -> bytes:
        return _event("ping", {"type": "ping"})

    def start(self, job: Job) -> Iterator[bytes]:
        message = {**_message_head(job), "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {**_usage(job), "output_tokens": 0}}
        yield _event("message_start", {"type": "message_start", "message": message})

    def event(self, job: Job, index: int, event: ChoiceEvent) -> Iterator[bytes]:
        if isinstance(event, Content | Reasoning):
            if not event.text:
                return
            kind = "text" if isinstance(event, Content) else "thinking"
            if self.open != kind:
                yield from self._close()
                yield self._open(_EMPTY_BLOCKS[kind])
            yield self._delta({"type": "text_delta", "text": event.text} if kind == "text"
                              else {"type": "thinking_delta", "thinking": event.text})
        elif isinstance(event, ToolCallStart):
            yield from self._close()
            yield self._open({"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
        elif isinstance(event, ToolCallArgs):
            if self.open == "tool_use":  # calls stream one after another: it is the open one's
                yield self._delta({"type": "input_json_delta", "partial_json": event.fragment})
        elif isinstance(event, Finished):
            self.finish = event.reason
            yield from self._close()

    def end(self, job: Job) -> Iterator[bytes]:
        if self.blocks == 0:  # a message always has content: an empty text block, as non-streamed
            yield self._open(_EMPTY_BLOCKS["text"])
            yield from self._close()
        reason, sequence = stop_reason(self.finish, job, self.asked)
        yield _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason,
                                                                          "stop_sequence": sequence},
                                       "usage": _usage(job)})
        yield _event("message_stop", {"type": "message_stop"})

    def error(self, error: ServiceError) -> Iterator[bytes]:
        yield _event("error", error_body(error))

    def _open(self, block: dict[str, Any]) -> bytes:
        self.open = block["type"]
        self.blocks += 1
        return _event("content_block_start", {"type": "content_block_start", "index": self.blocks - 1,
                                              "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1,
                                              "delta": delta})

    def _close(self) -> Iterator[bytes]:
        if self.open is None:
            return
        if self.open == "thinking":  # clients keep a thinking block's signature to send it back
            yield self._delta({"type": "signature_delta", "signature": ""})
        self.open = None
        yield _event("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})
