"""GBNF grammar text, checked as hostile input before llama.cpp ever sees it.

The parser follows llama.cpp's own (``llama_grammar_parser`` in src/llama-grammar.cpp of
the llama.cpp that llama-cpp-python 0.3.36 vendors) closely enough to refuse what it
refuses, but says where, as ``line L, column C``. On top of that it refuses what
llama.cpp accepts and then crashes or hangs on, found by running each shape against the
real library in a throw-away process:

* ``x{5,2}`` (minimum above maximum): the parser's unsigned ``max - min`` wraps around
  and it builds rules until memory runs out, holding the thread forever.
* left recursion hidden behind rules that can match empty text (``a ::= b a "x"``,
  ``b ::= "" | "y"``): llama.cpp's own check only sees alternatives that are literally
  empty, so it misses these and its stack expansion never ends.
* repeating something that can match empty text (``("x"?){0,200}``): legal, but the
  number of live parse stacks, and with it the time per token, grows without bound.
* groups nested thousands deep: the recursive C++ parser overflows its stack (SIGSEGV).
* terminals no token can ever produce (``[z-a]``, a class excluding every character,
  ``"\\x00"``): the first sampled token is then refused by the grammar and llama.cpp
  aborts the process.
* a NUL character: llama.cpp reads a C string and silently drops the rest.

The parser is iterative (an explicit stack of open groups), so deep nesting costs a
refusal, never a ``RecursionError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_CHARS = 256 * 1024  # the JSON grammar of a large schema is tens of KiB
MAX_REPEAT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD; above it llama.cpp errs or silently drops the bound
MAX_RULES_PER_REPETITION = 2000  # llama.cpp refuses when rules-in-item x repetitions exceeds this
MAX_NESTING = 1000  # a schema's maxLength of 1000 nests 1000 groups; the C++ parser survives far more
MAX_ELEMENTS = 200_000  # grammar elements after llama.cpp expands repetitions
MAX_CODE_POINT = 0x10FFFF

_TERMINAL = -1  # a symbol that consumes input (character, class, any, token)
_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


class GbnfError(ValueError):
    """A grammar llama.cpp would refuse, crash or hang on; says where."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.reason = message
        self.line = line
        self.column = column


@dataclass
class Grammar:
    """What checking a grammar learnt about it."""

    rules: list[str]  # defined rule names, in order of first definition
    name_spans: list[tuple[int, int]]  # every rule name in the text (definitions and references)
    tokens: list[int]  # token ids the grammar requires (``<[id]>``), for a check against the vocabulary
    elements: int  # llama.cpp grammar elements after expansion


def check(text: str) -> Grammar:
    """Check GBNF ``text``; return what was learnt or raise ``GbnfError``."""
    return _Parser(text).run()


def rename_rules(text: str, prefix: str) -> str:
    """``text`` with every rule name prefixed by ``prefix`` (``text`` must pass ``check``).

    Lets several generated grammars share one file without their rule names colliding.
    """
    out, last = [], 0
    for start, end in check(text).name_spans:
        out.append(text[last:start])
        out.append(prefix + text[start:end])
        last = end
    out.append(text[last:])
    return "".join(out)


def _is_word(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "-")


@dataclass
class _Node:
    """A nonterminal of the grammar as llama.cpp will expand it: a rule, a group or a repetition."""

    label: str  # "rule 'name'", "group" or the repetition operator
    position: int
    alternatives: list[list[int]] = field(default_factory=list)
    defined: bool = True


@dataclass
class _Item:
    """The item a repetition operator applies to (llama.cpp's ``last_sym_start`` to the end)."""

    symbol: int  # _TERMINAL or a node index
    inline: int  # grammar elements it occupies in its rule
    rules: int  # llama.cpp's ``n_prev_rules``: rules the item made, multiplied by repetitions


@dataclass
class _Frame:
    """A rule body or a group being parsed."""

    node: int
    nested: bool
    opened_at: int
    symbols_before: int
    sequence: list[int] = field(default_factory=list)
    last: _Item | None = None


