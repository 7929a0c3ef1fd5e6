"""gpt-oss: OpenAI's harmony format, messages on channels.

After the prompt's ``<|start|>assistant`` the model writes one or more messages:

    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>final<|message|>the answer<|return|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>
    <|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{...}<|call|>  (template's order)

A header (up to ``<|message|>``) names the channel and perhaps a recipient. The analysis channel is
reasoning; final and commentary without a recipient are content; a recipient ``functions.NAME``
makes the body a call's JSON arguments. ``<|call|>`` and ``<|return|>`` end the turn (llama.cpp
counts them as end-of-generation tokens, so they are rarely seen). Text that is not harmony at all
(no header within a few hundred characters) is content.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping, Sequence
from typing import Any

from dialects.dialect import Dialect
from dialects.gbnf_rules import arguments_rules, choice, functions, grammar, literal
from dialects.jsoncalls import object_arguments
from dialects.output import Output
from dialects.stream import Input, Reader, Refused, choose, read_until, skip_ws, text_until

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
BODY_ENDS = (END, CALL, RETURN, START)
HEADER_OPENINGS = (CHANNEL, "assistant", "to=")  # after the whitespace skipped
HEADER_LIMIT = 256
FUNCTIONS = "functions."
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


def run(dialect: Dialect, inp: Input, out: Output) -> Generator[None, None, None]:
    """The program for a whole gpt-oss response: messages until the text ends."""
    ended_by_start = False
    while True:
        yield from skip_ws(inp)
        if inp.final and not inp.buf:
            return
        inp.record(START if ended_by_start else "")  # the raw text of a message that turns out not to parse
        if not ended_by_start:
            yield from choose(inp, (START,))
        header = yield from _header(inp)
        if header is None:  # not harmony: content up to the next message, if any
            out.content.write(inp.recorded())
            ended_by_start = (yield from text_until(inp, (START,), out.content.write)) == START
            out.content.boundary()
            continue
        channel, recipient = _parse_header(header)
        if recipient is not None and out.options.parse_tools:
            yield from _guarded_call(recipient, inp, out)
            ended_by_start = False
            continue
        raw_header = inp.recorded()
        if recipient is not None:  # a call nobody asked to parse stays in the content, as written
            out.content.write(raw_header)
            ended_by_start = (yield from _body(inp, out.content.write, out.content.write)) == START
        elif channel == "analysis":
            out.inline_marker(raw_header)
            ended_by_start = (yield from _body(inp, out.reasoning.write, out.inline_marker)) == START
            out.reasoning.boundary()
        else:
            ended_by_start = (yield from _body(inp, out.content.write, lambda marker: None)) == START
        out.content.boundary()


def _header(inp: Input) -> Reader:
    """The header text up to ``<|message|>`` (consumed), or None when the text is not a header."""
    opening = yield from choose(inp, HEADER_OPENINGS)
    if opening is None:
        return None
    try:
        rest, _ = yield from read_until(inp, (MESSAGE,), HEADER_LIMIT)
    except Refused:
        return None
    return opening + rest


def _parse_header(header: str) -> tuple[str, str | None]:
    channel = _CHANNEL_NAME.search(header)
    recipient = _RECIPIENT.search(header)
    to = recipient.group(1) if recipient else None
    return (channel.group(1) if channel else ""), (None if to == "assistant" else to)


def _body(inp: Input, write: Any, write_end: Any) -> Reader:
    """A message body up to its end marker, which goes to ``write_end`` (unless it starts the next message)."""
    end = yield from text_until(inp, BODY_ENDS, write)
    if end is not None and end != START:
        write_end(end)
    return end


def _guarded_call(recipient: str, inp: Input, out: Output) -> Reader:
    """The body of a message to ``recipient`` as a call; refused text becomes content, as elsewhere."""
    try:
        yield from _call(recipient, inp, out)
    except Refused as refusal:
        out.book.abandon()
        raw = inp.recorded()
        out.refuse(refusal.reason, raw)
        out.content.write(raw)
    else:
        inp.recorded()
        out.content.boundary()


def _call(recipient: str, inp: Input, out: Output) -> Reader:
    name = recipient[len(FUNCTIONS):] if recipient.startswith(FUNCTIONS) else ""
    if not name or not out.book.known(name):
        raise Refused(f"a call to {recipient!r}, not to a known function")
    out.book.begin(name)
    yield from object_arguments(inp, out)
    yield from skip_ws(inp)
    yield from choose(inp, (CALL, END, RETURN))


def call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """One call from `` to=functions.`` (the trigger), with the channel before or after the recipient.

    gpt-oss ends its turn after a call, so ``parallel`` changes nothing.
    """
    alternatives, rules = [], []
    commentary = literal(CHANNEL + "commentary")
    for position, function in enumerate(functions(tools)):
        name, text = arguments_rules(function, f"t{position}-")
        alternatives.append(f'{literal(function.name)} {commentary}? ( " " {literal(CONSTRAIN)}? "json" )? '
                            f"{literal(MESSAGE)} {name}")
        rules.append(text)
    return grammar(f"{commentary}? {literal(' to=' + FUNCTIONS)} {choice(alternatives)}", *rules)


GPT_OSS = Dialect(
    name="gpt-oss",
    reasoning_markers=(CHANNEL + "analysis" + MESSAGE, END),
    call_triggers=(" to=" + FUNCTIONS,),
    special_markers=(START, CHANNEL, MESSAGE, CONSTRAIN, END, CALL, RETURN),
    stop_after_call=(CALL,),
    program=run,
    grammar=call_grammar,
)
