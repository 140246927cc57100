"""The built-in tools: hand-worked calculator, conversion, weather and date results; every bad input comes
back as an "error: ..." string (the caller is a model), never as an exception."""

import json

import pytest

from glm47.tools import BUILTIN, TOOLS, calculate, convert_units, date_add, days_between, get_weather, run_tool
from glm47.tools import format_number, tool_definitions

CALCULATOR_CASES = [
    ("12 * 7", "84"),
    ("2 + 3 * 4", "14"),  # precedence
    ("(2 + 3) * 4", "20"),
    ("2 * (3 + 4) - 10 / 4", "11.5"),
    ("-3 + 5", "2"),  # unary minus
    ("-(2 + 3) * -2", "10"),
    ("--4", "4"),
    ("+7", "7"),
    ("0.1 + 0.2", "0.3"),  # exact decimals, not 0.30000000000000004
    ("3.5 * 2", "7"),  # an integral result drops ".0"
    ("10 / 4", "2.5"),
    ("1 / 3", "0.3333333333"),  # 10 significant digits
    ("2 / 3 * 3", "2"),
    ("100 * 15 / 100", "15"),
    ("12 × 3 ÷ 4", "9"),
    ("6 x 7", "42"),
    ("1 / 100000", "0.00001"),  # plain notation, not 1e-05
    ("123456789 * 10000000", "1234567890000000"),  # integers stay exact below 1e16
    ("123456789 * 1000000000", "1.23456789e+17"),
    ("0.5 * 1e20", "5e+19"),
]


@pytest.mark.parametrize("expression, expected", CALCULATOR_CASES)
def test_calculator_on_hand_worked_expressions(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression, error", [
    ("1 / 0", "error: division by zero"),
    ("5 / (3 - 3)", "error: division by zero"),
    ("", "error: empty expression"),
    ("2 +", "error: cannot parse '2 +'"),
    ("(1 + 2", "error: cannot parse '(1 + 2'"),
    ("__import__('os').system('ls')", "error: unsupported Call: only numbers, + - * / and parentheses are allowed"),
    ("x + 1", "error: unsupported Name: only numbers, + - * / and parentheses are allowed"),
    ("2 ** 1000000", "error: unsupported Pow: only numbers, + - * / and parentheses are allowed"),
    ("(1).__class__", "error: unsupported Attribute: only numbers, + - * / and parentheses are allowed"),
    ("'a' * 3", "error: unsupported Constant: only numbers, + - * / and parentheses are allowed"),
    ("True + 1", "error: unsupported Constant: only numbers, + - * / and parentheses are allowed"),
    ("1e999", "error: number too large"),
    ("1e300 * 1e300", "error: result too large"),
    ("1" * 201, "error: expression longer than 200 characters"),
])
def test_calculator_reports_bad_input_as_an_error_string(expression, error):
    assert calculate(expression) == error


@pytest.mark.parametrize("value, expected", [(84, "84"), (-0.0, "0"), (2.50, "2.5"), (1 / 3, "0.3333333333"),
                                             (1234567.891, "1234567.891"), (3e20, "3e+20")])
def test_format_number_is_compact(value, expected):
    assert format_number(value) == expected


@pytest.mark.parametrize("value, source, target, expected", [
    (5, "miles", "km", "5 mi = 8.0467 km"),
    (1, "inches", "cm", "1 in = 2.54 cm"),
    (3, "feet", "m", "3 ft = 0.9144 m"),
    (2.5, "kg", "lbs", "2.5 kg = 5.5116 lb"),
    (16, "ounces", "pounds", "16 oz = 1 lb"),
    (1, "gallon", "liters", "1 gal = 3.7854 l"),
    (500, "ml", "cups", "500 ml = 2.1134 cup"),
    (100, "Celsius", "Fahrenheit", "100 °C = 212 °F"),
    (-40, "°F", "°C", "-40 °F = -40 °C"),
    (37, "C", "F", "37 °C = 98.6 °F"),
    (0, "K", "degrees Celsius", "0 K = -273.15 °C"),
    (1500, "M", "Kilometres", "1500 m = 1.5 km"),
])
def test_convert_units_uses_the_fixed_table(value, source, target, expected):
    assert convert_units(value, source, target) == expected


def test_convert_units_refuses_unknown_units_and_mixed_dimensions():
    assert convert_units(3, "parsecs", "m") == "error: unknown unit 'parsecs'"
    assert convert_units(3, "m", "kg") == "error: cannot convert length (m) to mass (kg)"
    assert convert_units(3, "°C", "l") == "error: cannot convert temperature (°C) to volume (l)"


