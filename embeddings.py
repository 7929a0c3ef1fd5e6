"""``/v1/embeddings``: one pooled, L2-normalised vector per input, in input order."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from engine.client import RequestFailed, WorkerCrashed
from errors import ContextLengthExceeded, InferenceFailed, InvalidRequest
from model_manager import Lease, Mode, ModelManager
from request_checks import check_token_ids
from schemas import EmbeddingRequest

log = logging.getLogger(__name__)


def create_embeddings(manager: ModelManager, request: EmbeddingRequest) -> dict[str, Any]:
    """Embed every input with the model's embedding-mode instance (in its worker)."""
    started = time.monotonic()
    _judge(manager, request)
    with manager.acquire(request.model, Mode.EMBED, keep_alive=request.keep_alive) as lease:
        worker = lease.worker
        if worker.info.n_cls_out:
            raise InvalidRequest(f"{lease.model_id} is a reranker: its output is a score, not an embedding; "
                                 "use /v1/rerank", param="model")
        with worker_failures(lease, "Embedding", "input"):
            inputs = [_tokens(worker, item) for item in request.inputs()]
            limit = worker.info.n_batch
            for index, tokens in enumerate(inputs):
                if len(tokens) > limit:
                    raise ContextLengthExceeded(f"input[{index}] has {len(tokens)} tokens; this model embeds at "
                                                f"most {limit}", param="input")
            raw = worker.embed(inputs)
        pooled = [_normalised(vector) for vector in raw]
        model_id = lease.model_id
    if request.dimensions is not None and request.dimensions != len(pooled[0]):
        raise InvalidRequest(f"this model's embeddings have {len(pooled[0])} dimensions", param="dimensions")
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
            for i, v in enumerate(pooled)]
    tokens = sum(len(t) for t in inputs)
    log.info("embeddings model=%s inputs=%d tokens=%d seconds=%.3f", model_id, len(inputs), tokens,
             time.monotonic() - started)
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@contextmanager
def worker_failures(lease: Lease, what: str, param: str) -> Iterator[None]:
    """What a model's worker reports, as the API's errors: the request's fault a 400 naming
    ``param``, anything else a 500, a crash the model's ``model_crashed``."""
    try:
        yield
    except RequestFailed as exc:
        if exc.kind != "invalid_request":
            raise InferenceFailed(f"{what} failed in {lease.model_id}: {exc.message}") from None
        raise InvalidRequest(exc.message, param=param, code=exc.code) from None
    except WorkerCrashed as exc:
        raise lease.crashed(exc) from None


def _judge(manager: ModelManager, request: EmbeddingRequest) -> None:
    """Refuse, before the model is leased, what its GGUF header already rules out."""
    header = manager.header(manager.resolve(request.model))
    if header is None:
        return
    for item in request.inputs():
        if isinstance(item, list):
            check_token_ids(item, header.n_vocab, "input")
    if request.dimensions is not None and header.n_embd and request.dimensions != header.n_embd:
        raise InvalidRequest(f"this model's embeddings have {header.n_embd} dimensions", param="dimensions")


def _tokens(worker: Any, item: str | list[int]) -> list[int]:
    if isinstance(item, list):
        check_token_ids(item, worker.info.n_vocab, "input")
        if not item:
            raise InvalidRequest("token id inputs must not be empty", param="input")
        return item
    if not item:
        raise InvalidRequest("input strings must not be empty", param="input")
    return worker.tokenize(item, add_special=True, parse_special=True)


def _normalised(vector: Any) -> np.ndarray:
    """L2-normalise (the worker pools: the model's own pooling, or the mean of its tokens)."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
