"""The turns of the synthetic agent corpus (corpus.py): one user message with the assistant's reasoning,
tool calls, tool results and answer, from templated phrasings. Also the value partition: each split draws
the values a user types (numbers, dates, cities, names) from its own side of `split_of`.
Tool results come from running the real tools, so a turn can never contradict them.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

from glm47.tools import WEATHER, run_tool

UNKNOWN_CITIES = ["Atlantis", "Gotham", "Springfield", "Narnia", "Lyon", "Perth", "Quito", "Hanoi", "Kyiv",
                  "Riga", "Tromso", "El Dorado", "Port Royal", "Lilliput", "Zion", "Avalon", "Eden",
                  "Metropolis", "Shangri-La", "Wakanda"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Marco",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf",
         "Zoe", "Leo", "Mia", "Noah", "Ivy", "Raj", "Sofia", "Theo", "Amara", "Kenji", "Lucia"]


def made_up_words(kind: str, count: int) -> list[str]:
    """`count` invented names ("Tavoki") or places ("Port Belura"), the same on every call: with only a few
    dozen real names and cities the model learns the set instead of copying what the user typed, and fails on
    every held-out one. Hundreds of invented ones leave copying as the only strategy that works."""
    rng = random.Random(f"glm47-{kind}")
    onsets, vowels = "b d f g h k l m n p r s t v z br dr kr st th sh ch".split(), "a e i o u a e i o".split()
    words: dict[str, None] = {}
    while len(words) < count:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3))))
        word = word.capitalize() + rng.choice(("", "", "", "n", "r", "s"))
        if kind == "place" and rng.random() < 0.3:
            word = rng.choice(("Port", "San", "New", "Lake", "Mount")) + " " + word
        words[word] = None
    return list(words)


def split_of(value: str) -> str:
    """The split allowed to use `value`, written as in a user message ("12", "3.5", "2024-02-28", "Paris"):
    about 1 in 5 values is held out, by a hash that does not depend on the seed."""
    return "heldout" if zlib.crc32(value.encode()) % 5 == 0 else "train"


# Integer ranges by use: operands (int, mid, big), follow-up factors (small), day counts, temperatures.
INT_RANGES = {"small": (2, 12), "int": (2, 99), "mid": (100, 999), "big": (1000, 9999), "days": (2, 400),
              "temp": (-40, 120), "percent": (1, 99)}


@functools.cache
def _pool(kind: str, split: str) -> tuple[str, ...]:
    if kind == "decimal":
        values = [f"{i / 10:g}" for i in range(5, 1000) if i % 10]  # 0.5 .. 99.9, one decimal place
    elif kind == "date":
        values = [(date(2000, 1, 1) + timedelta(d)).isoformat() for d in range(365 * 36)]
    elif kind == "bad_date":  # the day after each short month's last day: 2023-02-29, 2024-02-30, 2023-04-31, ...
        values = [f"{y}-{m:02d}-{(date(y, m + 1, 1) - timedelta(1)).day + 1}" for y in range(2000, 2036)
                  for m in (2, 4, 6, 9, 11)]
    elif kind == "city":
        values = list(WEATHER)
    elif kind == "unknown_city":
        values = UNKNOWN_CITIES + made_up_words("place", 300)
    elif kind == "name":
        values = NAMES + made_up_words("name", 400)
    else:
        lo, hi = INT_RANGES[kind]
        values = [str(abs(v)) for v in range(lo, hi + 1)]  # a sign is added later; "-5" partitions as "5"
    pool = tuple(dict.fromkeys(v for v in values if split_of(v) == split))
    assert pool, (kind, split)
    return pool


class Values:
    """Draws the values a user types, each from its own split's side of the partition."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split = rng, split

    def pick(self, kind: str, exclude: Iterable[str] = ()) -> str:
        return self.rng.choice([v for v in _pool(kind, self.split) if v not in exclude])

    def operand(self) -> str:
        r = self.rng.random()
        kind = "int" if r < 0.55 else "mid" if r < 0.75 else "big" if r < 0.82 else "decimal"
        return self.pick(kind)

    def date_after(self, start: str, max_days: int = 500) -> str:
        base = date.fromisoformat(start)
        while True:  # ~1 in 5 dates is held out, so a few tries find one of this split
            end = (base + timedelta(self.rng.randint(1, max_days))).isoformat()
            if split_of(end) == self.split:
                return end


