"""Grammars from requests: refused with a 400 that names the parameter, never a crash or a hang.

Every shape below once killed or froze the server (a NULL grammar sampler, an endless
parser loop, an abort while sampling). The live tests drive the real server on the tiny
generated models; the checker tests drive the real helper process and llama.cpp.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import JOIN_TIMEOUT, LiveServer, chat_body, sse_events, start_live_server, write_llama_model
from helpers import TOOLS_TEMPLATE
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp import llama_grammar

from engine.client import RequestFailed
from engine.protocol import SamplingParams
from errors import InvalidRequest, ShuttingDown
from grammar import gbnf
from grammar.checker import GrammarChecker
from grammar.schema import schema_grammar

ANSWER_SECONDS = 5.0  # "a few seconds": the checker's default limit is 5 s, and these are refused long before
SHIPPED = ["ARITHMETIC_GBNF", "C_GBNF", "CHESS_GBNF", "JAPANESE_GBNF", "JSON_ARR_GBNF", "JSON_GBNF", "LIST_GBNF"]
SLOW_TO_COMPILE = "root ::= " + " | ".join(f'"{chr(97 + i % 26)}{i}"' for i in range(22000))  # ~1 s on the tiny vocab


@pytest.fixture(scope="module")
def grammar_server(tmp_path_factory) -> LiveServer:
    models = tmp_path_factory.mktemp("grammar-models")
    write_llama_model(models / "tiny.gguf", seed=1)
    write_llama_model(models / "tiny-tools.gguf", seed=3, chat_template=TOOLS_TEMPLATE)
    live = start_live_server(models, {"n_ctx": 256, "max_tokens_limit": 64, "unload_timeout": 1})
    yield live
    live._stop()


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_llama_model(path, seed=1)
    return path


@pytest.fixture
def checker():
    grammars = GrammarChecker(timeout=0.3)
    yield grammars
    grammars.close()


def tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "act", "parameters": parameters}}


def assert_refused(live: LiveServer, path: str, body: dict, param: str) -> dict:
    """POST ``body``: a prompt 400 naming ``param`` in OpenAI's shape; then the model still serves."""
    started = time.monotonic()
    response = live.post(path, body)
    assert time.monotonic() - started < ANSWER_SECONDS
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == param, error
    follow = live.post("/v1/completions", {"model": body["model"], "prompt": "Hello", "max_tokens": 2,
                                           "grammar": 'root ::= "ok"'})
    assert follow.status_code == 200 and follow.json()["choices"][0]["text"] == "ok"
    return error


# ---------------------------------------------------------- the crash shapes, live

BAD_GRAMMARS = [
    ("root ::= this is (not valid GBNF", "unbalanced '('"),
    ('root ::= "a"{5,2}', "minimum above its maximum"),  # hung the request thread and the model forever
    ("root ::= foo", "undefined rule 'foo'"),
    ('x ::= "a"', "no 'root' rule"),
    ('root ::= "a" ]', "unbalanced ']'"),
    ('root ::= "abc', "unterminated string"),
    ("root ::= [abc", "unterminated character class"),
    ('root ::= "a"{99999999999999999999}', "above the limit of 2000"),
    ('root ::= x root "a" | "b"\nx ::= "" | "c"', "left-recursive"),  # llama.cpp's own check misses it and loops
    ('root ::= ("x"?)*', "can match empty text"),
    ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nest more than 1000"),  # far deeper overflows llama.cpp's stack
    ("root ::= [z-a]", "reversed"),  # passed llama.cpp, then aborted it at the first token
    ('root ::= "a\x00b"', "NUL"),
    ('root ::= "\\q"', "unknown escape"),
    ("root ::= <[99999]>", "outside this model's vocabulary"),  # only the vocabulary knows
]


@pytest.mark.parametrize(("grammar", "reason"), BAD_GRAMMARS)
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_bad_grammar_is_a_400_naming_grammar(grammar_server: LiveServer, endpoint: str, grammar: str, reason: str):
    body = ({"model": "tiny", "prompt": "Hello", "grammar": grammar} if endpoint == "/v1/completions"
            else chat_body("tiny", grammar=grammar))
    error = assert_refused(grammar_server, endpoint, body, "grammar")
    assert reason in error["message"]


