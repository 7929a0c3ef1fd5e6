"""The machinery every dialect shares: marker scanning, text sinks, the incremental JSON scanner."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialects.jsonscan import MAX_DEPTH, JsonScanner
from dialects.output import TextSink
from dialects.stream import markers

MARKERS = markers("<tool_call>", "<think>", "<|channel>", "<|channel>thought")


@pytest.mark.parametrize(("text", "final", "expected"), [
    ("plain text", False, (10, None)),
    ("text <tool_call> more", False, (5, "<tool_call>")),
    ("text <tool", False, (5, None)),  # a possible marker waits
    ("text <tool", True, (10, None)),  # unless the text is complete
    ("text <toolbox", False, (13, None)),
    ("a <|channel>", False, (2, None)),  # <|channel>thought may still come
    ("a <|channel>x", False, (2, "<|channel>")),
    ("a <|channel>thought", False, (2, "<|channel>thought")),
    ("<think><tool_call>", False, (0, "<think>")),
])
def test_markers_split_at_the_earliest_longest_marker(text: str, final: bool, expected: tuple[int, str | None]):
    assert MARKERS.split(text, final) == expected


def test_text_sink_trims_block_ends_and_keeps_inner_whitespace():
    out: list[str] = []
    sink = TextSink(out.append)
    for piece in ["\n\n  Hello", " ", " world", "\n", "\n"]:
        sink.write(piece)
    sink.boundary()
    sink.write("  next")
    assert out == ["Hello", "  world", "next"]


def test_text_sink_undoes_a_boundary_that_was_not_a_marker():
    out: list[str] = []
    sink = TextSink(out.append)
    sink.write("use ")
    sink.boundary()
    sink.undo_boundary()
    sink.write("functools")
    assert "".join(out) == "use functools"


def scan(pieces: list[str]) -> tuple[bool, str | None, str, int]:
    scanner, out, used = JsonScanner(), [], 0
    for piece in pieces:
        count, text = scanner.feed(piece)
        out.append(text)
        used += count
        if scanner.done or scanner.error:
            break
    if not scanner.done and scanner.error is None:
        scanner.end()
    return scanner.done, scanner.error, "".join(out), used


@pytest.mark.parametrize(("text", "value", "used"), [
    ('{"a": [1, 2.5e3, -0, true, null, {"b": "x\\"y}"}]} and then',
     {"a": [1, 2500.0, 0, True, None, {"b": 'x"y}'}]}, 49),
    ('"just a string" ', "just a string", 15),
    ("12", 12, 2),
    ("[]", [], 2),
    ('{"k": "\\u00e9\\n"}', {"k": "é\n"}, 17),
])
def test_scanner_stops_right_after_the_value(text: str, value, used: int):
    done, error, out, count = scan([text])
    assert (done, error, count) == (True, None, used)
    assert json.loads(out) == value


@pytest.mark.parametrize("text", ["[1,]", '{"a":1,}', '{"a" 1}', "[01]", "[tru]", '{"a":"\\q"}', "}", '{"a":1]', "-"])
def test_scanner_refuses_invalid_json(text: str):
    done, error, _, _ = scan([text])
    assert not done
    if text != "-":
        assert error is not None


def test_scanner_escapes_raw_control_characters_in_strings():
    done, _, out, _ = scan(['{"code": "line 1\nline\t2"}'])
    assert done
    assert json.loads(out) == {"code": "line 1\nline\t2"}


def test_scanner_refuses_deep_nesting():
    assert scan(["[" * (MAX_DEPTH + 1)])[1] == "nested too deeply"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(value=_JSON, indent=st.sampled_from([None, 1]), cuts=st.lists(st.integers(0, 300), max_size=6),
       tail=st.text(max_size=3))
def test_scanner_reads_any_json_however_cut(value, indent, cuts, tail):
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    whole = text + ("" if isinstance(value, int | float) and not isinstance(value, bool) else tail)
    bounds = [0, *sorted(c for c in cuts if c <= len(whole)), len(whole)]
    done, error, out, used = scan([whole[a:b] for a, b in itertools.pairwise(bounds)])
    assert (done, error, out) == (True, None, text)
    assert used == len(text)
