"""The lifecycle policy: capacity and memory limits, pins, keep_alive, aliases, per-model
settings, loading signals, the event stream and the queue limit."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer, chat_body, sse_data, sse_events
from gguf_factory import write_llama_model
from helpers import FakeClock, completion, open_stream

import completions
from config import ConfigError, load_settings


@pytest.fixture
def three_models(models_dir):
    write_llama_model(models_dir / "third.gguf", seed=3)
    return models_dir


def loaded(server: LiveServer) -> list[str]:
    return server.get("/health").json()["loaded_models"]


def unload_reasons(server: LiveServer) -> list[tuple[str, str]]:
    return [(e["model"], e["reason"]) for e in server.manager.events.history() if e["event"] == "unloaded"]


def test_capacity_evicts_least_recently_used(make_server, three_models):
    server = make_server({"max_loaded_models": 2})
    completion(server, "tiny")
    completion(server, "tiny-chat")
    completion(server, "third")  # tiny is the least recently used
    assert loaded(server) == ["third", "tiny-chat"]
    completion(server, "tiny-chat")  # now third is the least recently used
    completion(server, "tiny")
    assert loaded(server) == ["tiny", "tiny-chat"]
    assert unload_reasons(server) == [("tiny", "capacity"), ("third", "capacity")]


def test_pinned_model_survives_capacity_pressure(make_server, three_models):
    server = make_server({"max_loaded_models": 2}, models={"tiny": {"pinned": True}})
    completion(server, "tiny")
    completion(server, "tiny-chat")
    completion(server, "third")
    assert loaded(server) == ["third", "tiny"]
    assert server.model_view("tiny")["pinned"] is True


def test_memory_budget_evicts_for_room(make_server, three_models):
    # Each tiny model is estimated at about 65 MiB without the RAM its prompt cache may fill.
    server = make_server({"memory_budget": "150MiB", "prompt_cache_bytes": 0})
    completion(server, "tiny")
    completion(server, "tiny-chat")
    completion(server, "third")
    assert len(loaded(server)) == 2
    assert unload_reasons(server) == [("tiny", "memory")]


def test_the_prompt_cache_counts_towards_the_estimate(make_server):
    small = make_server({"prompt_cache_bytes": 0}).model_view("tiny")["estimated_memory_bytes"]
    cached = make_server({"prompt_cache_bytes": "100MiB"}).model_view("tiny")["estimated_memory_bytes"]
    assert cached - small == 100 * 2**20


def test_model_larger_than_the_budget_is_refused_at_once(make_server):
    server = make_server({"memory_budget": "10MiB"})
    reply = completion(server, "tiny")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "model_too_large"
    assert "GiB (estimate)" in error["message"] and "memory_budget of 0.01 GiB" in error["message"]
    assert server.loader.loads == []


def test_busy_model_is_never_evicted_the_newcomer_waits(make_server):
    server = make_server({"max_loaded_models": 1})
    completion(server, "tiny")
    server.loader.token_delay = 0.01
    with open_stream(server, "tiny", max_tokens=120) as stream:
        events = sse_events(stream)
        next(events)
        started = time.monotonic()
        waiting = completion(server, "tiny-chat")  # blocks until the stream above ends
        waited = time.monotonic() - started
        rest = list(events)
    assert rest[-1] == "[DONE]" and not any("error" in e for e in rest if e != "[DONE]")
    assert waiting.status_code == 200
    assert waited > 0.3
    assert unload_reasons(server) == [("tiny", "capacity")]


def test_load_that_cannot_get_room_in_time_is_503_naming_the_holder(make_server):
    server = make_server({"max_loaded_models": 1, "load_wait_timeout": 0.3})
    completion(server, "tiny")
    server.loader.token_delay = 0.01
    with open_stream(server, "tiny", max_tokens=200) as stream:
        events = sse_events(stream)  # keep the reader alive: dropping it hangs up
        next(events)
        reply = completion(server, "tiny-chat")
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "capacity_exhausted" and "tiny (" in error["message"] and "in flight" in error["message"]


def test_keep_alive_zero_unloads_right_after_the_response(server: LiveServer):
    assert completion(server, keep_alive=0).status_code == 200
    server.wait_for(lambda: unload_reasons(server) == [("tiny", "keep_alive")])
    assert loaded(server) == []


def test_keep_alive_duration_is_honoured_by_the_idle_job(make_server):
    clock = FakeClock()
    server = make_server({"idle_timeout": 300}, clock=clock, background=False)
    completion(server, keep_alive="2s")
    assert server.model_view("tiny")["idle_timeout"] == 2
    clock.advance(1)
    assert server.manager.evict_idle() == []
    clock.advance(1.5)
    assert server.manager.evict_idle() == ["tiny"]
    assert unload_reasons(server) == [("tiny", "keep_alive")]
    completion(server)  # no keep_alive: the configured timeout is back
    assert server.model_view("tiny")["idle_timeout"] == 300


def test_keep_alive_precedence_request_over_model_over_global(make_server):
    clock = FakeClock()
    server = make_server({"idle_timeout": 300}, clock=clock, background=False,
                         models={"tiny": {"idle_timeout": 10}, "tiny-chat": {"idle_timeout": -1}})
    completion(server, "tiny")
    completion(server, "tiny-chat")
    assert server.model_view("tiny")["idle_timeout"] == 10
    clock.advance(11)
    assert server.manager.evict_idle() == ["tiny"]  # tiny-chat never expires
    assert server.model_view("tiny-chat")["expires_at"] is None
    completion(server, "tiny-chat", keep_alive=5)
    clock.advance(6)
    assert server.manager.evict_idle() == ["tiny-chat"]


def test_invalid_keep_alive_is_400(server: LiveServer):
    reply = completion(server, keep_alive="soon")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "keep_alive"


def test_aliases_resolve_everywhere_and_are_listed(make_server):
    server = make_server(models={"tiny": {"aliases": ["fast", "gpt-4o-mini"]}})
    assert completion(server, "fast").json()["model"] == "tiny"
    assert server.post("/v1/embeddings", {"model": "gpt-4o-mini", "input": "Hello"}).status_code == 200
    assert server.post("/admin/unload", {"model": "fast"}).json()["unloaded"] == ["tiny", "tiny (embeddings)"]
    listing = {m["id"]: m for m in server.get("/v1/models").json()["data"]}
    assert listing["fast"]["alias_of"] == "tiny" and listing["gpt-4o-mini"]["alias_of"] == "tiny"


def test_per_model_context_size(make_server):
    server = make_server(models={"tiny": {"n_ctx": 64}, "tiny-chat": {"n_ctx": 512}})
    prompt = "Hello " * 80
    assert completion(server, "tiny", prompt=prompt).status_code == 400
    assert completion(server, "tiny-chat", prompt=prompt).status_code == 200


def test_model_default_sampling_sits_under_the_request(make_server):
    server = make_server(models={"tiny": {"default": {"max_tokens": 7, "temperature": 0}}})
    body = {"model": "tiny", "prompt": "Hello"}
    assert server.post("/v1/completions", body).json()["usage"]["completion_tokens"] == 7
    assert server.post("/v1/completions", {**body, "max_tokens": 2}).json()["usage"]["completion_tokens"] == 2


def test_embedding_model_serves_only_embeddings(make_server):
    server = make_server(models={"tiny": {"embedding": True}})
    assert server.post("/v1/embeddings", {"model": "tiny", "input": "Hello"}).status_code == 200
    reply = server.post("/v1/chat/completions", chat_body("tiny"))
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "model_not_generative"


def test_model_section_rejects_unknown_keys(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": {"tiny": {"idle_timout": 5}}}))
    with pytest.raises(ConfigError, match=r"models\.tiny\.idle_timout: unknown key"):
        load_settings(config)
    config.write_text(json.dumps({"models": {"tiny": {"load": {"n_ubatch": "big"}}}}))
    with pytest.raises(ConfigError, match="n_ubatch"):
        load_settings(config)
    config.write_text(json.dumps({"models": {"tiny": {"load": {"no_such_argument": 1}}}}))
    with pytest.raises(ConfigError, match="no_such_argument"):
        load_settings(config)


def test_per_model_llama_arguments_reach_the_load(make_server):
    server = make_server(models={"tiny": {"n_batch": 32, "load": {"n_ubatch": 16}}})
    completion(server, "tiny")
    with server.manager.acquire("tiny") as lease:
        info = lease.worker.info
    assert info.n_batch == 32 and info.n_ubatch == 16


def test_streams_waiting_for_a_load_get_loading_comments(server: LiveServer, monkeypatch):
    monkeypatch.setattr(completions, "STREAM_HEADERS_DEADLINE", 0.3)  # time is the subject: shortened
    server.loader.delay = 2.5
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
    started = time.monotonic()
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=JOIN_TIMEOUT) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(lines)
        assert time.monotonic() - started < 1.3  # headers and a first comment once the deadline passed
        rest = list(lines)
    rest = [line for line in rest if line]
    comments = [first] + [line for line in rest if line.startswith(b":")]
    assert comments[0] == b": loading tiny"
    assert any(c.startswith(b": loading tiny ") and c.endswith(b"%") for c in comments[1:])
    events = [sse_data(response, line) for line in rest if not line.startswith(b":")]
    assert events[-1] == "[DONE]" and len(events) > 1


def test_stream_whose_quick_load_fails_gets_the_failure_status(make_server, models_dir):
    (models_dir / "broken.gguf").write_text("not a model")
    server = make_server()
    body = {"model": "broken", "prompt": "Hello", "stream": True}
    reply = server.post("/v1/completions", body)
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "model_file_invalid"


def test_stream_whose_slow_load_fails_gets_an_error_event(make_server, models_dir, monkeypatch):
    monkeypatch.setattr(completions, "STREAM_HEADERS_DEADLINE", 0.2)
    (models_dir / "broken.gguf").write_text("not a model")
    server = make_server()
    server.loader.delay = 0.6
    body = {"model": "broken", "prompt": "Hello", "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=JOIN_TIMEOUT) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    assert events[0]["error"]["code"] == "model_file_invalid" and events[-1] == "[DONE]"


def test_event_stream_reports_loads_and_unloads_with_reasons(server: LiveServer):
    received: list[dict] = []
    with requests.get(server.url + "/admin/events", stream=True, timeout=JOIN_TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")

        def read() -> None:
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    received.append(json.loads(line[6:]))
                    if received[-1]["event"] == "unloaded":
                        return

        reader = threading.Thread(target=read)
        reader.start()
        completion(server)
        server.post("/admin/unload", {"model": "tiny"})
        reader.join(JOIN_TIMEOUT)
    kinds = [e["event"] for e in received]
    assert kinds[0] == "loading" and "loaded" in kinds and kinds[-2:] == ["unloading", "unloaded"]
    done = next(e for e in received if e["event"] == "loaded")
    assert done["model"] == "tiny" and done["seconds"] >= 0
    assert received[-1]["reason"] == "admin"
    assert any(e["event"] == "loading" and e.get("progress") == 1.0 for e in received)  # llama.cpp's callback


def test_queue_limit_answers_429_with_retry_after(make_server):
    server = make_server({"max_queue": 2}, models={"tiny": {"parallel": 1}})
    completion(server)
    server.loader.token_delay = 0.01
    streams = [open_stream(server, max_tokens=150) for _ in range(3)]  # one generating, two queued
    try:
        assert server.model_view("tiny")["in_flight"] == 3
        assert server.model_view("tiny")["queued"] == 2
        refused = completion(server)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        for stream in streams:
            stream.close()


def test_preload_loads_in_the_background(make_server):
    server = make_server({"preload": ["tiny-chat"]})
    assert server.get("/health").status_code == 200
    server.wait_for(lambda: loaded(server) == ["tiny-chat"])


def test_health_shows_policy_fields(make_server):
    server = make_server({"idle_timeout": 100})
    completion(server)
    view = server.model_view("tiny")
    assert view["estimated_memory_bytes"] > view["size_bytes"]
    assert view["expires_at"] == pytest.approx(view["last_used"] + 100, abs=0.01)
    assert view["queued"] == 0 and view["load_seconds"] >= 0 and view["loaded_at"] > 0


def test_rss_does_not_grow_over_ten_load_unload_cycles(make_server, models_dir):
    write_llama_model(models_dir / "big.gguf", n_embd=1024, n_layer=8, n_ff=2816, dtype="f16")
    server = make_server()
    process = psutil.Process()
    after_unload = []
    for _ in range(10):
        assert completion(server, "big", max_tokens=2).status_code == 200
        server.post("/admin/unload", {"model": "big"})
        after_unload.append(process.memory_info().rss)
    growth = after_unload[-1] - after_unload[1]
    assert growth < 20 * 2**20, [r // 2**20 for r in after_unload]


def test_concurrent_loads_beyond_the_limit_do_not_wait_for_each_other(make_server, three_models):
    # Regression: loads still waiting for room counted against each other, so three at once
    # under a limit of one all waited until load_wait_timeout.
    server = make_server({"max_loaded_models": 1, "load_wait_timeout": 20})
    server.loader.delay = 0.2
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda m: completion(server, m), ["tiny", "tiny-chat", "third"]))
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert time.monotonic() - started < 5


def test_a_model_that_is_never_idle_still_yields_to_a_waiting_load(make_server):
    # Regression: back-to-back requests kept a model leased forever, starving the other load.
    server = make_server({"max_loaded_models": 1, "load_wait_timeout": 20})
    completion(server, "tiny")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            completion(server, "tiny", max_tokens=2)

    hammers = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in hammers:
        thread.start()
    try:
        started = time.monotonic()
        assert completion(server, "tiny-chat").status_code == 200
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        for thread in hammers:
            thread.join(JOIN_TIMEOUT)


def test_global_context_is_capped_at_the_trained_length_unless_the_model_says_otherwise(make_server):
    server = make_server({"n_ctx": 4096}, models={"tiny-chat": {"n_ctx": 3072}})  # trained on 2048
    for model, expected in (("tiny", 2048), ("tiny-chat", 3072)):
        completion(server, model)
        with server.manager.acquire(model) as lease:
            assert lease.worker.info.n_ctx == expected
