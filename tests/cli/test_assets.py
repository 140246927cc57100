"""The embedded default model (glm47/assets/nano-glm47): what ships, and that it really thinks, calls the
built-in tools and answers with their results, through the same paths users take (LLM + agent loop, and
`glm47 chat`). Greedy decoding, so every value asserted here is what the shipped weights produce."""

import json
import subprocess
import sys

import pytest
import torch

from glm47.agent import run_agent
from glm47.assets import NANO_DIR, default_model_path
from glm47.engine.sampling import SamplingParams
from glm47.evaluate import evaluate_model
from glm47.llm import LLM
from glm47.chat import Tokenizer
from glm47.checkpoint.loader import load_model
from glm47.training.corpus import generate_examples
from glm47.training.recipe import NANO

GREEDY = SamplingParams(temperature=0, max_tokens=160)


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_path(), dtype=torch.float32)


def test_the_shipped_checkpoint_is_complete_small_and_has_the_recipes_shape():
    files = {p.name: p.stat().st_size for p in NANO_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert "train_state.pt" not in files
    assert sum(files.values()) <= 40 * 2**20
    config = json.loads((NANO_DIR / "config.json").read_text())
    assert {k: config[k] for k in NANO if k in config} == {k: v for k, v in NANO.items() if k in config}
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["num_nextn_predict_layers"] == 1


def test_it_calls_the_calculator_and_answers_with_the_result(llm):
    events = []
    new = run_agent(llm, [{"role": "user", "content": "What is 23 * 47 + 5?"}], sampling_params=GREEDY,
                    on_event=lambda kind, payload: events.append((kind, payload)))
    calls = [p for k, p in events if k == "tool_call"]
    results = [p["content"] for k, p in events if k == "tool_result"]
    assert [c["name"] for c in calls] == ["calculator"]
    assert calls[0]["arguments"]["expression"].replace(" ", "") == "23*47+5"
    assert results == ["1086"]
    assert new[0]["reasoning_content"] and "1086" in new[-1]["content"]


def test_thinking_off_answers_without_reasoning(llm):
    # A name from the training corpus: names it never saw it does not copy (see the README's figures).
    msg = llm.chat([{"role": "user", "content": "Hi, I'm Fatima."}], sampling_params=GREEDY, enable_thinking=False)
    assert msg.reasoning_content is None and not msg.tool_calls and "Fatima" in msg.content


@pytest.mark.slow
def test_held_out_conversations_score_near_the_published_figures():
    """A 24-conversation slice of `glm47 evaluate` (the README has the 200-conversation figures)."""
    model = load_model(default_model_path(), dtype=torch.float32)
    report = evaluate_model(model, Tokenizer.from_dir(default_model_path()), generate_examples(24, 0, "heldout"))
    m = report.metrics()
    assert m["tool_calls"] >= 0.85 and m["answers"] >= 0.75 and m["no_tool"] >= 0.85
    assert m["thinking_off"] >= 0.9 and m["mtp_agreement"] >= 0.6 and m["expert_load"] <= 1.6


def test_glm47_chat_with_no_model_uses_the_embedded_one():
    out = subprocess.run([sys.executable, "-m", "glm47.cli.main", "chat", "--temperature", "0",
                          "What is 23 * 47 + 5?"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[tool call] calculator(" in out.stdout and "[tool result] 1086" in out.stdout
    assert "1086" in out.stdout.split("[answer]")[-1]


def test_glm47_generate_with_mtp_drafts_prints_the_same_reply(capsys):
    from glm47.cli.main import main

    replies = []
    for extra in ([], ["--speculative-tokens", "2"]):
        assert main(["generate", "--temperature", "0", "--max-tokens", "60", "What is 9 * 8?", *extra]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and "[tool call]" in replies[0]


@pytest.fixture(scope="module")
def served():
    """`glm47 serve` with no --model: the embedded model, as a real process on loopback."""
    import os
    import time

    import httpx
    from server_util import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glm47.cli.main", "serve", "--port", str(port),
                             "--kv-cache-tokens", "4096", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_tool_call_round_trip_through_the_openai_client(served):
    import openai

    from glm47.tools import run_tool, tool_definitions

    client = openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is 23 * 47 + 5?"}]
    chunks = list(client.chat.completions.create(model="glm-4.7", messages=messages, tools=tool_definitions(),
                                                 temperature=0, max_tokens=160, stream=True))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert reasoning and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name == "calculator"
    arguments = "".join(t.function.arguments for t in calls)
    result = run_tool("calculator", arguments)
    assert result == "1086"
    messages += [{"role": "assistant", "content": "", "reasoning_content": reasoning,
                  "tool_calls": [{"id": calls[0].id, "type": "function",
                                  "function": {"name": "calculator", "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": calls[0].id, "content": result}]
    final = client.chat.completions.create(model="glm-4.7", messages=messages, tools=tool_definitions(),
                                           temperature=0, max_tokens=160)
    assert final.choices[0].finish_reason == "stop" and "1086" in final.choices[0].message.content


def test_a_tool_use_round_trip_through_the_anthropic_client(served):
    import anthropic

    from glm47.tools import run_tool, tool_definitions

    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in tool_definitions()]
    client = anthropic.Anthropic(base_url=served, api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "How many days are there from 2024-01-01 to 2024-03-01?"}]
    first = client.messages.create(model="glm-4.7", max_tokens=160, messages=messages, tools=tools,
                                   extra_body={"temperature": 0})
    kinds = [b.type for b in first.content]
    assert first.stop_reason == "tool_use" and kinds[0] == "thinking" and kinds[-1] == "tool_use"
    use = first.content[-1]
    assert use.name == "days_between" and use.input == {"start": "2024-01-01", "end": "2024-03-01"}
    result = run_tool(use.name, use.input)
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]}]
    final = client.messages.create(model="glm-4.7", max_tokens=160, messages=messages, tools=tools,
                                   extra_body={"temperature": 0})
    assert final.stop_reason == "end_turn" and "60" in final.content[-1].text
