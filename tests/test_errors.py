"""Every client mistake gets an OpenAI-shaped error with the right status, and nothing else breaks."""

from __future__ import annotations

import pytest
import requests
from conftest import LiveServer, chat_body


def assert_error(response: requests.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and "<html" not in response.text.lower()
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny"}, "messages"),
    ({"model": "tiny", "messages": "hi"}, "messages"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (chat_body("tiny", temperature="hot"), "temperature"),
    (chat_body("tiny", temperature=-1), "temperature"),
    (chat_body("tiny", max_tokens=0), "max_tokens"),
    (chat_body("tiny", max_tokens=1.5), "max_tokens"),
    (chat_body("tiny", stream="yes"), "stream"),
    (chat_body("tiny", n=0), "n"),
    (chat_body("tiny", n=17), "n"),
    (chat_body("tiny", top_logprobs=3), "top_logprobs"),
    (chat_body("tiny", logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat_body("tiny", stop=["x"] * 17), "stop"),
    (chat_body("tiny", logit_bias={"abc": 1}), "logit_bias"),
    (chat_body("tiny", logit_bias={"999999": 1}), "logit_bias"),
    (chat_body("tiny", response_format={"type": "xml"}), "response_format.type"),
    (chat_body("tiny", tool_choice="required", tools=[{"type": "function"}]), "tools[0].function"),
])
def test_chat_validation_errors_name_the_parameter(server: LiveServer, body, param):
    assert_error(server.post("/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": "x", "echo": True}, "echo"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "tiny", "prompt": ["a", "b", "c"], "n": 6}, "n"),
])
def test_completion_validation_errors(server: LiveServer, body, param):
    assert_error(server.post("/v1/completions", body), 400, param)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny"}, "input"),
    ({"model": "tiny", "input": []}, "input"),
    ({"model": "tiny", "input": [""]}, "input"),
    ({"model": "tiny", "input": [99999]}, "input"),
    ({"model": "tiny", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "tiny", "input": ["x"] * 3000}, "input"),
])
def test_embedding_validation_errors(server: LiveServer, body, param):
    assert_error(server.post("/v1/embeddings", body), 400, param)


def test_malformed_json_and_non_object_bodies(server: LiveServer):
    for raw in (b"{not json", b"[1, 2]", b"", b'"text"', b"\xff\xfe"):
        response = server.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        assert_error(response, 400)


def test_unknown_model_is_404_listing_available_ids(server: LiveServer):
    error = assert_error(server.post("/v1/chat/completions", chat_body("nope")), 404, "model")
    assert error["code"] == "model_not_found"
    assert "tiny" in error["message"] and "tiny-chat" in error["message"]


def test_missing_model_without_default_is_400(server: LiveServer):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(server.post("/v1/chat/completions", body), 400, "model")


def test_prompt_longer_than_context_is_400(make_server):
    server = make_server({"n_ctx": 64})
    error = assert_error(server.post("/v1/completions", {"model": "tiny", "prompt": "Hello " * 100}), 400)
    assert error["code"] == "context_length_exceeded" and "64" in error["message"]
    # max_tokens past the context is clamped to the room left, not refused
    reply = server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 500,
                                            "ignore_eos": True, "temperature": 0}).json()
    assert reply["usage"]["total_tokens"] == 64


def test_wrong_method_is_405(server: LiveServer):
    error = assert_error(server.get("/v1/chat/completions"), 405)
    assert "POST" in error["message"]
    assert_error(requests.delete(server.url + "/health", timeout=10), 405)


def test_unknown_path_is_404_json(server: LiveServer):
    assert_error(server.get("/v2/nothing"), 404)


def test_oversized_body_is_413(make_server):
    server = make_server(server={"max_request_body": 64 * 1024})
    assert_error(server.post("/v1/chat/completions", chat_body("tiny", content="x" * 100_000)), 413)


def test_admin_endpoints_validate_their_bodies(server: LiveServer):
    assert_error(server.post("/admin/unload", {}), 400, "model")
    assert_error(server.post("/admin/unload", {"model": 3}), 400, "model")
    assert_error(server.post("/admin/load", {"model": "nope"}), 404, "model")


def test_errors_leave_the_server_serving(server: LiveServer):
    for _ in range(3):
        server.post("/v1/chat/completions", {"model": "tiny", "messages": 7})
        server.post("/v1/completions", {"model": "ghost", "prompt": "x"})
    reply = server.post("/v1/chat/completions", chat_body("tiny", max_tokens=2))
    assert reply.status_code == 200
    view = server.model_view("tiny")
    assert view["in_flight"] == 0 and view["state"] == "loaded"


def test_cors_allows_configured_origin_only(make_server):
    server = make_server(server={"cors_origins": ["http://allowed.test"]})
    allowed = server.get("/v1/models", headers={"Origin": "http://allowed.test"})
    assert allowed.headers.get("Access-Control-Allow-Origin") == "http://allowed.test"
    refused = server.get("/v1/models", headers={"Origin": "http://evil.test"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    preflight = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://allowed.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers.get("Access-Control-Allow-Origin") == "http://allowed.test"
    assert "POST" in preflight.headers.get("Access-Control-Allow-Methods", "")
    assert "Access-Control-Allow-Credentials" not in preflight.headers
