"""The `get_weather` tool: today's weather from a fixed table of cities, so results are deterministic and
a corpus can be checked against them. A city outside the table gives "error: unknown city ..."."""

from __future__ import annotations

# city -> (temperature in °C, conditions). Hand-picked to spread over -10..35 °C.
WEATHER: dict[str, tuple[int, str]] = {
    "Amsterdam": (11, "rainy"), "Athens": (24, "sunny"), "Bangkok": (33, "humid"), "Barcelona": (21, "sunny"),
    "Beijing": (16, "hazy"), "Berlin": (9, "cloudy"), "Bogota": (14, "rainy"), "Boston": (7, "windy"),
    "Brussels": (10, "cloudy"), "Budapest": (13, "cloudy"), "Buenos Aires": (19, "sunny"),
    "Cairo": (30, "sunny"), "Cape Town": (18, "windy"), "Chicago": (4, "snowy"), "Copenhagen": (6, "windy"),
    "Delhi": (31, "hazy"), "Dubai": (35, "sunny"), "Dublin": (8, "rainy"), "Helsinki": (-3, "snowy"),
    "Hong Kong": (26, "humid"), "Istanbul": (17, "cloudy"), "Jakarta": (29, "stormy"), "Lagos": (28, "humid"),
    "Lima": (20, "foggy"), "Lisbon": (22, "sunny"), "London": (12, "foggy"), "Los Angeles": (23, "sunny"),
    "Madrid": (25, "sunny"), "Mexico City": (18, "cloudy"), "Montreal": (-2, "snowy"), "Moscow": (-7, "snowy"),
    "Mumbai": (32, "humid"), "Nairobi": (21, "cloudy"), "New York": (10, "rainy"), "Oslo": (-1, "snowy"),
    "Paris": (15, "cloudy"), "Prague": (5, "foggy"), "Reykjavik": (-5, "windy"), "Rome": (20, "sunny"),
    "Santiago": (16, "sunny"), "Seoul": (3, "windy"), "Shanghai": (14, "rainy"), "Singapore": (30, "stormy"),
    "Stockholm": (0, "cloudy"), "Sydney": (24, "sunny"), "Tokyo": (13, "rainy"), "Toronto": (2, "cloudy"),
    "Vienna": (8, "foggy"), "Warsaw": (1, "snowy"), "Zurich": (-4, "snowy"),
}
_BY_KEY = {name.lower(): name for name in WEATHER}


def get_weather(city: str) -> str:
    """"Paris: 15°C, cloudy", or "error: unknown city ..." (matching ignores case and extra spaces)."""
    name = _BY_KEY.get(" ".join(city.split()).lower())
    if name is None:
        return f"error: unknown city {city!r}"
    temperature, conditions = WEATHER[name]
    return f"{name}: {temperature}°C, {conditions}"
