"""Each model family's dialect end to end, through the real server and real llama.cpp.

A tiny generated model carries the family's real chat template (``../shared/chat-templates``)
and a vocabulary holding the family's markers as control tokens, as real models have them. The
request's ``grammar`` forces the model to write an exact answer in the family's format, and a
logit bias makes it write each marker as its control token (which a plain detokenize would
drop), so the whole path runs: template, special-token text from the worker, the dialect's
parser, and the OpenAI answer, whole and streamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer, sse_events
from gguf_factory import build_vocab, write_llama_model
from helpers import gbnf_literal

from chat_format import model_dialect
from dialects.deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "shared" / "chat-templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
PARIS = {"city": "Paris"}
DS_BEGIN, DS_END, DS_CALL, DS_CALL_END, DS_SEP = CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP


@dataclass
class Family:
    """A family's template, an answer its model could write, and what reading it must give."""

    name: str
    template: str
    output: str
    reasoning: str | None = None
    content: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    tools: bool = True


FAMILIES = [
    Family("qwen3", "Qwen-Qwen3-0.6B.jinja",
           '<think>\nThe user wants weather.\n</think>\n\nLet me check.<tool_call>\n'
           '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
           reasoning="The user wants weather.", content="Let me check.", calls=[PARIS]),
    Family("qwen3-two-calls", "Qwen-Qwen3-0.6B.jinja",
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
           calls=[PARIS, {"city": "Oslo"}]),
    Family("qwen3-coder", "Qwen3-Coder.jinja",
           "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
           "</function>\n</tool_call>", content="Checking.", calls=[PARIS]),
    Family("llama3.1", "meta-llama-Llama-3.1-8B-Instruct.jinja",
           '{"name": "get_weather", "parameters": {"city": "Paris"}}', calls=[PARIS]),
    Family("mistral-small-3.2", "Mistral-Small-3.2-24B-Instruct-2506.jinja",
           'I will look.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', content="I will look.", calls=[PARIS]),
    Family("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja",
           '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
           calls=[PARIS]),
    Family("ministral-reasoning", "mistralai-Ministral-3-14B-Reasoning-2512.jinja",
           "[THINK]Short question.[/THINK]Hello there.", reasoning="Short question.", content="Hello there.",
           tools=False),
    Family("deepseek-r1", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",  # the prompt opens <think>
           f"Weather wanted.\n</think>\n\n{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n```json\n"
           f'{{"city": "Paris"}}\n```{DS_CALL_END}{DS_END}', reasoning="Weather wanted.", calls=[PARIS]),
    Family("deepseek-v3.1", "deepseek-ai-DeepSeek-V3.1.jinja",  # thinking on: the prompt opens <think>
           f'Tool time.</think>Sure.{DS_BEGIN}{DS_CALL}get_weather{DS_SEP}{{"city": "Paris"}}{DS_CALL_END}{DS_END}',
           reasoning="Tool time.", content="Sure.", calls=[PARIS]),
    Family("gpt-oss", "openai-gpt-oss-120b.jinja",
           "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
           'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
           reasoning="Need the weather.", calls=[PARIS]),
    Family("gpt-oss-final", "openai-gpt-oss-120b.jinja",
           "<|channel|>analysis<|message|>Greeting.<|end|><|start|>assistant<|channel|>final<|message|>Hi!",
           reasoning="Greeting.", content="Hi!", tools=False),
    Family("granite", "ibm-granite-granite-3.3-2B-Instruct.jinja",
           '<think>Need weather.</think><|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
           reasoning="Need weather.", calls=[PARIS]),
    Family("gemma4", "google-gemma-4-31B-it.jinja",
           '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>', calls=[PARIS]),
    Family("smollm3", "HuggingFaceTB-SmolLM3-3B.jinja",
           "<think>\nSimple.\n</think>\nHello!", reasoning="Simple.", content="Hello!", tools=False),
]


@pytest.fixture
def family_server(make_server: Callable[..., LiveServer],
                  models_dir: Path) -> Callable[[Family], tuple[LiveServer, dict]]:
    """A server with ``family``'s tiny model, and the logit bias that makes it write markers as tokens."""

    def start(family: Family, **server: Any) -> tuple[LiveServer, dict[str, float]]:
        template = (TEMPLATES / family.template).read_text(encoding="utf-8")
        markers = model_dialect(template, None).special_markers
        write_llama_model(models_dir / f"{family.name}.gguf", chat_template=template, control_tokens=markers, seed=4)
        tokens, _, _ = build_vocab(control_tokens=markers)
        bias = {str(tokens.index(m)): 100.0 for m in markers}
        return make_server({"n_ctx": 4096}, **server), bias

    return start


def body(family: Family, bias: dict[str, float], **extra: Any) -> dict[str, Any]:
    request = {"model": family.name, "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "grammar": gbnf_literal(family.output), "logit_bias": bias, "max_tokens": 400, "temperature": 0,
               **extra}
    if family.tools:
        request["tools"] = [WEATHER]
    return request


