"""Helpers shared by test modules: requests the lifecycle tests send, a clock that moves on
cue, a chat template with tools, and Hypothesis strategies for grammars and JSON schemas
(valid, odd and broken), built from the shapes that used to crash or hang the server."""

from __future__ import annotations

import json
import socket
from typing import Any

import requests
from conftest import JOIN_TIMEOUT, LiveServer
from hypothesis import strategies as st
from llama_cpp.llama_grammar import ARITHMETIC_GBNF, JSON_ARR_GBNF, JSON_GBNF, LIST_GBNF


def completion(server: LiveServer, model: str = "tiny", **extra) -> requests.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0, **extra}
    return server.post("/v1/completions", body)


def open_stream(server: LiveServer, model: str = "tiny", max_tokens: int = 200) -> requests.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    response = requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=JOIN_TIMEOUT)
    assert response.status_code == 200
    return response


def anthropic_events(response: requests.Response) -> list[tuple[str, Any]]:
    """An Anthropic event stream as (event name, JSON data) pairs; every event has both lines."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith(b"event: "):
            name = line[len(b"event: "):].decode()
        elif line.startswith(b"data: "):
            assert name is not None, line
            events.append((name, json.loads(line[len(b"data: "):])))
            name = None
        else:
            assert not line, line
    return events


def raw_request(server: LiveServer, path: str, body: dict) -> socket.socket:
    """Send a POST over a bare socket and return it unread, so the test can hang up at will."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=JOIN_TIMEOUT)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


class FakeClock:
    """Monotonic time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML that renders ``tools``, so the server accepts tools for a model using it."""

# ------------------------------------------------------------------ grammars

VALID_GRAMMARS = [JSON_GBNF, LIST_GBNF, ARITHMETIC_GBNF, JSON_ARR_GBNF, 'root ::= "yes" | "no"',
                  'root ::= [a-z]+ ("," [a-z]+)*', 'root ::= "a" | ']
ITEMS = ['"a"', '"hello"', "[a-z]", '[^"\\\\]', "[0-9]", ".", "x", "y", "<[5]>", "!<[5]>", '"\\n"', '"é€"']
BAD_ITEMS = ['""', "root", "[z-a]", "[]", '"\\x00"', "<|im_end|>", "<[999999]>", "undefined-rule"]
OPERATORS = ["", "", "", "*", "+", "?", "{2}", "{0,3}", "{1,}"]
BAD_OPERATORS = ["{5,2}", "{0}", "{2001}", "{99999999999999999999}", "**", "{", "{1,2"]
BROKEN = ["(", ")", "[", "]", '"', "|", "::=", "{", "}", "\\", "<", "!", "\x00", "#", "\n", "{,}", "\ud800",
          "(" * 1500, "\n | "]


