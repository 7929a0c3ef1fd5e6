"""JSON schema to GBNF, for ``response_format`` and for tool-call ``parameters``.

llama-cpp-python's converter (``llama_cpp.llama_grammar.SchemaConverter``) does the
work; this module makes it safe to hand it a stranger's schema:

* Checks the schema first and names the problem and where it is: an empty ``enum``,
  ``anyOf`` or ``oneOf`` (the converter writes an empty rule, which llama.cpp cannot
  parse, and the server used to crash on the NULL grammar), ``minItems`` above
  ``maxItems`` (the converter silently ignores the maximum), bounds above what
  llama.cpp can expand (``maxLength`` over 1000 is refused by llama.cpp; a bound of
  10**9 makes the converter build a string of that size), ``$ref`` that leads
  nowhere or only back to itself (a grammar rule equal to itself: left recursion,
  which llama.cpp refuses or loops on), size and depth.
* Resolves every local ``$ref`` itself and gives each target a unique name: the
  converter names a referenced rule after the last segment of its pointer, so two
  different ``#/$defs/item`` and ``#/properties/item`` used to share one rule, and it
  cannot follow a pointer into a list (``#/anyOf/0``).
* Escapes literals properly: the converter escapes quotes but not backslashes, so an
  ``enum`` value containing ``"`` produced a broken grammar, and one containing ``\\``
  a grammar for invalid JSON.
* Runs the produced grammar through ``grammar.gbnf.check`` like any other.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from errors import InvalidRequest
from grammar import gbnf

MAX_SCHEMA_CHARS = 64 * 1024  # the schema serialised as JSON
MAX_DEPTH = 32  # subschemas within subschemas
MAX_NODES = 5000  # subschemas in all
MAX_BOUND = 1000  # minItems, maxItems, minLength, maxLength and pattern quantifiers: llama.cpp's limit
MAX_ENUM = 1000
MAX_PATTERN_CHARS = 1000
TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}
BOUNDS = (("minItems", "maxItems"), ("minLength", "maxLength"))
UNIONS = ("anyOf", "oneOf", "allOf")
DATA_KEYWORDS = ("const", "enum", "default", "examples")  # hold JSON values, not schemas
# Regex escapes the converter turns into valid grammar text; others (\d, \w, \.) it copies verbatim into an
# invalid grammar.
PATTERN_ESCAPES = set("[](){}|*+?^$\\\"-trn")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
_RULE_NAME = re.compile(r"[^a-zA-Z0-9-]+")


class SchemaError(ValueError):
    """A schema this server cannot turn into a grammar; ``where`` is a path inside it."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(f"{message} (at {where})" if where else message)


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The GBNF grammar of documents matching ``schema``; raises ``InvalidRequest`` naming ``param``."""
    return convert(prepare(schema, param), param)


def prepare(schema: dict[str, Any], param: str) -> dict[str, Any]:
    """``schema`` checked, with every ``$ref`` pointing at a uniquely named entry of its ``$defs``."""
    try:
        _check_size(schema)
        _check_nodes(schema)
        return _flatten_refs(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"Invalid '{param}': {exc}", param=param) from None
    except RecursionError:
        raise InvalidRequest(f"Invalid '{param}': the schema is nested too deeply", param=param) from None


def convert(prepared: dict[str, Any], param: str) -> str:
    """Convert a ``prepare``d schema; raises ``InvalidRequest`` naming ``param``."""
    ok, text = _convert(json.dumps(prepared))  # not sort_keys: property order is the output's order
    if not ok:
        raise InvalidRequest(f"Invalid '{param}': {text}", param=param)
    return text


@lru_cache(maxsize=256)
def _convert(canonical: str) -> tuple[bool, str]:
    """(True, grammar) or (False, why); cached because agents send the same schema with every request."""
    try:
        converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        schema = converter.resolve_refs(json.loads(canonical), "input")
        converter.visit(schema, "")
        text = converter.format_grammar()
    except Exception as exc:  # the converter raises assertion, key, type and recursion errors alike
        return False, f"the JSON schema cannot be turned into a grammar: {_short(str(exc) or type(exc).__name__)}"
    try:
        gbnf.check(text)
    except gbnf.GbnfError as exc:
        return False, f"the JSON schema produced a grammar llama.cpp cannot use ({exc})"
    return True, text


class _Converter(SchemaConverter):
    """llama-cpp-python's converter with literals escaped completely (backslash included)."""

    def _format_literal(self, literal: str) -> str:
        escaped = literal.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_size(schema: dict[str, Any]) -> None:
    size = len(json.dumps(schema))  # parsed from JSON, so it serialises; RecursionError is the caller's
    if size > MAX_SCHEMA_CHARS:
        raise SchemaError(f"the schema is {size} characters of JSON; the limit is {MAX_SCHEMA_CHARS}")


