"""Regressions from the hardening review (issue 9): each test failed on 8fe3734.

Crash inputs, requests judged before their model is leased, hang-ups that cost nothing,
event streams that cannot starve the workers, keep_alive that does not stick, and the
listing that follows the models folder without a reload.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer, chat_body, sse_events
from gguf_factory import write_llama_model
from helpers import completion, open_stream, raw_request

import sse
from config import Settings
from server import close_app, create_app
from wsgi_server import build_wsgi_server, listen_addresses, socket_map


def strict_json(text: str) -> object:
    """Parse as a browser would: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in a response body")
    return json.loads(text, parse_constant=refuse)


def unloaded_events(server: LiveServer) -> list[tuple[str, str]]:
    return [(e["model"], e["reason"]) for e in server.manager.events.history() if e["event"] == "unloaded"]


# ----------------------------------------------------------------------- crashes


@pytest.mark.parametrize("prompt", [[999999], [-5, 3], [1, 2**31 - 1]])
def test_token_id_prompt_outside_the_vocabulary_is_400(server: LiveServer, prompt):
    for stream in (False, True):
        reply = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2, "stream": stream})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "prompt" and "vocabulary" in reply.json()["error"]["message"]
    assert completion(server).status_code == 200


def test_logit_bias_outside_the_vocabulary_is_400_before_loading(server: LiveServer):
    reply = server.post("/v1/chat/completions", chat_body(logit_bias={"100000": 5}))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "logit_bias"
    assert server.loader.loads == []


# ----------------------------------------------------------- judged before the lease


def test_a_refused_request_loads_and_evicts_nothing(make_server):
    server = make_server({"max_loaded_models": 1, "max_tokens_limit": 8})
    assert completion(server, "tiny").status_code == 200
    refused = [
        {"model": "tiny-chat", "prompt": "Hi", "max_tokens": 100},
        {"model": "tiny-chat", "prompt": "Hi", "logit_bias": {"99999": 1}},
        {"model": "tiny-chat", "prompt": [99999]},
        {"model": "tiny-chat", "prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {}}},
    ]
    for body in refused:
        for stream in (False, True):
            reply = server.post("/v1/completions", {**body, "stream": stream})
            assert reply.status_code == 400, (body, reply.text)
    assert server.loader.loads == ["tiny"]
    assert server.get("/health").json()["loaded_models"] == ["tiny"]


def test_a_client_mistake_on_a_cold_stream_is_a_4xx_status(make_server):
    server = make_server({"n_ctx": 64})
    body = {"model": "tiny", "prompt": "Hello " * 200, "max_tokens": 2, "stream": True}
    cold = server.post("/v1/completions", body)
    warm = server.post("/v1/completions", body)
    assert cold.status_code == warm.status_code == 400
    assert cold.json()["error"]["code"] == warm.json()["error"]["code"] == "context_length_exceeded"
    assert cold.json()["error"]["param"] == "prompt"


def test_chat_honours_the_model_default_max_tokens(make_server):
    server = make_server(models={"tiny-chat": {"default": {"max_tokens": 3}}})
    reply = server.post("/v1/chat/completions", chat_body(ignore_eos=True))
    assert reply.json()["usage"]["completion_tokens"] == 3
    sent = server.post("/v1/chat/completions", chat_body(ignore_eos=True, max_completion_tokens=5))
    assert sent.json()["usage"]["completion_tokens"] == 5


# ------------------------------------------------------------------- keep_alive


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "prompt": "Hi", "keep_alive": NaN}',
                                 b'{"model": "tiny", "prompt": "Hi", "keep_alive": Infinity}',
                                 b'{"model": "tiny", "prompt": "Hi", "keep_alive": -Infinity}',
                                 b'{"model": "tiny", "prompt": "Hi", "keep_alive": 1e999}',
                                 b'{"model": "tiny", "prompt": "Hi", "keep_alive": "' + b"9" * 400 + b's"}',
                                 b'{"model": "tiny", "prompt": "Hi", "keep_alive": 1' + b"0" * 400 + b"}"])