BAD_SCHEMAS = [
    ({"enum": []}, "at least one value"),  # crashed the server
    ({"anyOf": []}, "at least one schema"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 5, "maxItems": 2}, "'minItems' 5 is above"),
    ({"type": "string", "minLength": 9, "maxLength": 3}, "'minLength' 9 is above"),
    ({"type": "array", "maxItems": 10**9}, "above the limit of 1000"),  # the converter built a string this long
    ({"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}]}, "b": {"$ref": "#/$defs/a"}}},
     "cycle a -> b -> a"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"type": "string", "pattern": "^\\d+$"}, "escape '\\d'"),
    ({"type": "object", "properties": {"x": True}}, "boolean schemas"),
    ({"anyOf": [{"type": "string"}, {"$ref": "#"}]}, "cycle root -> root"),
]


@pytest.mark.parametrize(("schema", "reason"), BAD_SCHEMAS)
def test_bad_response_format_schema_is_a_400_naming_response_format(grammar_server: LiveServer, schema, reason):
    body = chat_body("tiny", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = assert_refused(grammar_server, "/v1/chat/completions", body, "response_format")
    assert reason in error["message"]


@pytest.mark.parametrize(("schema", "reason"), BAD_SCHEMAS[:4])
def test_bad_tool_parameters_are_a_400_naming_the_tool(grammar_server: LiveServer, schema, reason):
    tools = [tool({"type": "object", "properties": {"ok": {"type": "boolean"}}}), tool(schema)]
    body = chat_body("tiny-tools", tools=tools, tool_choice="required")
    error = assert_refused(grammar_server, "/v1/chat/completions", body, "tools[1].function.parameters")
    assert reason in error["message"]


def test_refused_grammar_loads_no_model(make_server):
    live = make_server()
    response = live.post("/v1/chat/completions", chat_body("tiny", stream=True, grammar='root ::= "a"{5,2}'))
    assert response.status_code == 400  # a plain error, not a stream that fails later
    assert response.headers["Content-Type"].startswith("application/json")
    assert live.loader.loads == []


def test_valid_grammar_constrains_chat_and_completion(grammar_server: LiveServer):
    chat = grammar_server.post("/v1/chat/completions", chat_body("tiny", grammar='root ::= "yes" | "no"'))
    assert chat.json()["choices"][0]["message"]["content"] in ("yes", "no")
    body = {"model": "tiny", "prompt": "Hello", "temperature": 0, "stream": True, "grammar": 'root ::= [a-c]{3}'}
    with grammar_server.post("/v1/completions", body, stream=True) as response:
        events = [e for e in sse_events(response) if e != "[DONE]"]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert len(text) == 3 and set(text) <= set("abc"), text
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_schema_literals_with_quotes_and_backslashes(grammar_server: LiveServer):
    values = ['say "hi"', "C:\\temp"]  # the converter's escaping broke the first and mangled the second
    schema = {"type": "object", "properties": {"v": {"enum": values}}, "required": ["v"]}
    body = chat_body("tiny", max_tokens=64, response_format={"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": schema}})
    content = grammar_server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert json.loads(content)["v"] in values


# ------------------------------------------------------------- sampling time


def test_grammar_complete_under_ignore_eos_stops_cleanly(grammar_server: LiveServer):
    # ignore_eos forced end-of-generation to -inf; the complete grammar allowed nothing else: SIGABRT.
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "grammar": 'root ::= "a"'}
    for temperature in (0, 0.8):
        reply = grammar_server.post("/v1/completions", {**body, "temperature": temperature}).json()
        assert reply["choices"][0] == {"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop"}


def test_ignore_eos_still_holds_while_the_grammar_can_go_on(grammar_server: LiveServer):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "temperature": 0,
            "grammar": 'root ::= "ab"+', "logit_bias": {"2": 100}}  # EOS is the model's favourite
    reply = grammar_server.post("/v1/completions", body).json()
    assert reply["choices"][0]["text"] == "ababab" and reply["choices"][0]["finish_reason"] == "length"


