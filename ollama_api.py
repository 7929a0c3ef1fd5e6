"""Ollama's API under ``/api``: a thin adapter over the completion core.

Each view translates Ollama's body into the core's request (``ollama_schemas``), judges it
and runs it exactly as ``/v1`` does (``completions.prepare``/``results``/``stream_with``), so
leases, lazy loading, keep_alive, queueing, auth, CORS, metrics and events are the same; only
the shapes differ. Streams are newline-delimited JSON, Ollama's default. Errors are Ollama's
``{"error": "message"}`` with the HTTP status, registered for the ``/api/`` prefix, so auth,
routing and in-stream failures answer in that shape too.

Concurrency: none of its own; the views run on waitress's threads as ``/v1``'s do, and a
stream that waits for a load prepares on ``state.pool`` (``completions.stream_with``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import llama_cpp
from flask import Blueprint, Response, jsonify, request

import completions
import ollama_models
from completions import ChoiceEvent, Finished, Job, StreamRenderer
from dialects import Content, Reasoning, ToolCallArgs, ToolCallStart
from embeddings import create_embeddings
from errors import InvalidRequest, NotSupported, ServiceError, register_error_shape
from ollama_schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ShowRequest,
    chat_request,
    embedding_request,
    generate_request,
    renamed,
)
from request_checks import judge
from schemas import ChatCompletionRequest, _Generation, parse_body
from state import app_state

bp = Blueprint("ollama", __name__, url_prefix="/api")
# The Ollama release whose API this adapter follows (clients check it before using newer fields).
VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
NOT_SUPPORTED = ("Models are GGUF files in the server's models folder: copy a .gguf file there to add a model "
                 "and delete it to remove one; /api/pull, /api/push, /api/create, /api/copy and /api/delete "
                 "are not supported")


def error_shape(error: ServiceError) -> dict[str, Any]:
    """Ollama's error body."""
    return {"error": error.message}


bp.record_once(lambda setup: register_error_shape(setup.app, "/api", error_shape))


@bp.get("/version")
def version() -> Response:
    """The Ollama API version this server speaks."""
    return jsonify({"version": VERSION})


@bp.get("/tags")
def tags() -> Response:
    """Every model in the models folder."""
    return jsonify(ollama_models.tags(app_state().manager))


@bp.get("/ps")
def ps() -> Response:
    """The loaded models and when each unloads if left idle."""
    return jsonify(ollama_models.running(app_state().manager, llama_cpp.llama_supports_gpu_offload()))


@bp.post("/show")
def show() -> Response:
    """One model's template, parameters, GGUF metadata and capabilities."""
    body = parse_body(request.get_data(), ShowRequest)
    name = body.model or body.name
    if name is None:
        raise InvalidRequest("Missing required parameter: 'model'", param="model")
    manager = app_state().manager
    return jsonify(ollama_models.show(manager, ollama_models.resolve_name(manager, name)))


@bp.post("/chat")
def chat() -> Response:
    """A chat turn; newline-delimited JSON unless ``stream`` is false. No messages: load (or, with
    ``keep_alive`` 0, unload) the model, as Ollama does."""
    started = time.monotonic()
    body = parse_body(request.get_data(), ChatRequest)
    manager = app_state().manager
    model_id = ollama_models.resolve_name(manager, body.model)
    reply = Reply(body.model, "chat", started)
    if not body.messages:
        return jsonify(_load_or_unload(reply, model_id, body.keep_alive))
    with _ollama_names():
        completion = chat_request(body, model_id)
    return _answer(reply, "chat", completion)


@bp.post("/generate")
def generate() -> Response:
    """A completion of ``prompt``, through the model's chat template unless ``raw`` (or the model
    has none). No prompt: load or unload the model, as for ``/api/chat``."""
    started = time.monotonic()
    body = parse_body(request.get_data(), GenerateRequest)
    manager = app_state().manager
    model_id = ollama_models.resolve_name(manager, body.model)
    reply = Reply(body.model, "generate", started)
    if not body.prompt and not body.images:
        return jsonify(_load_or_unload(reply, model_id, body.keep_alive))
    templated = ollama_models.has_template(manager, model_id)
    with _ollama_names():
        completion = generate_request(body, model_id, templated)
    return _answer(reply, "chat" if isinstance(completion, ChatCompletionRequest) else "text", completion)


@bp.post("/embed")
def embed() -> Response:
    """One normalised embedding per input."""
    started = time.monotonic()
    body = parse_body(request.get_data(), EmbedRequest)
    answer = _embeddings(body)
    return jsonify({"model": body.model, "embeddings": [d["embedding"] for d in answer["data"]],
                    "total_duration": _ns(time.monotonic() - started), "load_duration": 0,
                    "prompt_eval_count": answer["usage"]["prompt_tokens"]})


@bp.post("/embeddings")
def embeddings() -> Response:
    """Ollama's older endpoint: one prompt, one embedding."""
    body = parse_body(request.get_data(), EmbeddingsRequest)
    return jsonify({"embedding": _embeddings(body)["data"][0]["embedding"]})


@bp.post("/pull")
@bp.post("/push")
@bp.post("/create")
@bp.post("/copy")
@bp.delete("/delete")
def not_supported() -> Response:
    """Model management: the models folder is the one source of models."""
    raise NotSupported(NOT_SUPPORTED)


# ------------------------------------------------------------------ the adapter


