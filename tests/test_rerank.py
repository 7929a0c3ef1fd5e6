"""``/v1/rerank`` through the real server, on a generated tiny BERT cross-encoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import llama_cpp
import pytest
from conftest import LiveServer
from gguf_factory import write_bert_reranker

DOCUMENTS = ["the cat sat on the mat", "paris is the capital of france", "what weather", "dog"]
QUERY = "what is the capital of france"


@pytest.fixture
def reranker(make_server: Callable[..., LiveServer], models_dir: Path) -> LiveServer:
    write_bert_reranker(models_dir / "reranker.gguf", seed=3)
    return make_server()


def direct_scores(path: Path) -> list[float]:
    """The same pairs scored by llama-cpp-python in this process, one at a time, laid out as
    llama-server lays out a BERT pair: [CLS] query [SEP] [SEP] document [SEP]."""
    llama = llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=512, verbose=False)
    try:
        sep = llama_cpp.llama_vocab_sep(llama._model.vocab)
        query = llama.tokenize(QUERY.encode(), add_bos=True)  # [CLS] query [SEP]
        return [_score(llama, [*query, sep, *llama.tokenize(d.encode(), add_bos=False), llama.token_eos()])
                for d in DOCUMENTS]
    finally:
        llama.close()


def _score(llama: llama_cpp.Llama, tokens: list[int]) -> float:
    llama._ctx.kv_cache_clear()
    llama._batch.set_batch(tokens, n_past=0, logits_all=True)
    llama._ctx.decode(llama._batch)
    return float(llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, 0)[0])


def test_documents_come_back_best_first_with_the_models_scores(reranker: LiveServer, models_dir: Path):
    reply = reranker.post("/v1/rerank", {"model": "reranker", "query": QUERY, "documents": DOCUMENTS,
                                         "return_documents": True})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    expected = direct_scores(models_dir / "reranker.gguf")
    by_index = {r["index"]: r["relevance_score"] for r in results}
    assert [round(by_index[i], 4) for i in range(len(DOCUMENTS))] == [round(s, 4) for s in expected]
    top = reranker.post("/rerank", {"model": "reranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert "document" not in top["results"][0]
    assert top["usage"]["prompt_tokens"] > 0


def test_a_model_that_is_not_a_reranker_is_a_400(reranker: LiveServer):
    reply = reranker.post("/v1/rerank", {"model": "tiny", "query": "q", "documents": ["d"]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"
    embed = reranker.post("/v1/embeddings", {"model": "reranker", "input": "the cat"})
    assert embed.status_code == 400 and embed.json()["error"]["param"] == "model"
    assert reranker.post("/v1/rerank", {"model": "reranker", "query": "q", "documents": []}).status_code == 400
    assert all(m["in_flight"] == 0 for m in reranker.get("/health").json()["models"])
