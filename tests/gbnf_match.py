"""A small GBNF recogniser for tests: does a grammar accept a whole text?

``grammar.gbnf.check`` proves llama.cpp will accept a grammar; this shows the grammar accepts
what it should, such as a chat template's own rendering of a tool call. It reads the subset the
schema converter and the dialects write (one rule per line; literals, classes, ``.``, groups,
``|``, ``?``, ``*``, ``+``, ``{m,n}``) and matches by sets of end positions, memoised per rule.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache

_RULE = re.compile(r"^([a-zA-Z0-9-]+)\s*::=\s*(.*)$")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^", "/": "/"}


@dataclass(frozen=True)
class Node:
    kind: str  # lit, cls, any, ref, seq, alt, rep
    value: object = None
    items: tuple[Node, ...] = ()
    low: int = 0
    high: int | None = None


class Grammar:
    def __init__(self, text: str) -> None:
        self.rules: dict[str, Node] = {}
        for line in text.splitlines():
            found = _RULE.match(line.strip())
            if found:
                self.rules[found.group(1)] = _Parser(found.group(2)).alternatives()

    def accepts(self, text: str, start: str = "root") -> bool:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20000))
        try:
            memo: dict[tuple[str, int], frozenset[int]] = {}
            return len(text) in self._ends(self.rules[start], text, 0, memo)
        finally:
            sys.setrecursionlimit(limit)

    def _ends(self, node: Node, text: str, pos: int, memo: dict) -> frozenset[int]:
        kind = node.kind
        if kind == "lit":
            return frozenset({pos + len(node.value)}) if text.startswith(node.value, pos) else frozenset()
        if kind in ("cls", "any"):
            if pos < len(text) and (kind == "any" or _in_class(node.value, text[pos])):
                return frozenset({pos + 1})
            return frozenset()
        if kind == "ref":
            key = (node.value, pos)
            if key not in memo:
                memo[key] = frozenset()
                memo[key] = self._ends(self.rules[node.value], text, pos, memo)
            return memo[key]
        if kind == "alt":
            return frozenset().union(*(self._ends(i, text, pos, memo) for i in node.items))
        if kind == "seq":
            current = frozenset({pos})
            for item in node.items:
                current = frozenset().union(*(self._ends(item, text, p, memo) for p in current))
                if not current:
                    break
            return current
        return self._repeat(node, text, pos, memo)

    def _repeat(self, node: Node, text: str, pos: int, memo: dict) -> frozenset[int]:
        (item,) = node.items
        reached, frontier, count = set(), {pos}, 0
        if node.low == 0:
            reached.add(pos)
        while frontier and (node.high is None or count < node.high):
            count += 1
            step = set().union(*(self._ends(item, text, p, memo) for p in frontier))
            frontier = step - reached if node.high is None else step
            if count >= node.low:
                reached |= step
        return frozenset(reached)


def _in_class(spec: tuple[bool, tuple[tuple[str, str], ...]], char: str) -> bool:
    negated, ranges = spec
    inside = any(low <= char <= high for low, high in ranges)
    return inside != negated


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def alternatives(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Node("alt", items=tuple(options))

    def sequence(self) -> Node:
        items = []
        while True:
            self.space()
            if self.pos >= len(self.text) or self.text[self.pos] in "|)":
                break
            items.append(self.postfix(self.atom()))
        return Node("seq", items=tuple(items))

    def atom(self) -> Node:
        char = self.text[self.pos]
        if char == '"':
            return Node("lit", self.literal())
        if char == "[":
            return Node("cls", self.char_class())
        if char == ".":
            self.pos += 1
            return Node("any")
        if char == "(":
            self.pos += 1
            inner = self.alternatives()
            assert self.text[self.pos] == ")"
            self.pos += 1
            return inner
        name = re.match(r"[a-zA-Z0-9-]+", self.text[self.pos:]).group()
        self.pos += len(name)
        return Node("ref", name)

    def postfix(self, node: Node) -> Node:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in "*+?":
                self.pos += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
                node = Node("rep", items=(node,), low=low, high=high)
            elif char == "{":
                end = self.text.index("}", self.pos)
                parts = self.text[self.pos + 1:end].split(",")
                low = int(parts[0] or 0)
                high = low if len(parts) == 1 else (int(parts[1]) if parts[1].strip() else None)
                self.pos = end + 1
                node = Node("rep", items=(node,), low=low, high=high)
            else:
                break
        return node

    def literal(self) -> str:
        self.pos += 1
        out = []
        while self.text[self.pos] != '"':
            out.append(self.char())
        self.pos += 1
        return "".join(out)

    def char_class(self) -> tuple[bool, tuple[tuple[str, str], ...]]:
        self.pos += 1
        negated = self.text[self.pos] == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.text[self.pos] != "]":
            low = self.char()
            high = low
            if self.text[self.pos] == "-" and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self.char()
            ranges.append((low, high))
        self.pos += 1
        return negated, tuple(ranges)

    def char(self) -> str:
        char = self.text[self.pos]
        if char != "\\":
            self.pos += 1
            return char
        code = self.text[self.pos + 1]
        if code in "xuU":
            size = {"x": 2, "u": 4, "U": 8}[code]
            value = chr(int(self.text[self.pos + 2:self.pos + 2 + size], 16))
            self.pos += 2 + size
            return value
        self.pos += 2
        return _ESCAPES[code]

    def peek(self) -> str:
        self.space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1


@lru_cache(maxsize=64)
def compiled(text: str) -> Grammar:
    return Grammar(text)
