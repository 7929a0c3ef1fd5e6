"""``/v1/embeddings``: one pooled, L2-normalised vector per input, in input order."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import llama_cpp
import numpy as np

from errors import ContextLengthExceeded, InvalidRequest
from model_manager import Mode, ModelManager
from request_checks import check_token_ids
from schemas import EmbeddingRequest

log = logging.getLogger(__name__)


def create_embeddings(manager: ModelManager, request: EmbeddingRequest) -> dict[str, Any]:
    """Embed every input with the model's embedding-mode instance."""
    started = time.monotonic()
    _judge(manager, request)
    with manager.acquire(request.model, Mode.EMBED, keep_alive=request.keep_alive) as lease:
        llama = lease.llama
        texts = [_as_text(llama, item) for item in request.inputs()]
        limit = llama.n_batch
        counts = [len(llama.tokenize(t.encode("utf-8"), add_bos=True, special=True)) for t in texts]
        for index, count in enumerate(counts):
            if count > limit:
                raise ContextLengthExceeded(f"input[{index}] has {count} tokens; this model embeds at most {limit}",
                                            param="input")
        with lease.generating():
            # One input per call: llama-cpp-python 0.3.36 mis-strides per-token vectors
            # when several inputs share a batch on a model without its own pooling.
            raw = [llama.embed(text, normalize=False, truncate=False) for text in texts]
        pooled = [_pool(vector, llama) for vector in raw]
        model_id = lease.model_id
    if request.dimensions is not None and request.dimensions != len(pooled[0]):
        raise InvalidRequest(f"this model's embeddings have {len(pooled[0])} dimensions", param="dimensions")
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
            for i, v in enumerate(pooled)]
    tokens = sum(counts)
    log.info("embeddings model=%s inputs=%d tokens=%d seconds=%.3f", model_id, len(texts), tokens,
             time.monotonic() - started)
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


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


def _as_text(llama: Any, item: str | list[int]) -> str:
    if isinstance(item, str):
        if not item:
            raise InvalidRequest("input strings must not be empty", param="input")
        return item
    n_vocab = llama.n_vocab()
    if not item or any(not 0 <= t < n_vocab for t in item):
        raise InvalidRequest(f"token ids must be between 0 and {n_vocab - 1}", param="input")
    return llama.detokenize(item).decode("utf-8", errors="replace")


def _pool(vector: Any, llama: Any) -> np.ndarray:
    """Mean-pool per-token vectors (models without their own pooling), then L2-normalise."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim == 2 or llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        array = array.reshape(-1, llama.n_embd()).mean(axis=0)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
