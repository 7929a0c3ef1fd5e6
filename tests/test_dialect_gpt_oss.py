"""gpt-oss outputs: harmony messages on the analysis, commentary and final channels."""

from __future__ import annotations

import pytest
from dialect_support import Case, check_case, read

from dialects import DIALECTS

GPT_OSS = DIALECTS["gpt-oss"]
ANALYSIS = "<|channel|>analysis<|message|>User asks for the weather; call the tool.<|end|>"
THOUGHT = "User asks for the weather; call the tool."
CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'

CASES = [
    Case("final-only", "<|channel|>final<|message|>Hello!<|return|>", content="Hello!"),
    Case("analysis-and-final", "<|channel|>analysis<|message|>Greet back.<|end|><|start|>assistant<|channel|>final"
         "<|message|>Hi, how can I help?", reasoning="Greet back.", content="Hi, how can I help?"),
    Case("reasoning-and-call", ANALYSIS + CALL + "<|call|>", reasoning=THOUGHT,
         calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("call-without-call-token", ANALYSIS + CALL, reasoning=THOUGHT, calls=[("get_weather", {"city": "Paris"})]),
    Case("template-order-call", ' to=functions.search<|channel|>commentary json<|message|>{"query": "q"}<|call|>',
         calls=[("search", {"query": "q"})]),
    Case("preamble-then-call", "<|channel|>commentary<|message|>Checking the weather now.<|end|>" + CALL,
         content="Checking the weather now.", calls=[("get_weather", {"city": "Paris"})]),
    Case("analysis-only", "<|channel|>analysis<|message|>Long thought that never", reasoning="Long thought that never"),
    Case("unicode-nested-args",
         '<|channel|>commentary to=functions.search <|constrain|>json<|message|>'
         '{"query": "naïve <|call|> 👍", "filters": {"site": "a", "year": 3}}<|call|>',
         calls=[("search", {"query": "naïve <|call|> 👍", "filters": {"site": "a", "year": 3}})]),
    Case("missing-end-before-start",
         "<|channel|>analysis<|message|>Think.<|start|>assistant<|channel|>final<|message|>Ok.",
         reasoning="Think.", content="Ok."),
    Case("not-harmony-at-all", "Just plain text, no channels.", content="Just plain text, no channels."),
    Case("malformed-args", ANALYSIS + '<|start|>assistant<|channel|>commentary to=functions.get_weather '
         '<|constrain|>json<|message|>{"city": Paris}<|call|>', reasoning=THOUGHT,
         content='<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                 '{"city": Paris}<|call|>',
         malformed=True),
    Case("malformed-builtin-tool",
         '<|channel|>analysis<|message|>Search.<|end|><|start|>assistant<|channel|>commentary '
         'to=browser.search <|constrain|>json<|message|>{"query": "x"}<|call|>', reasoning="Search.",
         content='<|start|>assistant<|channel|>commentary to=browser.search <|constrain|>json<|message|>'
                 '{"query": "x"}<|call|>',
         malformed=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpt_oss_recorded_outputs(case: Case):
    check_case(GPT_OSS, case)


def test_reasoning_format_none_keeps_the_analysis_message_inline():
    text = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Ok."
    _, result = read(GPT_OSS, [text], reasoning_format="none")
    assert (result.content, result.reasoning) == ("<|channel|>analysis<|message|>Think.<|end|>Ok.", None)


def test_without_tools_parsing_a_call_message_stays_content():
    _, result = read(GPT_OSS, [CALL + "<|call|>"], parse_tools=False)
    assert result.tool_calls == []
    assert result.content == CALL + "<|call|>"
