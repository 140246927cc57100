"""The registry of built-in tools: each one's OpenAI definition next to its implementation, and
`run_tool`, which checks a call's arguments against the definition before running it. Descriptions are
kept short on purpose: the definitions are rendered into every prompt of a nano model's training corpus."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from glm47.tools.calculator import calculate
from glm47.tools.dates import date_add, days_between
from glm47.tools.units import convert_units
from glm47.tools.weather import get_weather

_PYTHON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,)}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    # parameter name -> JSON type ("string", "number", "integer"). All are required; the schema leaves out
    # "required" to keep the prompt short, run_tool enforces it.
    parameters: dict[str, str]
    run: Callable[..., str]

    @property
    def definition(self) -> dict:
        props = {key: {"type": kind} for key, kind in self.parameters.items()}
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": props}}}


BUILTIN: dict[str, Tool] = {t.name: t for t in [
    Tool("calculator", "Evaluate arithmetic with + - * / and parentheses.", {"expression": "string"}, calculate),
    Tool("convert_units", "Convert length, mass, volume or temperature.",
         {"value": "number", "from_unit": "string", "to_unit": "string"}, convert_units),
    Tool("get_weather", "Current weather in a city.", {"city": "string"}, get_weather),
    Tool("date_add", "Add days to a YYYY-MM-DD date.", {"date": "string", "days": "integer"}, date_add),
    Tool("days_between", "Days from one YYYY-MM-DD date to another.", {"start": "string", "end": "string"},
         days_between),
]}
TOOLS: list[dict] = [t.definition for t in BUILTIN.values()]


def tool_definitions(names: list[str] | None = None) -> list[dict]:
    """Definitions of the named built-in tools, in the order given (None: all, in TOOLS order)."""
    if names is None:
        return [t.definition for t in BUILTIN.values()]
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise ValueError(f"unknown built-in tool(s) {unknown}; known: {', '.join(BUILTIN)}")
    return [BUILTIN[n].definition for n in names]


def run_tool(name: str, arguments: Mapping[str, Any] | str) -> str:
    """The result text of calling built-in tool `name`; arguments as a dict or a JSON object text (as in a
    parsed ToolCall). Never raises on what a model writes: unknown tools, missing, extra or mistyped
    arguments all come back as "error: ..." strings the model can read and recover from."""
    tool = BUILTIN.get(name)
    if tool is None:
        return f"error: unknown tool {name!r}; available: {', '.join(BUILTIN)}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"error: arguments are not JSON: {arguments!r}"
    if not isinstance(arguments, Mapping):
        return f"error: arguments must be an object, got {type(arguments).__name__}"
    problem = _check_arguments(tool, arguments)
    if problem:
        return f"error: {name}: {problem}"
    values = {key: int(v) if tool.parameters[key] == "integer" else v for key, v in arguments.items()}
    return tool.run(**values)


def _check_arguments(tool: Tool, arguments: Mapping[str, Any]) -> str | None:
    for key in arguments:
        if key not in tool.parameters:
            return f"unexpected argument {key!r} (takes {', '.join(tool.parameters)})"
    for key, kind in tool.parameters.items():
        if key not in arguments:
            return f"missing argument {key!r}"
        value = arguments[key]
        # bool is an int subclass, and 3.0 is a fine integer: check the value, not just the Python type.
        integral_float = kind == "integer" and isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not (isinstance(value, _PYTHON_TYPES[kind]) or integral_float):
            article = "an" if kind == "integer" else "a"
            return f"argument {key!r} must be {article} {kind}, got {json.dumps(value, ensure_ascii=False)}"
    return None
