"""``GET /openapi.json``: the API described from the same pydantic schemas that validate it.

Request bodies come from ``schemas.py``; nothing about them is written twice. Response
bodies are described loosely (objects), except errors, whose shape every endpoint shares.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, jsonify
from pydantic import BaseModel

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
_ERRORS = {
    "400": "Invalid request", "401": "Missing or invalid API key", "403": "Key not allowed here",
    "404": "Unknown model or stored response", "405": "Method not allowed", "409": "Model busy",
    "413": "Body too large", "415": "Unsupported media type",
    "422": "File is not a model", "429": "Queue full", "500": "Load or inference failure",
    "503": "No capacity or shutting down",
}

# (path, method, request schema, summary, streams)
_OPERATIONS: list[tuple[str, str, type[BaseModel] | None, str, bool]] = [
    ("/v1/chat/completions", "post", ChatCompletionRequest, "Chat completion", True),
    ("/v1/completions", "post", CompletionRequest, "Text completion", True),
    ("/v1/embeddings", "post", EmbeddingRequest, "Embeddings", False),
    ("/v1/models", "get", None, "List models", False),
    ("/v1/responses", "post", ResponseRequest, "Create a response (OpenAI's Responses API)", True),
    ("/v1/responses/{response_id}", "get", None, "A stored response", False),
    ("/v1/responses/{response_id}", "delete", None, "Delete a stored response", False),
    ("/v1/responses/{response_id}/input_items", "get", None, "The input items of a stored response", False),
    ("/v1/rerank", "post", RerankRequest, "Rerank documents against a query (a reranker model)", False),
    ("/tokenize", "post", TokenizeRequest, "Tokenize text (llama.cpp's endpoint)", False),
    ("/detokenize", "post", DetokenizeRequest, "Token ids back to text (llama.cpp's endpoint)", False),
    ("/apply-template", "post", ApplyTemplateRequest, "The prompt a chat request makes (llama.cpp's endpoint)", False),
    ("/health", "get", None, "Health and per-model state", False),
    ("/admin/models", "get", None, "Model detail", False),
    ("/admin/load", "post", ModelRequest, "Load a model", False),
    ("/admin/unload", "post", ModelRequest, "Unload a model or all", False),
    ("/admin/reload", "post", None, "Re-read config and rescan models", False),
]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of this server."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for path, method, body, summary, streams in _OPERATIONS:
        operation: dict[str, Any] = {"summary": summary, "responses": _responses(streams)}
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


def _responses(streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    for status, description in _ERRORS.items():
        responses[status] = {"description": description,
                             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return responses


def install_openapi(app: Flask) -> None:
    """Serve the document at ``/openapi.json`` (built once)."""
    document = openapi_document()
    app.add_url_rule("/openapi.json", "openapi", lambda: jsonify(document))
