"""`glm47 serve` as a real process on a tiny random checkpoint, driven by the official openai and anthropic
clients: chat whole and streamed (with the include_usage chunk), messages (also on ?beta=true) and
count_tokens, --api-key enforced, and SIGTERM draining a stream in flight before a clean exit (code 0)."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import anthropic
import httpx
import openai
import pytest
from server_util import chunks, free_port

from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset

KEY = "sk-process-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "Say something."}]


@contextlib.contextmanager
def started(path, log_path, *options):
    """(url, process, log) of `glm47 serve` on the float32 checkpoint at `path`, killed on the way out with every
    process it started."""
    port = free_port()
    log = open(log_path, "w+")
    command = [sys.executable, "-m", "glm47.cli.main", "serve", "--model", str(path), "--port", str(port),
               "--dtype", "float32", "--kv-cache-tokens", "2048", "--api-key", KEY, "--log-level", "info",
               "--drain-timeout", "30", *options]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, f"glm47 serve did not start: {read(log)}"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, proc, log
    finally:
        if proc.poll() is None:  # its tensor-parallel ranks too: a killed server cannot end them itself
            import psutil

            children = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait()
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            psutil.wait_procs(children, timeout=10)
        log.close()


@pytest.fixture(scope="module")
def server(tiny_glm47):
    with started(tiny_glm47, tiny_glm47 / "serve.log") as s:
        yield s


def read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def test_the_openai_client_chats_whole_and_streamed(server):
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)
    out = client.chat.completions.create(model="glm-4.7", messages=USER, max_tokens=8,
                                         extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    msg = out.choices[0].message
    assert msg.role == "assistant" and (msg.model_extra["reasoning_content"] or "") + (msg.content or "")
    stream = list(client.chat.completions.create(model="glm-4.7", messages=USER, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 8
    assert stream[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_the_anthropic_client_creates_messages_and_counts_tokens(server):
    client = anthropic.Anthropic(base_url=server[0], api_key=KEY, max_retries=0, timeout=30)
    # Greedy, so the reply is the same every run (it picks no stop id in its first 8 tokens). This SDK no
    # longer has sampling arguments; the server still reads them from the body.
    greedy = {"temperature": 0}
    out = client.messages.create(model="glm-4.7", max_tokens=8, messages=USER, extra_body=greedy)
    assert out.type == "message" and out.stop_reason == "max_tokens" and out.usage.output_tokens == 8
    counted = client.messages.count_tokens(model="glm-4.7", messages=USER).input_tokens
    assert counted == out.usage.input_tokens + out.usage.cache_read_input_tokens > 0
    beta = client.beta.messages.create(model="glm-4.7", max_tokens=8, messages=USER, extra_body=greedy)  # ?beta=true
    assert beta.stop_reason == "max_tokens" and unsigned(beta.content) == unsigned(out.content)


def unsigned(blocks) -> list[dict]:
    """Content blocks without thinking signatures (random on every reply)."""
    return [{k: v for k, v in b.model_dump().items() if k != "signature"} for b in blocks]


def test_api_key_is_required(server):
    url = server[0]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/messages", json={"model": "glm-4.7", "max_tokens": 5, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/health").status_code == 200  # probes need no key


@pytest.mark.parametrize("options", [(), ("--enable-expert-parallel",)], ids=["tp2", "tp2-ep2"])
def test_a_server_over_two_tensor_parallel_ranks_answers_as_one_process_and_ends_them(server, tiny_glm47, tmp_path,
                                                                                       options):
    """--tensor-parallel-size 2: a second process holds half of every layer (or half the experts, whole);
    greedy completions are the one-process server's, and SIGTERM ends both processes (exit 0)."""
    import psutil

    prompts = [[5, 17, 300, 42], list(range(100, 140))]  # the second is longer than a decode, shorter than a chunk
    with started(tiny_glm47, tmp_path / "tp.log", "--tensor-parallel-size", "2", *options) as (url, proc, log):
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) >= 1
        for prompt in prompts:
            body = {"model": "glm-4.7", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            one = httpx.post(server[0] + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
            two = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
            assert two["choices"][0]["text"] == one["choices"][0]["text"]
            assert two["usage"] == one["usage"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, read(log)
        text = read(log)
    assert "2 tensor-parallel ranks" in text and "Traceback" not in text, text
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, [r.cmdline() for r in alive]


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(server):
    url, proc, log = server
    body = {"messages": USER, "stream": True, "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        head = [next(lines) for _ in range(4)]  # the role chunk and the first token
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # new requests go unserved at once, while the old stream goes on
            assert time.monotonic() < deadline, "the server kept serving new requests after SIGTERM"
            try:
                httpx.get(url + "/health", timeout=1)
            except (httpx.ConnectError, httpx.RemoteProtocolError):  # refused, or accepted just before and closed
                break
            time.sleep(0.05)
        assert proc.poll() is None  # still draining
        cs = chunks(head + list(lines))
    assert [c["choices"][0]["finish_reason"] for c in cs if c["choices"]][-1] == "length"
    assert sum(1 for c in cs if c["choices"] and c["choices"][0]["finish_reason"] is None) > 1
    assert cs[-1]["usage"]["completion_tokens"] == 120
    assert proc.wait(timeout=30) == 0, read(log)
    text = read(log)
    assert "Waiting for connections to close" in text  # uvicorn's drain did wait for this stream
    assert "Traceback" not in text


def test_a_bf16_server_is_ready_only_once_its_kernels_are_loaded(tmp_path):
    """The CPU kernels are built (or loaded from the cache) before uvicorn starts, so /health says ok only
    once they are and the first request answers in normal time; the weights' huge pages are logged."""
    from glm47.kernels import cpu_has_avx512_bf16
    from glm47.model.memory import huge_pages_enabled

    init_checkpoint(preset("tiny-glm47"), tmp_path, seed=0, std=0.5)
    port = free_port()
    with open(tmp_path / "serve.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "glm47.cli.main", "serve", "--model", str(tmp_path), "--port",
                                 str(port), "--dtype", "bfloat16", "--kv-cache-tokens", "1024"],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, read(log)
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            start = time.monotonic()
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4}, timeout=60)
            assert r.status_code == 200 and time.monotonic() - start < 10
            text = read(log)
            ready = text.index("Application startup complete")
            if cpu_has_avx512_bf16():
                assert -1 < text.find("glm47.kernels: loading the CPU kernels") < ready, text
            if huge_pages_enabled():
                assert -1 < text.find("weights on huge pages:") < ready, text
        finally:
            proc.kill()
            proc.wait()
