"""Hermes / Qwen2.5 / Qwen3 / QwQ outputs (``<tool_call>`` JSON, ``<think>``), and the generic dialect."""

from __future__ import annotations

import pytest
from dialect_support import Case, check_case, options, read

from dialects import DIALECTS, Content

HERMES = DIALECTS["hermes"]
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

CASES = [
    Case("content-only", "The capital of France is Paris.", content="The capital of France is Paris."),
    Case("one-call", f"<tool_call>\n{W}\n</tool_call>", calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("content-before-call", f"Let me check the weather.\n<tool_call>\n{W}\n</tool_call>",
         content="Let me check the weather.", calls=[("get_weather", {"city": "Paris"})]),
    Case("two-calls",
         f'<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{{"name": "search", "arguments": '
         '{"query": "Paris events", "filters": {"year": 2025}}}\n</tool_call>',
         calls=[("get_weather", {"city": "Paris"}, "gen0"),
                ("search", {"query": "Paris events", "filters": {"year": 2025}}, "gen1")]),
    Case("reasoning-and-call",
         f"<think>\nThe user wants the weather. I should call get_weather.\n</think>\n\n<tool_call>\n{W}\n</tool_call>",
         reasoning="The user wants the weather. I should call get_weather.",
         calls=[("get_weather", {"city": "Paris"})]),
    Case("reasoning-and-content", "<think>\nSimple greeting.\n</think>\n\nHello! How can I help?",
         content="Hello! How can I help?", reasoning="Simple greeting."),
    Case("reasoning-only", "<think>\nStill thinking about it when the tokens ran out",
         reasoning="Still thinking about it when the tokens ran out"),
    Case("prompt-opened-thinking", "Let me think.\n</think>\n\nIt is sunny.",
         content="It is sunny.", reasoning="Let me think.", options={"starts_in_reasoning": True}),
    Case("unicode-args",
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich 東京 🌧", "units": "metric"}}'
         "\n</tool_call>",
         calls=[("get_weather", {"city": "Zürich 東京 🌧", "units": "metric"})]),
    Case("escaped-unicode-args",
         '<tool_call>{"name": "get_weather", "arguments": {"city": "S\\u00e3o Paulo"}}</tool_call>',
         calls=[("get_weather", {"city": "São Paulo"})]),
    Case("nested-args",
         '<tool_call>\n{"name": "search", "arguments": {"query": "x", "filters": {"site": "a.b", "year": 2024},'
         ' "exact": true}}\n</tool_call>',
         calls=[("search", {"query": "x", "filters": {"site": "a.b", "year": 2024}, "exact": True})]),
    Case("close-tag-inside-string",
         '<tool_call>\n{"name": "search", "arguments": {"query": "what does </tool_call> mean? {\\"a\\": 1}"}}\n'
         "</tool_call>",
         calls=[("search", {"query": 'what does </tool_call> mean? {"a": 1}'})]),
    Case("arguments-before-name", '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>',
         calls=[("get_weather", {"city": "Oslo"})]),
    Case("arguments-as-string",
         '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
         calls=[("get_weather", {"city": "Oslo"})]),
    Case("no-close-tag", f"<tool_call>\n{W}", calls=[("get_weather", {"city": "Paris"})]),
    Case("content-after-call", f"<tool_call>{W}</tool_call>\n\nDone.", content="Done.",
         calls=[("get_weather", {"city": "Paris"})]),
    Case("malformed-json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
         content='<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>', malformed=True),
    Case("malformed-unknown-function", 'Hm.\n<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
         content='Hm.\n<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', malformed=True),
    Case("malformed-truncated", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
         content='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', malformed=True),
    Case("malformed-after-good-call",
         f'<tool_call>{W}</tool_call>\n<tool_call>{{"name": "search", "arguments": [1]}}</tool_call>',
         content='<tool_call>{"name": "search", "arguments": [1]}</tool_call>',
         calls=[("get_weather", {"city": "Paris"})], malformed=True),
    Case("not-a-tag", "Use <tool_caller> or <think tank> here.", content="Use <tool_caller> or <think tank> here."),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hermes_recorded_outputs(case: Case):
    check_case(HERMES, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_generic_reads_what_hermes_reads(case: Case):
    check_case(DIALECTS["generic"], case)


def test_without_tools_parsing_a_call_stays_content_as_written():
    text = f"<tool_call>\n{W}\n</tool_call>"
    _, result = read(HERMES, [text], parse_tools=False)
    assert (result.content, result.tool_calls, result.malformed) == (text, [], None)


def test_reasoning_format_none_keeps_thinking_inline():
    _, result = read(HERMES, ["<think>\nhmm\n</think>\n\nHi"], reasoning_format="none")
    assert (result.content, result.reasoning) == ("<think>hmm</think>Hi", None)


def test_reasoning_format_none_with_prompt_opened_thinking_shows_the_opener():
    _, result = read(HERMES, ["hmm</think>Hi"], reasoning_format="none", starts_in_reasoning=True)
    assert result.content == "<think>hmm</think>Hi"


def test_content_streams_holding_back_only_a_possible_marker():
    parser = HERMES.parser()
    assert parser.feed("Hello wor") == [Content("Hello wor")]
    assert parser.feed("ld <tool") == [Content("ld")]  # " <tool" may still become <tool_call>
    assert parser.feed("box> ok") == [Content(" <toolbox> ok")]


def test_call_is_announced_when_its_name_is_read_and_arguments_stream():
    parser = HERMES.parser(options())
    events = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [type(e).__name__ for e in events] == ["ToolCallStart", "ToolCallArgs"]
    assert events[1].fragment == '{"ci'
