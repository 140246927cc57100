"""A bounded soak of `glm47 serve`: a mixed, misbehaving client load for a while, then checks that nothing leaked.

    python benchmarks/bench_soak.py [--duration 300] [--concurrency 8] [--warmup S] [--seed 0] [--kv-cache-tokens 16384]

Starts the server on the embedded nano model (a free loopback port) and has `concurrency` client threads send
OpenAI chat completions (some with a tool, n=2 or stop strings) and completions, Anthropic messages, streamed or
not, plus count_tokens and /tokenize. About 10 % of streams are dropped after a few lines and 3 % of plain
requests time out on the client, so the server sees hang-ups; 5 % are malformed and must get a 4xx. Printed:
requests per kind, errors, disconnects, requests/s, the server's RSS and its slope after warm-up (least squares),
the KV usage and running requests once idle, and the exit code after SIGTERM. Exits 1 on any error, KV left in
use, or an unclean exit, so it doubles as a check. Each thread draws from its own seeded random.Random.

NOTE the server gets a small KV pool (--kv-cache-tokens 16384). On CPU the pool is an anonymous mmap that becomes
resident as blocks are first written, so a default-sized one (1.9 GB on the nano model) keeps adding RSS long into
a run, which would read as a leak; a small one is all touched during warm-up, and its blocks and prefix cache are
reused and evicted all the time.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil

QUESTIONS = ["What is 17 + 25?", "Write a haiku about rain.", "Convert 3 miles to km.", "What day is 2026-03-01?",
             "What is the weather in Paris?", "Say hello.", "What is 9 * 8?", "Tell me a joke."]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,"]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
GAUGES = RUNNING, WAITING, KV = "glm47:num_requests_running", "glm47:num_requests_waiting", "glm47:kv_cache_usage_perc"
HI = [{"role": "user", "content": "hi"}]
# Malformed requests, each of which must get a 4xx: invalid JSON, wrong types, unknown model, missing max_tokens.
BAD = [("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"'),
       ("/v1/chat/completions", {"messages": "hello", "max_tokens": "many"}),
       ("/v1/chat/completions", {"model": "gpt-nope", "messages": HI}),
       ("/v1/completions", {"prompt": "x", "max_tokens": -5}),
       ("/v1/messages", {"model": "glm-4.7", "messages": HI}),
       ("/v1/messages", {"model": "claude-nope", "max_tokens": 8, "messages": HI})]


def pick(rng: random.Random) -> dict:
    """One request: kind (for the tallies), path, body, stream, bad, drop (abandon the stream),
    timeout (a client timeout shorter than the generation, or None)."""
    if rng.random() < 0.05:
        path, body = rng.choice(BAD)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return dict(kind="bad", path=path, raw=raw, stream=False, bad=True, drop=False, timeout=None)
    q, n_tok = rng.choice(QUESTIONS), rng.randint(8, 64)
    messages = [{"role": "user", "content": q}]
    api = rng.choices(["chat", "completions", "messages", "count_tokens", "tokenize"], [40, 20, 30, 5, 5])[0]
    if api == "chat":
        body, path = {"messages": messages, "max_tokens": n_tok}, "/v1/chat/completions"
        extras = (("tools", [TOOL], 0.3), ("n", 2, 0.2), ("stop", ["."], 0.1), ("stop", ["\n\n", "!"], 0.1))
        for key, value, p in extras:
            body.update({key: value} if rng.random() < p else {})
    elif api == "completions":
        body, path = {"prompt": rng.choice(PROMPTS), "max_tokens": n_tok}, "/v1/completions"
    elif api == "messages":
        body, path = {"model": "glm-4.7", "max_tokens": n_tok, "messages": messages}, "/v1/messages"
    elif api == "count_tokens":
        body, path = {"model": "glm-4.7", "messages": messages}, "/v1/messages/count_tokens"
    else:
        body, path = ({"prompt": q} if rng.random() < 0.5 else {"messages": messages}), "/tokenize"
    generates = api in ("chat", "completions", "messages")
    stream = generates and rng.random() < 0.5
    body.update({"stream": True} if stream else {})
    timeout = rng.uniform(0.02, 0.1) if generates and not stream and rng.random() < 0.03 else None
    return dict(kind=api + ("-stream" if stream else ""), path=path, raw=json.dumps(body).encode(), stream=stream,
                bad=False, drop=stream and rng.random() < 0.10, timeout=timeout)


def check_stream(lines: list[str], anthropic: bool) -> str | None:
    """What is wrong with a complete SSE stream, or None."""
    if any(line.startswith("event: error") or line.startswith("data: {\"error\"") for line in lines):
        return "error event: " + next(x for x in lines if "error" in x)[:200]
    end = "event: message_stop" if anthropic else "data: [DONE]"
    return None if end in lines else f"stream ended without {end!r}"


def send(client: httpx.Client, base: str, r: dict) -> tuple[str, str | None]:
    """Sends one request; returns (outcome, error): outcome is 'answered', 'dropped' or 'timed_out'."""
    url, headers = base + r["path"], {"content-type": "application/json"}
    if r["stream"]:
        with client.stream("POST", url, content=r["raw"], headers=headers) as resp:
            if resp.status_code != 200:
                return "answered", f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:200]}"
            lines = []
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if r["drop"] and len(lines) >= 3:
                    return "dropped", None  # leaving the block closes the half-read connection
            return "answered", check_stream(lines, r["path"] == "/v1/messages")
    timeout = httpx.Timeout(30.0, read=r["timeout"]) if r["timeout"] else httpx.USE_CLIENT_DEFAULT
    try:
        resp = client.post(url, content=r["raw"], headers=headers, timeout=timeout)
    except httpx.ReadTimeout:
        if r["timeout"]:
            return "timed_out", None
        raise
    if r["bad"]:
        return "answered", None if 400 <= resp.status_code < 500 else f"bad request got HTTP {resp.status_code}"
    if resp.status_code != 200:
        return "answered", f"HTTP {resp.status_code}: {resp.text[:200]}"
    resp.json()
    return "answered", None


def worker(base: str, seed: int, deadline: float, tally: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120.0) as client:
        while time.monotonic() < deadline:
            r = pick(rng)
            try:
                outcome, error = send(client, base, r)
            except (httpx.HTTPError, ValueError) as e:  # connection errors, unparsable JSON
                outcome, error = "answered", f"{type(e).__name__}: {e}"
            with lock:
                tally["sent"][r["kind"]] += 1
                tally["done"] += outcome == "answered" and error is None
                tally["disconnects"][outcome] += outcome != "answered"
                if error:
                    tally["errors"].append(f"{r['kind']} {r['path']}: {error}")


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    proc, t0 = psutil.Process(pid), time.monotonic()
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - t0, proc.memory_info().rss / 2**20))
        except psutil.Error:  # the server is gone; the errors say why
            return
        stop.wait(1.0)


def slope_per_min(samples: list[tuple[float, float]], after: float) -> float:
    """Least-squares slope of RSS (MB) against time, in MB per minute, over the samples from `after` s on."""
    pts = [(t / 60, mb) for t, mb in samples if t >= after]
    return statistics.linear_regression(*zip(*pts)).slope if len(pts) >= 2 else float("nan")


def gauges(base: str) -> dict[str, float]:
    """The GAUGES' values from /metrics (Prometheus text: `name{labels} value` lines)."""
    lines = httpx.get(base + "/metrics", timeout=10).text.splitlines()
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0] in GAUGES}


