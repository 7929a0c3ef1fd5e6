"""Ollama's API through the official ``ollama`` client, against the real server and real llama.cpp.

Answers are compared with /v1's for the same request (both run on the one completion core),
and thinking and tool calls are forced through a real family template (Qwen3's) with a GBNF
``grammar``, our extension, which a test transport adds to the client's bodies.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
import requests
from conftest import LiveServer
from gguf_factory import write_llama_model
from helpers import gbnf_literal

from chat_format import model_dialect

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "shared" / "chat-templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


class ExtraFields(httpx.BaseTransport):
    """Adds fields the official client has no argument for (our ``grammar``) to every JSON body."""

    def __init__(self, **fields: Any) -> None:
        self.inner = httpx.HTTPTransport()
        self.fields = fields

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read() or b"{}")
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        rewritten = httpx.Request(request.method, request.url, headers=headers,
                                  content=json.dumps({**body, **self.fields}).encode())
        return self.inner.handle_request(rewritten)


@pytest.fixture
def live(make_server: Callable[..., LiveServer], models_dir: Path, stories_path: Path) -> LiveServer:
    shutil.copy(stories_path, models_dir / "stories.gguf")
    return make_server()


@pytest.fixture
def client(live: LiveServer) -> ollama.Client:
    return ollama.Client(host=live.url)


@pytest.fixture
def qwen3(make_server: Callable[..., LiveServer], models_dir: Path) -> Callable[[str], ollama.Client]:
    """A client of a server holding ``qwen3``, a tiny model with Qwen3's template, forced to write ``output``."""
    template = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    write_llama_model(models_dir / "qwen3.gguf", chat_template=template, seed=4,
                      control_tokens=model_dialect(template, None).special_markers)
    server = make_server({"n_ctx": 4096})

    def forced(output: str) -> ollama.Client:
        return ollama.Client(host=server.url, transport=ExtraFields(grammar=gbnf_literal(output)))

    return forced


