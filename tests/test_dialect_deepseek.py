"""DeepSeek R1 (distills) and V3.1 outputs: DeepSeek's call tokens, ``<think>`` opened by the prompt."""

from __future__ import annotations

import pytest
from dialect_support import Case, check_case

from dialects import DIALECTS
from dialects.deepseek import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

R1, V31 = DIALECTS["deepseek-r1"], DIALECTS["deepseek-v3.1"]
BEGIN, END = CALLS_BEGIN, CALLS_END
OPENED = {"starts_in_reasoning": True}
PARIS, LIMA, QUERY = '{"city": "Paris"}', '{"city": "Lima"}', '{"query": "q"}'
GREEK = '{"city": "Ελλάδα"}'
TRICKY = f'{{"query": "北京 ```json", "filters": {{"site": "{CALL_END}"}}}}'


def r1_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"


R1_CASES = [
    Case("content-only", "Okay, thinking done.\n</think>\n\nThe answer is 4.", reasoning="Okay, thinking done.",
         content="The answer is 4.", options=OPENED),
    Case("reasoning-only", "Let me count: 1, 2, 3", reasoning="Let me count: 1, 2, 3", options=OPENED),
    Case("reasoning-and-call", f'Need weather.\n</think>\n\n{BEGIN}{r1_call("get_weather", PARIS)}{END}',
         reasoning="Need weather.", calls=[("get_weather", {"city": "Paris"}, "gen0")], options=OPENED),
    Case("content-before-call", f'Done.</think>Let me check.{BEGIN}{r1_call("get_weather", LIMA)}{END}',
         reasoning="Done.", content="Let me check.", calls=[("get_weather", {"city": "Lima"})], options=OPENED),
    Case("two-calls",
         f'{BEGIN}{r1_call("get_weather", PARIS)}\n{r1_call("search", QUERY)}{END}',
         calls=[("get_weather", {"city": "Paris"}), ("search", {"query": "q"})]),
    Case("without-outer-begin", r1_call("get_weather", PARIS), calls=[("get_weather", {"city": "Paris"})]),
    Case("unicode-nested-args",
         f'{BEGIN}{r1_call("search", TRICKY)}{END}',
         calls=[("search", {"query": "北京 ```json", "filters": {"site": CALL_END}})]),
    Case("malformed-args", f'{BEGIN}{r1_call("get_weather", "{city: Paris}")}{END}',
         content=f'{BEGIN}{r1_call("get_weather", "{city: Paris}")}{END}', malformed=True),
]

V31_CASES = [
    Case("content-only", "Hi there.", content="Hi there."),
    Case("one-call", f'{BEGIN}{v31_call("get_weather", PARIS)}{END}',
         calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("reasoning-and-call", f'Need weather.</think>{BEGIN}{v31_call("get_weather", PARIS)}{END}',
         reasoning="Need weather.", calls=[("get_weather", {"city": "Paris"})], options=OPENED),
    Case("content-before-two-calls",
         f'Checking both.{BEGIN}{v31_call("get_weather", PARIS)}{v31_call("search", QUERY)}{END}',
         content="Checking both.", calls=[("get_weather", {"city": "Paris"}), ("search", {"query": "q"})]),
    Case("unicode-args", f'{BEGIN}{v31_call("get_weather", GREEK)}{END}',
         calls=[("get_weather", {"city": "Ελλάδα"})]),
    Case("nested-args-with-end-token-in-string", f'{BEGIN}{v31_call("search", TRICKY)}{END}',
         calls=[("search", {"query": "北京 ```json", "filters": {"site": CALL_END}})]),
    Case("malformed-unknown-function", f'{BEGIN}{v31_call("launch", "{}")}{END}',
         content=f'{BEGIN}{v31_call("launch", "{}")}{END}', malformed=True),
]


@pytest.mark.parametrize("case", R1_CASES, ids=lambda c: c.id)
def test_deepseek_r1_outputs(case: Case):
    check_case(R1, case)


@pytest.mark.parametrize("case", V31_CASES, ids=lambda c: c.id)
def test_deepseek_v31_outputs(case: Case):
    check_case(V31, case)
