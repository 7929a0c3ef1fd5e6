"""Qwen3-Coder and Qwen3.5 outputs: XML-ish calls whose values the tool's schema types."""

from __future__ import annotations

import json

import pytest
from dialect_support import Case, check_case, options, read

from dialects import DIALECTS
from dialects.qwen_xml import convert

CODER = DIALECTS["qwen3-coder"]


def call(name: str, **params: str) -> str:
    """A call as Qwen3-Coder's template writes one."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CASES = [
    Case("content-only", "I can answer that directly: 42.", content="I can answer that directly: 42."),
    Case("one-call", call("get_weather", city="Paris"), calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("content-before-call", "I'll look that up.\n\n" + call("get_weather", city="Paris", days="3"),
         content="I'll look that up.", calls=[("get_weather", {"city": "Paris", "days": 3})]),
    Case("two-calls", call("get_weather", city="Paris") + "\n" + call("search", query="louvre hours"),
         calls=[("get_weather", {"city": "Paris"}), ("search", {"query": "louvre hours"})]),
    Case("reasoning-and-call", "<think>\nNeed the weather.\n</think>\n\n" + call("get_weather", city="Oslo"),
         reasoning="Need the weather.", calls=[("get_weather", {"city": "Oslo"})]),
    Case("prompt-opened-thinking-and-call", "Need the weather.\n</think>\n\n" + call("get_weather", city="Oslo"),
         reasoning="Need the weather.", calls=[("get_weather", {"city": "Oslo"})],
         options={"starts_in_reasoning": True}),
    Case("call-without-closing-thinking", "Need the weather.\n\n" + call("get_weather", city="Oslo"),
         reasoning="Need the weather.", calls=[("get_weather", {"city": "Oslo"})],
         options={"starts_in_reasoning": True}),
    Case("reasoning-only", "Need the weather. Hmm, which city", reasoning="Need the weather. Hmm, which city",
         options={"starts_in_reasoning": True}),
    Case("typed-values",
         call("search", query="x", filters='{"site": "a.b", "year": 2024}', exact="true"),
         calls=[("search", {"query": "x", "filters": {"site": "a.b", "year": 2024}, "exact": True})]),
    Case("multiline-unicode-string", call("search", query="línea uno\n  línea 2 — 東京 🌧"),
         calls=[("search", {"query": "línea uno\n  línea 2 — 東京 🌧"})]),
    Case("close-tag-inside-value", call("search", query='what is </tool_call> and "</function>"?'),
         calls=[("search", {"query": 'what is </tool_call> and "</function>"?'})]),
    Case("bad-number-kept-as-text", call("get_weather", city="Paris", days="three"),
         calls=[("get_weather", {"city": "Paris", "days": "three"})]),
    Case("unknown-parameter-is-text", call("get_weather", city="Paris", note="42"),
         calls=[("get_weather", {"city": "Paris", "note": "42"})]),
    Case("without-tool-call-tag", "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
         calls=[("get_weather", {"city": "Paris"})]),
    Case("bare-function-tag-of-unknown-name-is-content", "See <function=main> in the code.",
         content="See <function=main> in the code."),
    Case("malformed-unknown-function", "<tool_call>\n<function=delete_all>\n</function>\n</tool_call>",
         content="<tool_call>\n<function=delete_all>\n</function>\n</tool_call>", malformed=True),
    Case("malformed-truncated", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
         content="<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", malformed=True),
    Case("malformed-garbage-in-function", "<tool_call>\n<function=get_weather>\ncity=Paris\n</function>\n</tool_call>",
         content="<tool_call>\n<function=get_weather>\ncity=Paris\n</function>\n</tool_call>", malformed=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_qwen3_coder_recorded_outputs(case: Case):
    check_case(CODER, case)


def test_thinking_does_not_end_at_a_bare_function_tag():
    _, result = read(CODER, ["I could use <function=get_weather> here.</think>Fine."], starts_in_reasoning=True)
    assert (result.reasoning, result.content) == ("I could use <function=get_weather> here.", "Fine.")


def test_string_values_stream_as_they_are_written():
    parser = CODER.parser(options())
    parser.feed("<tool_call>\n<function=search>\n<parameter=query>\nfirst line\nsec")
    events = parser.feed("ond line\n")
    assert "".join(e.fragment for e in events) == "ond line"  # the newline may start </parameter>


@pytest.mark.parametrize(("text", "types", "expected"), [
    ("3", {"integer"}, 3), ("3.5", {"number"}, 3.5), ("true", {"boolean"}, True), ("true", {"integer"}, "true"),
    ('{"a": 1}', {"object"}, {"a": 1}), ("[1, 2]", {"array"}, [1, 2]), ("null", {"string", "null"}, None),
    ("hello", {"string", "null"}, "hello"), ("7", None, "7"), ("7", set(), 7), ("{bad", {"object"}, "{bad"),
])
def test_values_follow_the_schema_type(text, types, expected):
    assert convert(text, types) == expected
    json.dumps(expected)
