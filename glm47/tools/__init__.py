"""Built-in tools for the agent loop and the training corpus: calculator, unit conversion, a weather table
and date arithmetic. Standard library only (no torch), deterministic, and every result is a short string.

    run_tool("calculator", {"expression": "(2 + 3) * 4"})   # -> "20"
"""

from glm47.tools.builtin import BUILTIN, TOOLS, Tool, run_tool, tool_definitions
from glm47.tools.calculator import calculate, format_number
from glm47.tools.dates import date_add, days_between
from glm47.tools.units import convert_units
from glm47.tools.weather import WEATHER, get_weather

__all__ = ["BUILTIN", "TOOLS", "Tool", "WEATHER", "calculate", "convert_units", "date_add", "days_between",
           "format_number", "get_weather", "run_tool", "tool_definitions"]
