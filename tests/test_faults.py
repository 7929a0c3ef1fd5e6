"""Faults: broken or changing model files, failures inside llama.cpp, limits. Each leaves the
server serving everything else, with a clear error where a request is affected."""

from __future__ import annotations

import os
import shutil

import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer, sse_events
from gguf_factory import write_llama_model
from helpers import completion, open_stream


def test_generation_failing_mid_stream_sends_error_then_done_and_frees_the_model(server: LiveServer):
    completion(server)
    server.loader.fail_eval_after = 5
    with open_stream(server, max_tokens=50) as stream:
        events = list(sse_events(stream))
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "Traceback" not in str(error)
    assert server.model_view("tiny")["in_flight"] == 0
    again = completion(server, max_tokens=8)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8


def test_generation_failing_without_stream_is_500_and_recovers(server: LiveServer):
    completion(server)
    server.loader.fail_eval_after = 2
    failed = completion(server, max_tokens=20)
    assert failed.status_code == 500
    assert set(failed.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in failed.text
    assert completion(server).status_code == 200


def test_file_replaced_while_loaded_serves_the_old_until_reloaded(server: LiveServer, models_dir):
    before = completion(server, max_tokens=10, temperature=0).json()["choices"][0]["text"]
    replacement = models_dir.parent / "replacement.gguf"
    write_llama_model(replacement, seed=77)
    os.replace(replacement, models_dir / "tiny.gguf")
    assert completion(server, max_tokens=10, temperature=0).json()["choices"][0]["text"] == before
    server.post("/admin/unload", {"model": "tiny"})
    after = completion(server, max_tokens=10, temperature=0).json()["choices"][0]["text"]
    assert after != before


def test_file_deleted_while_loaded_keeps_serving_until_reload(server: LiveServer, models_dir):
    completion(server)
    (models_dir / "tiny.gguf").unlink()
    assert completion(server).status_code == 200  # the mapping stays valid while loaded
    assert server.post("/admin/reload").json()["removed"] == ["tiny"]
    assert completion(server).status_code == 404
    assert server.get("/health").json()["loaded_models"] == []


def test_models_folder_disappearing_is_not_fatal(server: LiveServer, models_dir):
    completion(server)
    shutil.rmtree(models_dir)
    reply = server.post("/admin/reload")
    assert reply.status_code == 200 and sorted(reply.json()["removed"]) == ["tiny", "tiny-chat"]
    assert server.get("/v1/models").json()["data"] == []
    assert server.get("/health").status_code == 200
    models_dir.mkdir()
    write_llama_model(models_dir / "tiny.gguf", seed=1)
    assert server.post("/admin/reload").json()["added"] == ["tiny"]
    assert completion(server).status_code == 200


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder, so permissions cannot hide it")
def test_unreadable_models_folder_lists_nothing(server: LiveServer, models_dir):
    models_dir.chmod(0)
    try:
        assert server.post("/admin/reload").status_code == 200
        assert server.get("/v1/models").json()["data"] == []
    finally:
        models_dir.chmod(0o755)


def test_model_still_being_copied_fails_clearly_then_loads_once_complete(server: LiveServer, models_dir, tmp_path):
    full = tmp_path / "full.gguf"
    write_llama_model(full, seed=5)
    data = full.read_bytes()
    (models_dir / "copying.gguf").write_bytes(data[: len(data) // 2])
    assert server.post("/admin/reload").json()["added"] == ["copying"]
    partial = completion(server, "copying")
    assert partial.status_code == 422 and "truncated" in partial.json()["error"]["message"]
    (models_dir / "copying.gguf").write_bytes(data)
    assert completion(server, "copying").status_code == 200  # a failed load is retried
    assert completion(server, "tiny").status_code == 200


def test_max_tokens_limit(make_server):
    server = make_server({"max_tokens_limit": 8})
    refused = completion(server, max_tokens=9)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    capped = server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "ignore_eos": True})
    assert capped.json()["usage"]["completion_tokens"] == 8  # the default of 16 is clamped to the limit


def test_connections_beyond_the_limit_are_refused_clearly(make_server):
    server = make_server(server={"connection_limit": 3})
    completion(server)
    held = [requests.Session() for _ in range(3)]
    try:
        for session in held:
            assert session.get(server.url + "/health", timeout=JOIN_TIMEOUT).status_code == 200  # stays open
        refused = requests.get(server.url + "/health", timeout=JOIN_TIMEOUT)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        assert held[1].get(server.url + "/health", timeout=JOIN_TIMEOUT).status_code == 200  # others unharmed
        held[0].close()
        server.wait_for(lambda: requests.get(server.url + "/health", timeout=JOIN_TIMEOUT).status_code == 200)
    finally:
        for session in held:
            session.close()


def test_model_default_max_tokens_above_the_limit_is_capped_not_refused(make_server):
    server = make_server({"max_tokens_limit": 8}, models={"tiny": {"default": {"max_tokens": 50}}})
    reply = server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
