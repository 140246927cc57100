"""The web chat page at / in headless Chromium (Debian's `chromium`, driven by playwright): with an API key set
in the page, a message is sent, the reply streams in with its reasoning in a collapsible block, the model's call
of a built-in tool is shown, run on the server and its result shown, and the answer built from it follows.
.ci/run installs chromium; without it (or playwright) the test is skipped, saying so."""

from __future__ import annotations

import shutil

import httpx
import pytest
from server_util import running

from glm47.chat import Tokenizer
from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

CALL = ("I will compute it.</think>Computing.<tool_call>calculator<arg_key>expression</arg_key>"
        "<arg_value>23 * 47 + 5</arg_value></tool_call>")
ANSWER = "The tool gave 1086.</think>23 * 47 + 5 = 1086."
pytestmark = pytest.mark.slow  # a real browser


def reply(prompt: str) -> str:
    return ANSWER if "<tool_response>1086</tool_response>" in prompt else CALL


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def test_the_page_streams_a_reply_with_its_reasoning_and_a_tool_round_trip(browser):
    tok = Tokenizer.default()
    with running(create_app(ScriptedEngine(tok, reply), tok, ServerConfig(api_key="k"))) as url:
        assert httpx.get(url + "/web/tools").status_code == 401  # the page's tool routes need the key too
        page = browser.new_page()
        page.goto(url + "/")
        assert page.title() == "glm47 chat"
        page.fill("#key", "k")
        page.dispatch_event("#key", "change")
        page.fill("#input", "What is 23 * 47 + 5?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant .answer').length === 2 && "
                               "!document.querySelector('#send').disabled", timeout=30_000)
        assert page.inner_text(".user") == "What is 23 * 47 + 5?"
        answers = page.eval_on_selector_all(".assistant .answer", "els => els.map(e => e.textContent)")
        assert answers == ["Computing.", "23 * 47 + 5 = 1086."]
        reasoning = page.eval_on_selector_all("details.reasoning .reasoning-text", "els => els.map(e => e.textContent)")
        assert reasoning == ["I will compute it.", "The tool gave 1086."]
        assert page.eval_on_selector_all("details.reasoning", "els => els.every(e => !e.open)")  # folded after
        assert page.inner_text(".call") == 'tool call: calculator({"expression": "23 * 47 + 5"})'
        assert page.inner_text(".result") == "tool result: 1086"
        page.close()