# ------------------------------------------------------------------ the checks


def _subschemas(node: dict[str, Any], where: str) -> list[tuple[Any, str]]:
    """The places in ``node`` that hold schemas, with their paths."""
    found: list[tuple[Any, str]] = []
    for key in ("properties", "$defs", "definitions"):
        value = node.get(key)
        if isinstance(value, dict):
            found += [(child, f"{where}.{key}.{name}") for name, child in value.items()]
    for key in (*UNIONS, "prefixItems"):
        value = node.get(key)
        if isinstance(value, list):
            found += [(child, f"{where}.{key}[{i}]") for i, child in enumerate(value)]
    items = node.get("items")
    if isinstance(items, list):
        found += [(child, f"{where}.items[{i}]") for i, child in enumerate(items)]
    elif items is not None:
        found.append((items, f"{where}.items"))
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool):
        found.append((extra, f"{where}.additionalProperties"))
    return found


def _check_nodes(schema: dict[str, Any]) -> None:
    """Walk every subschema (iteratively) and check each one's keywords."""
    pending: list[tuple[Any, str, int]] = [(schema, "schema", 0)]
    count = 0
    while pending:
        node, where, depth = pending.pop()
        count += 1
        if count > MAX_NODES:
            raise SchemaError(f"the schema has more than {MAX_NODES} subschemas")
        if depth > MAX_DEPTH:
            raise SchemaError(f"subschemas nest more than {MAX_DEPTH} deep", where)
        if isinstance(node, bool):
            raise SchemaError("boolean schemas are not supported; use {} for any value", where)
        if not isinstance(node, dict):
            raise SchemaError(f"a schema must be a JSON object, not {type(node).__name__}", where)
        _check_keywords(node, where)
        pending += [(child, path, depth + 1) for child, path in _subschemas(node, where)]


def _check_keywords(node: dict[str, Any], where: str) -> None:
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))):
        raise SchemaError(f"only local references ('#' or '#/...') are supported, not {_short(str(ref), 80)!r}",
                          where)
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError("'enum' must list at least one value (an empty enum matches nothing)", where)
        if len(values) > MAX_ENUM:
            raise SchemaError(f"'enum' has {len(values)} values; the limit is {MAX_ENUM}", where)
    for key in UNIONS:
        if key in node and (not isinstance(node[key], list) or not node[key]):
            raise SchemaError(f"'{key}' must list at least one schema (an empty {key} matches nothing)", where)
    _check_type(node.get("type"), where)
    _check_object(node, where)
    _check_array(node, where)
    _check_bounds(node, where)
    if "pattern" in node:
        _check_pattern(node["pattern"], where)


def _check_type(kind: Any, where: str) -> None:
    kinds = kind if isinstance(kind, list) else [] if kind is None else [kind]
    if isinstance(kind, list) and not kind:
        raise SchemaError("'type' must name at least one type", where)
    for one in kinds:
        if one not in TYPES:
            raise SchemaError(f"unknown type {_short(repr(one), 60)}; use one of {', '.join(sorted(TYPES))}", where)


def _check_object(node: dict[str, Any], where: str) -> None:
    properties = node.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise SchemaError("'properties' must be an object", where)
        if "" in properties:
            raise SchemaError("a property name must not be empty", where)
    required = node.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise SchemaError("'required' must be a list of property names", where)
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, bool | dict):
        raise SchemaError("'additionalProperties' must be true, false or a schema", where)


def _check_array(node: dict[str, Any], where: str) -> None:
    items = node.get("items")
    if isinstance(items, list) and not items:
        raise SchemaError("'items' must not be an empty list", where)
    prefix = node.get("prefixItems")
    if prefix is not None and not isinstance(prefix, list):
        raise SchemaError("'prefixItems' must be a list of schemas", where)