def streamed(server: LiveServer, request: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The deltas of a streamed answer gathered into a message, and its finish_reason."""
    message: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": {}}
    finish = None
    for event in sse_events(server.post("/v1/chat/completions", {**request, "stream": True}, stream=True)):
        if event == "[DONE]":
            break
        choice = event["choices"][0]
        delta = choice["delta"]
        message["content"] += delta.get("content") or ""
        message["reasoning_content"] += delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls") or []:
            whole = message["tool_calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in call:
                assert whole["id"] is None, "a call's id is sent once"
                whole["id"], whole["name"] = call["id"], call["function"]["name"]
            whole["arguments"] += call["function"].get("arguments", "")
        finish = choice["finish_reason"] or finish
    return message, finish


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_familys_answer_is_read_in_its_dialect(family_server, family: Family):
    server, bias = family_server(family)
    reply = server.post("/v1/chat/completions", body(family, bias))
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    message = choice["message"]
    assert message.get("reasoning_content") == family.reasoning
    assert (message["content"] or None) == family.content
    calls = message.get("tool_calls") or []
    assert [json.loads(c["function"]["arguments"]) for c in calls] == family.calls
    assert all(c["function"]["name"] == "get_weather" and c["id"] and c["type"] == "function" for c in calls)
    assert choice["finish_reason"] == ("tool_calls" if family.calls else "stop")

    stream, finish = streamed(server, body(family, bias))
    assert (stream["reasoning_content"] or None) == family.reasoning
    assert (stream["content"] or None) == family.content
    assert [json.loads(c["arguments"]) for c in stream["tool_calls"].values()] == family.calls
    assert finish == choice["finish_reason"]


def test_reasoning_format_none_keeps_thinking_inline(family_server):
    family = FAMILIES[0]
    server, bias = family_server(family)
    message = server.post("/v1/chat/completions", body(family, bias, reasoning_format="none")).json()["choices"][0][
        "message"]
    assert "reasoning_content" not in message
    # The markers as written; the layout whitespace beside them goes, as everywhere.
    assert message["content"].startswith("<think>The user wants weather.</think>Let me check.")
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_enable_thinking_false_reaches_the_template(family_server):
    family = FAMILIES[0]  # Qwen3: enable_thinking false writes an empty thinking block into the prompt
    server, bias = family_server(family)
    on = server.post("/v1/chat/completions", body(family, bias)).json()["usage"]["prompt_tokens"]
    off = server.post("/v1/chat/completions", body(family, bias, chat_template_kwargs={"enable_thinking": False}))
    assert off.status_code == 200, off.text
    assert off.json()["usage"]["prompt_tokens"] > on
    for clash in ({"messages": []}, {"self": 1}):
        refused = server.post("/v1/chat/completions", body(family, bias, chat_template_kwargs=clash))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"


def test_markers_are_plain_text_where_no_dialect_reads_them(family_server):
    """Without tools a call marker is what the model wrote, shown as content (and never dropped)."""
    family = FAMILIES[0]
    server, bias = family_server(family)
    request = body(family, bias)
    del request["tools"]
    message = server.post("/v1/chat/completions", request).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"].startswith("Let me check.<tool_call>")
    assert "tool_calls" not in message


def test_a_malformed_call_comes_back_as_content_not_an_error(family_server):
    family = Family("qwen3", "Qwen-Qwen3-0.6B.jinja", '<tool_call>\n{"name": "get_weather", "arguments": {"city"')
    server, bias = family_server(family)
    reply = server.post("/v1/chat/completions", body(family, bias))
    assert reply.status_code == 200
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == family.output
    # Streamed, the call went out as it was read and is not repeated as content.
    stream, finish = streamed(server, body(family, bias))
    assert finish == "stop" and stream["content"] == ""
    assert [(c["name"], c["arguments"]) for c in stream["tool_calls"].values()] == [("get_weather", '{"city"')]


def test_a_models_default_reasoning_format_applies_to_chat(family_server):
    family = FAMILIES[0]
    server, bias = family_server(family, models={family.name: {"default": {"reasoning_format": "none"}}})
    message = server.post("/v1/chat/completions", body(family, bias)).json()["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"].startswith("<think>")
    asked = server.post("/v1/chat/completions", body(family, bias, reasoning_format="auto")).json()
    assert asked["choices"][0]["message"]["reasoning_content"] == "The user wants weather."  # the request wins


def test_earlier_thinking_sent_back_reaches_the_template(family_server):
    """Qwen3 shows the thinking of the turns since the last question: sending it back lengthens the prompt."""
    family = FAMILIES[0]
    server, bias = family_server(family)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    plain = body(family, bias, messages=history)
    thought = body(family, bias, messages=[history[0], {**history[1], "reasoning_content": "Look it up."},
                                           history[2]])
    tokens = [server.post("/v1/chat/completions", b).json()["usage"]["prompt_tokens"] for b in (plain, thought)]
    assert tokens[1] > tokens[0]


def test_n_choices_are_each_read_in_the_dialect(family_server):
    family = FAMILIES[0]
    server, bias = family_server(family)
    reply = server.post("/v1/chat/completions", body(family, bias, n=2, logprobs=True)).json()
    for choice in reply["choices"]:
        assert choice["message"]["reasoning_content"] == "The user wants weather."
        assert choice["finish_reason"] == "tool_calls"
        assert choice["logprobs"]["content"]