def wait_idle(base: str, timeout: float = 60.0) -> dict[str, float]:
    end = time.monotonic() + timeout
    while True:
        g = gauges(base)
        if g.get(RUNNING, 0) + g.get(WAITING, 0) == 0 or time.monotonic() > end:
            return g
        time.sleep(0.5)


def start_server(log, kv_cache_tokens: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "glm47", "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--kv-cache-tokens", str(kv_cache_tokens)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    else:
        raise RuntimeError(f"server not healthy after {timeout:.0f} s (exit code {proc.poll()})")
    # The CPU kernels are built on the first generation, not at startup: pay for that before measuring.
    httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=timeout).raise_for_status()


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
    """SIGTERM, then the exit code; None (after a SIGKILL) if it does not exit within `timeout` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def soak(pid: int, base: str, duration: float, concurrency: int, seed: int) -> tuple[dict, float, list, dict]:
    """The load; returns the tally, the seconds it took (in-flight requests included), the RSS samples
    (seconds since the load began, MB) and the gauges once the server is idle."""
    tally = {"sent": collections.Counter(), "done": 0, "disconnects": collections.Counter(), "errors": []}
    lock, stop, samples = threading.Lock(), threading.Event(), []
    sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples), daemon=True)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(base, seed * 1000 + i, t0 + duration, tally, lock))
               for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t0
    idle = wait_idle(base)
    stop.set()
    sampler.join()
    return tally, elapsed, samples, idle


def report(tally: dict, elapsed: float, samples: list, warmup: float, idle: dict, code: int | None) -> bool:
    """Prints the figures; True if the run failed."""
    sent, drops, errors = tally["sent"], tally["disconnects"], tally["errors"]
    print("\nsent by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(sent.items())))
    print(f"sent {sum(sent.values())}, completed {tally['done']}, disconnects made {drops.total()} "
          f"({drops['dropped']} streams dropped, {drops['timed_out']} client timeouts), errors {len(errors)}; "
          f"{sum(sent.values()) / elapsed:.1f} requests/s over {elapsed:.1f} s")
    for e in errors[:5]:
        print(f"  error: {e}")
    rss = [mb for _, mb in samples]
    warm = next((mb for t, mb in samples if t >= warmup), rss[-1])
    print(f"RSS MB: start {rss[0]:.0f}, after warm-up {warm:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f}; "
          f"slope after {warmup:.0f} s warm-up {slope_per_min(samples, warmup):+.2f} MB/min ({len(rss)} samples)")
    kv, running = idle.get(KV), idle.get(RUNNING)
    print(f"idle at the end: kv_cache_usage_perc {kv}, num_requests_running {running}; server exit code {code}")
    return bool(errors) or kv != 0 or running != 0 or code != 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads")
    ap.add_argument("--warmup", type=float, default=None, help="seconds left out of the RSS slope "
                    "(default: 20 %% of the run or 60 s, whichever is less)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-tokens", type=int, default=16384,
                    help="the server's KV pool in tokens (small on purpose: see the docstring)")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else min(0.2 * args.duration, 60.0)

    log = tempfile.NamedTemporaryFile("w", prefix="glm47-soak-", suffix=".log", delete=False)
    proc, base = start_server(log, args.kv_cache_tokens)
    print(f"server pid {proc.pid} on {base}, log {log.name}")
    try:
        t = time.monotonic()
        wait_healthy(proc, base, args.startup_timeout)
        print(f"healthy and warm after {time.monotonic() - t:.1f} s; {args.duration:.0f} s of load, "
              f"{args.concurrency} clients, seed {args.seed}")
        results = soak(proc.pid, base, args.duration, args.concurrency, args.seed)
    except BaseException:
        proc.kill()
        raise
    failed = report(*results[:3], warmup, results[3], stop_server(proc))
    log.close()
    with open(log.name) as f:  # client-invisible failures (a crash in a disconnect handler) only show here
        print(f"server log: {f.read().count('Traceback')} tracebacks")
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
