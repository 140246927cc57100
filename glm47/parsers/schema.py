"""What the request's tools say about parsing a call: which names exist, and the JSON types of each
parameter, used to turn an <arg_value> text into a JSON value. The chat template writes string values raw
and every other value as JSON, so decoding undoes exactly that where the schema allows it."""

from __future__ import annotations

import json
import math
import re

STRING, NULL = "string", "null"


class ToolSchemas:
    """Built from an OpenAI tools list ([{"type": "function", "function": {...}}]), bare function objects
    ({"name", "parameters"}) or Anthropic tools ({"name", "input_schema"}). tools=None means no list is
    known: every well-formed call is accepted, all its values untyped; tools=[] accepts no call at all.
    Malformed entries are skipped."""

    __slots__ = ("accepts_all", "_properties")

    def __init__(self, tools: list[dict] | None) -> None:
        self.accepts_all = tools is None
        self._properties: dict[str, dict] = {}
        for tool in tools or ():
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            schema = fn.get("parameters") or fn.get("input_schema") or {}
            props = schema.get("properties") if isinstance(schema, dict) else None
            self._properties[fn["name"]] = props if isinstance(props, dict) else {}

    def knows(self, name: str) -> bool:
        return self.accepts_all or name in self._properties

    def types(self, name: str, key: str) -> frozenset[str] | None:
        """The JSON types parameter `key` of tool `name` allows; None when unknown (untyped)."""
        return json_types(self._properties.get(name, {}).get(key))


def json_types(schema: object) -> frozenset[str] | None:
    """Union of the types a JSON schema allows, through "type" (a name or a list), anyOf/oneOf, OpenAPI's
    "nullable" and enum/const values. None when the schema does not restrict the type."""
    if not isinstance(schema, dict):
        return None
    types: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            for branch in branches:
                branch_types = json_types(branch)
                if branch_types is None:
                    return None  # one branch accepts anything, so the union does too
                types |= branch_types
    if not types:
        values = schema.get("enum") if isinstance(schema.get("enum"), list) else []
        if "const" in schema:
            values = [schema["const"]]
        types.update(_type_of(v) for v in values)
    if not types:
        return None
    if schema.get("nullable") is True:
        types.add(NULL)
    return frozenset(types)


def value_json(text: str, types: frozenset[str] | None) -> str:
    """JSON text of a parameter's value, from the raw text between <arg_value> and </arg_value>:
    - a string parameter (null allowed or not): the raw text as a string, or null for the bare word null
      when null is allowed (how the template writes None);
    - untyped: the JSON value when `text` parses, else the raw text as a string;
    - string plus other types (["integer", "string"]): the JSON value when it parses *and* is one of the
      other types; else the raw text (the template writes strings raw, so "5" means 5 here, "[x" a string);
    - no string type: the JSON value, retrying once with backslash-escapes undone ({\\"a\\": 1}), else raw.
    Nothing written into `text` makes this raise; NaN and Infinity are never produced (not JSON)."""
    if types is not None and STRING in types and types <= {STRING, NULL}:
        return "null" if text == "null" and NULL in types else string_json(text)
    value = _loads(text)
    if types is not None and STRING in types:
        if value is not _FAILED and (isinstance(value, str) or _type_of(value) not in _widen(types)):
            value = _FAILED
    elif value is _FAILED and types is not None and "\\" in text:
        value = _unescape(text)
    encoded = None if value is _FAILED else _dumps(value)
    return string_json(text) if encoded is None else encoded


def string_json(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


_FAILED = object()


def _reject(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def _finite(token: str) -> float:
    value = float(token)
    return value if math.isfinite(value) else _reject(token)  # 1e999 would come back as Infinity


def _loads(text: str, strict: bool = True) -> object:
    try:
        return json.loads(text, parse_constant=_reject, parse_float=_finite, strict=strict)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return _FAILED


def _dumps(value: object) -> str | None:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
_ESCAPE = re.compile(r'\\(["\\/ntrbf])')


def _unescape(text: str) -> object:
    # A value written as if inside a JSON string ({\"a\": 1}); raw control characters may appear once
    # \n is undone, hence strict=False in the retry.
    return _loads(_ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text), strict=False)


def _type_of(value: object) -> str:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: STRING, dict: "object", list: "array"}.get(type(value), "unknown")


def _widen(types: frozenset[str]) -> frozenset[str]:
    # Every integer is also a JSON-schema number.
    return types | {"integer"} if "number" in types else types
