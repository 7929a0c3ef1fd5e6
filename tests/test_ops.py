"""Operations: Prometheus metrics, API keys, and the official OpenAI client against the server."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests
from conftest import LiveServer, chat_body, sse_events
from prometheus_client.parser import text_string_to_metric_families

USER_KEY, ADMIN_KEY = "user-key-123", "admin-key-456"


def scrape(server: LiveServer, **kwargs) -> dict[tuple[str, tuple], float]:
    text = server.get("/metrics", **kwargs).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_loads_and_unloads(server: LiveServer):
    server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
    assert list(sse_events(server.post("/v1/completions", body)))[-1] == "[DONE]"
    server.post("/admin/unload", {"model": "tiny"})
    server.post("/v1/completions", {"model": "nope", "prompt": "x"})
    samples = scrape(server)
    assert value(samples, "llama_server_requests_total", api="openai", endpoint="/v1/completions", method="POST",
                 status="200") == 2
    assert value(samples, "llama_server_requests_total", api="openai", endpoint="/v1/completions", method="POST",
                 status="404") == 1
    assert value(samples, "llama_server_generated_tokens_total", model="tiny") == 7
    assert value(samples, "llama_server_prompt_tokens_total", model="tiny") > 0
    assert value(samples, "llama_server_time_to_first_token_seconds_count", model="tiny") == 2
    assert value(samples, "llama_server_model_loads_total", model="tiny", mode="generate") == 1
    assert value(samples, "llama_server_model_unloads_total", model="tiny", mode="generate", reason="admin") == 1
    assert value(samples, "llama_server_model_load_duration_seconds_count", model="tiny") == 1
    assert value(samples, "llama_server_last_tokens_per_second", model="tiny") > 0
    assert value(samples, "llama_server_request_duration_seconds_count", endpoint="/v1/completions") == 3
    assert value(samples, "process_resident_memory_bytes") > 0


def test_metrics_count_requests_per_api(server: LiveServer):
    server.post("/api/generate", {"model": "tiny", "prompt": "Hello", "stream": False, "options": {"num_predict": 2}})
    server.post("/tokenize", {"model": "tiny", "content": "Hello"})
    server.post("/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    samples = scrape(server)
    for api, endpoint in (("ollama", "/api/generate"), ("llama.cpp", "/tokenize"), ("anthropic", "/v1/messages")):
        assert value(samples, "llama_server_requests_total", api=api, endpoint=endpoint, method="POST",
                     status="200") == 1, (api, endpoint)


def test_metrics_show_live_state_and_do_not_keep_models_alive(make_server):
    server = make_server({"idle_timeout": 0.5, "check_interval": 0.1})
    server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    samples = scrape(server)
    assert value(samples, "llama_server_loaded_models") == 1
    assert value(samples, "llama_server_estimated_memory_bytes", model="tiny") > 0
    assert value(samples, "llama_server_in_flight_requests", model="tiny") == 0
    deadline = time.monotonic() + 5
    while server.get("/health").json()["loaded_models"] and time.monotonic() < deadline:
        scrape(server)  # scraping and health checks are not activity
    assert server.get("/health").json()["loaded_models"] == []
    # "unloaded" is counted once the close finishes, a moment after the state left "loaded"
    server.wait_for(lambda: value(scrape(server), "llama_server_model_unloads_total", model="tiny",
                                  mode="generate", reason="idle") == 1, timeout=5)


@pytest.fixture
def keyed(make_server) -> LiveServer:
    return make_server(server={"api_keys": [USER_KEY], "admin_api_keys": [ADMIN_KEY]})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_guard_v1_and_admin(keyed: LiveServer):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1}
    missing = keyed.post("/v1/completions", body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert keyed.post("/v1/completions", body, headers=auth("wrong")).status_code == 401
    assert keyed.post("/v1/completions", body, headers={"Authorization": f"Basic {USER_KEY}"}).status_code == 401
    assert keyed.post("/v1/completions", body, headers=auth(USER_KEY)).status_code == 200
    assert keyed.post("/v1/completions", body, headers={"x-api-key": USER_KEY}).status_code == 200
    assert keyed.post("/v1/completions", body, headers=auth(ADMIN_KEY)).status_code == 200
    forbidden = keyed.post("/admin/unload", {"model": "all"}, headers=auth(USER_KEY))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "insufficient_permissions"
    assert keyed.post("/admin/unload", {"model": "all"}).status_code == 401
    assert keyed.post("/admin/unload", {"model": "all"}, headers=auth(ADMIN_KEY)).status_code == 200
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers=auth(ADMIN_KEY)).status_code == 200
    assert keyed.get("/health").status_code == 200  # stays open by default
    for reply in (missing, forbidden):
        assert USER_KEY not in reply.text and ADMIN_KEY not in reply.text


def test_only_user_keys_also_guard_admin(make_server):
    server = make_server(server={"api_keys": [USER_KEY]})
    assert server.post("/admin/unload", {"model": "all"}).status_code == 401
    assert server.post("/admin/unload", {"model": "all"}, headers=auth(USER_KEY)).status_code == 200


def test_cors_preflight_needs_no_key(make_server):
    server = make_server(server={"api_keys": [USER_KEY], "cors_origins": ["http://app.test"]})
    preflight = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers.get("Access-Control-Allow-Headers", "").lower()


def client(server: LiveServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_openai_client_chat_plain_and_streamed(server: LiveServer):
    ai = client(server)
    reply = ai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=5, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens == 5
    chunks = list(ai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=5, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5


def test_openai_client_completions_embeddings_json_mode_and_models(server: LiveServer):
    ai = client(server)
    completion = ai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.choices[0].text
    embeddings = ai.embeddings.create(model="tiny", input=["Hello", "world"])
    assert [d.index for d in embeddings.data] == [0, 1] and len(embeddings.data[0].embedding) == 64
    assert len(ai.embeddings.create(model="tiny", input="Hello").data[0].embedding) == 64  # base64 by default
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = ai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    assert isinstance(json.loads(reply.choices[0].message.content)["ok"], bool)
    assert {m.id for m in ai.models.list()} == {"tiny", "tiny-chat"}


def test_openai_client_errors(keyed: LiveServer):
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as not_found:
        client(keyed, USER_KEY).chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(keyed, USER_KEY).chat.completions.create(model="tiny", messages=[], max_tokens=1)


def test_health_can_require_a_key(make_server):
    server = make_server(server={"api_keys": [USER_KEY], "health_requires_key": True})
    assert server.get("/health").status_code == 401
    assert server.get("/health", headers=auth(USER_KEY)).status_code == 200


def test_chat_body_helper_still_works_with_keys(keyed: LiveServer):
    reply = keyed.post("/v1/chat/completions", chat_body(max_tokens=2), headers={"x-api-key": ADMIN_KEY})
    assert reply.status_code == 200
