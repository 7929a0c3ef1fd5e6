"""Check response bodies against OpenAI's own OpenAPI document (../shared/openai-spec/openapi.json).

The document is OpenAPI 3.1 (JSON Schema 2020-12), but about a hundred of its schemas
still carry 3.0's ``nullable: true``, which a 2020-12 validator ignores; the tree is
rewritten once so that each such schema reads "this, or null". ``$ref``s resolve against
the document itself, registered under ``SPEC_URI``, and nothing is fetched from outside.
The validator is ``jsonschema_rs``, the one schemathesis already brings in: validators
are compiled once per schema name and cached, and checking one stream chunk takes
microseconds.

Two places where the spec is stricter than what OpenAI really sends are allowed, each
under its own name so nothing else is loosened:

- ``COMPLETION_CHUNK``: a streamed ``/v1/completions`` chunk is a
  ``CreateCompletionResponse`` whose choices may carry ``"finish_reason": null`` until the
  last one (the spec's own streaming example does).
- ``BASE64_EMBEDDING``: with ``encoding_format: "base64"`` each ``embedding`` is a base64
  string of little-endian float32s, not an array of numbers.

One shape the spec leaves out is written here: ``RESPONSE_DELETED``, the body of
``DELETE /v1/responses/{id}`` (the spec documents a bare 200; OpenAI answers
``{"id", "object": "response.deleted", "deleted": true}``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema_rs

SPEC_PATH = Path(os.environ.get("OPENAI_SPEC", Path(__file__).resolve().parents[2] / "shared" / "openai-spec"
                                / "openapi.json"))
SPEC_URI = "urn:openai:openapi.json"

COMPLETION_CHUNK = "CreateCompletionResponse.streamed"
BASE64_EMBEDDING = "CreateEmbeddingResponse.base64"
RESPONSE_DELETED = "DeleteResponse.local"

# Keys whose values are data, not schemas: a "nullable" inside them is not a keyword.
_DATA_KEYS = frozenset({"example", "examples", "default", "enum", "const"})


# What each endpoint of ours answers with, by OpenAI's schema names.
_REPLIES = {"/v1/chat/completions": "CreateChatCompletionResponse", "/v1/completions": "CreateCompletionResponse",
            "/v1/embeddings": "CreateEmbeddingResponse", "/v1/models": "ListModelsResponse"}
_CHUNKS = {"/v1/chat/completions": "CreateChatCompletionStreamResponse", "/v1/completions": COMPLETION_CHUNK}


class SpecViolation(AssertionError):
    """A body that does not match its OpenAI schema; the message says where and why."""


def validate(body: Any, schema: str) -> None:
    """Raise ``SpecViolation`` unless ``body`` matches ``components.schemas[schema]``
    (or one of the two named deviations)."""
    errors = [f"at /{'/'.join(map(str, e.instance_path))}: {e.message}" for e in _validator(schema).iter_errors(body)]
    if errors:
        raise SpecViolation(f"{schema}: " + "; ".join(errors[:5]) + f"\nbody: {json.dumps(body)[:2000]}")


def response_schema(path: str, status: int, request: Any, method: str = "POST") -> str | None:
    """The schema a JSON reply to ``request`` (its parsed body) on ``path`` must match; None off OpenAI's
    paths (off ``/v1``, and Anthropic's ``/v1/messages``, checked by its own tests)."""
    if not path.startswith("/v1/") or path.startswith("/v1/messages"):
        return None
    if status >= 400:
        return "ErrorResponse"
    if path.startswith("/v1/models/"):
        return "Model"
    if path.startswith("/v1/responses"):
        if path.endswith("/input_items"):
            return "ResponseItemList"
        return RESPONSE_DELETED if method == "DELETE" else "Response"
    schema = _REPLIES.get(path)
    if schema == "CreateEmbeddingResponse" and isinstance(request, dict) and request.get("encoding_format") == "base64":
        return BASE64_EMBEDDING
    return schema


def chunk_schema(path: str, chunk: Any) -> str | None:
    """The schema one streamed event on ``path`` must match: a completion chunk, or an in-band error;
    on ``/v1/responses`` the schema of the event's ``type``."""
    if path == "/v1/responses":
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        return _response_events().get(kind, "ResponseStreamEvent") if isinstance(kind, str) else "ResponseStreamEvent"
    if path not in _CHUNKS:
        return None
    return "ErrorResponse" if isinstance(chunk, dict) and "error" in chunk else _CHUNKS[path]


@functools.cache
def _validator(schema: str) -> jsonschema_rs.Draft202012Validator:
    if schema not in _document()["components"]["schemas"]:
        raise KeyError(f"no schema {schema!r} in {SPEC_PATH}")
    return jsonschema_rs.Draft202012Validator({"$ref": f"{SPEC_URI}#/components/schemas/{schema}"},
                                              registry=_registry(), offline=True)


@functools.cache
def _response_events() -> dict[str, str]:
    """Each Responses stream event's ``type`` -> the name of its schema."""
    schemas = _document()["components"]["schemas"]
    events = {}
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[1]
        kind = schemas[name].get("properties", {}).get("type", {}).get("enum", [None])[0]
        if kind is not None:
            events[kind] = name
    return events


@functools.cache
def _registry() -> jsonschema_rs.Registry:
    return jsonschema_rs.Registry([(SPEC_URI, _document())], draft=jsonschema_rs.Draft202012)


@functools.cache
def _document() -> dict[str, Any]:
    """The spec with ``nullable`` rewritten and the two deviations added under their own names."""
    document = _without_nullable(json.loads(SPEC_PATH.read_text(encoding="utf-8")))
    schemas = document["components"]["schemas"]
    schemas[COMPLETION_CHUNK] = _completion_chunk(schemas["CreateCompletionResponse"])
    schemas[BASE64_EMBEDDING] = _base64_embeddings(schemas["CreateEmbeddingResponse"], schemas["Embedding"])
    schemas[RESPONSE_DELETED] = {
        "type": "object", "required": ["id", "object", "deleted"], "additionalProperties": False,
        "properties": {"id": {"type": "string"}, "object": {"const": "response.deleted"}, "deleted": {"const": True}}}
    return document


def _without_nullable(node: Any) -> Any:
    """Rewrite every ``{"nullable": true, ...}`` schema as ``{"anyOf": [{...}, {"type": "null"}]}``."""
    if isinstance(node, list):
        return [_without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: value if key in _DATA_KEYS else _without_nullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _completion_chunk(response: dict[str, Any]) -> dict[str, Any]:
    chunk = copy.deepcopy(response)
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    return chunk


def _base64_embeddings(response: dict[str, Any], embedding: dict[str, Any]) -> dict[str, Any]:
    item = copy.deepcopy(embedding)
    item["properties"]["embedding"] = {"type": "string", "contentEncoding": "base64"}
    listing = copy.deepcopy(response)
    listing["properties"]["data"]["items"] = item
    return listing