@st.composite
def _sequence(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth < 2 and draw(st.integers(0, 5)) == 0:
            item = "(" + draw(_alternatives(depth + 1)) + ")"
        else:
            item = draw(st.sampled_from(ITEMS * 4 + BAD_ITEMS))  # mostly valid: some must reach generation
        parts.append(item + draw(st.sampled_from(OPERATORS * 4 + BAD_OPERATORS)))
    return " ".join(parts)


@st.composite
def _alternatives(draw: st.DrawFn, depth: int = 0) -> str:
    return " | ".join(draw(st.lists(_sequence(depth), min_size=1, max_size=3)))


@st.composite
def _built_grammar(draw: st.DrawFn) -> str:
    names = draw(st.just(["root", "x", "y"]) | st.lists(st.sampled_from(["root", "x", "y"]), min_size=1, max_size=4))
    return "\n".join(f"{name} ::= {draw(_alternatives())}" for name in names)


@st.composite
def _mutated_grammar(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID_GRAMMARS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate"]))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(BROKEN + ITEMS + BAD_ITEMS + BAD_OPERATORS)) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        else:
            text = text[:at] + text[at:at + draw(st.integers(1, 40))] * 2 + text[at + 40:]
    return text


grammar_texts = (st.sampled_from(VALID_GRAMMARS) | _built_grammar() | _mutated_grammar()
                 | st.text(max_size=120) | st.text(alphabet='root::= "a|()[]{}*+?.-^\\\n#<>!0123456789',
                                                   max_size=80).map(lambda t: "root ::= " + t))
"""GBNF texts: llama.cpp's own grammars, grammars built from fragments (valid and broken), mutated valid
grammars and random text."""

# ------------------------------------------------------------------- schemas

_TYPES = ["string", "number", "integer", "boolean", "null", "object", "array", "xml", 7]
_BOUNDS = st.sampled_from([0, 1, 3, 5, 1000, 1001, 10**9, -1, True, 2.5])
_PATTERNS = ["^[a-z]+$", "^(yes|no)$", "^\\d{3}$", "^a{5,2}$", "^x{100000}$", "(", "^(a|b)*$", "no-anchors",
             '^"$', "^(a?)*$"]
_SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8) | st.sampled_from(['a"b', "c\\d"])
_REFS = ["#", "#/$defs/a", "#/$defs/b", "#/$defs/missing", "#/properties", "#/anyOf/0", "https://example.com/s",
         "other.json#/x", 5]


def _leaf() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(_TYPES)}),
        st.fixed_dictionaries({"type": st.lists(st.sampled_from(_TYPES), max_size=3)}),
        st.fixed_dictionaries({"enum": st.lists(_SCALARS, max_size=4)}),
        st.fixed_dictionaries({"const": _SCALARS}),
        st.fixed_dictionaries({"type": st.just("string")},
                              optional={"minLength": _BOUNDS, "maxLength": _BOUNDS,
                                        "pattern": st.sampled_from(_PATTERNS),
                                        "format": st.sampled_from(["date", "uuid", "date-time", "email"])}),
        st.fixed_dictionaries({"$ref": st.sampled_from(_REFS)}),
        st.booleans(),
        st.just({}),
    )


def _composite(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    names = st.sampled_from(["a", "b", "name", "x y", 'q"uote', "back\\slash"]) | st.just("")
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(names, inner, max_size=3)},
                              optional={"required": st.lists(names, max_size=3),
                                        "additionalProperties": st.booleans() | inner}),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                              optional={"minItems": _BOUNDS, "maxItems": _BOUNDS}),
        st.fixed_dictionaries({"prefixItems": st.lists(inner, max_size=3)}),
        st.sampled_from(["anyOf", "oneOf", "allOf"]).flatmap(
            lambda key: st.fixed_dictionaries({key: st.lists(inner, max_size=3)})),
    )


@st.composite
def _schema(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(st.recursive(_leaf(), _composite, max_leaves=8))
    schema = body if isinstance(body, dict) else {"anyOf": [body]}
    if draw(st.booleans()):
        defs = draw(st.fixed_dictionaries({"a": st.recursive(_leaf(), _composite, max_leaves=4),
                                           "b": st.recursive(_leaf(), _composite, max_leaves=4)}))
        schema = {**schema, "$defs": defs}
    return schema


KNOWN_BAD_SCHEMAS = [
    {"enum": []}, {"anyOf": []}, {"oneOf": []},
    {"type": "array", "items": {"type": "string"}, "minItems": 5, "maxItems": 2},
    {"type": "string", "minLength": 5, "maxLength": 2},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}}},
    {"$ref": "#/$defs/missing"}, {"type": "array", "maxItems": 10**9}, {"type": "string", "maxLength": 10**12},
    {"type": "string", "pattern": "^a{5,2}$"},
]
json_schemas = st.sampled_from(KNOWN_BAD_SCHEMAS) | _schema()
"""JSON schemas: the shapes that crashed the server, and generated ones (valid, odd and broken)."""


def gbnf_literal(text: str) -> str:
    """A grammar that lets the model write exactly ``text`` (and then end)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'root ::= "{escaped}"'
