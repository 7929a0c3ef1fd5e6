"""Model families' output dialects: how each writes its thinking and its tool calls.

``detect(template, architecture)`` picks the ``Dialect`` from the markers the chat template
contains (never from file names), falling back on the GGUF architecture for a template it does
not recognise, and on ``GENERIC`` (Hermes ``<tool_call>`` plus ``<think>``, what this server read
before) for a model with no template or an unknown one. A dialect gives a streaming parser
(``Dialect.parser``), a call grammar (``Dialect.call_grammar``) and the markers the worker must
render as text (``Dialect.special_markers``); ``dialects.template`` says what else the template
reads.

This package is pure: no server state, no llama.cpp; every function is safe to call from any thread.
"""

from __future__ import annotations

from collections.abc import Callable

from dialects.deepseek import CALL_BEGIN as DEEPSEEK_CALL
from dialects.deepseek import DEEPSEEK_R1, DEEPSEEK_V31
from dialects.dialect import Dialect
from dialects.events import (
    Content,
    Event,
    ParserOptions,
    Reasoning,
    ReasoningFormat,
    Result,
    ToolCallArgs,
    ToolCallStart,
)
from dialects.gemma import GEMMA4
from dialects.harmony import GPT_OSS
from dialects.hermes import GENERIC, HERMES
from dialects.json_lists import GRANITE, PHI4
from dialects.llama3 import LLAMA3
from dialects.mistral import MISTRAL, MISTRAL_NEMO
from dialects.parser import Parser
from dialects.qwen_xml import CODER
from dialects.template import TemplateInputs, adapt_messages, render_kwargs, template_inputs, template_uses

__all__ = [
    "DIALECTS", "GENERIC", "Content", "Dialect", "Event", "Parser", "ParserOptions", "Reasoning",
    "ReasoningFormat", "Result", "TemplateInputs", "ToolCallArgs", "ToolCallStart", "adapt_messages",
    "detect", "render_kwargs", "template_inputs", "template_uses",
]

DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    GENERIC, HERMES, CODER, LLAMA3, MISTRAL, MISTRAL_NEMO, DEEPSEEK_R1, DEEPSEEK_V31, GPT_OSS, GRANITE, PHI4, GEMMA4,
)}


def _has(*markers: str) -> Callable[[str], bool]:
    return lambda template: all(m in template for m in markers)


def _thinks_if(marker: str, dialect: Dialect) -> Callable[[str], Dialect]:
    """The dialect as is when the template knows its thinking marker, else without thinking."""
    return lambda template: dialect if marker in template else dialect.without_reasoning()


# First match wins: a more specific family comes before one whose markers it shares
# (Qwen3-Coder's <tool_call> before Hermes', Mistral's [ARGS] before Nemo's bare [TOOL_CALLS]).
_BY_TEMPLATE: tuple[tuple[Callable[[str], bool], Callable[[str], Dialect]], ...] = (
    (_has("<|channel|>", "<|message|>"), lambda t: GPT_OSS),
    (_has("<|tool_call>call:"), lambda t: GEMMA4),
    (_has("[TOOL_CALLS]", "[ARGS]"), _thinks_if("[THINK]", MISTRAL)),
    (_has("[TOOL_CALLS]"), lambda t: MISTRAL_NEMO),
    (_has(DEEPSEEK_CALL, "```json"), _thinks_if("<think>", DEEPSEEK_R1)),
    (_has(DEEPSEEK_CALL), _thinks_if("<think>", DEEPSEEK_V31)),
    (_has("<tool_call>", "<function=", "<parameter="), _thinks_if("<think>", CODER)),
    (_has("<tool_call>"), _thinks_if("<think>", HERMES)),
    (_has("<|tool_call|>", "<|start_of_role|>"), _thinks_if("<think>", GRANITE)),
    (lambda t: "functools[" in t or ("<|tool|>" in t and "<|/tool|>" in t), _thinks_if("<think>", PHI4)),
    (_has("<|start_header_id|>", '"parameters"'), lambda t: LLAMA3),
)

# For a template that names no family (a custom override, say): the model still writes its own format.
_BY_ARCHITECTURE: dict[str, Dialect] = {
    "gpt-oss": GPT_OSS,
    "gemma4": GEMMA4,
}


def detect(template: str | None, architecture: str | None = None) -> Dialect:
    """The dialect of a model with chat ``template`` (GGUF ``tokenizer.chat_template``) and GGUF ``architecture``."""
    if not template:
        return GENERIC
    for matches, dialect in _BY_TEMPLATE:
        if matches(template):
            return dialect(template)
    found = _BY_ARCHITECTURE.get(architecture or "")
    return found if found is not None else GENERIC
