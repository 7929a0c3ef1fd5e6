"""OpenAI's Responses API through the official ``openai`` client, on real models.

Every reply and every stream event that passes through ``LiveServer`` or ``sse_events`` is
also checked against OpenAI's own schema for it. The tool-call tests give a tiny model Qwen3's
real chat template and force its answer with a ``grammar`` (llama.cpp's extension, accepted
in the Responses body), as tests/test_dialects_served.py does for chat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import openai_spec
import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer, check_response, sse_events
from gguf_factory import build_vocab, write_llama_model
from helpers import raw_request

from chat_format import model_dialect

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "shared" / "chat-templates"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
THINK_AND_CALL = ('<think>\nThe user wants weather.\n</think>\n\nLet me check.<tool_call>\n'
                  '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=JOIN_TIMEOUT)


def literal(text: str) -> str:
    """A GBNF grammar that lets the model write exactly ``text``."""
    return 'root ::= "' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@pytest.fixture
def qwen3(make_server: Callable[..., LiveServer], models_dir: Path) -> tuple[LiveServer, dict[str, float]]:
    """A server with a tiny model on Qwen3's template, and the logit bias that makes it write its
    markers as control tokens."""
    template = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    markers = model_dialect(template, None).special_markers
    write_llama_model(models_dir / "qwen3.gguf", chat_template=template, control_tokens=markers, seed=4)
    tokens, _, _ = build_vocab(control_tokens=markers)
    return make_server({"n_ctx": 4096}), {str(tokens.index(m)): 100.0 for m in markers}


def test_create_retrieve_list_and_delete_with_the_client(server: LiveServer):
    client = client_for(server)
    reply = client.responses.create(model="tiny-chat", input="Hello", instructions="Be brief.", temperature=0,
                                    max_output_tokens=5, metadata={"ticket": "42"})
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text and reply.output[0].type == "message"
    assert reply.usage.output_tokens == 5
    assert reply.usage.total_tokens == reply.usage.input_tokens + 5
    assert reply.metadata == {"ticket": "42"} and reply.instructions == "Be brief."

    again = client.responses.retrieve(reply.id)
    assert again.model_dump() == reply.model_dump()
    items = client.responses.input_items.list(reply.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Hello")]
    assert server.get(f"/v1/responses/{reply.id}").status_code == 200  # the raw reply matches OpenAI's schema
    assert server.get(f"/v1/responses/{reply.id}/input_items").status_code == 200

    client.responses.delete(reply.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(reply.id)
    assert caught.value.body["param"] == "response_id" and caught.value.body["code"] == "not_found"


def test_the_raw_reply_and_the_deleted_reply_match_openais_shapes(server: LiveServer):
    reply = server.post("/v1/responses", {"model": "tiny-chat", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}], "max_output_tokens": 3})
    assert reply.status_code == 200, reply.text
    deleted = check_response(requests.delete(f"{server.url}/v1/responses/{reply.json()['id']}", timeout=JOIN_TIMEOUT))
    assert deleted.json() == {"id": reply.json()["id"], "object": "response.deleted", "deleted": True}
    with pytest.raises(openai_spec.SpecViolation):  # the check does look at the body
        openai_spec.validate({**deleted.json(), "deleted": "yes"}, openai_spec.RESPONSE_DELETED)


def test_streamed_with_the_clients_helper_matches_the_whole_answer(server: LiveServer):
    client = client_for(server)
    request: dict[str, Any] = {"model": "tiny-chat", "input": "Hello", "temperature": 0,
                               "extra_body": {"grammar": literal("Hi there, friend")}}
    with client.responses.stream(**request) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "response.output_text.delta" in kinds
    assert final.status == "completed" and final.output_text == "Hi there, friend"
    whole = client.responses.create(**request)
    assert whole.output_text == final.output_text and whole.usage.output_tokens == final.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == "Hi there, friend"  # a stream is stored too

    with server.post("/v1/responses", {**request.pop("extra_body"), **request, "stream": True},
                     stream=True) as raw:
        assert raw.headers["Content-Type"].startswith("text/event-stream")
        events = list(sse_events(raw))  # each event checked against its own schema, event: names included
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len({e["item_id"] for e in events if "item_id" in e}) == 1


def test_previous_response_id_continues_the_conversation(server: LiveServer):
    client = client_for(server)
    first = client.responses.create(model="tiny-chat", input="Hello", temperature=0, max_output_tokens=4)
    second = client.responses.create(previous_response_id=first.id, input="Tell me more", temperature=0,
                                     max_output_tokens=4)  # the model comes from the first response
    assert second.model == "tiny-chat" and second.previous_response_id == first.id
    # The second prompt holds the first turn: it is longer than both of the first's parts together,
    # and the worker reused the first turn's cached tokens.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    items = client.responses.input_items.list(second.id, order="asc")
    assert [(i.type, i.role) for i in items.data] == [("message", "user"), ("message", "assistant"),
                                                      ("message", "user")]
    assert items.data[1].content[0].text == first.output_text
    alone = client.responses.create(model="tiny-chat", input="Tell me more", temperature=0, max_output_tokens=4)
    assert alone.usage.input_tokens < second.usage.input_tokens


def test_a_function_call_round_trip(qwen3):
    server, bias = qwen3
    client = client_for(server)
    first = client.responses.create(model="qwen3", input="Weather in Paris?", tools=[WEATHER], temperature=0,
                                    extra_body={"grammar": literal(THINK_AND_CALL), "logit_bias": bias})
    assert [item.type for item in first.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = first.output
    assert reasoning.content[0].text == "The user wants weather."
    assert message.content[0].text == "Let me check."
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert first.status == "completed" and first.usage.output_tokens_details.reasoning_tokens > 0
    assert first.usage.output_tokens_details.reasoning_tokens < first.usage.output_tokens

    result = [{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}]
    second = client.responses.create(previous_response_id=first.id, input=result, tools=[WEATHER], temperature=0,
                                     extra_body={"grammar": literal("It is sunny."), "logit_bias": bias})
    assert second.output_text == "It is sunny." and second.status == "completed"
    assert second.usage.input_tokens_details.cached_tokens > 0
    kinds = [item.type for item in client.responses.input_items.list(second.id, order="asc").data]
    assert kinds == ["message", "reasoning", "message", "function_call", "function_call_output"]
    # Sent by hand instead of by id, the same conversation makes the same prompt.
    history = [{"role": "user", "content": "Weather in Paris?"},
               *[item.model_dump(exclude_none=True) for item in first.output], *result]
    by_hand = client.responses.create(model="qwen3", input=history, tools=[WEATHER], temperature=0, store=False,
                                      extra_body={"grammar": literal("It is sunny."), "logit_bias": bias})
    assert by_hand.usage.input_tokens == second.usage.input_tokens


def test_a_streamed_function_call_comes_as_typed_events(qwen3):
    server, bias = qwen3
    body = {"model": "qwen3", "input": "Weather in Paris?", "tools": [WEATHER], "temperature": 0, "stream": True,
            "grammar": literal(THINK_AND_CALL), "logit_bias": bias}
    with server.post("/v1/responses", body, stream=True) as raw:
        events = list(sse_events(raw))
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert (reasoning, text, json.loads(arguments)) == ("The user wants weather.", "Let me check.", {"city": "Paris"})
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in done] == [("get_weather", arguments)]
    final = events[-1]
    assert final["type"] == "response.completed"
    assert [item["type"] for item in final["response"]["output"]] == ["reasoning", "message", "function_call"]


def test_store_false_keeps_nothing(server: LiveServer):
    client = client_for(server)
    reply = client.responses.create(model="tiny-chat", input="Hello", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    refused = server.post("/v1/responses", {"input": "Hi", "previous_response_id": reply.id})
    assert refused.status_code == 404
    assert refused.json()["error"]["param"] == "previous_response_id"
    assert refused.json()["error"]["code"] == "previous_response_not_found"


def test_stored_responses_are_bounded_by_count(make_server: Callable[..., LiveServer]):
    server = make_server(server={"responses_max_count": 2})
    client = client_for(server)
    ids = [client.responses.create(model="tiny-chat", input=f"Hi {i}", max_output_tokens=1).id for i in range(3)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])  # the oldest went when the third was stored
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
    assert server.app.extensions["llama_cpp_server"].responses.count() == 2


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "nope", "input": "Hi"}, 404, "model"),
    ({"model": "tiny-chat"}, 400, "input"),
    ({"model": "tiny-chat", "input": "Hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "tiny-chat", "input": "Hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"model": "tiny-chat", "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "x"}]}]}, 400, "input[0].content[0].type"),
    ({"model": "tiny-chat", "input": "Hi", "background": True}, 400, "background"),
    ({"model": "tiny-chat", "input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "string", "minLength": 5, "maxLength": 2}}}}, 400, "text.format"),
    ({"model": "tiny-chat", "input": "Hi", "max_output_tokens": 100}, 400, "max_output_tokens"),
])
def test_errors_come_in_openais_shape_naming_this_apis_params(make_server, body, status, param):
    server = make_server({"max_tokens_limit": 50})
    reply = server.post("/v1/responses", body)  # the body must match OpenAI's ErrorResponse
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(server).responses.create(**body)
    assert caught.value.status_code == status


def test_a_hang_up_mid_stream_frees_the_lease(server: LiveServer):
    server.post("/v1/responses", {"model": "tiny-chat", "input": "Hi", "max_output_tokens": 1})  # loaded
    server.loader.token_delay = 0.05
    sock = raw_request(server, "/v1/responses", {"model": "tiny-chat", "input": "Hi", "stream": True,
                                                 "max_output_tokens": 400, "ignore_eos": True})
    received = b""
    while b"response.output_text.delta" not in received:
        received += sock.recv(4096)
    assert server.model_view("tiny-chat")["in_flight"] == 1
    sock.close()
    server.wait_for(lambda: server.model_view("tiny-chat")["in_flight"] == 0, timeout=10)
    started = time.monotonic()
    assert server.post("/v1/responses", {"model": "tiny-chat", "input": "Hi", "max_output_tokens": 1}).ok
    assert time.monotonic() - started < 5


def test_a_failure_mid_stream_is_an_error_event_then_response_failed(server: LiveServer):
    client = client_for(server)
    client.responses.create(model="tiny-chat", input="Hi", max_output_tokens=1)  # loaded
    server.loader.fail_eval_after = 5
    body = {"model": "tiny-chat", "input": "Hi", "stream": True, "max_output_tokens": 50, "ignore_eos": True}
    with server.post("/v1/responses", body, stream=True) as raw:
        events = list(sse_events(raw))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "inference_failed" and "Traceback" not in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(failed["id"])  # a failed response is not stored
    assert server.model_view("tiny-chat")["in_flight"] == 0
    assert client.responses.create(model="tiny-chat", input="Hi", max_output_tokens=3).usage.output_tokens == 3


def test_errors_name_the_responses_fields_in_param_and_message(make_server):
    server = make_server(manager={"max_tokens_limit": 8})
    refused = server.post("/v1/responses", {"model": "tiny-chat", "input": "Hi", "max_output_tokens": 50})
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "max_output_tokens"
    assert "max_output_tokens 50" in error["message"] and "max_tokens" not in error["message"].replace(
        "max_output_tokens", ""), error
