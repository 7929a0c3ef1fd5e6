"""One JSON value read as it arrives: where it ends, whether it is valid so far, and its text.

Call arguments are streamed as the model writes them, so the parser must know, without waiting
for the end, that the text so far is the beginning of a valid JSON value and where that value
closes, even when a string inside it holds ``}`` or ``</tool_call>``. ``JsonScanner`` is a small
pushdown automaton over characters that runs of plain string characters skip in one regex step.

One leniency: a raw control character inside a string (a real newline in code a model writes)
is passed on escaped, so the text handed on is valid JSON where the model's was not quite.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dialects.stream import Input, Reader, Refused

MAX_DEPTH = 128  # deeper nesting is refused: json.loads would hit Python's recursion limit

_WS = re.compile(r"[ \t\n\r]+")
_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}

# states
_VALUE, _FIRST_VALUE, _FIRST_KEY, _KEY, _COLON, _AFTER = range(6)
_STRING, _ESCAPE, _UNICODE, _NUMBER_STATE, _LITERAL = range(6, 11)


class JsonScanner:
    """Reads one JSON value from pieces of text and stops right after it."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.state = _VALUE
        self.done = False
        self.error: str | None = None
        self._key = False
        self._token = ""
        self._hex = 0

    def feed(self, text: str) -> tuple[int, str]:
        """Consume what belongs to the value; return (characters consumed, text to pass on).

        After an error, the count stops before the offending character.
        """
        out: list[str] = []
        i, size = 0, len(text)
        while i < size and not self.done:
            if self.state == _STRING:
                run = _STRING_RUN.match(text, i)
                if run:
                    out.append(run.group())
                    i = run.end()
                    continue
            step = self._step(text, i, out)
            if self.error is not None:
                break  # i: where the invalid character is
            i = step
        return i, "".join(out)

    def end(self) -> bool:
        """The input ended: a top-level number ends with it. Returns whether the value is complete."""
        if self.state == _NUMBER_STATE and not self.stack and _NUMBER.fullmatch(self._token):
            self.done = True
        return self.done

    def _step(self, text: str, i: int, out: list[str]) -> int:
        """Handle the character at ``i``; return the next position (``i`` when it must be seen again)."""
        char, state = text[i], self.state
        if state == _STRING:
            if char == '"':
                self._string_closed()
            elif char == "\\":
                self.state = _ESCAPE
            else:
                char = _CONTROL.get(char) or f"\\u{ord(char):04x}"
        elif state == _ESCAPE:
            if char == "u":
                self.state, self._hex = _UNICODE, 0
            elif char in '"\\/bfnrt':
                self.state = _STRING
            else:
                return self._fail(f"bad escape \\{char}")
        elif state == _UNICODE:
            if char not in _HEX:
                return self._fail("bad \\u escape")
            self._hex += 1
            if self._hex == 4:
                self.state = _STRING
        elif state == _NUMBER_STATE:
            if char not in _NUMBER_CHARS:
                return i if self._number_closed() else self._fail(f"bad number {self._token!r}")
            self._token += char
        elif state == _LITERAL:
            word = _LITERALS[self._token[0]]
            if char != word[len(self._token)]:
                return self._fail(f"bad literal {self._token + char!r}")
            self._token += char
            if self._token == word:
                self._value_closed()
        else:
            space = _WS.match(text, i)
            if space:
                if state == _AFTER and not self.stack:
                    return i
                out.append(space.group())
                return space.end()
            return self._structure(char, i, out)
        out.append(char)
        return i + 1

    def _structure(self, char: str, i: int, out: list[str]) -> int:
        state = self.state
        if state in (_FIRST_KEY, _KEY):
            if char == "}" and state == _FIRST_KEY:
                return self._close(char, i, out)
            if char != '"':
                return self._fail(f"expected a key, got {char!r}")
            self.state, self._key = _STRING, True
        elif state == _COLON:
            if char != ":":
                return self._fail(f"expected ':', got {char!r}")
            self.state = _VALUE
        elif state == _AFTER:
            if char == "," and self.stack:
                self.state = _KEY if self.stack[-1] == "{" else _VALUE
            elif char in "}]":
                return self._close(char, i, out)
            else:
                return self._fail(f"expected ',' or a closing bracket, got {char!r}")
        elif char == "]" and state == _FIRST_VALUE:
            return self._close(char, i, out)
        elif not self._value_start(char):
            return 0
        out.append(char)
        return i + 1

    def _value_start(self, char: str) -> bool:
        if char in "{[":
            if len(self.stack) >= MAX_DEPTH:
                self._fail("nested too deeply")
                return False
            self.stack.append(char)
            self.state = _FIRST_KEY if char == "{" else _FIRST_VALUE
        elif char == '"':
            self.state, self._key = _STRING, False
        elif char == "-" or char.isdigit():
            self.state, self._token = _NUMBER_STATE, char
        elif char in _LITERALS:
            self.state, self._token = _LITERAL, char
        else:
            self._fail(f"expected a value, got {char!r}")
            return False
        return True

    def _close(self, char: str, i: int, out: list[str]) -> int:
        opener = "{" if char == "}" else "["
        if not self.stack or self.stack[-1] != opener:
            return self._fail(f"unbalanced {char!r}")
        self.stack.pop()
        out.append(char)
        self._value_closed()
        return i + 1

    def _string_closed(self) -> None:
        if self._key:
            self._key = False
            self.state = _COLON
        else:
            self._value_closed()

    def _number_closed(self) -> bool:
        if not _NUMBER.fullmatch(self._token):
            return False
        self._value_closed()
        return True

    def _value_closed(self) -> None:
        self.state = _AFTER
        if not self.stack:
            self.done = True

    def _fail(self, reason: str) -> int:
        self.error = reason
        return 0


def json_value(inp: Input, write: Callable[[str], None] | None = None) -> Reader:
    """Read one JSON value; pass its text to ``write`` as it arrives, or return it whole.

    Refuses invalid JSON and a value the input ends inside.
    """
    scanner = JsonScanner()
    parts: list[str] = []
    emit = write or parts.append
    while True:
        count, text = scanner.feed(inp.buf)
        inp.take(count)
        if scanner.error is not None:
            raise Refused(f"invalid JSON: {scanner.error}")
        if text:
            emit(text)
        if scanner.done or (inp.final and scanner.end()):
            return "".join(parts)
        if inp.final:
            raise Refused("the JSON ends before it closes")
        yield