def _check_bounds(node: dict[str, Any], where: str) -> None:
    for low_key, high_key in BOUNDS:
        low, high = node.get(low_key), node.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SchemaError(f"'{key}' must be a non-negative integer", where)
            if value > MAX_BOUND:
                raise SchemaError(f"'{key}' {value} is above the limit of {MAX_BOUND}", where)
        if low is not None and high is not None and low > high:
            raise SchemaError(f"'{low_key}' {low} is above '{high_key}' {high}: nothing can match", where)


def _check_pattern(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise SchemaError("'pattern' must be a string", where)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaError(f"'pattern' is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}", where)
    for match in re.finditer(r"\\(.?)", pattern):
        if match.group(1) not in PATTERN_ESCAPES:
            raise SchemaError(f"'pattern' escape '\\{match.group(1)}' is not supported; write a character class "
                              "such as [0-9] instead", where)
    for match in _QUANTIFIER.finditer(pattern):
        low = int(match.group(1) or 0)
        high = match.group(2)
        for bound in (low, int(high) if high else None):
            if bound is not None and bound > MAX_BOUND:
                raise SchemaError(f"'pattern' repetition {match.group(0)} is above the limit of {MAX_BOUND}", where)
        if high and low > int(high):
            raise SchemaError(f"'pattern' repetition {match.group(0)} has its minimum above its maximum", where)


# -------------------------------------------------------------------- $ref


def _pointer_target(root: dict[str, Any], pointer: str) -> Any:
    """Resolve a local JSON pointer (``#/a/b~1c/0``) in ``root``; raises ``SchemaError``."""
    target: Any = root
    for raw in pointer[2:].split("/") if pointer != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise SchemaError(f"'$ref' {_short(pointer, 80)!r} points at nothing ({part!r} is missing)")
    if not isinstance(target, dict):
        raise SchemaError(f"'$ref' {_short(pointer, 80)!r} points at a {type(target).__name__}, not a schema")
    return target


def _flatten_refs(root: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``root`` whose references all point at ``#/$defs/refN-name``, each target once."""
    names: dict[str, str] = {}
    order: list[str] = []

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(child) for child in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref not in names:
                _check_nodes(_pointer_target(root, ref))  # a pointer may lead where the walk did not go
                last = ref.rstrip("/").rsplit("/", 1)[-1] if ref != "#" else "root"
                names[ref] = f"ref{len(names)}-{_RULE_NAME.sub('-', last)[:32]}"
                order.append(ref)
            return {"$ref": f"#/$defs/{names[ref]}"}  # the converter ignores a $ref's siblings too
        if node.get("items") == {}:  # any item: the converter takes {} for absent and fails, so say nothing
            node = {key: value for key, value in node.items() if key != "items"}
        return {key: value if key in DATA_KEYWORDS else rewrite(value)
                for key, value in node.items() if key not in ("$defs", "definitions")}

    flat = rewrite(root)
    defs: dict[str, Any] = {}
    for ref in order:  # grows while targets are rewritten: their own references join the end
        defs[names[ref]] = rewrite(_pointer_target(root, ref))
    _refuse_reference_cycles(defs)
    if "$ref" in flat:  # the converter never looks beside a $ref, so it would not find the $defs
        flat = {"anyOf": [flat]}
    if defs:
        flat["$defs"] = defs
    return flat


def _transparent_refs(node: dict[str, Any]) -> list[str]:
    """Definitions ``node`` may turn into without consuming any text (its $ref, or a union member's)."""
    found, pending = [], [node]
    while pending:
        current = pending.pop()
        ref = current.get("$ref")
        if isinstance(ref, str):
            found.append(ref.removeprefix("#/$defs/"))
            continue
        for key in ("anyOf", "oneOf"):
            pending += [m for m in current.get(key) or [] if isinstance(m, dict)]
    return found


def _refuse_reference_cycles(defs: dict[str, Any]) -> None:
    """A definition that reaches itself through $ref and unions only is a rule equal to itself."""
    edges = {name: _transparent_refs(schema) for name, schema in defs.items()}
    for start in edges:
        path, seen, pending = {start: None}, {start}, [start]
        while pending:
            current = pending.pop()
            for following in edges.get(current, []):
                if following == start:
                    chain, at = [following], current
                    while at is not None:
                        chain.append(at)
                        at = path[at]
                    readable = " -> ".join(name.split("-", 1)[-1] for name in reversed(chain))
                    raise SchemaError(f"'$ref' cycle {readable} never reaches a value: a schema that refers to "
                                      "itself must do so inside an object property or an array item")
                if following not in seen:
                    seen.add(following)
                    path[following] = current
                    pending.append(following)
