"""``POST /v1/rerank`` (also ``/rerank``): documents ordered by relevance to a query.

The Jina/Cohere shape llama.cpp's server speaks: ``query``, ``documents``, ``top_n``,
``return_documents`` -> ``results`` of ``index`` and ``relevance_score``, most relevant first.
A reranker is a cross-encoder GGUF (pooling type rank, such as bge-reranker): each
(query, document) pair is read as one input of the model's embedding-mode instance, as
``<bos> query <eos> [<sep>] document <eos>`` by the vocabulary's own flags (what llama-server
builds), and its pooled output is the score: the model's raw logit, not normalised, as
llama-server returns it. Any other model answers 400.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import Field

from embeddings import worker_failures
from errors import ContextLengthExceeded, InvalidRequest
from model_manager import Mode
from schemas import KeepAlive, _Body, parse_body
from state import app_state

log = logging.getLogger(__name__)
bp = Blueprint("rerank", __name__)
MAX_DOCUMENTS = 1024


class RerankRequest(_Body):
    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    keep_alive: KeepAlive = None


@bp.post("/v1/rerank")
@bp.post("/rerank")
def rerank() -> Response:
    """Score every document against the query with a reranker model; best first."""
    body = parse_body(request.get_data(), RerankRequest)
    started = time.monotonic()
    manager = app_state().manager
    with manager.acquire(body.model, Mode.EMBED, keep_alive=body.keep_alive) as lease:
        worker = lease.worker
        info = worker.info
        if not info.n_cls_out:
            raise InvalidRequest(f"{lease.model_id} is not a reranker (a GGUF with pooling type rank)",
                                 param="model")
        with worker_failures(lease, "Reranking", "documents"):
            query = worker.tokenize(body.query, add_special=False, parse_special=False)
            pairs = [_pair(info, query, worker.tokenize(doc, add_special=False, parse_special=False))
                     for doc in body.documents]
            for index, tokens in enumerate(pairs):
                if len(tokens) > info.n_batch:
                    raise ContextLengthExceeded(f"the query with documents[{index}] has {len(tokens)} tokens; "
                                                f"this model reads at most {info.n_batch}", param="documents")
            scores = [float(vector[0]) for vector in worker.embed(pairs)]
        model_id = lease.model_id
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[: body.top_n]
    results: list[dict[str, Any]] = []
    for index in order:
        result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if body.return_documents:
            result["document"] = {"text": body.documents[index]}
        results.append(result)
    tokens = sum(len(p) for p in pairs)
    log.info("rerank model=%s documents=%d tokens=%d seconds=%.3f", model_id, len(pairs), tokens,
             time.monotonic() - started)
    return jsonify({"object": "list", "model": model_id, "results": results,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _pair(info: Any, query: list[int], document: list[int]) -> list[int]:
    """One reranker input, the special tokens as the model's vocabulary asks for them."""
    tokens = [info.bos_token] if info.add_bos and info.bos_token >= 0 else []
    tokens += query
    if info.add_eos and info.eos_token >= 0:
        tokens.append(info.eos_token)
    if info.add_sep and info.sep_token >= 0:
        tokens.append(info.sep_token)
    tokens += document
    if info.add_eos and info.eos_token >= 0:
        tokens.append(info.eos_token)
    return tokens
