"""The `calculator` tool: + - * / and parentheses over decimal numbers, evaluated exactly with Fractions
on a whitelisted `ast` (never eval), and `format_number`, the compact number style every tool result uses.
Bad input is reported as an "error: ..." string, never raised: the caller is a model."""

from __future__ import annotations

import ast
import math
from decimal import Decimal
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200
SIGNIFICANT_DIGITS = 10
# Spellings a user or model may copy from prose; mapped to Python operators before parsing.
_ALIASES = {"×": "*", "÷": "/", "−": "-"}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}


def calculate(expression: str) -> str:
    """The value of `expression` as compact text ("84", "0.3", "-2.5"), or "error: ..."."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"
    text = "".join(_ALIASES.get(ch, ch) for ch in expression.replace(" x ", " * ")).strip()
    if not text:
        return "error: empty expression"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return f"error: cannot parse {expression!r}"
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        return "error: division by zero"
    except ValueError as e:
        return f"error: {e}"
    try:
        return format_number(value)
    except OverflowError:
        return "error: result too large"


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):
            raise ValueError("number too large")
        # repr() gives back the literal as written (0.1 -> "0.1"), so Fraction holds it exactly: 0.1+0.2 = 0.3.
        return Fraction(repr(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    raise ValueError(f"unsupported {what}: only numbers, + - * / and parentheses are allowed")


def format_number(value: float | int | Fraction, digits: int = SIGNIFICANT_DIGITS) -> str:
    """Integers without ".0", others rounded to `digits` significant digits, in plain (not exponent)
    notation between 1e-6 and 1e16: 84, 0.3333333333, -2.5, 0.00001, 1.5e+20."""
    if isinstance(value, Fraction) and value.denominator == 1 and abs(value) < 10**16:
        return str(value.numerator)
    x = float(value)
    text = f"{x:.{digits}g}"
    if "e" in text and 1e-6 <= abs(x) < 1e16:
        text = format(Decimal(text), "f")
    return "0" if text == "-0" else text
