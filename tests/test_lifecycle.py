"""Lifecycle rules: lazy and single-flight loads, leases, idle eviction, unload, reload, memory."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import JOIN_TIMEOUT, LiveServer, chat_body, sse_events
from gguf_factory import write_llama_model, write_not_gguf, write_truncated_model, write_vocab_only_model
from helpers import FakeClock, completion, open_stream

from errors import LoadFailed


def test_nothing_loads_at_startup(server: LiveServer):
    assert server.get("/health").json()["loaded_models"] == []
    assert server.loader.loads == []
    assert completion(server).status_code == 200
    assert server.loader.loads == ["tiny"]
    assert server.get("/health").json()["loaded_models"] == ["tiny"]


def test_eight_concurrent_first_requests_cause_one_load(server: LiveServer):
    server.loader.delay = 0.5
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: completion(server), range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    assert server.loader.loads == ["tiny"]


def test_health_and_listing_answer_during_a_slow_load(server: LiveServer):
    server.loader.delay = 2.0
    loading = threading.Thread(target=completion, args=(server,))
    loading.start()
    server.wait_for(lambda: server.model_view("tiny")["state"] == "loading")
    started = time.monotonic()
    assert server.get("/health").status_code == 200
    assert server.get("/v1/models").status_code == 200
    assert server.get("/admin/models").status_code == 200
    assert time.monotonic() - started < 0.5
    loading.join(JOIN_TIMEOUT)
    assert not loading.is_alive()


def test_two_models_load_in_parallel(server: LiveServer):
    server.loader.delay = 1.0
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda m: completion(server, m), ["tiny", "tiny-chat"]))
    assert [r.status_code for r in replies] == [200, 200]
    (start_a, end_a), (start_b, end_b) = server.loader.spans
    assert start_b < end_a and start_a < end_b  # the loads overlapped: neither waited for the other


def test_a_generation_on_one_model_does_not_block_another(server: LiveServer):
    completion(server, "tiny")
    completion(server, "tiny-chat")
    server.loader.token_delay = 0.02
    with open_stream(server, "tiny", max_tokens=150) as stream:
        next(sse_events(stream))
        started = time.monotonic()
        server.loader.token_delay = 0.0
        assert completion(server, "tiny-chat").status_code == 200
        assert time.monotonic() - started < 1.0


def test_idle_model_is_unloaded_after_timeout(make_server):
    server = make_server({"idle_timeout": 1, "check_interval": 0.2})
    assert completion(server).status_code == 200
    assert server.model_view("tiny")["state"] == "loaded"
    server.wait_for(lambda: server.model_view("tiny")["state"] == "unloaded", timeout=5)
    assert completion(server).status_code == 200  # and it comes back on demand
    assert server.loader.loads == ["tiny", "tiny"]


def test_idle_time_counts_from_the_end_of_the_last_request(make_server):
    clock = FakeClock()
    server = make_server({"idle_timeout": 60}, clock=clock, background=False)
    completion(server)
    clock.advance(59)
    completion(server)  # activity resets the idle clock
    clock.advance(59)
    assert server.manager.evict_idle() == []
    clock.advance(2)
    assert server.manager.evict_idle() == ["tiny"]


def test_idle_job_skips_model_with_open_stream(make_server):
    server = make_server({"idle_timeout": 0.3, "check_interval": 0.1})
    server.loader.token_delay = 0.01
    with open_stream(server, max_tokens=400) as stream:
        events = sse_events(stream)
        next(events)
        time.sleep(1.0)  # several idle ticks pass while the stream runs
        assert server.model_view("tiny")["state"] == "loaded"
        assert server.model_view("tiny")["in_flight"] == 1
        rest = list(events)
    assert rest[-1] == "[DONE]"
    server.wait_for(lambda: server.model_view("tiny")["state"] == "unloaded", timeout=5)


def test_admin_unload_waits_for_the_lease_and_says_so(server: LiveServer):
    server.loader.token_delay = 0.01
    with open_stream(server, max_tokens=400) as stream:
        events = sse_events(stream)
        next(events)
        refused = server.post("/admin/unload", {"model": "tiny", "timeout": 0.3})
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "model_busy"
        assert "tiny" in refused.json()["error"]["message"]
        assert server.model_view("tiny")["state"] == "loaded"
        unloader = threading.Thread(target=lambda: server.post("/admin/unload", {"model": "tiny"}))
        unloader.start()
        rest = list(events)  # the stream is not cut short by the pending unload
    unloader.join(JOIN_TIMEOUT)
    assert rest[-1] == "[DONE]"
    assert sum(1 for e in rest if e != "[DONE]" and e["choices"] and e["choices"][0]["text"]) >= 390
    server.wait_for(lambda: server.model_view("tiny")["state"] == "unloaded")


def test_admin_unload_all_and_load(server: LiveServer):
    loaded = server.post("/admin/load", {"model": "tiny"})
    assert loaded.status_code == 200 and loaded.json()["model"] == "tiny"
    server.post("/admin/load", {"model": "tiny-chat.gguf"})
    assert server.get("/health").json()["loaded_models"] == ["tiny", "tiny-chat"]
    reply = server.post("/admin/unload", {"model": "all"}).json()
    assert sorted(reply["unloaded"]) == ["tiny", "tiny-chat"]
    assert server.get("/health").json()["loaded_models"] == []
    again = server.post("/admin/unload", {"model": "tiny"}).json()
    assert again["unloaded"] == [] and again["not_loaded"] == ["tiny"]
    assert server.post("/admin/unload", {"model": "missing"}).status_code == 404


def test_client_disconnect_ends_generation_and_frees_the_model(server: LiveServer):
    server.loader.token_delay = 0.01
    stream = open_stream(server, max_tokens=500)
    events = sse_events(stream)
    for _ in range(3):
        next(events)
    stream.close()  # hang up mid-stream
    server.wait_for(lambda: server.model_view("tiny")["in_flight"] == 0, timeout=3)
    evals = server.loader.evals
    time.sleep(0.2)
    assert server.loader.evals == evals  # the generation stopped
    assert evals < 100
    with server.manager.acquire("tiny") as lease:
        assert lease.worker.stats()["kv_used"] > 2  # a hang-up is not a failure: the KV cache stays for reuse
    assert completion(server).status_code == 200


def test_failed_load_is_reported_recorded_and_retried(server: LiveServer):
    server.loader.fail_next = LoadFailed("failed to load model tiny: out of memory on cue")
    first = completion(server)
    assert first.status_code == 500
    assert "out of memory on cue" in first.json()["error"]["message"]
    view = server.model_view("tiny")
    assert view["state"] == "failed" and "out of memory" in view["error"]
    assert completion(server).status_code == 200  # the next request tries again
    assert server.loader.loads == ["tiny", "tiny"]


@pytest.mark.parametrize("writer", [write_not_gguf, write_truncated_model, write_vocab_only_model])
def test_file_that_is_not_a_model_answers_422_and_others_keep_serving(make_server, models_dir, writer):
    writer(models_dir / "broken.gguf")
    server = make_server()
    reply = completion(server, "broken")
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_file_invalid" and "broken" in error["message"]
    assert "Traceback" not in reply.text
    listing = {m["id"]: m for m in server.get("/v1/models").json()["data"]}
    assert listing["broken"]["state"] == "failed"
    assert completion(server, "tiny").status_code == 200


def test_reload_picks_up_new_files_and_drops_removed_ones(server: LiveServer, models_dir):
    completion(server, "tiny")
    (models_dir / "sub").mkdir()
    write_llama_model(models_dir / "sub" / "newcomer.gguf", seed=9)
    (models_dir / "tiny.gguf").unlink()
    reply = server.post("/admin/reload").json()
    assert reply["added"] == ["newcomer"] and reply["removed"] == ["tiny"]
    assert completion(server, "newcomer").status_code == 200
    assert completion(server, "tiny").status_code == 404
    assert "tiny" not in server.get("/health").json()["loaded_models"]


def test_reload_keeps_a_busy_removed_model_until_its_stream_ends(server: LiveServer, models_dir):
    server.loader.token_delay = 0.01
    with open_stream(server, max_tokens=200) as stream:
        events = sse_events(stream)
        next(events)
        (models_dir / "tiny.gguf").unlink()
        assert server.post("/admin/reload").json()["removed"] == ["tiny"]
        rest = list(events)
    assert rest[-1] == "[DONE]" and not any("error" in e for e in rest if e != "[DONE]")
    server.wait_for(lambda: "tiny" not in server.get("/health").json()["loaded_models"])


def test_reload_rejects_bad_config_and_keeps_the_old_one(make_server, models_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_manager": {"models_directory": str(models_dir), "n_ctx": 512}}))
    server = make_server(config_path=config)
    config.write_text('{"model_manager": {"models_directory": ')
    bad = server.post("/admin/reload")
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]["message"]
    config.write_text(json.dumps({"model_manager": {"idle_timeot": 5}}))
    unknown = server.post("/admin/reload")
    assert unknown.status_code == 400 and "idle_timeot" in unknown.json()["error"]["message"]
    assert completion(server).status_code == 200
    config.write_text(json.dumps({"model_manager": {"models_directory": str(models_dir), "n_ctx": 256},
                                  "server": {"api_keys": ["new-key"]}}))
    reloaded = server.post("/admin/reload")
    assert reloaded.status_code == 200
    assert server.manager.settings.n_ctx == 256  # applies to the next load
    assert "api_keys" in reloaded.json()["restart_required"]  # reported, not silently half-applied
    assert completion(server).status_code == 200


def test_unload_gives_memory_back(make_server, models_dir):
    """The model lives in its worker; unloading ends that process, and the server never held it."""
    write_llama_model(models_dir / "big.gguf", n_embd=1024, n_layer=8, n_ff=2816, dtype="f16")
    size = (models_dir / "big.gguf").stat().st_size
    server = make_server()
    process = psutil.Process()
    before = process.memory_info().rss
    assert completion(server, "big", max_tokens=2).status_code == 200
    pid = server.model_view("big")["pid"]
    worker_rss = psutil.Process(pid).memory_info().rss
    assert worker_rss > size * 0.8, (worker_rss, size)
    assert process.memory_info().rss - before < size * 0.15  # the weights are not in the server
    server.post("/admin/unload", {"model": "big"})
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    unloaded = [e for e in server.manager.events.history() if e["event"] == "unloaded"]
    assert unloaded[-1]["freed_rss_mb"] * 2**20 > size * 0.8


def test_concurrent_chats_on_one_model_are_batched_and_each_exact(server: LiveServer):
    completion(server)
    server.loader.token_delay = 0.005
    alone = server.post("/v1/chat/completions", chat_body("tiny", max_tokens=20)).json()
    steps = server.loader.evals
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: server.post("/v1/chat/completions", chat_body("tiny", max_tokens=20)),
                                range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    contents = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert contents == {alone["choices"][0]["message"]["content"]}  # greedy: exactly the text of one alone
    assert server.loader.evals - steps < 4 * 20  # they shared decode steps: not one after another
