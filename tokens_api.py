"""llama.cpp's token endpoints: ``POST /tokenize``, ``/detokenize`` and ``/apply-template``.

Named and shaped as llama-server's, plus a ``model`` field (the default model when absent), as
in its router mode. Each leases its model (loading it if needed) for the moment it takes: the
tokenizer and the chat template are the loaded model's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, jsonify, request

from completions import chat_template
from embeddings import worker_failures
from model_manager import Lease, Mode
from schemas import ChatCompletionRequest, _Body, parse_body
from state import app_state

bp = Blueprint("tokens", __name__)


class TokenizeRequest(_Body):
    model: str | None = None
    content: str
    add_special: bool = False  # llama-server's defaults
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class ApplyTemplateRequest(ChatCompletionRequest):
    """A chat request whose prompt is wanted, not its answer (its sampling fields are unused)."""


@bp.post("/tokenize")
def tokenize() -> Response:
    """``content``'s token ids in the model's vocabulary (``with_pieces``: each with its text)."""
    body = parse_body(request.get_data(), TokenizeRequest)
    with _leased(body.model) as lease:
        tokens = lease.worker.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special)
        if not body.with_pieces:
            return jsonify({"tokens": tokens})
        pieces = lease.worker.token_pieces(tokens)
    return jsonify({"tokens": [{"id": t, "piece": _piece(p)} for t, p in zip(tokens, pieces, strict=True)]})


@bp.post("/detokenize")
def detokenize() -> Response:
    """The text of ``tokens``."""
    body = parse_body(request.get_data(), DetokenizeRequest)
    with _leased(body.model) as lease:
        return jsonify({"content": lease.worker.detokenize(body.tokens)})


@bp.post("/apply-template")
def apply_template() -> Response:
    """The prompt the model's chat template makes of ``messages`` (and ``tools``, ...)."""
    body = parse_body(request.get_data(), ApplyTemplateRequest)
    with _leased(body.model) as lease:
        return jsonify({"prompt": chat_template(lease).render(body).text})


@contextmanager
def _leased(name: str | None) -> Iterator[Lease]:
    manager = app_state().manager
    model_id = manager.resolve(name)
    mode = Mode.EMBED if manager.model_settings(model_id).embedding else Mode.GENERATE
    lease = manager.acquire(model_id, mode)
    try:
        with worker_failures(lease, "Tokenizing", "tokens"):
            yield lease
    finally:
        lease.release()


def _piece(piece: bytes) -> Any:
    """A token's text, or its bytes where they are not UTF-8 alone (part of a character), as llama-server."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
