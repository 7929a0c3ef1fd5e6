"""Anthropic's Messages API through the official ``anthropic`` client, on real models.

stories260K answers plain text; a tiny model with Qwen3's real chat template, a grammar forcing
its exact answer and a logit bias writing its markers as control tokens (as in
test_dialects_served.py) answers with thinking and tool calls through the real path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer
from gguf_factory import build_vocab, write_llama_model
from helpers import anthropic_events, gbnf_literal, raw_request

from chat_format import model_dialect

QWEN3 = Path(__file__).resolve().parent.parent.parent / "shared" / "chat-templates" / "Qwen-Qwen3-0.6B.jinja"
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = ('<think>\nThe user wants weather.\n</think>\n\nLet me check.<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def stories(make_server, stories_path, models_dir) -> tuple[LiveServer, anthropic.Anthropic]:
    shutil.copy(stories_path, models_dir / "stories260K.gguf")
    server = make_server()
    return server, anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture
def qwen3(make_server, models_dir) -> tuple[LiveServer, anthropic.Anthropic, dict[str, float]]:
    """A tiny model with Qwen3's template, and the logit bias that makes it write markers as tokens."""
    template = QWEN3.read_text(encoding="utf-8")
    markers = model_dialect(template, None).special_markers
    write_llama_model(models_dir / "qwen3.gguf", chat_template=template, control_tokens=markers, seed=4)
    tokens, _, _ = build_vocab(control_tokens=markers)
    server = make_server({"n_ctx": 4096})
    bias = {str(tokens.index(m)): 100.0 for m in markers}
    return server, anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0), bias


def forced(bias: dict[str, float], output: str) -> dict[str, Any]:
    return {"grammar": gbnf_literal(output), "logit_bias": bias}


def test_create_answers_a_message(stories):
    server, client = stories
    message = client.messages.create(model="stories260K", max_tokens=8, system="Tell a story.",
                                     messages=[{"role": "user", "content": "Once upon a time"}],
                                     extra_body={"temperature": 0})  # this client version has no temperature
    assert message.type == "message" and message.role == "assistant" and message.model == "stories260K"
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 8
    counted = client.messages.count_tokens(model="stories260K", system="Tell a story.",
                                           messages=[{"role": "user", "content": "Once upon a time"}])
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    metrics = server.get("/metrics").text
    assert 'endpoint="/v1/messages",method="POST",status="200"' in metrics
    assert 'llama_server_generated_tokens_total{model="stories260K"} 8.0' in metrics


def test_stream_helpers_give_the_same_message(stories):
    _, client = stories
    request: dict[str, Any] = {"model": "stories260K", "max_tokens": 10, "extra_body": {"temperature": 0},
                               "messages": [{"role": "user", "content": "Once upon a time"}]}
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10
    assert final.id.startswith("msg_") and final.model == "stories260K"


