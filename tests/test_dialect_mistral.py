"""Mistral outputs: Nemo's ``[TOOL_CALLS][...]`` list, Small 3.2 / Ministral's ``[TOOL_CALLS]name[ARGS]{...}``."""

from __future__ import annotations

import re

import pytest
from dialect_support import Case, check_case, read

from dialects import DIALECTS
from dialects.output import mistral_call_id

MISTRAL, NEMO = DIALECTS["mistral"], DIALECTS["mistral-nemo"]

NAMED = [
    Case("content-only", "Paris is the capital.", content="Paris is the capital."),
    Case("one-call", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
         calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("content-before-call", 'Checking now.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
         content="Checking now.", calls=[("get_weather", {"city": "Paris"})]),
    Case("two-calls", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"query": "x"}',
         calls=[("get_weather", {"city": "Paris"}, "gen0"), ("search", {"query": "x"}, "gen1")]),
    Case("model-written-call-id", '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}',
         calls=[("get_weather", {"city": "Paris"}, "a1B2c3D4e")]),
    Case("reasoning-and-call", '[THINK]The user wants weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
         reasoning="The user wants weather.", calls=[("get_weather", {"city": "Rome"})]),
    Case("reasoning-and-content", "[THINK]Easy one.[/THINK]Bonjour !", reasoning="Easy one.", content="Bonjour !"),
    Case("reasoning-only", "[THINK]Still going", reasoning="Still going"),
    Case("unicode-args", '[TOOL_CALLS]get_weather[ARGS]{"city": "Köln 🌦", "units": "metric"}',
         calls=[("get_weather", {"city": "Köln 🌦", "units": "metric"})]),
    Case("nested-args", '[TOOL_CALLS]search[ARGS]{"query": "q", "filters": {"site": "x.org", "year": 1999}}',
         calls=[("search", {"query": "q", "filters": {"site": "x.org", "year": 1999}})]),
    Case("marker-inside-string", '[TOOL_CALLS]search[ARGS]{"query": "what is [TOOL_CALLS] and [ARGS]?"}',
         calls=[("search", {"query": "what is [TOOL_CALLS] and [ARGS]?"})]),
    Case("malformed-args", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris",}',
         content='[TOOL_CALLS]get_weather[ARGS]{"city": "Paris",}', malformed=True),
    Case("malformed-no-args-marker", "[TOOL_CALLS]get_weather Paris please",
         content="[TOOL_CALLS]get_weather Paris please", malformed=True),
]

LISTED = [
    Case("content-only", "Paris is the capital.", content="Paris is the capital."),
    Case("one-call-with-id", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1B2c3D4e"}]',
         calls=[("get_weather", {"city": "Paris"}, "a1B2c3D4e")]),
    Case("one-call-without-id", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
         calls=[("get_weather", {"city": "Paris"}, "gen0")]),
    Case("content-before-call", 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
         content="Sure.", calls=[("get_weather", {"city": "Paris"})]),
    Case("two-calls",
         '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "aaaaaaaa1"}, '
         '{"name": "search", "arguments": {"query": "x", "filters": {"year": 2020}}, "id": "bbbbbbbb2"}]',
         calls=[("get_weather", {"city": "Paris"}, "aaaaaaaa1"),
                ("search", {"query": "x", "filters": {"year": 2020}}, "bbbbbbbb2")]),
    Case("unicode-and-bracket-in-string",
         '[TOOL_CALLS][{"name": "search", "arguments": {"query": "ñ ] } [TOOL_CALLS]"}}]',
         calls=[("search", {"query": "ñ ] } [TOOL_CALLS]"})]),
    Case("malformed-second-call",
         '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "search", "arguments": "q"}]',
         content=', {"name": "search", "arguments": "q"}]', calls=[("get_weather", {"city": "Paris"})], malformed=True),
]


@pytest.mark.parametrize("case", NAMED, ids=lambda c: c.id)
def test_mistral_named_calls(case: Case):
    check_case(MISTRAL, case)


@pytest.mark.parametrize("case", LISTED, ids=lambda c: c.id)
def test_mistral_nemo_call_lists(case: Case):
    check_case(NEMO, case)


def test_made_up_ids_have_mistral_shape():
    assert re.fullmatch(r"[A-Za-z0-9]{9}", mistral_call_id())
    _, result = read(MISTRAL, ['[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'], id_factory=None)
    assert re.fullmatch(r"[A-Za-z0-9]{9}", result.tool_calls[0]["id"])


def test_nemo_without_written_id_streams_only_when_the_object_closes():
    parser = NEMO.parser()
    assert parser.feed('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par') == []
