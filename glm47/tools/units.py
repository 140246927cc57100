"""The `convert_units` tool: length, mass, volume and temperature from one fixed table. Each unit is a
factor to its dimension's base unit (metre, kilogram, litre); temperature is affine, so it has its own
formulas. Results keep 5 significant digits ("5 mi = 8.0467 km"); bad input gives "error: ..."."""

from __future__ import annotations

from glm47.tools.calculator import format_number

SIGNIFICANT_DIGITS = 5
# symbol -> (dimension, factor to the base unit); the symbol is how results spell the unit.
UNITS: dict[str, tuple[str, float]] = {
    "mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
    "in": ("length", 0.0254), "ft": ("length", 0.3048), "yd": ("length", 0.9144), "mi": ("length", 1609.344),
    "mg": ("mass", 1e-6), "g": ("mass", 0.001), "kg": ("mass", 1.0), "t": ("mass", 1000.0),
    "oz": ("mass", 0.028349523125), "lb": ("mass", 0.45359237),
    "ml": ("volume", 0.001), "l": ("volume", 1.0), "cup": ("volume", 0.2365882365),
    "gal": ("volume", 3.785411784), "fl oz": ("volume", 0.0295735295625),
    "°C": ("temperature", 1.0), "°F": ("temperature", 1.0), "K": ("temperature", 1.0),
}
# Other spellings (compared lower-case, spaces kept) -> symbol.
ALIASES = {
    "millimeter": "mm", "millimetre": "mm", "centimeter": "cm", "centimetre": "cm", "meter": "m",
    "metre": "m", "kilometer": "km", "kilometre": "km", "inch": "in", "inches": "in", "foot": "ft",
    "feet": "ft", "yard": "yd", "mile": "mi", "milligram": "mg", "gram": "g", "kilogram": "kg", "kilo": "kg",
    "ton": "t", "tonne": "t", "ounce": "oz", "pound": "lb", "lbs": "lb", "milliliter": "ml",
    "millilitre": "ml", "liter": "l", "litre": "l", "gallon": "gal", "fluid ounce": "fl oz",
    "c": "°C", "celsius": "°C", "degrees celsius": "°C", "f": "°F", "fahrenheit": "°F",
    "degrees fahrenheit": "°F", "k": "K", "kelvin": "K",
}


def unit_symbol(name: str) -> str | None:
    """The table's symbol for a unit spelled `name` ("Miles" -> "mi", "celsius" -> "°C"), or None."""
    key = " ".join(name.strip().split())
    if key in UNITS:
        return key
    key = key.lower()
    for candidate in (key, key.removesuffix("s"), key.removesuffix("es")):
        symbol = candidate if candidate in UNITS else ALIASES.get(candidate)
        if symbol is not None:
            return symbol
    return {"°c": "°C", "°f": "°F"}.get(key)


def convert_value(value: float, source: str, target: str) -> float:
    """`value` in unit `source` expressed in `target` (both table symbols of one dimension)."""
    if UNITS[source][0] == "temperature":
        celsius = {"°C": value, "°F": (value - 32) * 5 / 9, "K": value - 273.15}[source]
        return {"°C": celsius, "°F": celsius * 9 / 5 + 32, "K": celsius + 273.15}[target]
    return value * UNITS[source][1] / UNITS[target][1]


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """"5 mi = 8.0467 km", or "error: ..." for an unknown unit or a cross-dimension request."""
    source, target = unit_symbol(from_unit), unit_symbol(to_unit)
    for given, symbol in ((from_unit, source), (to_unit, target)):
        if symbol is None:
            return f"error: unknown unit {given!r}"
    if UNITS[source][0] != UNITS[target][0]:
        return f"error: cannot convert {UNITS[source][0]} ({source}) to {UNITS[target][0]} ({target})"
    result = convert_value(value, source, target)
    return f"{format_number(value)} {source} = {format_number(result, SIGNIFICANT_DIGITS)} {target}"