def test_stream_follows_anthropics_event_sequence(stories):
    server, _ = stories
    body = {"model": "stories260K", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with requests.post(server.url + "/v1/messages", json=body, stream=True, timeout=JOIN_TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = anthropic_events(response)
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    delta = dict(events)["message_delta"]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 5


def test_a_stop_sequence_is_named_as_the_reason(stories):
    _, client = stories
    request: dict[str, Any] = {"model": "stories260K", "max_tokens": 24, "extra_body": {"temperature": 0},
                               "messages": [{"role": "user", "content": "Once upon a time"}]}
    text = client.messages.create(**request).content[0].text
    words = text.split()
    assert len(words) > 3, text
    stop = " " + words[2]
    message = client.messages.create(**request, stop_sequences=["NEVER", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[:text.index(stop)]
    with client.messages.stream(**request, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_thinking_and_tool_use_round_trip(qwen3):
    _, client, bias = qwen3
    message = client.messages.create(model="qwen3", max_tokens=400, messages=ASK, tools=[WEATHER],
                                     thinking={"type": "enabled", "budget_tokens": 1024},
                                     extra_body=forced(bias, CALL))
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = message.content
    assert thinking.thinking == "The user wants weather." and thinking.signature == ""
    assert text.text == "Let me check."
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id
    assert message.stop_reason == "tool_use"

    history = [*ASK, {"role": "assistant", "content": message.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]}]
    answer = client.messages.create(model="qwen3", max_tokens=400, messages=history, tools=[WEATHER],
                                    extra_body=forced(bias, "It is sunny."))
    assert [(b.type, b.text) for b in answer.content] == [("text", "It is sunny.")]
    assert answer.stop_reason == "end_turn"
    # The result reached the template: the prompt grows by it.
    assert client.messages.count_tokens(model="qwen3", messages=history, tools=[WEATHER]).input_tokens > \
        client.messages.count_tokens(model="qwen3", messages=history[:2], tools=[WEATHER]).input_tokens


def test_streamed_thinking_and_tool_use(qwen3):
    _, client, bias = qwen3
    with client.messages.stream(model="qwen3", max_tokens=400, messages=ASK, tools=[WEATHER],
                                extra_body=forced(bias, CALL)) as stream:
        kinds = [event.delta.type for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert {"thinking_delta", "text_delta", "input_json_delta", "signature_delta"} <= set(kinds)
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "The user wants weather."
    assert final.content[2].input == {"city": "Paris"} and final.stop_reason == "tool_use"


def test_thinking_disabled_reaches_the_template(qwen3):
    """Qwen3 writes an empty thinking block into the prompt when thinking is off."""
    _, client, _ = qwen3
    on = client.messages.count_tokens(model="qwen3", messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024})
    off = client.messages.count_tokens(model="qwen3", messages=ASK, thinking={"type": "disabled"})
    assert off.input_tokens > on.input_tokens


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(qwen3):
    _, client, _ = qwen3
    offered = client.messages.count_tokens(model="qwen3", messages=ASK, tools=[WEATHER])
    withheld = client.messages.count_tokens(model="qwen3", messages=ASK, tools=[WEATHER], tool_choice={"type": "none"})
    plain = client.messages.count_tokens(model="qwen3", messages=ASK)
    assert offered.input_tokens > withheld.input_tokens == plain.input_tokens


def test_errors_come_in_anthropics_shape(server: LiveServer):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=5, messages=ASK)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=ASK)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="tiny-chat", max_tokens=0, messages=ASK)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    image = {"type": "image", "source": {}}
    call_from_user = {"type": "tool_use", "id": "x", "name": "f", "input": {}}
    bad_bodies = [b"{", json.dumps({"model": "tiny-chat", "messages": ASK}).encode()] + [
        json.dumps({"model": "tiny-chat", "max_tokens": 5, "messages": [{"role": "user", "content": [block]}]}).encode()
        for block in (image, call_from_user)]
    for body in bad_bodies:
        reply = requests.post(server.url + "/v1/messages", data=body, timeout=JOIN_TIMEOUT)
        assert reply.status_code == 400, reply.text
        assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "invalid_request_error"
    wrong_method = requests.get(server.url + "/v1/messages", timeout=JOIN_TIMEOUT)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    # The OpenAI endpoints keep their own shape.
    openai = server.post("/v1/chat/completions", {"model": "nope", "messages": ASK})
    assert openai.status_code == 404 and set(openai.json()) == {"error"}


def test_keys_are_checked_and_refusals_come_in_anthropics_shape(make_server):
    server = make_server(server={"api_keys": ["secret"]})
    refused = requests.post(server.url + "/v1/messages", json={}, timeout=JOIN_TIMEOUT)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.count_tokens(
            model="tiny-chat", messages=ASK)
    client = anthropic.Anthropic(base_url=server.url, api_key="secret", max_retries=0)  # sends x-api-key
    assert client.messages.create(model="tiny-chat", max_tokens=2, messages=ASK).usage.output_tokens == 2
    bearer = requests.post(server.url + "/v1/messages/count_tokens", json={"model": "tiny-chat", "messages": ASK},
                           headers={"Authorization": "Bearer secret", "anthropic-version": "2023-06-01"},
                           timeout=JOIN_TIMEOUT)
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0


def test_a_hang_up_mid_stream_frees_the_lease(server: LiveServer):
    server.post("/admin/load", {"model": "tiny-chat"})
    server.loader.token_delay = 0.05
    body = {"model": "tiny-chat", "max_tokens": 400, "stream": True, "messages": ASK}
    sock = raw_request(server, "/v1/messages", body)
    received = b""
    while b"content_block_delta" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert server.model_view("tiny-chat")["in_flight"] == 1
    sock.close()
    server.wait_for(lambda: server.model_view("tiny-chat")["in_flight"] == 0)
