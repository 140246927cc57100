"""Fixtures of the CLI tests."""

import pytest

from calculator_util import calculator_server


@pytest.fixture(scope="module")
def server():
    """(url, engine) of a real server whose scripted engine calls the built-in calculator (API key: KEY)."""
    with calculator_server() as s:
        yield s