# ---- turns: one user message and everything the assistant does until it answers ---------------------------

@dataclass(slots=True)
class Turn:
    user: str
    rounds: list[tuple[str, list[tuple[str, dict, str]]]]  # per tool round: (reasoning, [(name, args, result)])
    reasoning: str  # before the answer
    content: str  # the answer
    answer: str
    facts: dict = field(default_factory=dict)  # what a follow-up question may refer to


def _call(name: str, **arguments) -> tuple[str, dict, str]:
    return name, arguments, run_tool(name, arguments)


def _pick(rng: random.Random, templates: list[str], **values) -> str:
    return rng.choice(templates).format(**values)


CALC_ASK = ["What is {q}?", "what's {q}", "Calculate {q}.", "Compute {q}", "Please work out {q}.",
            "Can you calculate {q}?", "How much is {q}?", "{q} = ?", "Solve {q}", "Quick question: what is {q}?",
            "I need the value of {q}.", "Evaluate {q}.", "What does {q} equal?", "Help me with {q}.",
            "Tell me {q}.", "Find {q}.", "What do you get for {q}?", "Could you compute {q} for me?", "{q}?",
            "Math time: {q}", "What's the result of {q}?", "Do the math: {q}", "I'd like to know {q}.",
            "Give me the answer to {q}.", "Work out {q} please", "Hey, what is {q}?", "Figure out {q}.",
            "Result of {q}?", "Please calculate {q}."]
OP_WORDS = {"+": ["+", "plus"], "-": ["-", "minus"], "*": ["*", "times", "x", "multiplied by"],
            "/": ["/", "divided by"]}
NAMED_OPS = [("+", ["What is the sum of {a} and {b}?", "Add {a} and {b}.", "Add {a} to {b}."]),
             ("*", ["What is the product of {a} and {b}?", "Multiply {a} by {b}."]),
             ("-", ["What is the difference between {a} and {b}?", "Subtract {b} from {a}.",
                    "Take {b} away from {a}."]),
             ("/", ["Divide {a} by {b}.", "What is {a} shared equally among {b}?"])]
CALC_THINK = ["The user wants {expr}. I will use the calculator.",
              "I need to compute {expr}. I will call the calculator.",
              "This is arithmetic: {expr}. I will use the calculator."]
CALC_DONE = ["The calculator returned {result}.", "The result is {result}.", "{expr} = {result}. I can answer."]
CALC_SAY = ["{expr} = {result}.", "The answer is {result}.", "It is {result}.", "The result is {result}."]


def _calc_turn(v: Values, expr: str | None = None, user: str | None = None) -> Turn:
    rng = v.rng
    if expr is None:
        a, b, c = v.operand(), v.operand(), v.operand()
        if rng.random() < 0.1:
            a = "-" + a
        op1, op2 = rng.choice("+-*/"), rng.choice("+-*/")
        shape = rng.choice(["words", "binary", "binary", "chain", "paren", "percent", "named"])
        if shape == "percent":
            p, a = v.pick("percent"), v.pick("int" if rng.random() < 0.5 else "mid")
            expr, q = f"{a} * {p} / 100", f"{p}% of {a}"
        elif shape == "named":
            op, templates = rng.choice(NAMED_OPS)
            expr, user = f"{a} {op} {b}", _pick(rng, templates, a=a, b=b)
        elif shape == "chain":
            expr = q = f"{a} {op1} {b} {op2} {c}"
        elif shape == "paren":
            expr = q = rng.choice([f"({a} {op1} {b}) {op2} {c}", f"{a} {op1} ({b} {op2} {c})"])
        else:
            expr = f"{a} {op1} {b}"
            q = f"{a} {rng.choice(OP_WORDS[op1]) if shape == 'words' else op1} {b}"
        user = user or _pick(rng, CALC_ASK, q=q)
    call = _call("calculator", expression=expr)
    result = call[2]
    return Turn(user, [(_pick(rng, CALC_THINK, expr=expr), [call])],
                _pick(rng, CALC_DONE, expr=expr, result=result), _pick(rng, CALC_SAY, expr=expr, result=result),
                result, {"type": "calc", "result": result})


