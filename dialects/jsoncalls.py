"""Calls written as JSON objects, ``{"name": ..., "arguments": {...}}``, alone or in a list.

Hermes/Qwen, Llama 3, Mistral Nemo, Granite and Phi-4 all write this object, around different
markers. The reader streams the arguments as they are written once the name is read and known;
arguments written before the name, a call id that comes after the arguments (Mistral Nemo
writes ``"id"`` last), or arguments given as a JSON string are held until the object closes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dialects.jsonscan import json_value
from dialects.output import Output
from dialects.stream import Input, NotACall, Reader, Refused, choose, peek, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")


def call_object(inp: Input, out: Output, *, bare: bool = False, expect_id: bool = False,
                args_keys: Sequence[str] = ARGUMENT_KEYS) -> Reader:
    """Read one call object. ``bare``: no marker announced it, so anything unlike a call is content."""
    book = out.book
    call = _Call(out, expect_id)
    yield from skip_ws(inp)
    if (yield from choose(inp, ("{",))) is None:
        raise NotACall() if bare else Refused("expected a JSON object")
    while True:
        yield from skip_ws(inp)
        if (yield from choose(inp, ("}",))) is not None:
            break
        if call.keys and (yield from choose(inp, (",",))) is None:
            raise Refused("expected ',' or '}' in the call object")
        yield from skip_ws(inp)
        if bare and not call.keys and (yield from peek(inp)) != '"':
            raise NotACall()
        key = yield from _json_key(inp)
        if bare and call.name is None and key not in ("name", "type"):
            raise NotACall()  # Llama writes "type" or "name" first; any other JSON answer is content
        call.keys.append(key)
        yield from skip_ws(inp)
        if (yield from choose(inp, (":",))) is None:
            raise Refused("expected ':' in the call object")
        yield from skip_ws(inp)
        if key == "name" and call.name is None:
            name = yield from _json_string(inp, "the function name")
            if bare and name not in book.schemas:
                raise NotACall()  # bare JSON is a call only when it names a function the request offers
            if not book.known(name):
                raise Refused(f"unknown function {name!r}")
            call.name = name
            call.announce_if_ready()
        elif key in args_keys and not call.has_args:
            yield from call.read_arguments(inp)
        elif key == "id" and call.call_id is None:
            call.call_id = yield from _json_string(inp, "the call id")
            call.announce_if_ready()
        else:
            yield from json_value(inp)  # "type": "function" and anything else: skipped
    if call.name is None:
        raise NotACall() if bare else Refused("the call object has no name")
    call.finish()


def object_arguments(inp: Input, out: Output) -> Reader:
    """The open call's arguments, written as one JSON object (streamed into the call book), and
    the call closed: DeepSeek's, Mistral's and gpt-oss's calls end this way."""
    yield from skip_ws(inp)
    if (yield from peek(inp)) != "{":
        raise Refused("the arguments are not a JSON object")
    yield from json_value(inp, out.book.args)
    out.book.close()


def call_list(inp: Input, out: Output, *, expect_id: bool = False, opened: bool = False) -> Reader:
    """Read ``[call, call, ...]``; each call that closes is kept even if a later one is refused.

    ``opened``: the ``[`` has been read already.
    """
    yield from skip_ws(inp)
    if not opened and (yield from choose(inp, ("[",))) is None:
        raise Refused("expected a JSON list of calls")
    first = True
    while True:
        yield from skip_ws(inp)
        if (yield from choose(inp, ("]",))) is not None:
            return None
        if not first and (yield from choose(inp, (",",))) is None:
            raise Refused("expected ',' or ']' in the list of calls")
        yield from call_object(inp, out, expect_id=expect_id)
        inp.checkpoint()
        first = False


def calls_in_json(inp: Input, out: Output) -> Reader:
    """A list of call objects or a single one, whichever the text holds."""
    yield from skip_ws(inp)
    if (yield from peek(inp)) == "[":
        yield from call_list(inp, out)
    else:
        yield from call_object(inp, out)


class _Call:
    """The parts of one call object read so far, and when to announce it."""

    def __init__(self, out: Output, expect_id: bool) -> None:
        self.book = out.book
        self.expect_id = expect_id
        self.keys: list[str] = []
        self.name: str | None = None
        self.call_id: str | None = None
        self.announced = False
        self.has_args = False
        self.held_args: str | None = None

    def announce_if_ready(self) -> None:
        if not self.announced and self.name is not None and (self.call_id is not None or not self.expect_id):
            self.book.begin(self.name, self.call_id)
            self.announced = True
            if self.held_args is not None:
                self.book.args(self.held_args)
                self.held_args = None

    def read_arguments(self, inp: Input) -> Reader:
        self.has_args = True
        first = yield from peek(inp)
        if first == '"':  # arguments as a JSON string holding the JSON object
            text = yield from _json_string(inp, "the arguments")
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                raise Refused("the arguments string is not JSON") from None
            if not isinstance(value, dict):
                raise Refused("the arguments are not a JSON object")
            self.held_args = json.dumps(value, ensure_ascii=False)
        elif first != "{":
            raise Refused("the arguments are not a JSON object")
        elif self.announced:
            yield from json_value(inp, self.book.args)
        else:
            self.held_args = yield from json_value(inp)
        if self.announced and self.held_args is not None:
            self.book.args(self.held_args)
            self.held_args = None

    def finish(self) -> None:
        self.expect_id = False
        self.announce_if_ready()
        if not self.has_args:
            self.book.args("{}")
        self.book.close()


def _json_key(inp: Input) -> Reader:
    return (yield from _json_string(inp, "a key"))


def _json_string(inp: Input, what: str) -> Reader:
    if (yield from peek(inp)) != '"':
        raise Refused(f"expected {what} as a JSON string")
    return json.loads((yield from json_value(inp)))
