"""CPU resources that must never change results: weights on huge pages (or not) are the same weights and give
the same tokens; decode steps on fewer threads (the ThreadGovernor on a busy machine) give the same greedy
tokens; and the governor gives decode steps the cores the rest of the machine leaves free."""

from __future__ import annotations

import pytest
import torch

import glm47.engine.threads as threads_module
from glm47.bench import greedy, random_prompt
from glm47.checkpoint.loader import load_model
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.engine.threads import ThreadGovernor
from glm47.model.memory import HUGE_PAGE, anon_huge_bytes, huge_pages_enabled


@pytest.fixture(scope="module")
def checkpoint(tiny_glm47):
    path = tiny_glm47
    return path


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def generate(model, prompts) -> list[list[int]]:
    engine = LLMEngine(model, EngineConfig(kv_cache_tokens=2048, max_num_batched_tokens=64, max_num_seqs=16))
    return [o.token_ids for o in engine.generate(prompts, greedy(20))]


def test_weights_on_huge_pages_are_the_same_weights_and_give_the_same_tokens(checkpoint, monkeypatch):
    monkeypatch.setenv("GLM47_HUGE_PAGES", "0")
    plain = load_model(checkpoint, dtype=torch.bfloat16)
    monkeypatch.setenv("GLM47_HUGE_PAGES", "1")
    huge = load_model(checkpoint, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(plain.state_dict().items(), huge.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    prompts = [random_prompt(n, plain.config.vocab_size, n) for n in (3, 50)]
    assert generate(plain, prompts) == generate(huge, prompts)
    if huge_pages_enabled():  # THP on request (this machine: "madvise"): the weights sit in one aligned block
        ptrs = sorted(p.data_ptr() for p in huge.parameters())
        assert ptrs[0] % HUGE_PAGE == 0
        assert ptrs[-1] - ptrs[0] < sum(p.numel() * p.element_size() for p in huge.parameters()) + 64 * len(ptrs)
        assert anon_huge_bytes() is not None and anon_huge_bytes() > 0


def test_decode_steps_on_one_thread_give_the_same_greedy_tokens(checkpoint, two_threads):
    """Prompts longer than the governor's 32 rows are prefilled on every thread; decode steps on one."""
    model = load_model(checkpoint, dtype=torch.bfloat16)
    first = [random_prompt(n, model.config.vocab_size, n) for n in (2, 17, 45, 130)]
    then = [random_prompt(90, model.config.vocab_size, 7)]  # prefilled after decode steps ran on one thread
    plain = LLMEngine(model, EngineConfig(kv_cache_tokens=2048, max_num_batched_tokens=64, max_num_seqs=16,
                                          adaptive_threads=False))
    want = [[o.token_ids for o in plain.generate(p, greedy(20))] for p in (first, then)]
    seen = []
    real = torch.set_num_threads

    def spy(n):
        seen.append(n)
        real(n)

    engine = LLMEngine(model, EngineConfig(kv_cache_tokens=2048, max_num_batched_tokens=64, max_num_seqs=16))
    engine.threads = ThreadGovernor(max_threads=2, interval=1e9)  # as if another process held one core
    engine.threads.threads = 1
    torch.set_num_threads = spy
    try:
        got = [[o.token_ids for o in engine.generate(p, greedy(20))] for p in (first, then)]
    finally:
        torch.set_num_threads = real
    assert got == want
    # decode steps on one thread, every thread back once idle (so the later prompt is prefilled on two)
    assert seen == [1, 2, 1, 2] and torch.get_num_threads() == 2


def test_the_governor_gives_decode_steps_the_cores_others_leave(monkeypatch):
    clock, ticks = [0.0], [(0, 0)]
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads_module, "_cpu_busy_ticks", lambda: ticks[0])
    monkeypatch.setattr(threads_module.os, "cpu_count", lambda: 2)
    g = ThreadGovernor(max_threads=2, max_rows=32, interval=0.5)
    g._tick = 100

    def after(seconds: float, others: float, ours: float) -> int:
        clock[0] += seconds
        busy, own = ticks[0]
        ticks[0] = (busy + round((others + ours) * 100 * seconds), own + round(ours * 100 * seconds))
        return g.threads_for(1)

    assert after(0.5, others=0.0, ours=2.0) == 2  # quiet: both cores
    assert after(0.5, others=1.0, ours=1.0) == 2  # a competitor: measured once, not yet taken
    assert after(0.5, others=1.0, ours=1.0) == 1  # twice: decode steps take the one core left
    assert g.threads_for(500) == 2  # a prefill chunk keeps every thread (its GEMMs' sums depend on it)
    assert after(0.5, others=0.1, ours=1.0) == 1
    assert after(0.5, others=0.1, ours=1.0) == 2  # the competitor left