WEATHER_ASK = ["What's the weather in {city}?", "What is the weather like in {city} today?",
               "How warm is it in {city}?", "Is it cold in {city} right now?", "Weather in {city}?",
               "Tell me the weather in {city}.", "What's the temperature in {city}?", "How hot is it in {city} today?",
               "Do I need a jacket in {city} today?", "Check the weather in {city}, please.",
               "Can you look up the weather for {city}?", "What are the conditions in {city}?",
               "Is it raining in {city}?", "How is the weather in {city}?", "Give me the current weather for {city}.",
               "I'm flying to {city}. What's the weather there?", "What's it like outside in {city}?",
               "Current temperature in {city}?", "Could you check {city}'s weather?",
               "Any idea what the weather is in {city}?", "Is it sunny in {city}?", "weather {city}",
               "How's the weather in {city} today?", "What's the forecast for {city} today?",
               "Please get the weather in {city}."]
WEATHER_THINK = ["The user asks about the weather in {city}. I will call get_weather.",
                 "I need the weather in {city}. I will use get_weather."]
WEATHER_SAY = ["In {city} it is {t}°C and {cond}.", "{city}: {t}°C, {cond}.", "It is {t}°C and {cond} in {city}.",
               "The weather in {city} is {cond}, {t}°C."]


def _weather_turn(v: Values, city: str | None = None, user: str | None = None) -> Turn:
    rng = v.rng
    city = city or v.pick("city")
    t, cond = WEATHER[city]
    user = user or _pick(rng, WEATHER_ASK, city=city)
    return Turn(user, [(_pick(rng, WEATHER_THINK, city=city), [_call("get_weather", city=city)])],
                f"{city} is {t}°C and {cond}.", _pick(rng, WEATHER_SAY, city=city, t=t, cond=cond), f"{t}°C",
                {"type": "weather", "city": city, "t": t})


# unit symbol -> how users write it (passed to the tool verbatim: it knows these spellings)
UNIT_WORDS = {"km": ["km", "kilometers", "kilometres"], "m": ["meters", "m", "metres"], "cm": ["cm", "centimeters"],
              "mm": ["mm", "millimeters"], "mi": ["miles", "mi"], "ft": ["feet", "ft"], "in": ["inches"],
              "yd": ["yards"], "kg": ["kg", "kilograms"], "g": ["grams", "g"], "lb": ["pounds", "lb", "lbs"],
              "oz": ["ounces", "oz"], "t": ["tonnes"], "l": ["liters", "litres", "l"], "ml": ["ml", "milliliters"],
              "gal": ["gallons"], "cup": ["cups"], "°C": ["Celsius", "°C", "degrees Celsius"],
              "°F": ["Fahrenheit", "°F", "degrees Fahrenheit"], "K": ["Kelvin", "K"]}
UNIT_PAIRS = [("km", "mi"), ("m", "ft"), ("cm", "in"), ("mm", "in"), ("yd", "m"), ("m", "km"), ("kg", "lb"),
              ("g", "oz"), ("t", "kg"), ("lb", "oz"), ("l", "gal"), ("ml", "cup"), ("l", "ml"), ("°C", "°F"),
              ("°C", "K"), ("°F", "K")]
CONVERT_ASK = ["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?", "{v} {f} in {t}?",
               "How much is {v} {f} in {t}?", "Please convert {v} {f} into {t}.", "Can you turn {v} {f} into {t}?",
               "I have {v} {f}. How many {t} is that?", "What's {v} {f} expressed in {t}?", "{v} {f} to {t}",
               "How many {t} are in {v} {f}?", "Change {v} {f} to {t}, please.", "Convert {v} {f} into {t} for me.",
               "What do {v} {f} come to in {t}?", "If something is {v} {f}, what is it in {t}?",
               "Express {v} {f} in {t}.", "Quick conversion: {v} {f} to {t}.", "I need {v} {f} in {t}.",
               "Could you convert {v} {f} to {t}?", "Tell me {v} {f} in {t}.",
               "What is the equivalent of {v} {f} in {t}?", "{v} {f} equals how many {t}?"]
CONVERT_THINK = ["The user wants {v} {f} in {t}. I will call convert_units.",
                 "This is a unit conversion from {f} to {t}. I will use convert_units."]
CONVERT_SAY = ["{v} {f} is {r} {ts}.", "That is {r} {ts}.", "{v} {f} = {r} {ts}.", "It comes to {r} {ts}."]