def v1_chat(live: LiveServer, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": USER, "temperature": 0, "max_tokens": 12, **extra}
    return live.post("/v1/chat/completions", body).json()["choices"][0]


def test_chat_answers_as_v1_does_whole_and_streamed(live: LiveServer, client: ollama.Client):
    expected = v1_chat(live, "tiny-chat")["message"]["content"]
    whole = client.chat(model="tiny-chat", messages=USER, options=GREEDY, stream=False)
    assert whole.message.content == expected and whole.message.role == "assistant"
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    assert whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat(model="tiny-chat:latest", messages=USER, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done and parts[-1].eval_count == 12
    assert parts[0].model == "tiny-chat:latest"


def test_generate_raw_and_templated(live: LiveServer, client: ollama.Client):
    text = live.post("/v1/completions", {"model": "stories", "prompt": "Once upon a time", "temperature": 0,
                                         "max_tokens": 12}).json()["choices"][0]["text"]
    raw = client.generate(model="stories", prompt="Once upon a time", options=GREEDY)
    assert raw.response == text and raw.done_reason == "length"
    streamed = "".join(p.response for p in client.generate(model="stories", prompt="Once upon a time", options=GREEDY,
                                                            stream=True))
    assert streamed == text
    # A model with a template: the prompt is one user turn, as in /v1's chat.
    templated = client.generate(model="tiny-chat", prompt="Weather in Paris?", options=GREEDY)
    assert templated.response == v1_chat(live, "tiny-chat")["message"]["content"]


def test_options_reach_the_sampler(client: ollama.Client):
    stop = client.generate(model="stories", prompt="Once upon a time", options={**GREEDY, "stop": ["girl"]})
    assert "girl" not in stop.response and stop.done_reason == "stop"
    seeded = [client.generate(model="stories", prompt="Once", options={"temperature": 1.5, "seed": 7,
                                                                       "num_predict": 16}).response
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_format_schema_constrains_the_answer(client: ollama.Client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = client.chat(model="tiny-chat", messages=USER, format=schema, options={"temperature": 0,
                                                                                 "num_predict": 40})
    assert isinstance(json.loads(answer.message.content)["ok"], bool)


def test_embed_and_the_older_embeddings(live: LiveServer, client: ollama.Client):
    expected = live.post("/v1/embeddings", {"model": "tiny", "input": ["a cat", "a dog"]}).json()["data"]
    embedded = client.embed(model="tiny", input=["a cat", "a dog"])
    assert len(embedded.embeddings) == 2 and embedded.prompt_eval_count > 0
    for ours, theirs in zip(embedded.embeddings, expected, strict=True):
        assert ours == pytest.approx(theirs["embedding"])
        assert math.isclose(math.fsum(v * v for v in ours), 1.0, rel_tol=1e-4)
    assert client.embeddings(model="tiny:latest", prompt="a cat").embedding == pytest.approx(embedded.embeddings[0])


def test_list_show_and_version(live: LiveServer, client: ollama.Client):
    names = {m.model for m in client.list().models}
    assert names == {"tiny:latest", "tiny-chat:latest", "stories:latest"}
    tiny = next(m for m in client.list().models if m.model == "tiny:latest")
    assert tiny.details.format == "gguf" and tiny.details.family == "llama" and tiny.size > 0
    shown = client.show("tiny-chat")
    assert "<|im_start|>" in shown.template and shown.modelinfo["general.architecture"] == "llama"
    assert "completion" in shown.capabilities and "thinking" not in shown.capabilities
    assert requests.get(live.url + "/api/version", timeout=10).json()["version"]


def test_ps_lists_loaded_models_and_keep_alive_zero_unloads(live: LiveServer, client: ollama.Client):
    assert client.ps().models == []
    client.chat(model="tiny-chat", messages=USER, options={"num_predict": 2}, keep_alive="10m")
    [loaded] = client.ps().models
    assert loaded.model == "tiny-chat:latest" and loaded.size > 0
    left = (loaded.expires_at - datetime.now(UTC)).total_seconds()
    assert 590 < left <= 600
    client.chat(model="tiny-chat", messages=USER, options={"num_predict": 2}, keep_alive=0)
    live.wait_for(lambda: live.model_view("tiny-chat")["state"] == "unloaded")
    assert client.ps().models == []


def test_empty_prompt_loads_and_keep_alive_zero_unloads(live: LiveServer, client: ollama.Client):
    """What ``ollama run`` (load) and ``ollama stop`` (unload) send."""
    assert client.generate(model="stories", prompt="").done_reason == "load"
    assert live.model_view("stories")["state"] == "loaded"
    assert client.chat(model="stories", messages=[], keep_alive=0).done_reason == "unload"
    live.wait_for(lambda: live.model_view("stories")["state"] == "unloaded")


def test_think_separates_reasoning(qwen3: Callable[[str], ollama.Client]):
    client = qwen3("<think>\nThe user wants weather.\n</think>\n\nIt is sunny.")
    whole = client.chat(model="qwen3", messages=USER, think=True, options={"temperature": 0})
    assert whole.message.thinking == "The user wants weather." and whole.message.content == "It is sunny."
    parts = list(client.chat(model="qwen3", messages=USER, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "The user wants weather."
    assert "".join(p.message.content for p in parts) == "It is sunny."
    assert "thinking" in client.show("qwen3").capabilities


def test_tool_calls_round_trip(qwen3: Callable[[str], ollama.Client]):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    client = qwen3(call)
    first = client.chat(model="qwen3", messages=USER, tools=[WEATHER], think=False)
    [made] = first.message.tool_calls
    assert made.function.name == "get_weather" and made.function.arguments == {"city": "Paris"}
    assert first.done_reason == "stop"
    streamed = [c for p in client.chat(model="qwen3", messages=USER, tools=[WEATHER], think=False, stream=True)
                for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [("get_weather", {"city": "Paris"})]
    # The call and its result go back: the template renders both (the prompt grows by them).
    history = [*USER, first.message, {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 24 C"}]
    second = qwen3("It is sunny.").chat(model="qwen3", messages=history, tools=[WEATHER], think=False)
    assert second.message.content == "It is sunny." and second.prompt_eval_count > first.prompt_eval_count + 10


def test_errors_come_in_ollama_shape(live: LiveServer, client: ollama.Client):
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=USER)
    assert missing.value.status_code == 404 and 'model "nope" not found' in missing.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.generate(model="nope:7b", prompt="Hi", stream=True))
    assert streamed.value.status_code == 404
    bad = requests.post(live.url + "/api/chat", json={"model": "tiny-chat", "messages": USER,
                                                       "options": {"temperature": "hot"}}, timeout=10)
    assert bad.status_code == 400 and bad.json() == {"error": "Invalid 'options.temperature': "
                                                              "Input should be a valid number"}
    for path, body in [("/api/chat", b"{"), ("/api/generate", b'{"prompt": "Hi"}'),
                       ("/api/embed", b'{"model": "tiny", "input": 3}'), ("/api/show", b"[]")]:
        response = requests.post(live.url + path, data=body, timeout=10)
        assert response.status_code == 400 and list(response.json()) == ["error"], (path, response.text)
    assert requests.get(live.url + "/api/chat", timeout=10).json()["error"].startswith("Method not allowed")


def test_images_are_refused_clearly(client: ollama.Client):
    image = b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="tiny-chat", messages=[{"role": "user", "content": "What is this?", "images": [image]}])
    # tiny-chat has no projector (tests/test_vision.py sends pictures to one that has)
    assert refused.value.status_code == 400 and "no multimodal projector" in refused.value.error
    assert "messages[0].images[0]" in refused.value.error


@pytest.mark.parametrize("call", [lambda c: c.pull("llama3"), lambda c: c.push("llama3"),
                                  lambda c: c.create("x", from_="tiny"), lambda c: c.copy("tiny", "t2"),
                                  lambda c: c.delete("tiny")])
def test_model_management_is_refused_clearly(client: ollama.Client, call: Callable[[ollama.Client], Any]):
    with pytest.raises(ollama.ResponseError) as refused:
        call(client)
    assert refused.value.status_code == 400 and "GGUF files in the server's models folder" in refused.value.error


def test_api_needs_a_key_when_keys_are_set(make_server: Callable[..., LiveServer]):
    live = make_server(server={"api_keys": ["sesame"]})
    refused = requests.get(live.url + "/api/tags", timeout=10)
    assert refused.status_code == 401 and list(refused.json()) == ["error"]
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=live.url).list()
    keyed = ollama.Client(host=live.url, headers={"Authorization": "Bearer sesame"})
    assert keyed.chat(model="tiny-chat", messages=USER, options={"num_predict": 2}).done


def test_metrics_count_ollama_completions(live: LiveServer, client: ollama.Client):
    client.chat(model="tiny-chat", messages=USER, options={"num_predict": 3, "temperature": 0})
    scraped = live.get("/metrics").text
    assert 'llama_server_generated_tokens_total{model="tiny-chat"} 3.0' in scraped


def test_hang_up_mid_stream_frees_the_lease(live: LiveServer):
    live.loader.token_delay = 0.05
    body = {"model": "stories", "prompt": "Once upon a time", "options": {"num_predict": 400}}
    with requests.post(live.url + "/api/generate", json=body, stream=True, timeout=30) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
    live.wait_for(lambda: live.model_view("stories")["in_flight"] == 0)


def test_stream_waiting_for_a_slow_load_sends_chunks_the_client_reads(live: LiveServer, client: ollama.Client):
    live.loader.delay = 6.0  # past the point where a stream sends its headers and then keepalives
    parts = list(client.generate(model="stories", prompt="Once upon a time", options=GREEDY, stream=True))
    assert parts[0].response == "" and not parts[0].done
    assert parts[-1].done and parts[-1].eval_count == 12 and parts[-1].load_duration > 5e9


def test_a_failure_mid_stream_arrives_as_an_error_line(live: LiveServer, client: ollama.Client):
    client.generate(model="stories", prompt="")  # loaded: the failure comes after the headers
    live.loader.fail_eval_after = 3
    with pytest.raises(ollama.ResponseError) as failed:
        list(client.generate(model="stories", prompt="Once upon a time", options={"num_predict": 50}, stream=True))
    assert "failed" in failed.value.error.lower()
    live.wait_for(lambda: live.model_view("stories")["in_flight"] == 0)


def test_a_broken_gguf_file_does_not_break_the_listings(make_server, models_dir: Path):
    (models_dir / "empty.gguf").write_bytes(b"")  # a copy still in progress, say
    (models_dir / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # magic and version, no counts
    server = make_server()
    assert server.get("/api/tags").status_code == 200
    assert server.get("/v1/models").status_code == 200
    assert server.post("/api/show", {"model": "empty"}).status_code < 500


def test_keep_alive_zero_on_a_busy_model_unloads_it_when_its_requests_end(make_server):
    server = make_server()
    server.post("/api/chat", {"model": "tiny-chat", "messages": []})  # loads it
    server.loader.token_delay = 0.02
    finished = threading.Event()

    def long_request() -> None:
        server.post("/api/chat", {"model": "tiny-chat", "stream": False, "options": {"num_predict": 60},
                                  "messages": [{"role": "user", "content": "hi"}]})
        finished.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.4)
    reply = server.post("/api/generate", {"model": "tiny-chat", "keep_alive": 0})
    assert reply.json()["done_reason"] == "unload"
    thread.join(60)
    assert finished.is_set()
    deadline = time.monotonic() + 10
    while "tiny-chat" in server.get("/health").json()["loaded_models"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tiny-chat" not in server.get("/health").json()["loaded_models"]


def test_chat_with_an_embedding_model_points_at_api_embed(make_server):
    server = make_server(models={"tiny": {"embedding": True}})
    for path, body in (("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/api/generate", {"model": "tiny", "prompt": "hi"})):
        refused = server.post(path, {**body, "stream": False})
        assert refused.status_code == 400, refused.text
        assert "/api/embed" in refused.json()["error"] and "/v1/" not in refused.json()["error"]
