"""``GET /openapi.json``: the API described from the same pydantic schemas that validate it.

Request bodies come from ``schemas.py`` (``anthropic_schemas.py`` for Anthropic's Messages API,
``ollama_schemas.py`` for Ollama's); nothing about them is written twice. Response bodies are
described loosely (objects), except errors, whose shape every endpoint of one API shares
(OpenAI's, Anthropic's under ``/v1/messages``, or Ollama's under ``/api/``).
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, jsonify
from pydantic import BaseModel

from anthropic_schemas import ERROR_SCHEMA as ANTHROPIC_ERROR_SCHEMA
from anthropic_schemas import CountTokensRequest, MessagesRequest
from ollama_api import NDJSON
from ollama_schemas import ChatRequest, EmbeddingsRequest, EmbedRequest, GenerateRequest, ShowRequest
from rerank import RerankRequest
from responses_schemas import ResponseRequest
from schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelRequest
from tokens_api import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
OLLAMA_ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"],
                                      "properties": {"error": {"type": "string"}}}
_ERRORS = {
    "400": "Invalid request", "401": "Missing or invalid API key", "403": "Key not allowed here",
    "404": "Unknown model or stored response", "405": "Method not allowed", "409": "Model busy",
    "413": "Body too large", "415": "Unsupported media type",
    "422": "File is not a model", "429": "Queue full", "500": "Load or inference failure",
    "503": "No capacity or shutting down",
}

SSE = "text/event-stream"
# (path, method, request schema, summary, the media type of its stream or None)
_OPERATIONS: list[tuple[str, str, type[BaseModel] | None, str, str | None]] = [
    ("/v1/chat/completions", "post", ChatCompletionRequest, "Chat completion", SSE),
    ("/v1/messages", "post", MessagesRequest, "Anthropic Messages: create a message", SSE),
    ("/v1/messages/count_tokens", "post", CountTokensRequest, "Anthropic Messages: count prompt tokens", None),
    ("/v1/completions", "post", CompletionRequest, "Text completion", SSE),
    ("/v1/embeddings", "post", EmbeddingRequest, "Embeddings", None),
    ("/v1/models", "get", None, "List models", None),
    ("/v1/responses", "post", ResponseRequest, "Create a response (OpenAI's Responses API)", SSE),
    ("/v1/responses/{response_id}", "get", None, "A stored response", None),
    ("/v1/responses/{response_id}", "delete", None, "Delete a stored response", None),
    ("/v1/responses/{response_id}/input_items", "get", None, "The input items of a stored response", None),
    ("/v1/rerank", "post", RerankRequest, "Rerank documents against a query (a reranker model)", None),
    ("/tokenize", "post", TokenizeRequest, "Tokenize text (llama.cpp's endpoint)", None),
    ("/detokenize", "post", DetokenizeRequest, "Token ids back to text (llama.cpp's endpoint)", None),
    ("/apply-template", "post", ApplyTemplateRequest, "The prompt a chat request makes (llama.cpp's endpoint)", None),
    ("/health", "get", None, "Health and per-model state", None),
    ("/admin/models", "get", None, "Model detail", None),
    ("/admin/load", "post", ModelRequest, "Load a model", None),
    ("/admin/unload", "post", ModelRequest, "Unload a model or all", None),
    ("/admin/reload", "post", None, "Re-read config and rescan models", None),
    ("/api/chat", "post", ChatRequest, "Ollama chat", NDJSON),
    ("/api/generate", "post", GenerateRequest, "Ollama generate", NDJSON),
    ("/api/embed", "post", EmbedRequest, "Ollama embeddings", None),
    ("/api/embeddings", "post", EmbeddingsRequest, "Ollama embedding (older endpoint)", None),
    ("/api/show", "post", ShowRequest, "Ollama model information", None),
    ("/api/tags", "get", None, "Ollama model list", None),
    ("/api/ps", "get", None, "Ollama loaded models", None),
    ("/api/version", "get", None, "Ollama API version", None),
]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of this server."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA, "AnthropicError": ANTHROPIC_ERROR_SCHEMA,
                                  "OllamaError": OLLAMA_ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for path, method, body, summary, streams in _OPERATIONS:
        error = "AnthropicError" if path.startswith("/v1/messages") else "OllamaError" if path.startswith(
            "/api/") else "Error"
        operation: dict[str, Any] = {"summary": summary, "responses": _responses(streams, error)}
        names = re.findall(r"{(\w+)}", path)
        if names:
            operation["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                                       for name in names]
        if body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _component(body, components)}}}
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "llama-cpp-server", "version": "1.0.0",
                 "description": "OpenAI-compatible API for local GGUF models"},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _component(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _responses(streams: str | None, error: str) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams is not None:
        ok[streams] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    for status, description in _ERRORS.items():
        responses[status] = {"description": description,
                             "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}}
    return responses


def install_openapi(app: Flask) -> None:
    """Serve the document at ``/openapi.json`` (built once)."""
    document = openapi_document()
    app.add_url_rule("/openapi.json", "openapi", lambda: jsonify(document))