def test_grammar_that_dead_ends_mid_generation_is_a_400(grammar_server: LiveServer):
    # <|im_end|> is an end-of-generation token of the tiny vocabulary: the grammar may never reach it, and
    # llama.cpp aborted the process when the only allowed continuation was impossible.
    body = {"model": "tiny", "prompt": "Hello", "grammar": 'root ::= "a" <|im_end|>'}
    error = assert_refused(grammar_server, "/v1/completions", body, "grammar")
    assert "after 1 generated tokens the grammar allows no token" in error["message"]
    with grammar_server.post("/v1/completions", {**body, "stream": True}, stream=True) as response:
        events = list(sse_events(response))
    assert events[-2]["error"]["param"] == "grammar" and events[-1] == "[DONE]"


def test_grammar_too_slow_per_token_is_refused(grammar_server: LiveServer):
    assert grammar_server.post("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 1}).status_code == 200
    lease = grammar_server.manager.acquire("tiny")
    try:
        worker = lease.worker
        prompt = worker.tokenize("Hello")
        params = SamplingParams(max_tokens=4, temperature=0, grammar='root ::= "a"+', grammar_token_seconds=0)
        with pytest.raises(RequestFailed, match=r"took .* for one token") as refused:
            list(worker.generate(prompt, params))
        assert refused.value.param == "grammar"
    finally:
        lease.release()


# ------------------------------------------------------------------ checker


def test_checker_caches_verdicts(checker: GrammarChecker, tiny_path: Path):
    checker.check(llama_grammar.JSON_GBNF, tiny_path, "grammar")
    checker.check(llama_grammar.JSON_GBNF, tiny_path, "grammar")
    with pytest.raises(InvalidRequest):
        checker.check("root ::= <[99999]>", tiny_path, "grammar")
    pid = checker.helper_pid
    os.kill(pid, signal.SIGKILL)  # a cached refusal needs no helper
    with pytest.raises(InvalidRequest, match="outside"):
        checker.check("root ::= <[99999]>", tiny_path, "grammar")
    assert checker.stats.cache_hits == 2


def test_compile_over_the_time_limit_is_refused_and_the_helper_recovers(checker: GrammarChecker, tiny_path: Path):
    gbnf.check(SLOW_TO_COMPILE)  # legal: only llama.cpp is slow with it (its stack set is quadratic)
    checker.check('root ::= "a"', tiny_path, "grammar")
    first = checker.helper_pid
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match=r"within 0\.3 s") as refused:
        checker.check(SLOW_TO_COMPILE, tiny_path, "grammar")
    assert refused.value.param == "grammar" and time.monotonic() - started < 3  # the Python check, 0.3 s, a kill
    assert checker.helper_pid is None  # killed, not left computing
    checker.check('root ::= "b"', tiny_path, "grammar")
    assert checker.helper_pid not in (None, first)
    assert checker.stats.timeouts == 1


def test_helper_crash_is_a_400_and_the_helper_restarts(checker: GrammarChecker, tiny_path: Path):
    checker.check('root ::= "a"', tiny_path, "grammar")
    pid = checker.helper_pid
    checker.timeout = 5.0
    outcome: list[BaseException] = []

    def slow_check() -> None:
        try:
            checker.check(SLOW_TO_COMPILE, tiny_path, "response_format")
        except BaseException as exc:
            outcome.append(exc)

    helper = psutil.Process(pid)
    idle_cpu = sum(helper.cpu_times()[:2])
    worker = threading.Thread(target=slow_check)
    worker.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    while sum(helper.cpu_times()[:2]) - idle_cpu < 0.1 and time.monotonic() < deadline:
        time.sleep(0.005)  # until llama.cpp is well into the compile (about a second of CPU)
    os.kill(pid, signal.SIGSEGV)  # as if llama.cpp crashed mid-compile
    worker.join(JOIN_TIMEOUT)
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidRequest), outcome
    assert "crashed" in outcome[0].message and "SIGSEGV" in outcome[0].message
    assert outcome[0].param == "response_format"
    checker.check('root ::= "c"', tiny_path, "grammar")
    assert checker.helper_pid not in (None, pid)


