"""The date tools: `date_add` (a date plus a number of days, either sign) and `days_between` (signed days
from one date to another), on ISO "YYYY-MM-DD" dates of the proleptic Gregorian calendar (datetime.date).
Bad dates and out-of-range results give "error: ..." strings."""

from __future__ import annotations

from datetime import date, timedelta


def parse_date(text: str) -> date | None:
    """`text` as a date when it is exactly YYYY-MM-DD and exists (2023-02-29 does not), else None."""
    text = text.strip()
    if len(text) != 10:  # fromisoformat also takes "20240102" and week dates; the tools promise one format
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def date_add(date: str, days: int) -> str:
    """"2024-03-01": `date` moved by `days` (negative goes back)."""
    start = parse_date(date)
    if start is None:
        return f"error: {date!r} is not a date like 2024-05-17"
    try:
        return (start + timedelta(days=days)).isoformat()
    except OverflowError:
        return "error: the result is outside the years 1-9999"


def days_between(start: str, end: str) -> str:
    """"29 days": how many days from `start` to `end` (negative when end is earlier)."""
    a, b = parse_date(start), parse_date(end)
    for given, parsed in ((start, a), (end, b)):
        if parsed is None:
            return f"error: {given!r} is not a date like 2024-05-17"
    n = (b - a).days
    return f"{n} day" if abs(n) == 1 else f"{n} days"