@dataclass
class _Repetition:
    node: int
    item: int
    optional_copies: bool
    operator: str
    position: int


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.nodes: list[_Node] = []
        self.named: dict[str, int] = {}
        self.first_use: dict[str, int] = {}
        self.symbols = 0  # llama.cpp's symbol_ids.size(): names seen plus rules it generated
        self.name_spans: list[tuple[int, int]] = []
        self.tokens: list[int] = []
        self.elements = 0
        self.repetitions: list[_Repetition] = []
        self.order: list[str] = []

    # ------------------------------------------------------------------ driver

    def run(self) -> Grammar:
        self._screen()
        self._space(newlines=True)
        while self.pos < len(self.text):
            self._rule()
        self._check_references()
        nullable = self._nullable()
        self._check_repetitions(nullable)
        self._check_left_recursion(nullable)
        if self.elements > MAX_ELEMENTS:
            raise self._error(f"the grammar expands to {self.elements} elements; the limit is {MAX_ELEMENTS}", 0)
        return Grammar(self.order, self.name_spans, self.tokens, self.elements)

    def _screen(self) -> None:
        text = self.text
        if len(text) > MAX_CHARS:
            raise GbnfError(f"the grammar is {len(text)} characters long; the limit is {MAX_CHARS}", 1, 1)
        nul = text.find("\x00")
        if nul >= 0:
            raise self._error("NUL character (llama.cpp would silently ignore everything after it)", nul)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise self._error("lone surrogate: the grammar is not valid Unicode", exc.start) from None

    def _error(self, message: str, position: int | None = None) -> GbnfError:
        position = self.pos if position is None else position
        line = self.text.count("\n", 0, position) + 1
        column = position - (self.text.rfind("\n", 0, position) + 1) + 1
        return GbnfError(message, line, column)

    def _where(self, position: int) -> str:
        error = self._error("", position)
        return f"line {error.line}, column {error.column}"

    def _peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def _found(self) -> str:
        char = self._peek()
        return f"found {char!r}" if char else "found the end of the grammar"

    # ----------------------------------------------------------------- lexing

    def _space(self, newlines: bool) -> None:
        text, pos = self.text, self.pos
        while pos < len(text):
            char = text[pos]
            if char == "#":
                while pos < len(text) and text[pos] not in "\r\n":
                    pos += 1
            elif char in " \t" or (newlines and char in "\r\n"):
                pos += 1
            else:
                break
        self.pos = pos

    def _name(self) -> str:
        start = self.pos
        while _is_word(self._peek()):
            self.pos += 1
        if self.pos == start:
            raise self._error(f"expected a rule name, {self._found()}")
        self.name_spans.append((start, self.pos))
        return self.text[start:self.pos]

    def _integer(self, what: str) -> int:
        start = self.pos
        while self._peek().isascii() and self._peek().isdigit():
            self.pos += 1
        if self.pos == start:
            raise self._error(f"expected {what}, {self._found()}")
        return int(self.text[start:self.pos])

    def _char(self) -> int:
        """One character of a literal or class, escapes decoded; returns its code point."""
        start = self.pos
        char = self._peek()
        if not char:
            raise self._error("unexpected end of the grammar")
        if char != "\\":
            self.pos += 1
            return ord(char)
        kind = self._peek(1)
        if kind in _ESCAPES:
            self.pos += 2
            return ord(_ESCAPES[kind])
        if kind in _HEX_DIGITS:
            size = _HEX_DIGITS[kind]
            digits = self.text[self.pos + 2:self.pos + 2 + size]
            if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self._error(f"'\\{kind}' must be followed by {size} hex digits", start)
            self.pos += 2 + size
            value = int(digits, 16)
            if value > MAX_CODE_POINT:
                raise self._error(f"'\\{kind}{digits}' is not a Unicode code point", start)
            return value
        shown = f"'\\{kind}'" if kind else "'\\' at the end"
        raise self._error(f"unknown escape {shown}; use \\t \\r \\n \\\\ \\\" \\[ \\] \\- \\xHH \\uHHHH "
                          "or \\UHHHHHHHH", start)

    # ----------------------------------------------------------------- grammar

    def _node(self, label: str, position: int) -> int:
        self.nodes.append(_Node(label, position))
        return len(self.nodes) - 1

    def _named(self, name: str, position: int) -> int:
        index = self.named.get(name)
        if index is None:
            index = self.named[name] = self._node(f"rule '{name}'", position)
            self.nodes[index].defined = False
            self.first_use[name] = position
            self.symbols += 1
        return index

    def _rule(self) -> None:
        start = self.pos
        if not _is_word(self._peek()):
            raise self._error(self._unexpected("expected a rule name"))
        name = self._name()
        node = self._named(name, start)
        self._space(newlines=False)
        if self.text[self.pos:self.pos + 3] != "::=":
            raise self._error(f"expected '::=' after the rule name '{name}', {self._found()}")
        self.pos += 3
        self._space(newlines=True)
        # A later definition replaces an earlier one, as in llama.cpp.
        self.nodes[node] = _Node(f"rule '{name}'", start)
        if name not in self.order:
            self.order.append(name)
        self._body(node)
        char = self._peek()
        if char == "\r":
            self.pos += 2 if self._peek(1) == "\n" else 1
        elif char == "\n":
            self.pos += 1
        elif char:
            raise self._error(self._unexpected(f"expected a newline or the end of the grammar after rule '{name}'"))
        self._space(newlines=True)

    def _unexpected(self, default: str) -> str:
        char = self._peek()
        if self.text.startswith("::=", self.pos):
            return ("a rule name followed by '::=' inside a rule: an empty rule body reads on across the newline "
                    "into the next rule (write \"\" for a rule that matches empty text)")
        if char == ")":
            return "unbalanced ')': no group is open here"
        if char == "]":
            return "unbalanced ']': no character class is open here"
        if char == "|":
            return "'|' at the start of a line: at the top level an alternative continues only after a '|' that " \
                   "ends the previous line (or wrap the alternatives in parentheses)"
        return f"{default}, {self._found()}"

    def _body(self, rule_node: int) -> None:
        """Parse the alternatives of a rule, with any groups in them, without recursion."""
        frames = [_Frame(rule_node, nested=False, opened_at=self.pos, symbols_before=self.symbols)]
        while frames:
            frame = frames[-1]
            char = self._peek()
            if char == "(":
                if len(frames) > MAX_NESTING:
                    raise self._error(f"groups nest more than {MAX_NESTING} deep")
                opened = self.pos
                self.pos += 1
                self._space(newlines=True)
                symbols_before = self.symbols
                self.symbols += 1  # the group's own rule
                group = self._node("group", opened)
                frames.append(_Frame(group, nested=True, opened_at=opened, symbols_before=symbols_before))
            elif char and char in "*+?{":
                self._repetition(frame)
            elif char == "|":
                self._end_alternative(frame)
                self.pos += 1
                self._space(newlines=True)
            elif (char and char in "\"[<!.") or _is_word(char):
                frame.last = self._terminal_or_reference()
                if frame.last is not None:  # an empty literal adds nothing, and leaves nothing to repeat
                    frame.sequence.append(frame.last.symbol)
                    self.elements += frame.last.inline
                self._space(newlines=frame.nested)
            else:
                self._end_alternative(frame)
                frames.pop()
                if frame.nested:
                    self._close_group(frame, frames[-1])

    def _end_alternative(self, frame: _Frame) -> None:
        self.nodes[frame.node].alternatives.append(frame.sequence)
        self.elements += 1  # the ALT or END element
        frame.sequence = []
        frame.last = None

    def _close_group(self, frame: _Frame, parent: _Frame) -> None:
        if self._peek() != ")":
            raise self._error(f"unbalanced '(': no ')' closes this group (at {self._where(self.pos)}, "
                              f"{self._found()})", frame.opened_at)
        self.pos += 1
        self._space(newlines=parent.nested)
        rules = max(1, self.symbols - frame.symbols_before)
        parent.last = _Item(frame.node, 1, rules)
        parent.sequence.append(frame.node)
        self.elements += 1

    def _terminal_or_reference(self) -> _Item | None:
        char = self._peek()
        start = self.pos
        if char == '"':
            return self._literal()
        if char == "[":
            return self._class()
        if char in "<!":
            self._token()
            return _Item(_TERMINAL, 1, 1)
        if char == ".":
            self.pos += 1
            return _Item(_TERMINAL, 1, 1)
        name = self._name()
        return _Item(self._named(name, start), 1, 1)

    def _literal(self) -> _Item | None:
        opened = self.pos
        self.pos += 1
        size = 0
        while self._peek() != '"':
            if not self._peek():
                raise self._error("unterminated string: this '\"' is never closed", opened)
            at = self.pos
            if self._char() == 0:
                raise self._error("'\\x00' can never be generated (llama.cpp ends text at NUL)", at)
            size += 1
        self.pos += 1
        return _Item(_TERMINAL, size, 1) if size else None

    def _class(self) -> _Item:
        opened = self.pos
        self.pos += 1
        negated = self._peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        while self._peek() != "]":
            if not self._peek():
                raise self._error("unterminated character class: this '[' is never closed", opened)
            at = self.pos
            low = high = self._char()
            if self._peek() == "-" and self._peek(1) != "]":
                self.pos += 1
                if not self._peek():
                    raise self._error("unexpected end of the grammar in a character range")
                high = self._char()
                if high < low:
                    raise self._error(f"the range {chr(low)!r}-{chr(high)!r} is reversed and matches nothing", at)
            ranges.append((low, high))
        self.pos += 1
        if not ranges:
            raise self._error("empty character class (llama.cpp would read it as empty text); write \"\" for "
                              "nothing or . for any character", opened)
        if not _class_matches_something(ranges, negated):
            raise self._error("this character class matches no character a model can generate", opened)
        return _Item(_TERMINAL, len(ranges) + sum(1 for low, high in ranges if low != high), 1)

    def _token(self) -> None:
        start = self.pos
        negated = self._peek() == "!"
        if negated:
            self.pos += 1
            if self._peek() != "<":
                raise self._error(f"expected '<' after '!', {self._found()}")
        self.pos += 1
        if self._peek() == "[":
            self.pos += 1
            token = self._integer("a token id")
            if token > 0xFFFFFFFF:
                raise self._error(f"token id {token} is too big", start)
            if self._peek() != "]" or self._peek(1) != ">":
                raise self._error(f"expected ']>' to close the token id, {self._found()}")
            self.pos += 2
            if not negated:
                self.tokens.append(token)
            return
        end = self.text.find(">", self.pos)
        if end < 0:
            raise self._error("this token is never closed with '>'", start)
        self.pos = end + 1

    def _repetition(self, frame: _Frame) -> None:
        start = self.pos
        operator = self._peek()
        self.pos += 1
        self._space(newlines=frame.nested)
        if operator == "*":
            low, high = 0, None
        elif operator == "+":
            low, high = 1, None
        elif operator == "?":
            low, high = 0, 1
        else:
            low, high = self._bounds(frame, start)
            operator = f"{{{low}}}" if low == high else f"{{{low},{'' if high is None else high}}}"
        item = frame.last
        if item is None:
            raise self._error(f"'{operator}' must follow the item it repeats", start)
        total = high if high else (low or 1)
        if item.rules * total > MAX_RULES_PER_REPETITION:
            raise self._error(f"'{operator}' repeats an item made of {item.rules} rules {total} times; llama.cpp "
                              f"refuses more than {MAX_RULES_PER_REPETITION} (make the repeated item simpler)", start)
        optional = 1 if high is None else high - low
        self.symbols += optional
        self.elements += optional * (item.inline + 3) - item.inline + item.inline * low + (1 if optional else 0)
        frame.sequence.pop()
        if low == 0 and optional == 0:  # x{0}: llama.cpp drops the item altogether
            frame.last = None
            return
        node = self._node(f"'{operator}'", start)
        self.nodes[node].alternatives = [[item.symbol]] if low else [[item.symbol], []]
        self.repetitions.append(_Repetition(node, item.symbol, high is None or high > max(low, 1), operator, start))
        frame.last = _Item(node, item.inline * low + (1 if optional else 0), item.rules * total)
        frame.sequence.append(node)

    def _bounds(self, frame: _Frame, opened: int) -> tuple[int, int | None]:
        low = self._integer("a number after '{'")
        self._space(newlines=frame.nested)
        high: int | None = low
        if self._peek() == ",":
            self.pos += 1
            self._space(newlines=frame.nested)
            high = self._integer("a number") if self._peek().isascii() and self._peek().isdigit() else None
            self._space(newlines=frame.nested)
        if self._peek() != "}":
            raise self._error(f"expected ',' or '}}' in the repetition at {self._where(opened)}, {self._found()}")
        self.pos += 1
        self._space(newlines=frame.nested)
        for bound in (low, high):
            if bound is not None and bound > MAX_REPEAT:
                raise self._error(f"repetition bound {bound} is above the limit of {MAX_REPEAT}", opened)
        if high is not None and low > high:
            raise self._error(f"repetition {{{low},{high}}} has its minimum above its maximum", opened)
        return low, high

    # ---------------------------------------------------------------- analysis

    def _check_references(self) -> None:
        for name, position in sorted(self.first_use.items(), key=lambda item: item[1]):
            if not self.nodes[self.named[name]].defined:
                raise self._error(f"undefined rule '{name}'", position)
        if "root" not in self.named or not self.nodes[self.named["root"]].defined:
            raise GbnfError("the grammar has no 'root' rule, where generation starts", 1, 1)

    def _nullable(self) -> list[bool]:
        """Which nodes can match empty text, through references too (not only literally empty).

        A worklist, linear in the grammar's size: each alternative counts the symbols not yet
        known to be nullable, and a node becomes nullable when one of its counts reaches zero.
        """
        nullable = [False] * len(self.nodes)
        pending: list[int] = []  # per alternative: symbols not yet known nullable
        owner: list[int] = []
        uses: list[list[int]] = [[] for _ in self.nodes]  # node -> alternatives it appears in
        ready: list[int] = []
        for index, node in enumerate(self.nodes):
            for alternative in node.alternatives:
                if _TERMINAL in alternative:
                    continue
                slot = len(pending)
                pending.append(len(alternative))
                owner.append(index)
                for symbol in alternative:
                    uses[symbol].append(slot)
                if not alternative:
                    ready.append(index)
        while ready:
            index = ready.pop()
            if nullable[index]:
                continue
            nullable[index] = True
            for slot in uses[index]:
                pending[slot] -= 1
                if pending[slot] == 0:
                    ready.append(owner[slot])
        return nullable

    def _check_repetitions(self, nullable: list[bool]) -> None:
        for repetition in self.repetitions:
            if repetition.optional_copies and repetition.item != _TERMINAL and nullable[repetition.item]:
                raise self._error(
                    f"'{repetition.operator}' repeats something that can match empty text; the ways to split "
                    "the output between repetitions multiply and llama.cpp's matching slows without bound "
                    "(make the repeated item non-empty)", repetition.position)

    def _check_left_recursion(self, nullable: list[bool]) -> None:
        """Refuse a cycle of leftmost references (through nullable prefixes); iterative DFS."""
        edges: list[list[int]] = []
        for node in self.nodes:
            targets = []
            for alternative in node.alternatives:
                for symbol in alternative:
                    if symbol == _TERMINAL:
                        break
                    targets.append(symbol)
                    if not nullable[symbol]:
                        break
            edges.append(targets)
        state = [0] * len(self.nodes)  # 0 new, 1 on the path, 2 done
        for start in range(len(self.nodes)):
            if state[start]:
                continue
            path, iterators = [start], [iter(edges[start])]
            state[start] = 1
            while path:
                following = next(iterators[-1], None)
                if following is None:
                    state[path.pop()] = 2
                    iterators.pop()
                elif state[following] == 1:
                    raise self._left_recursion(path[path.index(following):])
                elif state[following] == 0:
                    state[following] = 1
                    path.append(following)
                    iterators.append(iter(edges[following]))

    def _left_recursion(self, cycle: list[int]) -> GbnfError:
        named = [self.nodes[i] for i in cycle if self.nodes[i].label.startswith("rule ")]
        first = min(named or [self.nodes[i] for i in cycle], key=lambda node: node.position)
        chain = " -> ".join(self._describe(self.nodes[i]).removeprefix("rule ") for i in [*cycle, cycle[0]])
        return self._error(f"{self._describe(first)} is left-recursive ({chain}), which llama.cpp cannot match; "
                           "start the recursive alternative with text", first.position)

    def _describe(self, node: _Node) -> str:
        # Positions are worked out only here: counting lines for every group would be quadratic.
        return node.label if node.label.startswith("rule ") else f"{node.label} at {self._where(node.position)}"



def _class_matches_something(ranges: list[tuple[int, int]], negated: bool) -> bool:
    """Whether a class matches a code point from 1 to U+10FFFF (NUL is never generated)."""
    clipped = sorted((max(low, 1), min(high, MAX_CODE_POINT)) for low, high in ranges)
    clipped = [(low, high) for low, high in clipped if low <= high]
    if not negated:
        return bool(clipped)
    covered_to = 0  # everything from 1 to covered_to is excluded
    for low, high in clipped:
        if low > covered_to + 1:
            return True
        covered_to = max(covered_to, high)
    return covered_to < MAX_CODE_POINT
