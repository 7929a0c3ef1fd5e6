"""Model families' output dialects: how each writes its thinking and its tool calls.

A ``Dialect`` gives a streaming parser (``Dialect.parser``), a call grammar
(``Dialect.call_grammar``) and the markers the worker must render as text
(``Dialect.special_markers``). ``DIALECTS`` holds one per family, by name.

This package is pure: no server state, no llama.cpp; every function is safe to call from any thread.
"""

from __future__ import annotations

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

__all__ = [
    "DIALECTS", "GENERIC", "Content", "Dialect", "Event", "Parser", "ParserOptions", "Reasoning",
    "ReasoningFormat", "Result", "ToolCallArgs", "ToolCallStart",
]

DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    GENERIC, HERMES, CODER, LLAMA3, MISTRAL, MISTRAL_NEMO, DEEPSEEK_R1, DEEPSEEK_V31, GPT_OSS, GRANITE, PHI4, GEMMA4,
)}
