"""llama.cpp's token endpoints through the real server: /tokenize, /detokenize, /apply-template."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LiveServer


@pytest.fixture
def stories(make_server: Callable[..., LiveServer], models_dir: Path, stories_path: Path) -> LiveServer:
    shutil.copy(stories_path, models_dir / "stories260K.gguf")
    return make_server()


def test_tokenize_and_detokenize_round_trip(stories: LiveServer):
    text = "Once upon a time, there was a dragon."
    reply = stories.post("/tokenize", {"model": "stories260K", "content": text})
    assert reply.status_code == 200, reply.text
    tokens = reply.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    with_bos = stories.post("/tokenize", {"model": "stories260K", "content": text, "add_special": True}).json()
    assert with_bos["tokens"][1:] == tokens and len(with_bos["tokens"]) == len(tokens) + 1
    back = stories.post("/detokenize", {"model": "stories260K", "tokens": tokens}).json()["content"]
    assert back.strip() == text
    pieces = stories.post("/tokenize", {"model": "stories260K", "content": text, "with_pieces": True}).json()
    assert [p["id"] for p in pieces["tokens"]] == tokens
    assert "".join(p["piece"] for p in pieces["tokens"]).strip() == text


def test_a_token_id_outside_the_vocabulary_is_a_400(stories: LiveServer):
    reply = stories.post("/detokenize", {"model": "stories260K", "tokens": [1, 10**6]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tokens"
    assert stories.post("/detokenize", {"model": "nope", "tokens": [1]}).status_code == 404
    assert stories.post("/tokenize", {"model": "stories260K"}).status_code == 400
    assert stories.get("/health").json()["models"][0]["in_flight"] == 0


def test_apply_template_is_the_prompt_a_chat_request_makes(server: LiveServer):
    reply = server.post("/apply-template", {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_token_endpoints_want_a_key_when_keys_are_set(make_server: Callable[..., LiveServer]):
    server = make_server(server={"api_keys": ["secret"]})
    body = {"model": "tiny", "content": "Hello"}
    assert server.post("/tokenize", body).status_code == 401
    assert server.post("/tokenize", body, headers={"Authorization": "Bearer secret"}).status_code == 200