def test_non_finite_keep_alive_is_refused(server: LiveServer, raw):
    reply = requests.post(server.url + "/v1/completions", data=raw, timeout=JOIN_TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert server.loader.loads == []
    strict_json(server.get("/health").text)
    strict_json(server.get("/v1/models").text)


def test_a_request_keep_alive_does_not_stick_to_the_model(server: LiveServer):
    assert completion(server, keep_alive=0).status_code == 200
    server.wait_for(lambda: unloaded_events(server) == [("tiny", "keep_alive")])
    assert completion(server).status_code == 200  # no keep_alive: the configured 300 s
    time.sleep(0.2)
    assert server.model_view("tiny")["state"] == "loaded" and server.model_view("tiny")["idle_timeout"] == 300
    assert completion(server, keep_alive="2s").status_code == 200
    assert server.post("/admin/unload", {"model": "tiny"}).status_code == 200
    assert server.model_view("tiny")["idle_timeout"] == 300  # an unload forgets it


def test_keep_alive_zero_answers_before_the_unload_runs(server: LiveServer):
    gate = server.loader.close_gate = threading.Event()
    try:
        reply = requests.post(server.url + "/v1/completions", timeout=10,
                              json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "keep_alive": 0})
        assert reply.status_code == 200
        assert unloaded_events(server) == []  # the close is still held back: the answer did not wait for it
    finally:
        gate.set()
    server.wait_for(lambda: unloaded_events(server) == [("tiny", "keep_alive")])


def test_warm_up_survives_idle_timeout_zero_until_the_idle_check(make_server):
    server = make_server({"idle_timeout": 0}, background=False)
    reply = server.post("/admin/load", {"model": "tiny"}).json()
    assert reply["state"] == "loaded"
    assert server.model_view("tiny")["state"] == "loaded"
    assert server.manager.evict_idle() == ["tiny"]
    assert server.post("/admin/load", {"model": "tiny"}).status_code == 200
    assert completion(server).status_code == 200  # a real request ends: idle_timeout 0 unloads now
    server.wait_for(lambda: server.model_view("tiny")["state"] == "unloaded")


def test_embedding_models_can_be_warmed(make_server):
    server = make_server(models={"tiny": {"embedding": True}})
    assert server.post("/admin/load", {"model": "tiny"}).status_code == 200
    assert server.model_view("tiny")["embeddings"]["state"] == "loaded"
    assert server.post("/v1/embeddings", {"model": "tiny", "input": "Hello"}).status_code == 200
    assert server.loader.loads == ["tiny"]


# ------------------------------------------------------------------- hang-ups


def test_streams_queued_behind_a_generation_hear_from_the_server(make_server, monkeypatch):
    server = make_server(models={"tiny": {"parallel": 1}})  # one slot: the second stream queues
    monkeypatch.setattr(sse, "LOADING_COMMENT_INTERVAL", 0.1)  # time is the subject: shortened
    assert completion(server).status_code == 200
    server.loader.token_delay = 0.02
    with open_stream(server, max_tokens=50) as first:
        first_events = sse_events(first)  # kept: a dropped generator would close the connection
        next(first_events)
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": True}
        with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=JOIN_TIMEOUT) as queued:
            lines = queued.iter_lines()
            before_data = []
            for line in lines:
                if line.startswith(b"data: "):
                    break
                if line:
                    before_data.append(line)
            list(lines)
    assert len(before_data) >= 3 and all(line.startswith(b": queued for tiny") for line in before_data)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_queued_costs_no_prompt_evaluation(make_server, stream):
    server = make_server(models={"tiny": {"parallel": 1}})
    assert completion(server).status_code == 200
    server.loader.token_delay = 0.02
    with open_stream(server, max_tokens=60) as first:
        first_events = sse_events(first)
        next(first_events)
        sock = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "word " * 150, "max_tokens": 1,
                                                       "stream": stream})
        server.wait_for(lambda: server.model_view("tiny")["in_flight"] == 2)
        decoded = server.loader.decoded_tokens
        sock.close()
        assert list(first_events)[-1] == "[DONE]"
    server.wait_for(lambda: server.model_view("tiny")["in_flight"] == 0)
    assert server.loader.decoded_tokens - decoded < 100  # the rest of the first stream, not 300 prompt tokens


