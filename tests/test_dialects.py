"""Dialects: detection from real templates, what templates read, call grammars, and streaming properties.

The templates in ../shared/chat-templates are the publishers' own. Each one is detected, and
wherever a template renders an assistant tool call, that rendering, the very text the model was
trained to write, is read back by the detected dialect and accepted by its call grammar.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from dialect_support import TEMPLATES, TOOLS, check_streams_agree, read, template
from gbnf_match import compiled
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import dialects
from dialects import (
    DIALECTS,
    GENERIC,
    ParserOptions,
    adapt_messages,
    detect,
    render_kwargs,
    template_inputs,
    template_uses,
)
from dialects import deepseek as ds
from errors import InvalidRequest
from grammar import gbnf

pytestmark = pytest.mark.skipif(not TEMPLATES.is_dir(), reason=f"{TEMPLATES} not found")

THINK = ("<think>", "</think>")
DETECTED = {  # template file: (dialect, thinking markers)
    "HuggingFaceTB-SmolLM3-3B.jinja": ("generic", THINK),
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": ("mistral", None),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": ("hermes", None),
    "Qwen-QwQ-32B.jinja": ("hermes", THINK),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("hermes", None),
    "Qwen-Qwen3-0.6B.jinja": ("hermes", THINK),
    "Qwen3-Coder.jinja": ("qwen3-coder", None),
    "Qwen3.5-4B.jinja": ("qwen3-coder", THINK),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": ("deepseek-r1", THINK),
    "deepseek-ai-DeepSeek-V3.1.jinja": ("deepseek-v3.1", THINK),
    "google-gemma-2-2b-it.jinja": ("generic", THINK),
    "google-gemma-4-31B-it.jinja": ("gemma4", ("<|channel>thought", "<channel|>")),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": ("granite", THINK),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("llama3", None),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("llama3", None),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("generic", THINK),
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja": ("mistral", ("[THINK]", "[/THINK]")),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("mistral-nemo", None),
    "openai-gpt-oss-120b.jinja": ("gpt-oss", ("<|channel|>analysis<|message|>", "<|end|>")),
}
NO_CALLS = {"HuggingFaceTB-SmolLM3-3B.jinja", "google-gemma-2-2b-it.jinja", "microsoft-Phi-3.5-mini-instruct.jinja",
            "ibm-granite-granite-3.3-2B-Instruct.jinja"}  # these templates never render an assistant's tool calls
TURN_ENDS = ("<|im_end|>", "</s>", ds.token("end of sentence"), "<|eot_id|>", "<end_of_turn>", "<turn|>")
ASSISTANT_HEADERS = ("<|im_start|>assistant", ds.token("Assistant"))
ARGUMENTS = {"city": "Paris", "days": 3}
CALL = {"id": "abc123XYZ", "type": "function",  # as a client sends it: arguments are a JSON string
        "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}
USER = {"role": "user", "content": "What's the weather in Paris for 3 days?"}


def render(source: str, messages: list[dict[str, Any]], generation: bool, **extra: Any) -> str:
    formatter = Jinja2ChatFormatter(source, eos_token="</s>", bos_token="<s>", add_generation_prompt=generation)
    return formatter(messages=messages, tools=TOOLS, **extra).prompt


# ------------------------------------------------------------------ detection


def test_every_template_is_in_the_table():
    assert sorted(p.name for p in TEMPLATES.glob("*.jinja")) == sorted(DETECTED)


@pytest.mark.parametrize(("name", "expected"), sorted(DETECTED.items()))
def test_template_maps_to_its_dialect(name: str, expected: tuple[str, Any]):
    dialect = detect(template(name))
    assert (dialect.name, dialect.reasoning_markers) == expected


def test_no_template_or_an_unknown_one_gets_the_generic_dialect():
    assert detect(None) is GENERIC
    assert detect("") is GENERIC
    assert detect("{% for m in messages %}{{ m.content }}{% endfor %}", "llama") is GENERIC


def test_architecture_decides_only_for_an_unknown_template():
    unknown = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert detect(unknown, "gpt-oss").name == "gpt-oss"
    assert detect(template("Qwen-Qwen3-0.6B.jinja"), "gpt-oss").name == "hermes"
    assert detect(None, "gpt-oss") is GENERIC


def test_file_names_play_no_part():
    assert detect("Qwen3-Coder gpt-oss Mistral llama3").name == "generic"


# ------------------------------------------------------------------ the templates' own calls


def assistant_text(source: str, message: dict[str, Any]) -> tuple[str, str]:
    """(generation prompt, the text the template renders for the assistant ``message``), turn end cut off."""
    prompt = render(source, [USER], True, enable_thinking=True)
    whole = render(source, adapt_messages([USER, message], template_inputs(source)), False, enable_thinking=True)
    if whole.startswith(prompt):
        text = whole[len(prompt):]
    else:  # the prompt opens thinking that the history leaves out (QwQ, R1): read after the role header
        text = whole[len(render(source, [USER], False, enable_thinking=True)):]
        header = next(h for h in ASSISTANT_HEADERS if text.startswith(h))
        text, prompt = text[len(header):], ""
    ends = [text.find(e) for e in TURN_ENDS if e in text]
    return prompt, text[:min(ends)] if ends else text


CALLING = sorted(set(DETECTED) - NO_CALLS)


@pytest.mark.parametrize("name", CALLING)
def test_dialect_reads_the_call_its_template_renders(name: str):
    source = template(name)
    dialect = detect(source)
    prompt, text = assistant_text(source, {"role": "assistant", "content": "", "tool_calls": [CALL]})
    result = check_streams_agree(dialect, text, range(0, len(text), 3),
                                 starts_in_reasoning=dialect.starts_in_reasoning(prompt))
    assert result.malformed is None
    [call] = result.tool_calls
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather", ARGUMENTS)
    if dialect.id_style == "mistral" and "abc123XYZ" in text:
        assert call["id"] == "abc123XYZ"


@pytest.mark.parametrize("name", CALLING)
def test_call_grammar_accepts_the_call_its_template_renders(name: str):
    source = template(name)
    dialect = detect(source)
    _, text = assistant_text(source, {"role": "assistant", "content": "", "tool_calls": [CALL]})
    start = min((text.find(t) for t in dialect.call_triggers if t in text), default=0)
    call_text = text[start:].rstrip() if dialect.name != "gpt-oss" else text[start:].removesuffix("<|call|>")
    if dialect.name == "gemma4":
        call_text = call_text.removesuffix("<|tool_response>")
    assert compiled(dialect.call_grammar(TOOLS, parallel=True)).accepts(call_text), call_text


# ------------------------------------------------------------------ prompts and template inputs


@pytest.mark.parametrize(("name", "extra", "expected"), [
    ("Qwen-Qwen3-0.6B.jinja", {}, False),
    ("Qwen3.5-4B.jinja", {}, True),
    ("Qwen3.5-4B.jinja", {"enable_thinking": False}, False),
    ("Qwen-QwQ-32B.jinja", {"enable_thinking": True}, True),
    ("Qwen-QwQ-32B.jinja", {}, False),  # QwQ's template closes thinking unless asked to think
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", {"enable_thinking": True}, True),
    ("deepseek-ai-DeepSeek-V3.1.jinja", {"thinking": True}, True),
    ("deepseek-ai-DeepSeek-V3.1.jinja", {}, False),
    ("google-gemma-4-31B-it.jinja", {"enable_thinking": True}, False),
    ("HuggingFaceTB-SmolLM3-3B.jinja", {}, False),
    ("openai-gpt-oss-120b.jinja", {}, False),
])
def test_prompt_that_opens_thinking_is_recognised(name: str, extra: dict[str, Any], expected: bool):
    source = template(name)
    assert detect(source).starts_in_reasoning(render(source, [USER], True, **extra)) is expected


@pytest.mark.parametrize(("name", "switch", "effort", "field"), [
    ("Qwen-Qwen3-0.6B.jinja", "enable_thinking", False, "reasoning_content"),
    ("Qwen3.5-4B.jinja", "enable_thinking", False, "reasoning_content"),
    ("google-gemma-4-31B-it.jinja", "enable_thinking", False, "reasoning_content"),
    ("openai-gpt-oss-120b.jinja", None, True, "thinking"),
    ("mistralai-Ministral-3-14B-Reasoning-2512.jinja", None, False, "thinking_part"),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", "thinking", False, None),
    ("deepseek-ai-DeepSeek-V3.1.jinja", "enable_thinking", False, None),
    ("HuggingFaceTB-SmolLM3-3B.jinja", "enable_thinking", False, None),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", None, False, None),
])
def test_template_inputs(name: str, switch: str | None, effort: bool, field: str | None):
    inputs = template_inputs(template(name))
    assert (inputs.thinking_switch, inputs.reasoning_effort, inputs.reasoning_field) == (switch, effort, field)


@pytest.mark.parametrize(("name", "request_kwargs", "effort", "expected"), [
    ("Qwen-QwQ-32B.jinja", None, None, {"enable_thinking": True}),
    ("Qwen-QwQ-32B.jinja", {"enable_thinking": False}, None, {"enable_thinking": False}),
    ("openai-gpt-oss-120b.jinja", None, "high", {"reasoning_effort": "high"}),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", {"custom": 1}, "high", {"custom": 1}),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", {"thinking": True}, None, {"thinking": True}),
])
def test_render_kwargs(name: str, request_kwargs, effort, expected):
    assert render_kwargs(template_inputs(template(name)), request_kwargs, effort) == expected


def test_thinking_is_on_by_default_where_the_template_would_close_it():
    source = template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")
    prompt = render(source, [USER], True, **render_kwargs(template_inputs(source)))
    assert detect(source).starts_in_reasoning(prompt)


def test_reasoning_effort_reaches_gpt_oss():
    source = template("openai-gpt-oss-120b.jinja")
    assert "Reasoning: high" in render(source, [USER], True, **render_kwargs(template_inputs(source), None, "high"))


def test_template_uses_reads_code_not_prose():
    source = "{# enable_thinking #} enable_thinking {{ message.reasoning_content }}{% if x.get('effort') %}{% endif %}"
    assert template_uses(source, "reasoning_content")
    assert template_uses(source, "effort")
    assert not template_uses(source, "enable_thinking")
    assert not template_uses("{{ 'say reasoning_effort' }}", "reasoning_effort")
    assert template_uses(template("openai-gpt-oss-120b.jinja"), "reasoning_effort")


@pytest.mark.parametrize(("name", "shown"), [
    ("Qwen-Qwen3-0.6B.jinja", "<think>\nI need the weather.\n</think>"),
    ("Qwen3.5-4B.jinja", "<think>\nI need the weather.\n</think>"),
    ("openai-gpt-oss-120b.jinja", "<|channel|>analysis<|message|>I need the weather.<|end|>"),
    ("mistralai-Ministral-3-14B-Reasoning-2512.jinja", "[THINK]I need the weather.[/THINK]"),
    ("google-gemma-4-31B-it.jinja", "<|channel>thought\nI need the weather.\n<channel|>"),
])
def test_earlier_reasoning_reaches_the_templates_that_read_it(name: str, shown: str):
    source = template(name)
    messages = [USER, {"role": "assistant", "content": "Let me check.", "reasoning_content": "I need the weather.",
                       "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "abc123XYZ", "content": "sunny"}]
    adapted = adapt_messages(messages, template_inputs(source))
    assert shown in render(source, adapted, True)


def test_templates_that_never_show_reasoning_do_not_get_it():
    message = {"role": "assistant", "content": "x", "reasoning_content": "hidden"}
    [adapted] = adapt_messages([message], template_inputs(template("Qwen-Qwen2.5-7B-Instruct.jinja")))
    assert adapted == {"role": "assistant", "content": "x"}


# ------------------------------------------------------------------ grammars

ODD_TOOLS = [
    *TOOLS,
    {"type": "function", "function": {"name": "ping"}},
    {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object",
        "$defs": {"node": {"type": "object",
                           "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "properties": {"root": {"$ref": "#/$defs/node"}, "tag": {"type": "string", "const": "x"}}}}},
]


@pytest.mark.parametrize("name", sorted(DIALECTS))
@pytest.mark.parametrize("parallel", [False, True])
def test_call_grammar_is_valid_gbnf(name: str, parallel: bool):
    dialect = DIALECTS[name]
    text = dialect.call_grammar(ODD_TOOLS, parallel)
    gbnf.check(text)
    assert text.startswith("root ::= ")


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_call_grammar_names_the_tool_whose_schema_is_refused(name: str):
    bad = [*TOOLS, {"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "enum": []}}}]
    with pytest.raises(InvalidRequest) as refused:
        DIALECTS[name].call_grammar(bad, True)
    assert refused.value.param == "tools[2].function.parameters"


WELL_FORMED = [
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"query": "q", "exact": true}}\n</tool_call>'),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"query": "q"}}'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"query": "q"}'),
    ("mistral-nemo", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "x"}}, '
                     '{"name": "search", "arguments": {"query": "y"}}]'),
    ("deepseek-v3.1", f'{ds.CALLS_BEGIN}{ds.CALL_BEGIN}search{ds.SEP}{{"query": "q"}}{ds.CALL_END}{ds.CALLS_END}'),
    ("gpt-oss", '<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"query": "q"}'),
    ("gpt-oss", ' to=functions.search<|channel|>commentary json<|message|>{"query": "q"}'),
    ("granite", '<|tool_call|>[{"name": "search", "arguments": {"query": "q"}}]'),
    ("functools", 'functools[{"name": "search", "arguments": {"query": "q"}}]'),
    ("gemma4", '<|tool_call>call:search{query:<|"|>a "b" } <|"|>,filters:{year:3}}<tool_call|>'),
    ("qwen3-coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan\n</param\n</parameter>\n"
                    "<parameter=units>\nmetric\n</parameter>\n</function>\n</tool_call>"),
]


@pytest.mark.parametrize(("name", "text"), WELL_FORMED)
def test_call_grammar_accepts_well_formed_calls(name: str, text: str):
    assert compiled(DIALECTS[name].call_grammar(TOOLS, parallel=True)).accepts(text)


@pytest.mark.parametrize(("name", "text"), [
    ("hermes", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"query": 1}}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"query": "q"}'),
    ("qwen3-coder", "<tool_call>\n<function=get_weather>\n<parameter=units>\nkelvin\n</parameter>\n</function>\n"
                    "</tool_call>"),
])
def test_call_grammar_refuses_what_the_request_does_not_allow(name: str, text: str):
    assert not compiled(DIALECTS[name].call_grammar(TOOLS, parallel=False)).accepts(text)


@pytest.mark.parametrize(("name", "text"), [c for c in WELL_FORMED if c[0] != "qwen3-coder"] + [
    ("llama3", '{"name": "search", "parameters": {"query": "q"}}'),
    ("qwen3-coder", "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n</function>\n</tool_call>"),
])
def test_a_lazy_grammar_accepts_the_call_from_its_trigger_on(name: str, text: str):
    dialect = DIALECTS[name]
    start = min(text.find(t) for t in dialect.call_triggers if t in text)
    assert compiled(dialect.call_grammar(TOOLS, parallel=True)).accepts(text[start:])


# ------------------------------------------------------------------ properties over generated outputs

_TEXT = st.text(st.sampled_from([*"abc xyz,.!?:;'\"()-_\n\t{}[]<>|/=", "é", "東", "🙂"]), max_size=40)
_SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_ARGS = st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=10), _JSON, max_size=4)
_PLAIN_TOOLS = [{"type": "function", "function": {"name": n}} for n in ("lookup", "do_it")]


def _writers() -> dict[str, Any]:
    def js(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    return {
        "hermes": lambda n, a: f"<tool_call>\n{js({'name': n, 'arguments': a})}\n</tool_call>",
        "mistral": lambda n, a: f"[TOOL_CALLS]{n}[ARGS]{js(a)}",
        "mistral-nemo": lambda n, a: f"[TOOL_CALLS][{js({'name': n, 'arguments': a})}]",
        "deepseek-v3.1": lambda n, a: f"{ds.CALLS_BEGIN}{ds.CALL_BEGIN}{n}{ds.SEP}{js(a)}{ds.CALL_END}{ds.CALLS_END}",
        "deepseek-r1": lambda n, a: f"{ds.CALLS_BEGIN}{ds.CALL_BEGIN}function{ds.SEP}{n}\n```json\n"
                                    f"{js(a)}\n```{ds.CALL_END}{ds.CALLS_END}",
        "granite": lambda n, a: f"<|tool_call|>[{js({'name': n, 'arguments': a})}]",
        "functools": lambda n, a: f"functools[{js({'name': n, 'arguments': a})}]",
        "gpt-oss": lambda n, a: f"<|start|>assistant<|channel|>commentary to=functions.{n} <|constrain|>json"
                                f"<|message|>{js(a)}<|call|>",
    }


WRITERS = _writers()


@pytest.mark.parametrize("name", sorted(WRITERS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_generated_outputs_read_the_same_however_they_are_cut(name: str, data: st.DataObject):
    dialect = DIALECTS[name]
    before = data.draw(_TEXT, "content")
    calls = data.draw(st.lists(st.tuples(st.sampled_from(["lookup", "do_it"]), _ARGS), max_size=2), "calls")
    markers = set(dialect.special_markers) | set(dialect.call_markers) | {"<think>", "</think>", "functools"}
    if any(m in before for m in markers):
        return
    prefix = "<|channel|>final<|message|>" if name == "gpt-oss" else ""
    text = prefix + before + "".join(WRITERS[name](n, a) for n, a in calls)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=6), "cuts")
    result = check_streams_agree(dialect, text, cuts, tools=_PLAIN_TOOLS)
    assert result.malformed is None
    assert result.content == (before.strip() or None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.tool_calls] == \
        [(n, json.loads(json.dumps(a))) for n, a in calls]


_PIECES = [*"ab <>/{}[]|\"\n", "<tool_call>", "</tool_call>", "<think>", "</think>", '{"name": "lookup", "arguments": ',
           "[TOOL_CALLS]", "<|channel|>", "<|message|>", "<|start|>", "<|end|>", " to=functions.lookup", ds.SEP,
           ds.CALL_BEGIN, "<|tool_call>call:", '<|"|>', "<function=lookup>", "<parameter=x>", "[ARGS]"]


@settings(max_examples=80, deadline=None)
@given(text=st.lists(st.sampled_from(_PIECES), max_size=30).map("".join),
       cuts=st.lists(st.integers(0, 400), max_size=5),
       name=st.sampled_from(sorted(DIALECTS)))
def test_any_text_is_read_without_raising_and_the_same_however_cut(text: str, cuts: list[int], name: str):
    dialect = DIALECTS[name]
    _, result = read(dialect, [text], tools=_PLAIN_TOOLS)
    _, cut_result = read(dialect, [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), None],
                                                                      strict=True)], tools=_PLAIN_TOOLS)
    assert cut_result.content == result.content
    assert cut_result.reasoning == result.reasoning
    assert cut_result.tool_calls == result.tool_calls


def test_public_names():
    assert set(dialects.__all__) <= set(dir(dialects))
    assert ParserOptions().reasoning_format == "auto"