def test_weather_lookup_is_deterministic_and_ignores_case():
    assert get_weather("Paris") == "Paris: 15°C, cloudy"
    assert get_weather("  new   york ") == "New York: 10°C, rainy"
    assert get_weather("Helsinki") == "Helsinki: -3°C, snowy"
    assert get_weather("Atlantis") == "error: unknown city 'Atlantis'"


@pytest.mark.parametrize("start, days, expected", [
    ("2024-02-28", 1, "2024-02-29"),  # leap year
    ("2023-02-28", 1, "2023-03-01"),  # not a leap year
    ("2024-12-31", 1, "2025-01-01"),
    ("2024-03-01", -1, "2024-02-29"),
    ("2024-01-31", 30, "2024-03-01"),
    ("2000-02-28", 366, "2001-02-28"),  # 2000 is a leap year (divisible by 400)
    ("2024-05-17", 0, "2024-05-17"),
])
def test_date_add_crosses_month_and_leap_year_boundaries(start, days, expected):
    assert date_add(start, days) == expected


@pytest.mark.parametrize("start, end, expected", [
    ("2024-01-01", "2025-01-01", "366 days"),
    ("2023-01-01", "2024-01-01", "365 days"),
    ("2024-02-01", "2024-03-01", "29 days"),
    ("2100-02-01", "2100-03-01", "28 days"),  # 2100 is not a leap year
    ("2024-01-01", "2024-01-02", "1 day"),
    ("2024-03-01", "2024-02-28", "-2 days"),
])
def test_days_between_counts_signed_days(start, end, expected):
    assert days_between(start, end) == expected


def test_date_tools_refuse_impossible_dates():
    assert date_add("2023-02-29", 1) == "error: '2023-02-29' is not a date like 2024-05-17"
    assert date_add("20240102", 1) == "error: '20240102' is not a date like 2024-05-17"
    assert date_add("9999-12-31", 1) == "error: the result is outside the years 1-9999"
    assert days_between("2024-04-31", "2024-05-01") == "error: '2024-04-31' is not a date like 2024-05-17"


def test_run_tool_takes_a_dict_or_the_json_text_of_a_parsed_call():
    assert run_tool("calculator", {"expression": "(2 + 3) * 4"}) == "20"
    assert run_tool("convert_units", '{"value": 5, "from_unit": "miles", "to_unit": "km"}') == "5 mi = 8.0467 km"
    assert run_tool("date_add", {"date": "2024-02-28", "days": 2.0}) == "2024-03-01"  # an integral float is fine


@pytest.mark.parametrize("name, arguments, error", [
    ("search_web", {"q": "x"}, "error: unknown tool 'search_web'; available: calculator, convert_units, "
                               "get_weather, date_add, days_between"),
    ("get_weather", {}, "error: get_weather: missing argument 'city'"),
    ("get_weather", {"city": "Paris", "day": "monday"}, "error: get_weather: unexpected argument 'day' (takes city)"),
    ("date_add", {"date": "2024-01-01", "days": "ten"}, "error: date_add: argument 'days' must be an integer, got \"ten\""),
    ("date_add", {"date": "2024-01-01", "days": True}, "error: date_add: argument 'days' must be an integer, got true"),
    ("date_add", {"date": "2024-01-01", "days": 1.5}, "error: date_add: argument 'days' must be an integer, got 1.5"),
    ("convert_units", {"value": "5 km", "from_unit": "km", "to_unit": "m"},
     "error: convert_units: argument 'value' must be a number, got \"5 km\""),
    ("calculator", "{not json", "error: arguments are not JSON: '{not json'"),
    ("calculator", [1, 2], "error: arguments must be an object, got list"),
])
def test_run_tool_reports_bad_calls_as_error_strings(name, arguments, error):
    assert run_tool(name, arguments) == error


def test_every_definition_is_an_openai_function_with_typed_parameters():
    assert [t["function"]["name"] for t in TOOLS] == list(BUILTIN)
    for tool in TOOLS:
        assert tool["type"] == "function" and set(tool["function"]) == {"name", "description", "parameters"}
        props = tool["function"]["parameters"]["properties"]
        assert props and all(p["type"] in ("string", "number", "integer") for p in props.values())
    # Rendered into every training prompt: the five definitions stay small.
    assert sum(len(json.dumps(t, ensure_ascii=False)) for t in TOOLS) < 1100


def test_tool_definitions_selects_by_name_in_the_order_given():
    assert [t["function"]["name"] for t in tool_definitions(["get_weather", "calculator"])] == [
        "get_weather", "calculator"]
    assert tool_definitions() == TOOLS
    with pytest.raises(ValueError, match="unknown built-in tool"):
        tool_definitions(["calculator", "search_web"])