def _convert_turn(v: Values, pair: tuple[str, str] | None = None, words: tuple[str, str] | None = None,
                  ask: list[str] | None = None) -> Turn:
    rng = v.rng
    source, target = pair or rng.choice(UNIT_PAIRS)
    if pair is None and rng.random() < 0.5:
        source, target = target, source
    fw, tw = words or (rng.choice(UNIT_WORDS[source]), rng.choice(UNIT_WORDS[target]))
    if source in ("°C", "°F", "K"):
        value = v.pick("temp")
        value = "-" + value if source != "K" and rng.random() < 0.2 else value
    else:
        value = v.pick("decimal") if rng.random() < 0.25 else v.pick(rng.choice(["int", "int", "mid"]))
    number = float(value) if "." in value else int(value)
    call = _call("convert_units", value=number, from_unit=fw, to_unit=tw)
    r, ts = _result_value(call[2])
    user = _pick(rng, ask or CONVERT_ASK, v=value, f=fw, t=tw)
    return Turn(user, [(_pick(rng, CONVERT_THINK, v=value, f=fw, t=tw), [call])], f"The tool says {call[2]}.",
                _pick(rng, CONVERT_SAY, v=value, f=fw, r=r, ts=ts), r,
                {"type": "convert", "pair": (source, target), "words": (fw, tw)})


def _result_value(result: str) -> tuple[str, str]:
    """("8.0467", "km") from convert_units' "5 mi = 8.0467 km"."""
    number, unit = result.split(" = ")[1].split(" ", 1)
    return number, unit


DATE_ADD_ASK = ["What date is {n} days after {d}?", "What is {d} plus {n} days?", "Add {n} days to {d}.",
                "What's the date {n} days from {d}?", "If today is {d}, what date is it in {n} days?",
                "My trip starts on {d} and lasts {n} days. When does it end?", "{n} days after {d} is which date?",
                "Which date comes {n} days after {d}?", "A task is due {n} days after {d}. What is the due date?",
                "Count {n} days forward from {d}.", "What will the date be {n} days after {d}?",
                "Starting {d}, what's the date after {n} days?", "I start on {d}. Where am I after {n} days?",
                "What is the date {n} days later than {d}?"]
DATE_SUB_ASK = ["What date was {n} days before {d}?", "What is {d} minus {n} days?", "Go back {n} days from {d}.",
                "If today is {d}, what was the date {n} days ago?", "Subtract {n} days from {d}.",
                "Which date is {n} days before {d}?", "What was the date {n} days earlier than {d}?",
                "Count {n} days back from {d}."]
DATE_SAY = ["{n} days {dir} {d} is {r}.", "The date is {r}.", "It is {r}.", "That is {r}."]


def _date_add_turn(v: Values, start: str | None = None, ask: list[str] | None = None, bad: bool = False) -> Turn:
    rng = v.rng
    d = start or v.pick("bad_date" if bad else "date")
    n = v.pick("days")
    back = rng.random() < 0.3 and not start
    days = -int(n) if back else int(n)
    direction = "before" if back else "after"
    user = _pick(rng, ask or (DATE_SUB_ASK if back else DATE_ADD_ASK), n=n, d=d)
    call = _call("date_add", date=d, days=days)
    think = f"The user wants the date {n} days {direction} {d}. I will call date_add with {days} days."
    if bad:
        return Turn(user, [(think, [call])], f"{d} is not a real date.",
                    f"{d} is not a valid date, so I cannot add days to it.", "not a valid date")
    r = call[2]
    return Turn(user, [(think, [call])], f"{n} days {direction} {d} is {r}.",
                _pick(rng, DATE_SAY, n=n, dir=direction, d=d, r=r), r, {"type": "date", "result": r})


DAYS_ASK = ["How many days are there between {a} and {b}?", "How many days from {a} to {b}?",
            "Count the days from {a} until {b}.", "What's the number of days between {a} and {b}?",
            "How long is it from {a} to {b} in days?", "I leave on {a} and return on {b}. How many days is that?",
            "Days between {a} and {b}?", "How many days until {b} if today is {a}?",
            "From {a} to {b}, how many days pass?", "How many days separate {a} and {b}?",
            "Tell me the days between {a} and {b}.", "Number of days from {a} to {b}?",
            "If I start on {a}, how many days until {b}?", "Compute the days from {a} to {b}."]
DAYS_SAY = ["There are {n} days from {a} to {b}.", "It is {n} days.", "{a} to {b} is {n} days.", "That is {n} days."]


