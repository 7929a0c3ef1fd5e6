"""The OpenAI-compatible endpoints under ``/v1``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

import completions
from auth import caller_is_admin
from embeddings import create_embeddings
from errors import ModelNotFound
from request_checks import judge
from schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_body
from state import app_state

bp = Blueprint("v1", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """Chat completion, streamed as Server-Sent Events when ``stream`` is true."""
    return _complete("chat", parse_body(request.get_data(), ChatCompletionRequest))


@bp.post("/completions")
def text_completions() -> Response:
    """Text completion of ``prompt``, streamed when ``stream`` is true."""
    return _complete("text", parse_body(request.get_data(), CompletionRequest))


@bp.post("/embeddings")
def embeddings() -> Response:
    """One normalised embedding vector per input."""
    body = parse_body(request.get_data(), EmbeddingRequest)
    return jsonify(create_embeddings(app_state().manager, body))


@bp.get("/models")
def list_models() -> Response:
    """Every discovered model, loaded or not, in OpenAI's list shape (plus live state)."""
    data = []
    for view in _views():
        entry = _model_object(view)
        data.append(entry)
        data.extend({**entry, "id": alias, "alias_of": view["id"]} for alias in view["aliases"])
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model>")
def get_model(model: str) -> Response:
    """One model by id."""
    manager = app_state().manager
    model_id = manager.resolve(model)
    for view in _views():
        if view["id"] == model_id:
            return jsonify(_model_object(view))
    raise ModelNotFound(f"The model '{model[:100]}' does not exist", param="model")


def _complete(kind: str, body: Any) -> Response:
    state = app_state()
    manager, observer = state.manager, state.metrics.observe_completion
    verdict = judge(manager, body, state.grammars)  # before any lease: a refused request loads nothing
    disconnected = request.environ.get("waitress.client_disconnected") or (lambda: False)
    if body.stream and not manager.is_loaded(verdict.model_id):
        return completions.stream_after_load(manager, kind, body, verdict, disconnected, state.pool, observer)
    job = completions.prepare(manager, kind, body, verdict, disconnected, observer)
    if body.stream:
        return completions.stream(job)
    return jsonify(completions.complete(job))


def _views() -> list[dict[str, Any]]:
    # As /health: RPC servers and devices are for admins (addresses of a protocol without authentication).
    state = app_state()
    return state.manager.models(relative_paths=not caller_is_admin(state.settings.server))


def _model_object(view: dict[str, Any]) -> dict[str, Any]:
    return {"id": view["id"], "object": "model", "created": view["created"], "owned_by": "llama-cpp-server",
            **{key: value for key, value in view.items() if key not in ("id", "created", "path")}}
