"""Real agent CLIs against the server, from the npm registry: Claude Code (`claude -p`, Anthropic Messages) and
Codex (`codex exec`, the Responses API). Each asks the scripted engine, which answers with a call of the CLI's own
tool (Claude Code's Read, Codex's exec_command); the CLI must run it, send the result back, and print the answer
the engine builds from that result. The CLIs are installed once into ~/.cache/glm47/agent-cli (.ci/run does it
first); a test is skipped, saying why, only where npm or the registry cannot be reached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from server_util import running

from glm47.chat import Tokenizer
from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
CODEX = "@openai/codex@0.171.0"
CACHE = Path(os.environ.get("GLM47_AGENT_CLI_DIR", Path.home() / ".cache" / "glm47" / "agent-cli"))
SECRET = "zebra-7731"
pytestmark = pytest.mark.slow  # two real CLIs in subprocesses (and their npm install, the first time)


def installed(package: str, command: str) -> Path:
    """The CLI's executable, installed from npm into CACHE when it is not there yet (or the test is skipped)."""
    binary = CACHE / "node_modules" / ".bin" / command
    if not binary.exists():
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not installed: cannot fetch {package} from the npm registry")
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", package],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("the npm registry did not answer within 10 minutes")
        if done.returncode != 0 or not binary.exists():
            pytest.skip(f"npm could not install {package}: {done.stderr.strip().splitlines()[-1:]}")
    return binary


def answer_from_result(prompt: str, results: list[str]) -> str:
    """The scripted engine's second turn: the answer, built from the tool's result in the prompt."""
    result = prompt.rsplit("<tool_response>", 1)[1].split("</tool_response>", 1)[0]
    results.append(result)
    found = re.search(r"secret word is ([\w-]+)", result)
    return f"I read it.</think>The secret word is {found.group(1) if found else 'missing'}."


def test_claude_code_runs_the_scripted_tool_call_and_answers_from_its_result(tmp_path):
    claude = installed(CLAUDE_CODE, "claude")
    notes = tmp_path / "notes.txt"
    notes.write_text(f"The secret word is {SECRET}.\n")
    results = []

    def reply(prompt: str) -> str:
        if "<tool_response>" in prompt:  # Claude Code ran the tool: answer from what it sent back
            return answer_from_result(prompt, results)
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
    assert SECRET in results[0]  # the Read tool really ran: the file's text came back as its result
    assert f"The secret word is {SECRET}." in done.stdout


def test_codex_runs_the_scripted_command_over_the_responses_api_and_answers_from_its_output(tmp_path):
    codex = installed(CODEX, "codex")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text(f"The secret word is {SECRET}.\n")
    results = []

    def reply(prompt: str) -> str:
        if "<tool_response>" in prompt:  # Codex ran the command: answer from its output
            return answer_from_result(prompt, results)
        return "Let me look.</think><tool_call>exec_command<arg_key>cmd</arg_key><arg_value>cat notes.txt</arg_value>" \
               "</tool_call>"

    tok = Tokenizer.default()
    engine = ScriptedEngine(tok, reply, max_model_len=200_000)
    with running(create_app(engine, tok, ServerConfig(api_key="k"))) as url:
        home = tmp_path / "home" / ".codex"
        home.mkdir(parents=True)
        (home / "config.toml").write_text(
            f'model = "glm-4.7"\nmodel_provider = "glm47"\n[model_providers.glm47]\nname = "glm47"\n'
            f'base_url = "{url}/v1"\nwire_api = "responses"\nenv_key = "GLM47_KEY"\n')
        env = {**os.environ, "HOME": str(home.parent), "CODEX_HOME": str(home), "GLM47_KEY": "k"}
        command = [str(codex), "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
                   "What is the secret word in notes.txt?"]
        done = subprocess.run(command, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert SECRET in results[0]  # the command really ran: its output came back as the call's result
    assert f"The secret word is {SECRET}." in done.stdout