def _days_turn(v: Values) -> Turn:
    rng = v.rng
    a = v.pick("date")
    b = v.date_after(a)
    call = _call("days_between", start=a, end=b)
    n = call[2].split()[0]
    think = f"The user wants the days from {a} to {b}. I will call days_between."
    return Turn(_pick(rng, DAYS_ASK, a=a, b=b), [(think, [call])], f"days_between returned {n} days.",
                _pick(rng, DAYS_SAY, n=n, a=a, b=b), n, {"type": "days", "n": n})


# ---- turns with several tool calls -------------------------------------------------------------------------

WARMER_ASK = ["Which is warmer, {a} or {b}?", "Is it warmer in {a} or in {b}?",
              "Compare the weather in {a} and {b}. Which is warmer?", "Where is it warmer today, {a} or {b}?",
              "{a} or {b}: which one is warmer right now?", "I can visit {a} or {b}. Which is warmer?",
              "Which city is warmer today: {a} or {b}?", "Is {a} warmer than {b} today?",
              "Check {a} and {b} and tell me which is warmer."]
FAHRENHEIT_ASK = ["What's the temperature in {city} in Fahrenheit?", "How warm is {city} in Fahrenheit?",
                  "Give me the temperature of {city} in °F.",
                  "What is the temperature in {city} in degrees Fahrenheit?",
                  "I use Fahrenheit. How warm is it in {city}?", "Tell me how hot {city} is, in Fahrenheit.",
                  "{city} temperature in Fahrenheit?"]
TOTAL_ASK = ["I have {a} {f} and {b} {t}. What is the total in {t}?", "What is {a} {f} plus {b} {t}, in {t}?",
             "Add {a} {f} and {b} {t}. Give the total in {t}.", "How much is {a} {f} and {b} {t} together, in {t}?",
             "Sum {a} {f} and {b} {t}, in {t}."]
WEEKS_ASK = ["How many weeks are there between {a} and {b}?", "How many weeks from {a} to {b}?",
             "In weeks, how long is it from {a} to {b}?", "Count the weeks from {a} until {b}."]


def _warmer_turn(v: Values) -> Turn:
    a = v.pick("city")
    b = v.pick("city", exclude=[c for c in WEATHER if WEATHER[c][0] == WEATHER[a][0]])
    (ta, _), (tb, _) = WEATHER[a], WEATHER[b]
    w, l = (a, b) if ta > tb else (b, a)
    tw, tl = max(ta, tb), min(ta, tb)
    calls = [_call("get_weather", city=a), _call("get_weather", city=b)]
    return Turn(_pick(v.rng, WARMER_ASK, a=a, b=b),
                [(f"I need the weather in {a} and {b}. I will call get_weather for both.", calls)],
                f"{a} is {ta}°C and {b} is {tb}°C, so {w} is warmer.",
                f"{w} is warmer: {tw}°C versus {tl}°C in {l}.", f"{w} is warmer",
                {"type": "weather", "city": b, "t": tb})


def _fahrenheit_turn(v: Values, city: str | None = None, user: str | None = None) -> Turn:
    city = city or v.pick("city")
    t = WEATHER[city][0]
    rounds = []
    if user is None:  # a follow-up already knows the temperature; a fresh question looks it up first
        rounds.append((f"The user wants the temperature in {city} in Fahrenheit. First I will call get_weather.",
                       [_call("get_weather", city=city)]))
    call = _call("convert_units", value=t, from_unit="Celsius", to_unit="Fahrenheit")
    f = _result_value(call[2])[0]
    rounds.append((f"{city} is {t}°C. Now I will convert {t} Celsius to Fahrenheit.", [call]))
    return Turn(user or _pick(v.rng, FAHRENHEIT_ASK, city=city), rounds, f"{t}°C is {f}°F.",
                f"It is {f}°F ({t}°C) in {city}.", f"{f}°F", {"type": "weather", "city": city, "t": t})


def _total_turn(v: Values) -> Turn:
    rng = v.rng
    source, target = rng.choice([p for p in UNIT_PAIRS if p[0] not in ("°C", "°F")])
    if rng.random() < 0.5:
        source, target = target, source
    fw, tw = rng.choice(UNIT_WORDS[source]), rng.choice(UNIT_WORDS[target])
    a, b = v.pick("int"), v.pick(rng.choice(["int", "decimal"]))
    convert = _call("convert_units", value=int(a), from_unit=fw, to_unit=tw)
    r, ts = _result_value(convert[2])
    add = _call("calculator", expression=f"{r} + {b}")
    return Turn(_pick(rng, TOTAL_ASK, a=a, b=b, f=fw, t=tw),
                [(f"I must convert {a} {fw} to {tw} first, then add {b}.", [convert]),
                 (f"{a} {fw} is {r} {ts}. Now I will add {b} with the calculator.", [add])],
                f"{r} + {b} = {add[2]}.", f"The total is {add[2]} {ts}.", add[2],
                {"type": "calc", "result": add[2]})