def test_closed_checker_stops_its_helper(tiny_path: Path):
    grammars = GrammarChecker()
    grammars.check('root ::= "a"', tiny_path, "grammar")
    pid = grammars.helper_pid
    grammars.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ShuttingDown):
        grammars.check('root ::= "b"', tiny_path, "grammar")


# ------------------------------------------------------------- syntax check


@pytest.mark.parametrize("name", SHIPPED)
def test_accepts_the_grammars_llama_cpp_ships(name: str):
    gbnf.check(getattr(llama_grammar, name))


REAL_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                                      "email": {"type": "string", "format": "email"}},
     "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "id": {"type": "string", "format": "uuid"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                                      "kind": {"enum": ["a", "b", 3, None]}}},
    {"$defs": {"node": {"type": "object", "properties": {"value": {"type": "number"},
                                                         "children": {"type": "array",
                                                                      "items": {"$ref": "#/$defs/node"}}}}},
     "$ref": "#/$defs/node"},
    {"type": "object", "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 1000},
                                      "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 1000}}},
    {"anyOf": [{"type": "string"}, {"type": "null"}]},
]


@pytest.mark.parametrize("schema", REAL_SCHEMAS)
def test_grammars_from_real_schemas_pass_the_check_and_llama_cpp(schema, checker: GrammarChecker, tiny_path: Path):
    checker.timeout = 5.0
    checker.check(schema_grammar(schema, "response_format"), tiny_path, "response_format")


REFUSED = [
    ('root ::= "a"{5,2}', 1, 13, "{5,2} has its minimum above its maximum"),
    ('root ::= "a"{0,2001}', 1, 13, "bound 2001 is above the limit of 2000"),
    ("root ::= (\n  \"a\" |\n  \"b\"", 1, 10, "no ')' closes this group (at line 3, column 6"),
    ('root ::= "a")', 1, 13, "unbalanced ')'"),
    ('root ::= "a\nb', 1, 10, "unterminated string"),
    ('root ::= ["a"]]', 1, 15, "unbalanced ']'"),
    ('root ::= "a"\n  | "b"', 2, 3, "'|' at the start of a line"),
    ("root ::= \nnext ::= \"a\"", 2, 6, "empty rule body reads on across the newline"),
    ('root ::= "a" | b', 1, 16, "undefined rule 'b'"),
    ('main ::= "a"', 1, 1, "no 'root' rule"),
    ("root ::= *", 1, 10, "'*' must follow the item"),
    ('root ::= ""*', 1, 12, "'*' must follow the item"),
    ('root ::= "\\x4"', 1, 11, "must be followed by 2 hex digits"),
    ('root ::= "\\U00110000"', 1, 11, "not a Unicode code point"),
    ('root ::= "\\x00"', 1, 11, "can never be generated"),
    ("root ::= [^\\x01-\\U0010FFFF]", 1, 10, "matches no character"),
    ("root ::= []", 1, 10, "empty character class"),
    ('root ::= !"a"', 1, 11, "expected '<' after '!'"),
    ("root ::= <abc", 1, 10, "never closed with '>'"),
    ('root ::= a "x"\na ::= b\nb ::= "" | a', 2, 1, "left-recursive ('a' -> 'b' -> 'a')"),
    ('root ::= ("a"{0,3}){2,4}', 1, 20, "can match empty text"),
    ('root ::= ("a" "b"{0,40}){60}', 1, 25, "llama.cpp refuses more than 2000"),
    ("root ::= " + "(" * 1001 + '"a"' + ")" * 1001, 1, 1010, "nest more than 1000 deep"),
    ("root ::= " + '"a" ' * 70_000, 1, 1, "the limit is 262144"),
    ('root ::= "a"\n' + "\n".join(f'r{i} ::= "{"x" * 90}"{{2000}}' for i in range(2)), 1, 1, "expands to"),
    ('root ::= "\ud800"', 1, 11, "lone surrogate"),
]


