"""The spec checker itself: it passes OpenAI's own examples and catches what it is there to catch."""

from __future__ import annotations

import json
from typing import Any

import openai_spec
import pytest
from openai_spec import BASE64_EMBEDDING, COMPLETION_CHUNK, SpecViolation, validate

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}]}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "usage": None,
         "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}]}
TEXT = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}]}
EMBEDDINGS = {"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1},
              "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}]}


def examples(schema: str) -> list[Any]:
    """The JSON examples the spec gives for ``schema`` (a stream example holds several, and a "....")."""
    spec = json.loads(openai_spec.SPEC_PATH.read_text(encoding="utf-8"))
    text = spec["components"]["schemas"][schema]["x-oaiMeta"]["example"]
    return [json.loads(part) for part in text.split("\n\n") if part.strip() and part.strip() != "...."]


@pytest.mark.parametrize("schema", ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
                                    "CreateCompletionResponse", "Model", "ResponseOutputItemAddedEvent",
                                    "ResponseFunctionCallArgumentsDoneEvent",
                                    "ResponseItemList"])
def test_openais_own_examples_pass(schema: str):
    for example in examples(schema):
        validate(example, schema)


def test_nullable_reads_as_this_or_null():
    validate(CHUNK, "CreateChatCompletionStreamResponse")  # "usage": null, "logprobs": null
    with pytest.raises(SpecViolation, match="usage"):
        validate({**CHUNK, "usage": "none"}, "CreateChatCompletionStreamResponse")


def test_the_two_deviations_are_allowed_only_where_documented():
    validate(TEXT, COMPLETION_CHUNK)
    with pytest.raises(SpecViolation, match="finish_reason"):
        validate(TEXT, "CreateCompletionResponse")  # a complete response must say why it ended
    encoded = {**EMBEDDINGS, "data": [{**EMBEDDINGS["data"][0], "embedding": "AAAAPwAAAD8="}]}
    validate(encoded, BASE64_EMBEDDING)
    with pytest.raises(SpecViolation, match="embedding"):
        validate(encoded, "CreateEmbeddingResponse")
    with pytest.raises(SpecViolation, match="embedding"):
        validate(EMBEDDINGS, BASE64_EMBEDDING)


@pytest.mark.parametrize(("schema", "body", "where"), [
    ("CreateChatCompletionResponse", {**CHAT, "choices": [{**CHAT["choices"][0], "message": {
        "role": "assistant", "content": "hi"}}]}, "refusal"),
    ("CreateChatCompletionResponse", {**CHAT, "object": "chat.completion.chunk"}, "object"),
    (COMPLETION_CHUNK, {**TEXT, "object": "text_completion.chunk"}, "object"),
    ("CreateChatCompletionStreamResponse", {**CHUNK, "system_fingerprint": None}, "system_fingerprint"),
    ("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None}}, "code"),
    ("ListModelsResponse", {"object": "list", "data": [{"id": "a", "object": "model", "owned_by": "x"}]},
     "created"),
])
def test_shape_mistakes_are_caught(schema: str, body: dict, where: str):
    with pytest.raises(SpecViolation, match=where):
        validate(body, schema)


def test_endpoints_map_to_their_schemas():
    assert openai_spec.response_schema("/v1/chat/completions", 200, {}) == "CreateChatCompletionResponse"
    assert openai_spec.response_schema("/v1/embeddings", 200, {"encoding_format": "base64"}) == BASE64_EMBEDDING
    assert openai_spec.response_schema("/v1/models/a/b.gguf", 200, None) == "Model"
    assert openai_spec.response_schema("/v1/completions", 429, None) == "ErrorResponse"
    assert openai_spec.response_schema("/health", 200, None) is None
    assert openai_spec.chunk_schema("/v1/completions", {"id": "x"}) == COMPLETION_CHUNK
    assert openai_spec.chunk_schema("/v1/chat/completions", {"error": {}}) == "ErrorResponse"
    assert openai_spec.response_schema("/v1/responses", 200, {}) == "Response"
    assert openai_spec.response_schema("/v1/responses/resp_1", 200, None, "DELETE") == openai_spec.RESPONSE_DELETED
    assert openai_spec.response_schema("/v1/responses/resp_1/input_items", 200, None, "GET") == "ResponseItemList"
    assert openai_spec.chunk_schema("/v1/responses", {"type": "response.output_text.delta"}) == "ResponseTextDeltaEvent"
    assert openai_spec.chunk_schema("/v1/responses", {"type": "error"}) == "ResponseErrorEvent"
    assert openai_spec.chunk_schema("/v1/responses", {"type": "made.up"}) == "ResponseStreamEvent"