def _weeks_turn(v: Values) -> Turn:
    a = v.pick("date")
    b = v.date_after(a, 900)
    between = _call("days_between", start=a, end=b)
    n = between[2].split()[0]
    divide = _call("calculator", expression=f"{n} / 7")
    return Turn(_pick(v.rng, WEEKS_ASK, a=a, b=b),
                [("I will count the days with days_between, then divide by seven.", [between]),
                 (f"There are {n} days. Now I will compute {n} / 7.", [divide])],
                f"{n} / 7 = {divide[2]}.", f"That is {divide[2]} weeks ({n} days).", divide[2],
                {"type": "calc", "result": divide[2]})


# ---- turns without a tool, and tool errors -----------------------------------------------------------------

GREETINGS = ["Hi!", "Hello", "Hey there!", "Good morning!", "Good evening.", "Hi, how are you?", "Hello there.",
             "Hey!", "Good afternoon!", "Hiya", "Greetings!", "Hello, anyone there?", "Hi assistant.", "Yo!",
             "Morning!", "Hey, how's it going?"]
THANKS = ["Thanks!", "Thank you.", "Thanks a lot!", "Great, thank you!", "Perfect, thanks.", "Cheers!",
          "Thank you so much!", "That helps, thanks.", "Awesome, thanks!", "Many thanks.", "ok thanks",
          "Nice, thank you."]
IDENTITY = ["Who are you?", "What can you do?", "What tools do you have?", "What are you?", "Can you help me?",
            "What kind of questions can you answer?", "Introduce yourself.", "What are you good at?",
            "How can you help?"]
OUT_OF_SCOPE = ["Write a poem about the sea.", "What is the capital of France?", "Tell me a joke.",
                "Who painted the Mona Lisa?", "Translate 'good night' into French.", "What's the meaning of life?",
                "Recommend a good book.", "Can you book a flight for me?", "What is the population of Japan?",
                "Explain quantum physics.", "Who is the president of the United States?", "Write an email to my boss.",
                "Send a message to my mom.", "Play some music.", "What is the best programming language?",
                "Summarize the news today.", "How do I bake bread?", "What's the stock price of Apple?",
                "Set an alarm for tomorrow.", "Who won the last World Cup?"]
NAME_INTRO = ["Hi, I'm {name}.", "My name is {name}.", "Hello! I am {name}.", "Call me {name}.",
              "I'm {name}, nice to meet you."]
NAME_ASK = ["What is my name?", "Do you remember my name?", "What did I say my name was?", "Who am I?"]
CAPABILITIES = "I can calculate, convert units, check the weather and work with dates."
SORRY = "Sorry, I can only help with arithmetic, unit conversions, the weather and dates."


def chat_turn(v: Values, first: bool = True) -> Turn:
    """A turn without a tool: greeting, thanks, what-can-you-do, out of scope, or the user's name."""
    rng = v.rng
    r = rng.random()
    if r < 0.15 or (first and r < 0.25):  # "Thanks!" only makes sense after another turn
        return Turn(rng.choice(GREETINGS), [], "The user greets me. No tool is needed.", f"Hello! {CAPABILITIES}",
                    "Hello")
    if r < 0.4:
        return Turn(rng.choice(THANKS), [], "The user thanks me. No tool is needed.",
                    rng.choice(["You're welcome!", "You're welcome! Anything else?"]), "welcome")
    if r < 0.55:
        return Turn(rng.choice(IDENTITY), [], "The user asks what I can do. No tool is needed.",
                    f"I am GLM, a small assistant. {CAPABILITIES}", "I can calculate")
    if r < 0.8:
        return Turn(rng.choice(OUT_OF_SCOPE), [], "None of my tools can answer this. I will say so briefly.", SORRY,
                    "Sorry")
    name = v.pick("name")
    facts = {"type": "name", "name": name}
    if rng.random() < 0.5:
        return Turn(_pick(rng, NAME_INTRO, name=name), [], f"The user's name is {name}. No tool is needed.",
                    f"Nice to meet you, {name}! How can I help?", name, facts)
    user = _pick(rng, NAME_INTRO, name=name) + " " + rng.choice(NAME_ASK)
    return Turn(user, [], f"The user said their name is {name}.", f"Your name is {name}.", name, facts)


