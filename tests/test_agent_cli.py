"""A real agent CLI against the server: Claude Code (`claude -p`, from the npm registry) asks the scripted engine,
which answers with a call to Claude Code's own Read tool; Claude Code must run it, send the file's contents back
as a tool_result, and print the answer the engine builds from that result. The CLI is installed once into
~/.cache/glm47/agent-cli (.ci/run does it first); the test is skipped, saying why, only where npm or the
registry cannot be reached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_server_util import running

from glm47.chat import Tokenizer
from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
CACHE = Path(os.environ.get("GLM47_AGENT_CLI_DIR", Path.home() / ".cache" / "glm47" / "agent-cli"))


@pytest.fixture(scope="module")
def claude() -> Path:
    binary = CACHE / "node_modules" / ".bin" / "claude"
    if not binary.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot fetch Claude Code from the npm registry")
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", CLAUDE_CODE],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("the npm registry did not answer within 10 minutes")
        if done.returncode != 0 or not binary.exists():
            pytest.skip(f"npm could not install {CLAUDE_CODE}: {done.stderr.strip().splitlines()[-1:]}")
    return binary


def test_claude_code_runs_the_scripted_tool_call_and_answers_from_its_result(claude, tmp_path):
    secret = "zebra-7731"
    notes = tmp_path / "notes.txt"
    notes.write_text(f"The secret word is {secret}.\n")
    results = []

    def reply(prompt: str) -> str:
        if "<tool_response>" in prompt:  # Claude Code ran the tool: answer from what it sent back
            result = prompt.rsplit("<tool_response>", 1)[1].split("</tool_response>", 1)[0]
            results.append(result)
            found = re.search(r"secret word is ([\w-]+)", result)
            return f"I read it.</think>The secret word is {found.group(1) if found else 'missing'}."
        return (f"I should read the file.</think>Reading it.<tool_call>Read<arg_key>file_path</arg_key>"
                f"<arg_value>{notes}</arg_value></tool_call>")

    tok = Tokenizer.default()
    engine = ScriptedEngine(tok, reply, max_model_len=200_000)
    with running(create_app(engine, tok, ServerConfig(api_key="k"))) as url:
        home = tmp_path / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "ANTHROPIC_BASE_URL": url, "ANTHROPIC_AUTH_TOKEN": "k",
               "ANTHROPIC_MODEL": "glm-4.7", "ANTHROPIC_SMALL_FAST_MODEL": "glm-4.7",
               "ANTHROPIC_DEFAULT_HAIKU_MODEL": "glm-4.7", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}
        done = subprocess.run([str(claude), "-p", f"What is the secret word in {notes}?", "--allowedTools", "Read"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert secret in results[0]  # the Read tool really ran: the file's text came back as its result
    assert f"The secret word is {secret}." in done.stdout
