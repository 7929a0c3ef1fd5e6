"""Granite 3.3 and Phi-4 (a marker, then a JSON list of calls) and Gemma 4 (its own call notation)."""

from __future__ import annotations

import pytest
from dialect_support import Case, check_case

from dialects import DIALECTS
from dialects.gemma import to_python
from dialects.stream import Refused

GRANITE, FUNCTOOLS, GEMMA4 = DIALECTS["granite"], DIALECTS["functools"], DIALECTS["gemma4"]
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
S = '{"name": "search", "arguments": {"query": "a ] b", "filters": {"year": 2001}}}'

GRANITE_CASES = [
    Case("content-only", "Hello! I am Granite.", content="Hello! I am Granite."),
    Case("one-call", f"<|tool_call|>[{W}]", calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("content-before-two-calls", f"Checking.<|tool_call|>[{W}, {S}]", content="Checking.",
         calls=[("get_weather", {"city": "Paris"}), ("search", {"query": "a ] b", "filters": {"year": 2001}})]),
    Case("reasoning-and-response", "<think>The user greets me.</think><response>Hi there!</response>",
         reasoning="The user greets me.", content="Hi there!"),
    Case("reasoning-and-call", f"<think>Need weather.</think><|tool_call|>[{W}]", reasoning="Need weather.",
         calls=[("get_weather", {"city": "Paris"})]),
    Case("reasoning-only", "<think>Hmm", reasoning="Hmm"),
    Case("marker-inside-string",
         '<|tool_call|>[{"name": "search", "arguments": {"query": "<|tool_call|>[{}] </think>"}}]',
         calls=[("search", {"query": "<|tool_call|>[{}] </think>"})]),
    Case("unicode-args", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Reykjavík ❄"}}]',
         calls=[("get_weather", {"city": "Reykjavík ❄"})]),
    Case("malformed", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}]',
         content='<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}]', malformed=True),
]

FUNCTOOLS_CASES = [
    Case("content-only", "Use functools.partial for that.", content="Use functools.partial for that."),
    Case("python-indexing-is-content", "x = functools[0] or functools[ ]", content="x = functools[0] or functools[ ]"),
    Case("one-call", f"functools[{W}]", calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("two-calls", f" functools[{W}, {S}]",
         calls=[("get_weather", {"city": "Paris"}), ("search", {"query": "a ] b", "filters": {"year": 2001}})]),
    Case("tagged", f"<|tool_call|>{W}<|/tool_call|>", calls=[("get_weather", {"city": "Paris"})]),
    Case("reasoning-and-call", f"<think>Weather.</think>functools[{W}]", reasoning="Weather.",
         calls=[("get_weather", {"city": "Paris"})]),
    Case("malformed", "functools[{name: get_weather}]", content="functools[{name: get_weather}]", malformed=True),
]

Q = '<|"|>'
GEMMA_CASES = [
    Case("content-only", "Hello from Gemma.", content="Hello from Gemma."),
    Case("one-call", f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>",
         calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("thought-content-call",
         "<|channel>thought\nThe user wants weather.<channel|>Let me check."
         f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},"
         f"days:3,units:{Q}metric{Q}}}<tool_call|><|tool_response>",
         reasoning="The user wants weather.", content="Let me check.",
         calls=[("get_weather", {"city": "Paris", "days": 3, "units": "metric"})]),
    Case("two-calls", f"<|tool_call>call:get_weather{{city:{Q}Oslo{Q}}}<tool_call|>"
         f"<|tool_call>call:search{{query:{Q}q{Q},"
         f"filters:{{site:{Q}x.org{Q},year:2020}},exact:false}}<tool_call|>",
         calls=[("get_weather", {"city": "Oslo"}),
                ("search", {"query": "q", "filters": {"site": "x.org", "year": 2020}, "exact": False})]),
    Case("string-with-braces-and-unicode", f"<|tool_call>call:search{{query:{Q}a }} b {{ \"c\" <tool_call|> 漢字{Q}}}"
         "<tool_call|>", calls=[("search", {"query": 'a } b { "c" <tool_call|> 漢字'})]),
    Case("thought-only", "<|channel>thought\nThinking and thinking", reasoning="Thinking and thinking"),
    Case("empty-thought-then-content", "<|channel>thought\n<channel|>Answer.", content="Answer."),
    Case("malformed", f"<|tool_call>call:get_weather{{city:{Q}Paris}}<tool_call|>",
         content=f"<|tool_call>call:get_weather{{city:{Q}Paris}}<tool_call|>", malformed=True),
]


@pytest.mark.parametrize("case", GRANITE_CASES, ids=lambda c: c.id)
def test_granite_outputs(case: Case):
    check_case(GRANITE, case)


@pytest.mark.parametrize("case", FUNCTOOLS_CASES, ids=lambda c: c.id)
def test_functools_outputs(case: Case):
    check_case(FUNCTOOLS, case)


@pytest.mark.parametrize("case", GEMMA_CASES, ids=lambda c: c.id)
def test_gemma4_outputs(case: Case):
    check_case(GEMMA4, case)


@pytest.mark.parametrize(("text", "value"), [
    ("{}", {}), (f"{{a:{Q}x{Q}}}", {"a": "x"}), ("{a:[1,-2.5,true,null]}", {"a": [1, -2.5, True, None]}),
    (f"{{{Q}key with: colon{Q}:1}}", {"key with: colon": 1}), ("{a: word}", {"a": "word"}),
])
def test_gemma_notation_becomes_json_values(text, value):
    assert to_python(text) == value


@pytest.mark.parametrize("text", ["{a:1", "{a 1}", f"{{a:{Q}x}}", "{a:1,,b:2}", "{a:1} x", "[" * 100 + "]" * 100])
def test_gemma_notation_refuses_broken_text(text):
    with pytest.raises(Refused):
        to_python(text)