def error_turn(v: Values) -> Turn:
    """A call that fails (unknown city, division by zero, impossible date) and an answer that says why."""
    rng = v.rng
    r = rng.random()
    if r < 0.45:
        city = v.pick("unknown_city")
        call = _call("get_weather", city=city)
        return Turn(_pick(rng, WEATHER_ASK, city=city), [(_pick(rng, WEATHER_THINK, city=city), [call])],
                    f"The tool has no data for {city}.", f"Sorry, I have no weather data for {city}.",
                    "no weather data")
    if r < 0.75:
        a = v.operand()
        user = rng.choice(["What is {a} divided by zero?", "Divide {a} by zero.", "Calculate {a} over zero.",
                           "What do I get if I divide {a} by zero?"]).format(a=a)
        expr = f"{a} / 0"  # "zero" in words: every digit a user types belongs to one split
        return Turn(user, [(_pick(rng, CALC_THINK, expr=expr), [_call("calculator", expression=expr)])],
                    "Division by zero is undefined.", f"{expr} is undefined: division by zero is not allowed.",
                    "division by zero")
    return _date_add_turn(v, bad=True)


SINGLE_TOOL = [_calc_turn, _calc_turn, _weather_turn, _convert_turn, _date_add_turn, _days_turn]
MULTI_TOOL = [_warmer_turn, _fahrenheit_turn, _total_turn, _weeks_turn]


def follow_up(v: Values, facts: dict) -> Turn | None:
    """A question that refers back to the previous turn, or None when that turn offers nothing to refer to."""
    rng, kind = v.rng, facts.get("type")
    if kind == "weather":
        city, t = facts["city"], facts["t"]
        r = rng.random()
        if r < 0.4:
            other = v.pick("city", exclude=[city])
            q = rng.choice(["And in {c}?", "What about {c}?", "And {c}?", "How about {c}?", "Now {c}, please."])
            return _weather_turn(v, other, q.format(c=other))
        if r < 0.7:
            q = rng.choice(["What is that in Fahrenheit?", "And in Fahrenheit?", "Convert that to Fahrenheit.",
                            "How much is that in °F?"])
            return _fahrenheit_turn(v, city, q)
        q = rng.choice(["What was the temperature in {c} again?", "Remind me, how warm was {c}?",
                        "Sorry, what did you say the temperature in {c} was?"]).format(c=city)
        return Turn(q, [], f"I already know this: {city} is {t}°C. No tool is needed.", f"It was {t}°C in {city}.",
                    f"{t}°C")
    if kind == "calc" and "e" not in facts["result"]:  # "3e+20 * 4" would teach an odd expression
        result, k = facts["result"], v.pick("small")
        op, q = rng.choice([("*", "Multiply that by {k}."), ("*", "Now times {k}."), ("*", "And that times {k}?"),
                            ("+", "Add {k} to that."), ("+", "Plus {k}?"), ("-", "Now subtract {k}."),
                            ("/", "Divide that by {k}.")])
        return _calc_turn(v, f"{result} {op} {k}", q.format(k=k))
    if kind == "convert":
        return _convert_turn(v, facts["pair"], facts["words"], ["And {v} {f}?", "What about {v} {f}?", "Now {v} {f}."])
    if kind == "date":
        return _date_add_turn(v, facts["result"], ["And {n} days after that?", "What about {n} days after that?",
                                                   "Add {n} more days."])
    if kind == "days":
        q = rng.choice(["How many weeks is that?", "And in weeks?", "What is that in weeks?"])
        return _calc_turn(v, f"{facts['n']} / 7", q)
    if kind == "name":
        name = facts["name"]
        return Turn(rng.choice(NAME_ASK), [], f"The user told me their name: {name}.", f"Your name is {name}.", name)
    return None


def fresh_turn(v: Values, first: bool = True) -> Turn:
    """A new request: a single tool (50 %), several tools (20 %), no tool (20 %) or a failing call (10 %)."""
    r = v.rng.random()
    if r < 0.5:
        return v.rng.choice(SINGLE_TOOL)(v)
    if r < 0.7:
        return v.rng.choice(MULTI_TOOL)(v)
    return chat_turn(v, first) if r < 0.9 else error_turn(v)