def test_a_client_gone_during_prompt_evaluation_stops_it(make_server):
    server = make_server(models={"tiny": {"n_batch": 8}})
    assert completion(server).status_code == 200
    server.loader.token_delay = 0.05  # per batch of 8 prompt tokens: about 2 s for the whole prompt
    decoded = server.loader.decoded_tokens
    sock = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "word " * 150, "max_tokens": 1})
    server.wait_for(lambda: server.loader.decoded_tokens > decoded)
    sock.close()
    server.wait_for(lambda: server.model_view("tiny")["in_flight"] == 0)
    assert server.loader.decoded_tokens - decoded < 150
    server.loader.token_delay = 0
    assert completion(server).status_code == 200


# ---------------------------------------------------------------- event streams


def test_head_on_the_event_stream_leaks_no_subscriber(server: LiveServer):
    for _ in range(10):
        assert requests.head(server.url + "/admin/events", timeout=JOIN_TIMEOUT).status_code == 200
    server.wait_for(lambda: not server.manager.events._subscribers)


def test_event_streams_cannot_starve_the_workers(make_server):
    server = make_server(server={"threads": 4})
    with requests.get(server.url + "/admin/events", stream=True, timeout=JOIN_TIMEOUT) as first:
        assert first.status_code == 200
        second = server.get("/admin/events", stream=True)
        assert second.status_code == 503 and second.json()["error"]["code"] == "too_many_event_streams"
        assert second.headers["Retry-After"]
        for _ in range(3):
            assert requests.get(server.url + "/health", timeout=2).status_code == 200
    def reopened() -> bool:
        with requests.get(server.url + "/admin/events", stream=True, timeout=JOIN_TIMEOUT) as again:
            return again.status_code == 200
    server.wait_for(reopened)


# ------------------------------------------------------------- metrics, health


def test_invented_http_methods_share_one_metrics_series(server: LiveServer):
    for method in ("BREW", "WHEN", "FOO"):
        requests.request(method, server.url + "/health", timeout=JOIN_TIMEOUT)
    scrape = server.get("/metrics").text
    assert 'method="other"' in scrape
    assert not any(m in scrape for m in ("BREW", "WHEN", "FOO"))


def test_health_shows_paths_relative_to_the_models_folder_without_an_admin_key(make_server, models_dir):
    server = make_server(server={"api_keys": ["user"], "admin_api_keys": ["admin"]})
    paths = {key: {m["id"]: m["path"] for m in server.get("/health", headers=headers).json()["models"]}
             for key, headers in (("none", {}), ("user", {"Authorization": "Bearer user"}),
                                  ("admin", {"Authorization": "Bearer admin"}))}
    assert paths["none"] == paths["user"] == {"tiny": "tiny.gguf", "tiny-chat": "tiny-chat.gguf"}
    assert paths["admin"]["tiny"] == str((models_dir / "tiny.gguf").resolve())


def test_listings_follow_the_models_folder_without_a_reload(server: LiveServer, models_dir):
    write_llama_model(models_dir / "newcomer.gguf", seed=11)
    server.wait_for(lambda: "newcomer" in [m["id"] for m in server.get("/v1/models").json()["data"]], timeout=5)
    assert "newcomer" in [m["id"] for m in server.get("/health").json()["models"]]
    (models_dir / "newcomer.gguf").unlink()
    server.wait_for(lambda: "newcomer" not in [m["id"] for m in server.get("/v1/models").json()["data"]], timeout=5)


# ------------------------------------------------------------- reload, shutdown


