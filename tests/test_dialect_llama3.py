"""Llama 3.1 / 3.2 / 3.3 outputs: the whole answer is ``{"name": ..., "parameters": {...}}``."""

from __future__ import annotations

import pytest
from dialect_support import Case, check_case, read

from dialects import DIALECTS

LLAMA3 = DIALECTS["llama3"]

CASES = [
    Case("content-only", "The weather is nice today.", content="The weather is nice today."),
    Case("one-call", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
         calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("leading-space-and-type", '\n {"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
         calls=[("get_weather", {"city": "Paris"})]),
    Case("python-tag", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
         calls=[("get_weather", {"city": "Paris"})]),
    Case("content-then-python-tag",
         'Let me check.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
         content="Let me check.", calls=[("get_weather", {"city": "Paris"})]),
    Case("two-calls",
         '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "search", "parameters": {"query": "q"}}',
         calls=[("get_weather", {"city": "Paris"}, "gen0"), ("search", {"query": "q"}, "gen1")]),
    Case("arguments-key", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
         calls=[("get_weather", {"city": "Paris"})]),
    Case("unicode-nested-args",
         '{"name": "search", "parameters": {"query": "café \\"☕\\" }", "filters": {"site": "{\\"x\\"}", "year": 1}}}',
         calls=[("search", {"query": 'café "☕" }', "filters": {"site": '{"x"}', "year": 1}})]),
    Case("json-answer-is-content", '{"answer": 42, "name": "get_weather"}',
         content='{"answer": 42, "name": "get_weather"}'),
    Case("unknown-name-is-content", '{"name": "Alice", "age": 30}', content='{"name": "Alice", "age": 30}'),
    Case("json-later-is-content", 'Here: {"name": "get_weather", "parameters": {}}',
         content='Here: {"name": "get_weather", "parameters": {}}'),
    Case("malformed-args", '{"name": "get_weather", "parameters": {"city": "Paris"',
         content='{"name": "get_weather", "parameters": {"city": "Paris"', malformed=True),
    Case("malformed-after-python-tag", '<|python_tag|>brave_search.call(query="weather")',
         content='<|python_tag|>brave_search.call(query="weather")', malformed=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_llama3_recorded_outputs(case: Case):
    check_case(LLAMA3, case)


def test_an_answer_starting_with_a_brace_waits_only_until_it_is_decided():
    parser = LLAMA3.parser()
    assert parser.feed('{"res') == []
    assert "".join(e.text for e in parser.feed('ult": 1')) == '{"result": 1'


def test_bare_json_is_a_call_only_for_a_function_the_request_offers():
    _, result = read(LLAMA3, ['{"name": "get_weather", "parameters": {}}'], tools=())
    assert (result.content, result.tool_calls) == ('{"name": "get_weather", "parameters": {}}', [])


def test_without_tools_parsing_json_stays_content():
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    _, result = read(LLAMA3, [text], parse_tools=False)
    assert (result.content, result.tool_calls) == (text, [])
