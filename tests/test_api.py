"""The OpenAI-compatible endpoints, over HTTP, on real models."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import socket
import struct
import time

import requests
from conftest import LiveServer, chat_body, sse_events
from gguf_factory import EOS_ID, write_llama_model


def test_stories_completion_continues_the_story(make_server, stories_path, models_dir):
    shutil.copy(stories_path, models_dir / "stories260K.gguf")
    server = make_server()
    body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    reply = server.post("/v1/completions", body).json()
    assert reply["choices"][0]["text"].startswith(", there was a little girl named Lily")
    assert reply["object"] == "text_completion"
    assert reply["usage"]["completion_tokens"] == 12
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + 12


def test_stories_chat_uses_fallback_template(make_server, stories_path, models_dir):
    shutil.copy(stories_path, models_dir / "stories260K.gguf")
    server = make_server()
    reply = server.post("/v1/chat/completions", chat_body("stories260K.gguf", max_tokens=16))
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["model"] == "stories260K"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["message"]["content"]
    assert data["object"] == "chat.completion"


def test_chat_with_model_template(server: LiveServer):
    reply = server.post("/v1/chat/completions", chat_body(max_tokens=5)).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    message = reply["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None  # OpenAI's message always has it
    assert reply["usage"]["completion_tokens"] == 5
    prompt_tokens = reply["usage"]["prompt_tokens"]
    longer = server.post("/v1/chat/completions", chat_body(content="Hello Hello Hello", max_tokens=5)).json()
    assert longer["usage"]["prompt_tokens"] == prompt_tokens + 2


def test_stream_shape_and_usage(server: LiveServer):
    body = chat_body(max_tokens=6, stream=True, stream_options={"include_usage": True})
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # null until the last, as OpenAI
    plain = server.post("/v1/chat/completions", chat_body(max_tokens=6)).json()
    assert text == plain["choices"][0]["message"]["content"]  # greedy: same text either way


def test_text_completion_stream(server: LiveServer):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as response:
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])  # OpenAI: same object as the reply
    assert not any("usage" in e for e in events[:-1])  # not asked for
    body["stream_options"] = {"include_usage": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as response:
        events = list(sse_events(response))[:-1]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert not any("usage" in e for e in events[:-1])  # unlike chat chunks, never null: the spec says so


def test_system_fingerprint_is_one_value_on_every_reply_and_chunk(server: LiveServer):
    text = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    replies = [server.post("/v1/chat/completions", chat_body(max_tokens=3)).json(),
               server.post("/v1/completions", text).json(), server.post("/v1/completions", text).json()]
    for path, body in (("/v1/chat/completions", chat_body(max_tokens=3)), ("/v1/completions", text)):
        with requests.post(server.url + path, json={**body, "stream": True}, stream=True, timeout=30) as response:
            replies += [e for e in sse_events(response) if e != "[DONE]"]
    fingerprints = {reply.get("system_fingerprint") for reply in replies}
    assert len(fingerprints) == 1, fingerprints
    assert re.fullmatch(r"fp_[0-9a-f]{10}", fingerprints.pop() or "")


def test_tokens_leave_as_they_are_generated(server: LiveServer):
    """Over a raw socket, the first content chunk arrives long before the stream ends."""
    assert server.post("/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 1}).status_code == 200
    server.loader.token_delay = 0.01
    body = json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 60, "temperature": 0,
                       "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received, first = b"", None
        while b"[DONE]" not in received:
            data = sock.recv(65536)
            assert data, "connection closed before [DONE]"
            received += data
            if first is None and b'"text":"' in received:
                first = time.monotonic() - started
        total = time.monotonic() - started
    assert first is not None
    assert first < total / 4, (first, total)


def test_stop_strings_end_generation_and_are_not_emitted(server: LiveServer):
    free = server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 20,
                                           "temperature": 0}).json()["choices"][0]["text"]
    stop = free[5:8]
    assert stop.strip(), free
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 20, "temperature": 0, "stop": [stop],
                "stream": stream}
        if stream:
            with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as response:
                events = [e for e in sse_events(response) if e != "[DONE]"]
            text = "".join(e["choices"][0]["text"] for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            choice = server.post("/v1/completions", body).json()["choices"][0]
            text, finish = choice["text"], choice["finish_reason"]
        assert text == free[: free.index(stop)]
        assert finish == "stop"


def test_eos_stops_unless_ignore_eos(server: LiveServer):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "logit_bias": {str(EOS_ID): 100}}
    stopped = server.post("/v1/completions", body).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 0
    ignored = server.post("/v1/completions", {**body, "ignore_eos": True}).json()
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 8


def test_multibyte_characters_never_split_across_chunks(server: LiveServer):
    # The grammar forces "é€" (2 + 3 UTF-8 bytes), which the tiny vocab spells with byte tokens.
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 15, "temperature": 0, "stream": True,
            "grammar": 'root ::= ("é€")+', "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as response:
        pieces = [e["choices"][0]["text"] for e in sse_events(response) if e != "[DONE]"]
    text = "".join(pieces)
    assert text.startswith("é€é€"), text
    assert "\ufffd" not in text
    assert all(set(piece) <= {"é", "€"} for piece in pieces), pieces  # whole characters only


def test_seeded_sampling_is_reproducible(server: LiveServer):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 10, "temperature": 1.0, "seed": 42}
    first = server.post("/v1/completions", body).json()["choices"][0]["text"]
    assert server.post("/v1/completions", body).json()["choices"][0]["text"] == first


def test_prompt_list_gives_one_choice_each(server: LiveServer):
    body = {"model": "tiny", "prompt": ["Hello", "Once upon a time"], "max_tokens": 3, "temperature": 0}
    reply = server.post("/v1/completions", body).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert reply["usage"]["completion_tokens"] == 6


def test_json_schema_response_format(server: LiveServer):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = chat_body(max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "r",
                                                                                           "schema": schema}})
    content = server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert json.loads(content)["ok"] in (True, False)


def test_required_tool_choice_returns_tool_call(make_server, models_dir):
    template = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    write_llama_model(models_dir / "tool-model.gguf", chat_template=template, seed=3)
    server = make_server()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"]}}}
    body = chat_body("tool-model", "Weather?", max_tokens=200, tools=[tool], tool_choice="required")
    reply = server.post("/v1/chat/completions", body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", reply
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
    refused = server.post("/v1/chat/completions", chat_body(tools=[tool]))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
    with requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True,
                       timeout=30) as response:
        chunks = [e for e in sse_events(response) if e != "[DONE]"]
    deltas = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["index"] == 0 and deltas[0]["id"] and deltas[0]["function"]["name"] == "get_weather"
    arguments = "".join(d["function"]["arguments"] for d in deltas if d["index"] == 0)
    assert arguments == call["function"]["arguments"]  # greedy: the same call, streamed as it was written
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_embeddings_one_normalised_vector_per_input_in_order(server: LiveServer):
    inputs = ["Hello world", "Once upon a time", "Hello world"]
    reply = server.post("/v1/embeddings", {"model": "tiny", "input": inputs}).json()
    vectors = [d["embedding"] for d in reply["data"]]
    assert [d["index"] for d in reply["data"]] == [0, 1, 2]
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert reply["usage"]["prompt_tokens"] > 0
    single = server.post("/v1/embeddings", {"model": "tiny", "input": "Hello world"}).json()["data"]
    assert single[0]["embedding"] == vectors[0]
    encoded = server.post("/v1/embeddings", {"model": "tiny", "input": "Hello world",
                                             "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(decoded, vectors[0], strict=True))


def test_embedding_instance_is_separate_and_evictable(server: LiveServer):
    server.post("/v1/chat/completions", chat_body("tiny", max_tokens=2))
    server.post("/v1/embeddings", {"model": "tiny", "input": "Hello"})
    view = server.model_view("tiny")
    assert view["state"] == "loaded" and view["embeddings"]["state"] == "loaded"
    assert server.post("/admin/unload", {"model": "tiny"}).json()["unloaded"] == ["tiny", "tiny (embeddings)"]


def test_models_listing(server: LiveServer):
    data = server.get("/v1/models").json()
    assert data["object"] == "list"
    assert {m["id"] for m in data["data"]} == {"tiny", "tiny-chat"}
    for model in data["data"]:
        assert model["object"] == "model" and model["owned_by"] and isinstance(model["created"], int)
        assert model["state"] == "unloaded"
    assert server.get("/v1/models/tiny.gguf").json()["id"] == "tiny"
    assert server.get("/v1/models/nope").status_code == 404


def test_default_model_serves_requests_without_model(make_server):
    server = make_server({"default_model": "tiny"})
    reply = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["model"] == "tiny"


def test_prefix_reuse_keeps_answers_identical(server: LiveServer):
    history = chat_body(content="Hello Hello world", max_tokens=8)
    first = server.post("/v1/chat/completions", history).json()["choices"][0]["message"]["content"]
    evals_before = server.loader.evals
    again = server.post("/v1/chat/completions", history).json()["choices"][0]["message"]["content"]
    assert again == first
    assert server.loader.evals - evals_before == 8  # 1 re-evaluated prompt token + 7 generated tokens


def test_usage_counts_prompt_tokens_served_from_the_kv_cache(server: LiveServer):
    body = chat_body(content="Hello Hello world", max_tokens=4)
    first = server.post("/v1/chat/completions", body).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    again = server.post("/v1/chat/completions", body).json()["usage"]
    assert 0 < again["prompt_tokens_details"]["cached_tokens"] < again["prompt_tokens"] == first["prompt_tokens"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(server.url + "/v1/chat/completions", json=stream, stream=True, timeout=30) as response:
        streamed = [e for e in sse_events(response) if e != "[DONE]"][-1]["usage"]
    assert streamed["prompt_tokens_details"] == again["prompt_tokens_details"]


def test_text_parts_are_joined_with_newlines(server: LiveServer):
    """As llama.cpp's server does: [{"text": "a"}, {"text": "b"}] reads as "a\\nb"."""
    parts = chat_body(max_tokens=6)
    parts["messages"][0]["content"] = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    joined = server.post("/v1/chat/completions", chat_body(content="Hello\nworld", max_tokens=6)).json()
    glued = server.post("/v1/chat/completions", chat_body(content="Helloworld", max_tokens=6)).json()
    assert joined["usage"]["prompt_tokens"] != glued["usage"]["prompt_tokens"]  # the test can tell them apart
    reply = server.post("/v1/chat/completions", parts).json()
    assert reply["usage"]["prompt_tokens"] == joined["usage"]["prompt_tokens"]
    assert reply["choices"][0]["message"]["content"] == joined["choices"][0]["message"]["content"]
