"""More of the OpenAI request through the real server: ``n`` choices, ``logprobs``, ``seed``."""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer, sse_events
from helpers import open_stream

MODEL = "stories260K"


@pytest.fixture
def stories(make_server: Callable[..., LiveServer], models_dir: Path, stories_path: Path) -> LiveServer:
    shutil.copy(stories_path, models_dir / "stories260K.gguf")
    return make_server()


def chat(server: LiveServer, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 16,
            **extra}
    reply = server.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def text(server: LiveServer, **extra: Any) -> dict[str, Any]:
    reply = server.post("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16,
                                            **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_n_choices_share_one_prompt_and_each_seed_repeats(stories: LiveServer):
    first = chat(stories, n=3, temperature=1.0, seed=11)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    contents = [c["message"]["content"] for c in first["choices"]]
    assert len(set(contents)) > 1  # each choice samples with its own seed
    assert first["usage"]["completion_tokens"] == 3 * 16
    alone = chat(stories)["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens"] == alone  # the prompt counts once, not once per choice
    again = chat(stories, n=3, temperature=1.0, seed=11)
    assert [c["message"]["content"] for c in again["choices"]] == contents
    assert chat(stories, temperature=1.0, seed=11)["choices"][0]["message"]["content"] == contents[0]


def test_n_times_prompts_choices_in_prompt_order(stories: LiveServer):
    reply = stories.post("/v1/completions", {"model": MODEL, "prompt": ["Once upon a time", "The dog"], "n": 2,
                                             "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] != choices[2]["text"] == choices[3]["text"]


def test_n_streams_every_choice_with_its_index(stories: LiveServer):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "n": 2,
            "temperature": 0, "stream": True}
    reply = stories.post("/v1/chat/completions", body, stream=True)
    texts: dict[int, str] = {}
    finished = set()
    for event in sse_events(reply):
        if event == "[DONE]":
            break
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                finished.add(choice["index"])
    assert finished == {0, 1}
    assert texts[0] == texts[1] == chat(stories, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                        temperature=0)["choices"][0]["message"]["content"]


def test_chat_logprobs_in_openais_shape(stories: LiveServer):
    reply = chat(stories, temperature=0, logprobs=True, top_logprobs=2)
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
        assert math.isclose(entry["top_logprobs"][0]["logprob"], entry["logprob"])
    assert chat(stories, temperature=0, logprobs=True)["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert chat(stories, temperature=0)["choices"][0]["logprobs"] is None


def test_streamed_logprobs_match_the_whole_answer(stories: LiveServer):
    whole = chat(stories, temperature=0, logprobs=True, top_logprobs=1)["choices"][0]["logprobs"]["content"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 16,
            "temperature": 0, "logprobs": True, "top_logprobs": 1, "stream": True}
    streamed = []
    for event in sse_events(stories.post("/v1/chat/completions", body, stream=True)):
        if event == "[DONE]":
            break
        logprobs = event["choices"][0]["logprobs"]
        if logprobs is not None:
            streamed.extend(logprobs["content"])
    # The second request reuses the first one's prompt from the KV cache: the same tokens,
    # log probabilities equal up to float rounding (the prompt was decoded in another batch shape).
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4) for a, b in zip(streamed, whole, strict=True))


def test_completion_logprobs_in_the_legacy_shape(stories: LiveServer):
    choice = text(stories, temperature=0, logprobs=3)["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["top_logprobs"])
    assert all(len(top) <= 3 and max(top.values()) <= 0 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert logprobs["text_offset"][0] == 0


def test_a_seed_repeats_its_text_whatever_else_runs(stories: LiveServer):
    alone = text(stories, temperature=1.0, seed=5, max_tokens=24)["choices"][0]["text"]
    busy = open_stream(stories, MODEL, max_tokens=400)  # another sequence decodes in the same steps
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        text(stories, temperature=1.0, seed=5, max_tokens=24)["choices"][0]["text"])) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    busy.close()
    assert results == [alone, alone]


def test_logprobs_end_where_a_stop_string_cuts_the_text(stories: LiveServer):
    whole = text(stories, temperature=0, max_tokens=12)["choices"][0]["text"]
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]  # a stop string in the middle of a token, likely
    choice = text(stories, temperature=0, max_tokens=12, logprobs=1, stop=[stop])["choices"][0]
    assert choice["finish_reason"] == "stop"
    logprobs = choice["logprobs"]
    shown = "".join(logprobs["tokens"])
    assert choice["text"].startswith(shown) and len(choice["text"]) - len(shown) < 8  # no token past the cut
    assert all(offset <= len(choice["text"]) for offset in logprobs["text_offset"])
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 1,
            "stop": [stop], "stream": True}
    streamed = []
    for event in sse_events(stories.post("/v1/completions", body, stream=True)):
        if event == "[DONE]":
            break
        if event["choices"][0]["logprobs"]:
            streamed += event["choices"][0]["logprobs"]["tokens"]
    assert streamed == logprobs["tokens"]
