"""Engine measurements shared by `glm47 bench` and benchmarks/bench_engine.py: batch-1 decode speed against
the memory-bandwidth roofline, concurrent throughput, long-prompt prefill and prefix-cache time to first
token. Each returns plain numbers; nothing here asserts a target (benchmarks print ratios, tests don't time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from glm47.engine.llm_engine import LLMEngine
from glm47.engine.sampling import SamplingParams


def random_prompt(n: int, vocab_size: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 150000), (n,), generator=g).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def measure_bandwidth(nbytes: int = 1 << 30, repeat: int = 7) -> float:
    """Read bandwidth in bytes/s: the median of `repeat` passes summing a buffer far larger than the caches.
    The median, not the best: on a shared virtual machine a single pass now and then comes out far above what
    the memory can deliver (76 GB/s once, on a box whose plain AVX-512 read loop tops out at 46 GB/s), and a
    roofline over such a figure would be fiction."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return nbytes / sorted(times)[len(times) // 2]


def active_weight_bytes(model, tokens: int = 1) -> int:
    """Weight bytes one decode step of `tokens` sequences must read: everything except the routed experts none
    of them uses, and one embedding row per token instead of the table. The routed experts count at the
    expected share a uniform router touches, 1 - (1 - top_k / n_routed)^tokens (top_k / n_routed for one)."""
    cfg = model.config
    experts = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** tokens
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        nbytes = p.numel() * p.element_size()
        if name.endswith("experts.w13") or name.endswith("experts.w2"):
            nbytes = int(nbytes * experts)
        elif name == "model.embed_tokens.weight":
            nbytes = tokens * p.shape[1] * p.element_size()
        total += nbytes
    return total


def measure_bf16_flops(n: int = 2048, repeat: int = 5) -> float:
    """bf16 matmul throughput in FLOP/s: the best of `repeat` n x n x n products (torch's GEMM, oneDNN on CPU),
    a practical compute peak for the prefill bound."""
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def prefill_flops(model, prompt_lens: list[int]) -> float:
    """FLOPs to prefill these prompts (each its own sequence): per token twice the parameters it uses (attention,
    dense or shared MLP, top_k routed experts; not the embedding), causal attention scores and values per layer,
    and the LM head for each prompt's last token only."""
    cfg = model.config
    per_token = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if name.endswith(("experts.w13", "experts.w2")) else 1
        per_token += 2 * p.numel() * share
    attention = sum(4 * n * (n + 1) / 2 * cfg.head_dim * cfg.num_attention_heads for n in prompt_lens)
    head = 2 * cfg.vocab_size * cfg.hidden_size * len(prompt_lens)
    return per_token * sum(prompt_lens) + attention * cfg.num_hidden_layers + head


@dataclass(slots=True)
class Timing:
    ttft: float  # seconds to the first token of the first request
    total: float  # seconds until every request finished
    generated: int  # tokens generated

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated - 1) / max(self.total - self.ttft, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.total


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> Timing:
    """Adds every prompt at once and steps to completion."""
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    ttft, generated = None, 0
    while engine.has_unfinished():
        for o in engine.step():
            generated += len(o.new_token_ids)
            if ttft is None and o.new_token_ids:
                ttft = time.perf_counter() - start
    return Timing(ttft or 0.0, time.perf_counter() - start, generated)


def prefix_cache_ttft(engine: LLMEngine, history: int, new: int, seed: int = 0) -> tuple[float, int]:
    """A first turn of `history` tokens, then a second turn that repeats it and adds `new` tokens: returns
    the second turn's time to first token and how many prompt tokens it actually computed."""
    first = random_prompt(history, engine.vocab_size, seed)
    second = first + random_prompt(new, engine.vocab_size, seed + 1)
    run(engine, [first], greedy(1))
    before = engine.stats().prompt_tokens_computed
    t = run(engine, [second], greedy(1))
    return t.ttft, engine.stats().prompt_tokens_computed - before


def cpu_report(model) -> str:
    """One line on what the CPU runs with: threads, OpenMP's wait policy, weights on huge pages."""
    from glm47.engine.threads import wait_policy
    from glm47.model.memory import anon_huge_bytes, huge_pages_enabled

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    got = anon_huge_bytes()
    huge = ("off" if not huge_pages_enabled() else "unknown" if got is None else
            f"{min(got, weights) / 1e9:.2f} of {weights / 1e9:.2f} GB of weights")
    return (f"cpu: {torch.get_num_threads()} threads (decode steps: fewer while other processes use cores), "
            f"OpenMP wait policy {wait_policy()}, huge pages {huge}")