def test_reload_with_the_config_file_gone_keeps_the_running_config(make_server, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": {"tiny": {"aliases": ["small"]}}}))
    settings = json.loads(config.read_text())
    server = make_server(models=settings["models"], config_path=config)
    config.unlink()
    reply = server.post("/admin/reload")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_config"
    assert "not found" in reply.json()["error"]["message"]
    assert completion(server, "small").status_code == 200


def test_a_load_waiting_for_room_gives_up_when_shutdown_begins(make_server):
    server = make_server({"max_loaded_models": 1, "load_wait_timeout": 30})
    server.loader.token_delay = 0.01
    with open_stream(server, "tiny", max_tokens=150) as busy:
        busy_events = sse_events(busy)
        next(busy_events)
        outcome: dict[str, requests.Response] = {}
        waiter = threading.Thread(target=lambda: outcome.setdefault("reply", completion(server, "tiny-chat")))
        waiter.start()
        server.wait_for(lambda: server.model_view("tiny-chat")["state"] == "loading")
        threading.Thread(target=server.manager.shutdown, args=(10,), daemon=True).start()
        waiter.join(5)
        assert not waiter.is_alive(), "the waiting load did not notice the shutdown"
        assert list(busy_events)[-1] == "[DONE]"
    assert outcome["reply"].status_code == 503 and outcome["reply"].json()["error"]["code"] == "shutting_down"
    assert server.loader.loads == ["tiny"]


def test_localhost_resolving_to_two_addresses_serves_both(tmp_path, monkeypatch, models_dir):
    """Where ``localhost`` is both ::1 and 127.0.0.1 waitress opens one socket per address.

    This machine's resolver gives one address, so the resolver's answer is replaced by two
    loopback addresses; both sockets, the server and the requests are real."""
    real = socket.getaddrinfo

    def two_addresses(host, *args, **kwargs):
        if host != "localhost":
            return real(host, *args, **kwargs)
        return [entry for address in ("127.0.0.1", "127.0.0.2") for entry in real(address, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    settings = Settings.model_validate({"server": {"host": "localhost", "port": 0},
                                        "model_manager": {"models_directory": models_dir}})
    app = create_app(settings, background=False)
    server = build_wsgi_server(app, settings.server)
    monkeypatch.setattr(socket, "getaddrinfo", real)
    stop = threading.Event()
    from waitress import wasyncore

    def serve() -> None:
        while not stop.is_set():
            wasyncore.loop(timeout=0.05, map=socket_map(server), count=1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        addresses = listen_addresses(server)
        assert sorted(host for host, _ in addresses) == ["127.0.0.1", "127.0.0.2"]
        for host, port in addresses:
            assert requests.get(f"http://{host}:{port}/health", timeout=JOIN_TIMEOUT).status_code == 200
    finally:
        stop.set()
        thread.join(JOIN_TIMEOUT)
        server.close()
        close_app(app, 0)


def test_embedding_token_ids_outside_the_vocabulary_are_400_before_loading(server: LiveServer):
    for body in ({"model": "tiny", "input": [99999]}, {"model": "tiny", "input": [[1, 2], [-1]]},
                 {"model": "tiny", "input": "Hello", "dimensions": 7}):
        reply = server.post("/v1/embeddings", body)
        assert reply.status_code == 400, reply.text
    assert server.loader.loads == []


def test_a_huge_stop_string_is_refused(server: LiveServer):
    reply = completion(server, stop=["x" * 100_000])
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop"


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "x\\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udc00"}]}',
     "messages[0].content"),
    ("/v1/embeddings", b'{"model": "tiny", "input": "\\ud800"}', "input"),
])
def test_a_lone_surrogate_is_a_400_and_kills_no_worker(server: LiveServer, path, raw, param):
    assert completion(server).status_code == 200
    pid = server.model_view("tiny")["pid"]
    reply = requests.post(server.url + path, data=raw, timeout=JOIN_TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and "surrogate" in reply.json()["error"]["message"]
    assert server.model_view("tiny")["pid"] == pid and completion(server).status_code == 200


def test_one_request_cannot_queue_thousands_of_prompts(server: LiveServer):
    reply = server.post("/v1/completions", {"model": "tiny", "prompt": ["once upon"] * 3000, "max_tokens": 2})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    assert server.post("/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2}).status_code == 200
    assert server.loader.loads == ["tiny"]


def test_logit_bias_keys_are_ascii_token_ids(server: LiveServer):
    reply = server.post("/v1/completions", {"model": "tiny", "prompt": "Hi", "logit_bias": {"\u0661": 1}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "logit_bias"