@pytest.mark.parametrize(("text", "line", "column", "reason"), REFUSED)
def test_refuses_with_line_column_and_reason(text: str, line: int, column: int, reason: str):
    with pytest.raises(gbnf.GbnfError) as refused:
        gbnf.check(text)
    assert reason in refused.value.reason
    assert (refused.value.line, refused.value.column) == (line, column), str(refused.value)


def test_accepts_what_llama_cpp_accepts_at_the_edges():
    for text in ['root ::= "a" | ', 'root ::= "a" |\n "b"', "root ::= (\n \"a\"\n | \"b\"\n)",
                 "root ::= [a-] [-a] [\\]]", 'root ::= "a"{0} "b"{2000} "c"{1,}',
                 'root ::= "a" # comment\n# another\nx ::= "y"\r\n',
                 "root ::= <|im_end|> !<[2]> <[5]>", 'root ::= x\nx ::= "a"\nx ::= "b"', 'root ::= ("a"?){2}']:
        gbnf.check(text)


def test_rename_rules_prefixes_every_name():
    text = 'root ::= item ("," item)*\nitem ::= [a-z]+ # root item\n'
    renamed = gbnf.rename_rules(text, "t0-")
    assert renamed == 't0-root ::= t0-item ("," t0-item)*\nt0-item ::= [a-z]+ # root item\n'


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200) | st.sampled_from([e[0] for e in BAD_GRAMMARS]).flatmap(
    lambda t: st.integers(0, len(t)).map(lambda i: t[:i])))
def test_syntax_check_only_ever_raises_gbnf_error(text: str):
    started = time.perf_counter()
    with contextlib.suppress(gbnf.GbnfError):
        gbnf.check(text)
    assert time.perf_counter() - started < 1


def test_schema_refs_resolve_per_pointer_not_per_name():
    # The converter names a referenced rule after the pointer's last segment: both refs below became one rule.
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/item"},
                                               "b": {"$ref": "#/$defs/more/$defs/item"}},
              "$defs": {"item": {"type": "integer"}, "more": {"$defs": {"item": {"type": "boolean"}}}}}
    text = schema_grammar(schema, "response_format")
    assert '"true"' in text and "integral-part" in text


def test_a_forced_call_may_follow_text_but_must_come():
    from gbnf_match import compiled

    from dialects import DIALECTS
    from grammar.request import tool_call_grammar
    from schemas import FunctionDef

    weather = FunctionDef.model_validate({"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}})
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    hermes = compiled(tool_call_grammar([(0, weather)], DIALECTS["hermes"]))
    assert hermes.accepts(call)
    assert hermes.accepts("<think>\nThe user wants weather.\n</think>\n" + call)
    assert hermes.accepts("Opened by the template.\n</think>\nLet me check. " + call)  # DeepSeek R1, QwQ
    assert not hermes.accepts("<think>\nNo call after all.\n</think>\nSunny.")
    assert not hermes.accepts("<think>hmm</think>")
    assert not hermes.accepts('<tool_call>{"name": "other", "arguments": {}}</tool_call>')
    harmony = compiled(tool_call_grammar([(0, weather)], DIALECTS["gpt-oss"]))
    assert harmony.accepts("<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary"
                           ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
    mistral = compiled(tool_call_grammar([(0, weather)], DIALECTS["mistral"]))  # Ministral thinks
    assert mistral.accepts('[THINK]Weather.[/THINK]I will look.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    plain = compiled(tool_call_grammar([(0, weather)], DIALECTS["hermes"].without_reasoning()))
    assert plain.accepts(call) and not plain.accepts("Let me check. " + call)  # no thinking: the call at once
    llama3 = compiled(tool_call_grammar([(0, weather)], DIALECTS["llama3"]))  # read only at the start
    assert llama3.accepts('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert not llama3.accepts('Sure. {"name": "get_weather", "parameters": {"city": "Paris"}}')