def _answer(reply: Reply, kind: str, completion: _Generation) -> Response:
    """Judge and run ``completion`` as /v1 does; answer in Ollama's shapes."""
    state = app_state()
    manager, observer = state.manager, state.metrics.observe_completion
    with _ollama_names():
        verdict = judge(manager, completion, state.grammars)  # before any lease: a refused request loads nothing
        disconnected = request.environ.get("waitress.client_disconnected") or (lambda: False)
        if completion.stream:
            return completions.stream_with(manager, kind, completion, verdict, disconnected, state.pool,
                                           NdjsonRenderer(reply), observer)
        job = completions.prepare(manager, kind, completion, verdict, disconnected, observer)
    result = completions.results(job)[0]
    calls = [_call(call, index) for index, call in enumerate(result.tool_calls)]
    return jsonify(reply.final(job, result.finish_reason, result.content or "", result.reasoning, calls))


def _embeddings(body: EmbedRequest | EmbeddingsRequest) -> dict[str, Any]:
    manager = app_state().manager
    with _ollama_names():
        return create_embeddings(manager, embedding_request(body, ollama_models.resolve_name(manager, body.model)))


def _load_or_unload(reply: Reply, model_id: str, keep_alive: float | None) -> dict[str, Any]:
    manager = app_state().manager
    if keep_alive == 0:
        manager.unload_after_requests(model_id)  # as Ollama: a busy model goes once its requests end
        return reply.done("unload")
    manager.load(model_id, keep_alive=keep_alive)
    return reply.done("load")


@contextmanager
def _ollama_names() -> Iterator[None]:
    """Refusals name the fields as the Ollama client sent them."""
    try:
        yield
    except InvalidRequest as exc:
        raise renamed(exc) from None


@dataclass
class Reply:
    """One answer's Ollama shapes: a chat's ``message`` or a generate's ``response``."""

    model: str  # as the client named it
    shape: str  # "chat" or "generate"
    started: float  # monotonic, when the request arrived

    def chunk(self, content: str = "", thinking: str | None = None,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A piece of the answer (``done`` false)."""
        body: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.shape == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            body["message"] = message
        else:
            body["response"] = content
            if thinking:
                body["thinking"] = thinking
        body["done"] = False
        return body

    def done(self, reason: str) -> dict[str, Any]:
        """The answer to a load or an unload."""
        return {**self.chunk(), "done": True, "done_reason": reason}

    def final(self, job: Job, finish: str, content: str = "", thinking: str | None = None,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The last object: ``done``, why, token counts and durations (nanoseconds)."""
        usage = job.usage()
        now = time.monotonic()
        first = next((s.result.first_token_at for s in job.streams if s.result.first_token_at), None)
        first = first if first is not None else now
        return {**self.chunk(content, thinking, tool_calls), "done": True, "done_reason": _done_reason(finish),
                "total_duration": _ns(now - self.started), "load_duration": _ns(job.started - self.started),
                "prompt_eval_count": usage["prompt_tokens"], "prompt_eval_duration": _ns(first - job.started),
                "eval_count": usage["completion_tokens"], "eval_duration": _ns(now - first)}


@dataclass
class NdjsonRenderer(StreamRenderer):
    """Ollama's stream: one JSON object a line; a tool call goes out whole once its arguments end."""

    reply: Reply
    mimetype = NDJSON
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    finish: str = "stop"
    call: dict[str, Any] | None = None  # the call being read: id, name, arguments' JSON text so far
    calls: int = field(default=0)

    def keepalive(self, job: Job | None) -> bytes:
        # No comment syntax in NDJSON, and Ollama's clients parse every line: an empty piece of
        # the answer is the one keepalive they all take.
        return _line(self.reply.chunk())

    def event(self, job: Job, index: int, event: ChoiceEvent) -> Iterator[bytes]:
        if isinstance(event, Content) and event.text:
            yield _line(self.reply.chunk(event.text))
        elif isinstance(event, Reasoning) and event.text:
            yield _line(self.reply.chunk(thinking=event.text))
        elif isinstance(event, ToolCallStart):
            yield from self._flush_call()
            self.call = {"id": event.id, "function": {"name": event.name, "arguments": ""}}
        elif isinstance(event, ToolCallArgs) and self.call is not None:
            self.call["function"]["arguments"] += event.fragment
        elif isinstance(event, Finished):
            yield from self._flush_call()
            self.finish = event.reason

    def end(self, job: Job) -> Iterator[bytes]:
        yield _line(self.reply.final(job, self.finish))

    def error(self, error: ServiceError) -> Iterator[bytes]:
        yield _line(error_shape(error))

    def _flush_call(self) -> Iterator[bytes]:
        if self.call is not None:
            yield _line(self.reply.chunk(tool_calls=[_call(self.call, self.calls)]))
            self.calls += 1
            self.call = None


def _call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """An OpenAI tool call as Ollama's: the arguments an object, not JSON text."""
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except json.JSONDecodeError:  # a call cut short (num_predict): what was written, as text
        arguments = {"arguments": function["arguments"]}
    if not isinstance(arguments, dict):
        arguments = {"arguments": arguments}
    return {"id": call.get("id"), "function": {"index": index, "name": function["name"], "arguments": arguments}}


def _done_reason(finish: str) -> str:
    """Ollama ends a turn with a call as ``stop``; ``length`` is the same word in both."""
    return "length" if finish == "length" else "stop"


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
