"""The server over the real engine (LLMEngine on a tiny random checkpoint, a KV pool far smaller than the
load) on a real socket: a client that leaves mid-stream gives its KV blocks back within a second, and 64
concurrent streaming clients all get well-formed, complete streams, after which every block is free."""

import asyncio
import time

import httpx
import pytest
import torch
from server_util import chunks, metric, running, running_and_kv, wait_idle

from glm47.chat import Tokenizer
from glm47.engine.llm_engine import LLMEngine
from glm47.server.app import create_app
from glm47.server.context import ServerConfig

KV_TOKENS = 1024  # 64 blocks of 16: the 64 clients below need about twice that at once
CLIENTS, MAX_TOKENS = 64, 12


@pytest.fixture(scope="module", params=[0, 2], ids=["plain", "mtp-drafts"])
def served(tiny_glm47, request):
    """Plain decoding, and with 2 MTP drafts a step (the random MTP layer's drafts are mostly rejected, but they
    are made, verified, preempted and aborted with everything else)."""
    path = tiny_glm47
    engine = LLMEngine.from_path(path, dtype=torch.float32, kv_cache_tokens=KV_TOKENS,
                                 num_speculative_tokens=request.param)
    with running(create_app(engine, Tokenizer.from_dir(path), ServerConfig())) as url:
        yield url, engine


def all_blocks_free(engine: LLMEngine) -> bool:
    stats = engine.stats()  # read while the engine thread idles (it waits for a command)
    return (not engine.has_unfinished() and stats.num_running == stats.num_waiting == 0
            and stats.num_free_blocks == stats.num_kv_blocks == engine.block_manager.num_free_blocks)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"ignore_eos": True}),
    ("/v1/messages", {"model": "glm-4.7", "temperature": 0}),  # greedy: no stop id in this reply's first tokens
])
def test_a_client_leaving_mid_stream_frees_its_kv_blocks_within_a_second(served, path, body):
    url, engine = served
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": 900, **body}  # ~20 s of generation if nobody stopped it
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        lines = r.iter_lines()
        head = [next(lines) for _ in range(12)]  # the opening messages and a few tokens
        running, kv = running_and_kv(url)
        assert r.status_code == 200 and running == 1.0 and kv > 0, head
    left = time.monotonic()
    assert wait_idle(url, 1.0) == (0.0, 0.0)
    assert time.monotonic() - left < 1.0 and all_blocks_free(engine)


async def one_stream(client: httpx.AsyncClient, k: int) -> list[dict]:
    # Greedy: the default top_p=0.95 sorts the whole 151,552-token vocabulary per row, ~1 s per 64-row step here.
    body = {"messages": [{"role": "user", "content": f"Client {k}: count to {k}."}], "stream": True,
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        return chunks([line async for line in r.aiter_lines()])  # asserts the stream ends with [DONE]


async def load(url: str) -> list[list[dict]]:
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        return await asyncio.wait_for(asyncio.gather(*(one_stream(client, k) for k in range(CLIENTS))), 120)


def test_64_concurrent_streams_all_complete_well_formed_and_free_every_block(served):
    url, engine = served
    blocks_each = -(-(20 + MAX_TOKENS) // 16)  # prompts are ~20 tokens
    assert CLIENTS * blocks_each > engine.stats().num_kv_blocks  # they cannot all hold their blocks at once
    tokens_before = metric(httpx.get(url + "/metrics").text, "glm47:generation_tokens_total")
    streams = asyncio.run(load(url))
    assert len(streams) == CLIENTS
    for cs in streams:
        assert len({c["id"] for c in cs}) == 1
        assert cs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        finish = [c["choices"][0]["finish_reason"] for c in cs if c["choices"]]
        assert finish[-1] == "length" and not any(finish[:-1])
        assert cs[-1]["choices"] == [] and cs[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert wait_idle(url, 1.0) == (0.0, 0.0) and all_blocks_free(engine)
    tokens = metric(httpx.get(url + "/metrics").text, "glm47:generation_tokens_total") - tokens_before
    assert tokens == CLIENTS * MAX_TOKENS  # every token sent once, none lost or repeated by preemption
    assert engine.stats().num_preemptions > 0
    assert engine.stats().spec_draft_tokens > 0 or not engine.config.num_speculative_tokens


def test_speculative_decoding_behind_the_server_streams_the_same_reply_and_counts_its_drafts():
    """The embedded model served with MTP drafts: a greedy streamed reply equals the one without them (as text,
    chunk by chunk joined), and /metrics counts drafted and accepted tokens."""
    from glm47.assets import default_model_path

    path = default_model_path()
    body = {"messages": [{"role": "user", "content": "What is 12 * 7?"}], "stream": True, "max_tokens": 60,
            "temperature": 0}
    replies = []
    for k in (0, 2):
        engine = LLMEngine.from_path(path, num_speculative_tokens=k, kv_cache_tokens=KV_TOKENS)
        with running(create_app(engine, Tokenizer.from_dir(path), ServerConfig())) as url:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                parts = chunks(list(r.iter_lines()))
            replies.append(["".join(str(c["choices"][0]["delta"].get(key) or "") for c in parts if c["choices"])
                            for key in ("reasoning_content", "content", "tool_calls")])
            text = httpx.get(url + "/metrics").text
            drafted = metric(text, "glm47:spec_decode_num_draft_tokens_total")
            accepted = metric(text, "glm47:spec_decode_num_accepted_tokens_total")
            assert (drafted > 10 and 0 < accepted <= drafted) if k else drafted == accepted == 0
    assert replies[0] == replies[1] and replies[0][0]


def test_completions_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks():
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens=1, temperature 0) on the real engine: every
    echoed prompt token but the first carries the model's logprob of it (the LLM API's prompt_logprobs), whole
    and streamed alike, and a prompt whose prefix is cached is still scored in full."""
    from glm47 import LLM
    from glm47.assets import default_model_path
    from glm47.engine.sampling import SamplingParams

    path = default_model_path()
    prompt = "The weather in Paris is sunny and the weather in Rome is rainy."
    llm = LLM(path)
    ids = llm.tokenizer.encode(prompt, allow_special=True)
    want = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(temperature=0, max_tokens=1,
                                                                             prompt_logprobs=1))[0]
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    engine = LLMEngine.from_path(path, kv_cache_tokens=KV_TOKENS)
    with running(create_app(engine, Tokenizer.from_dir(path), ServerConfig())) as url:
        httpx.post(url + "/v1/completions", json={**body, "echo": False}, timeout=30)  # caches the prompt's blocks
        whole = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            parts = [c["choices"][0] for c in chunks(list(r.iter_lines()))]
    lp = whole["logprobs"]
    assert whole["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want.prompt_logprobs[1:], abs=1e-3)
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    streamed = [x for p in parts if p["logprobs"] for x in p["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"] and "".join(p["text"] for p in parts) == whole["text"]
