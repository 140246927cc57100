"""LLMEngine end to end on tiny random checkpoints written by transformers: greedy parity with transformers'
generate, batch invariance, prefix caching, preemption, aborts, seeded sampling, and request validation."""

import pytest
import torch

import glm47
from glm47.config import preset
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.engine.model_runner import num_kv_blocks
from glm47.engine.sampling import SamplingParams
from helpers import save_hf_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    ref = save_hf_checkpoint(preset("tiny"), path)
    return path, ref, glm47.load_model(path, dtype=torch.float32)


def engine(model, **options) -> LLMEngine:
    options = {"block_size": 4, "kv_cache_tokens": 1024, "max_num_batched_tokens": 64, "max_num_seqs": 16,
               **options}
    return LLMEngine(model, EngineConfig(**options))


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in lengths]


def tokens(outputs):
    return [o.token_ids for o in outputs]


def test_greedy_tokens_equal_transformers_generate_with_chunked_prefill(checkpoint):
    """Budget 16 tokens a step: the 40- and 70-token prompts are prefilled in chunks, next to decodes."""
    _, ref, model = checkpoint
    ps = prompts([1, 3, 17, 40, 5, 70])
    got = engine(model, max_num_batched_tokens=16, max_num_seqs=8).generate(ps, GREEDY)
    for p, out in zip(ps, got):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert out.token_ids == want, f"prompt of {len(p)} tokens"
        assert out.finish_reason == ("stop" if want[-1] == 1 else "length")


def test_a_requests_greedy_tokens_are_the_same_alone_and_in_a_batch_of_16(checkpoint):
    model = checkpoint[2]
    ps = prompts([9, 2, 33, 14, 50, 7, 21, 3, 40, 11, 26, 5, 18, 60, 1, 30], seed=2)
    batched = tokens(engine(model).generate(ps, GREEDY))
    for i in (0, 4, 13):
        alone = tokens(engine(model).generate([ps[i]], GREEDY))[0]
        assert alone == batched[i], f"request {i}"


def test_prefix_cache_gives_the_same_tokens_and_computes_only_the_new_blocks(checkpoint):
    model = checkpoint[2]
    shared = prompts([24], seed=3)[0]  # 6 full blocks of 4
    first, second = shared + [7, 8, 9], shared + [10, 11, 12, 13, 14, 15, 16]
    cold = tokens(engine(model, enable_prefix_caching=False).generate([first, second], GREEDY))

    eng = engine(model)
    out1 = eng.generate([first], GREEDY)[0]
    before = eng.stats().prompt_tokens_computed
    out2 = eng.generate([second], GREEDY)[0]
    assert [out1.token_ids, out2.token_ids] == cold
    assert out2.num_cached_tokens == 24
    assert eng.stats().prompt_tokens_computed - before == len(second) - 24

    # A second turn (prompt + answer + more) hits the answer's blocks as well.
    turn2 = first + out1.token_ids + [20, 21, 22]
    out3 = eng.generate([turn2], GREEDY)[0]
    assert out3.num_cached_tokens == (len(first) + len(out1.token_ids) - 1) // 4 * 4
    assert out3.token_ids == tokens(engine(model, enable_prefix_caching=False).generate([turn2], GREEDY))[0]


def test_identical_prompts_admitted_in_one_step_share_blocks(checkpoint):
    """The second copy hits blocks the first is filling in the same step: every K/V of a step is written
    before any attention reads the cache, so this is safe (what n > 1 relies on)."""
    model = checkpoint[2]
    p = prompts([21], seed=8)[0]
    eng = engine(model)
    out = eng.generate([p, p], GREEDY)
    assert out[0].token_ids == out[1].token_ids == tokens(engine(model, enable_prefix_caching=False)
                                                          .generate([p], GREEDY))[0]
    assert (out[0].num_cached_tokens, out[1].num_cached_tokens) == (0, 20)
    assert eng.stats().prompt_tokens_computed == 21 + 1


def test_preempted_requests_resume_with_the_same_tokens(checkpoint):
    """A 48-token pool for 6 requests that each need up to 40 tokens: decodes keep running out of blocks."""
    model = checkpoint[2]
    ps = prompts([20, 9, 28, 14, 3, 17], seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = tokens(engine(model).generate(ps, params))
    small = engine(model, kv_cache_tokens=48, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert tokens(small.generate(ps, params)) == want
    assert small.stats().num_preemptions > 0
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch_and_across_preemption(checkpoint):
    model = checkpoint[2]
    ps = prompts([12, 30, 5, 22], seed=5)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    alone = engine(model).generate([ps[0]], seeded)[0].token_ids
    mixed = engine(model).generate(ps, [seeded, others, others, others])
    assert mixed[0].token_ids == alone
    tight = engine(model, kv_cache_tokens=40, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert tight.generate(ps, [seeded, others, others, others])[0].token_ids == alone
    assert tight.stats().num_preemptions > 0


def test_abort_frees_every_block_whenever_it_happens(checkpoint):
    model = checkpoint[2]
    eng = engine(model, max_num_batched_tokens=16)
    ids = [eng.add_request(p, GREEDY) for p in prompts([30, 6, 45, 9])]
    for _ in range(3):  # some decode, one is mid-prefill, one still waits
        eng.step()
    assert eng.stats().num_waiting > 0 and eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    for rid in ids:
        assert eng.abort(rid)
    assert not eng.abort(ids[0]), "a finished request cannot be aborted twice"
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert not eng.has_unfinished() and eng.stats().kv_usage == 0


@pytest.mark.parametrize("prompt, params, message", [
    ([], GREEDY, "prompt is empty"),
    ([5, 512], GREEDY, "token id 512 is not in the vocabulary"),
    ([5, -1], GREEDY, "token id -1"),
    ([5] * 60, SamplingParams(max_tokens=10), "60 tokens \\+ max_tokens=10 exceeds the context of 64 tokens"),
    ([5] * 64, SamplingParams(max_tokens=None), "64 tokens exceeds the context of 64 tokens"),
    ([5] * 20, SamplingParams(max_tokens=20), "KV cache pool of 32 tokens"),
    ([5], SamplingParams(n=2), "n=2"),
    ([5], SamplingParams(logit_bias={512: -100}), r"logit_bias token id 512 is not in the vocabulary \[0, 512\)"),
])
def test_a_request_that_can_never_run_is_refused_at_add_request(checkpoint, prompt, params, message):
    big_pool = "context of 64" in message  # max_model_len=64 is the limit, not the pool
    eng = engine(checkpoint[2], max_model_len=64, kv_cache_tokens=128 if big_pool else 32)
    with pytest.raises(ValueError, match=message):
        eng.add_request(prompt, params)
    assert not eng.has_unfinished()


def test_logit_bias_of_minus_100_keeps_a_token_out_of_the_greedy_reply(checkpoint):
    p = prompts([9])[0]
    plain = engine(checkpoint[2]).generate([p], GREEDY)[0].token_ids
    banned = SamplingParams(temperature=0, max_tokens=12, logit_bias={plain[0]: -100, plain[3]: -100})
    out = engine(checkpoint[2]).generate([p], banned)[0].token_ids
    assert plain[0] not in out and plain[3] not in out and len(out) == 12


def test_max_tokens_none_runs_to_the_context_limit_and_duplicate_ids_are_refused(checkpoint):
    eng = engine(checkpoint[2], max_model_len=24)
    eng.add_request([3] * 20, SamplingParams(max_tokens=4), request_id="x")
    with pytest.raises(ValueError, match="'x' is already in use"):
        eng.add_request([3], GREEDY, request_id="x")
    eng.abort("x")
    out = eng.generate([[3] * 20], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert not eng.has_unfinished()


def test_stop_token_ids_logprobs_and_step_outputs(checkpoint):
    model = checkpoint[2]
    p = prompts([10], seed=6)[0]
    free_run = engine(model).generate([p], GREEDY)[0].token_ids
    stop_at = free_run[3]
    eng = engine(model)
    rid = eng.add_request(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], logprobs=2))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.new_token_ids[0] for o in outs] == free_run[:free_run.index(stop_at) + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and not any(o.finished for o in outs[:-1])
    assert all(o.request_id == rid and len(o.logprobs) == 1 and len(o.top_logprobs[0]) == 2 for o in outs)
    assert all(o.top_logprobs[0][0][0] == o.new_token_ids[0] for o in outs), "greedy picks the top token"
    done = eng.generate([p], SamplingParams(temperature=0, max_tokens=5, logprobs=0))[0]
    assert len(done.logprobs) == 5 and done.top_logprobs == [[]] * 5


def test_runner_returns_the_final_hidden_states_of_every_token(checkpoint):
    """What MTP drafting needs: the final-normed hidden state at each computed position."""
    model = checkpoint[2]
    eng = engine(model)
    p = prompts([11], seed=7)[0]
    eng.add_request(p, GREEDY)
    step = eng.runner.prepare(eng.scheduler.schedule(), keep_hidden=True)
    result = eng.runner.execute(step.input)
    with torch.no_grad():
        want = model(torch.tensor([p]))
    assert result.hidden.shape == (11, model.config.hidden_size)
    assert (result.hidden - want[0]).abs().max() < 1e-5


def test_from_path_reads_the_stop_ids_of_generation_config(checkpoint):
    eng = LLMEngine.from_path(checkpoint[0], dtype=torch.float32, block_size=8, kv_cache_tokens=64)
    assert eng.eos_token_ids == {1} and eng.block_manager.num_blocks == 8


def test_kv_pool_size_from_bytes_tokens_or_free_memory():
    dev = torch.device("cpu")
    assert num_kv_blocks(EngineConfig(kv_cache_tokens=100, block_size=16), 1000, dev, 4096) == 7
    assert num_kv_blocks(EngineConfig(kv_cache_bytes=10_500, block_size=16), 1000, dev, 4096) == 10
    # Default: a fraction of free RAM, but never more than max_num_seqs full contexts.
    assert num_kv_blocks(EngineConfig(max_num_seqs=2, block_size=16), 1000, dev, 4096) == 2 * 256
    with pytest.raises(ValueError, match="below one block"):
        num_kv_blocks(EngineConfig(kv_cache_bytes=10), 1000, dev, 4096)


def test_prompt_logprobs_equal_transformers_through_chunks_cached_prefixes_and_preemption(checkpoint):
    """Each prompt token's logprob under the reference's logits (the first token has none), its top-2, computed
    across 16-token prefill chunks; a prompt whose blocks are cached is still scored in full (it takes no hits),
    and a pool that forces recomputation scores no token twice."""
    _, ref, model = checkpoint
    ps = prompts([40, 23, 5])
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    for options in ({"max_num_batched_tokens": 16, "max_num_seqs": 3}, {"kv_cache_tokens": 64}):
        eng = engine(model, **options)
        eng.generate([ps[0]], GREEDY)  # its blocks are now in the prefix cache
        outs = eng.generate(ps, params)
        for p, out in zip(ps, outs):
            with torch.no_grad():
                lp = ref(torch.tensor([p])).logits[0].float().log_softmax(-1)
            assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] == []
            assert out.prompt_logprobs[1:] == pytest.approx([lp[i, p[i + 1]].item() for i in range(len(p) - 1)],
                                                            abs=1e-4)
            assert [[t for t, _ in top] for top in out.prompt_top_logprobs[1:]] == lp[:-1].topk(2).indices.tolist()
        assert eng.stats().prefix_cache_hits == 0 or "kv_cache_tokens" in options
    assert eng.stats().num_preemptions > 0


def test_a_request_whose_sampling_raises_ends_alone_and_the_others_get_their_tokens(checkpoint, monkeypatch):
    """A fault injected into one request's sampling (here: its seed) ends that request with finish_reason
    'error' and frees its blocks; the others, greedy and seeded, get exactly the tokens of a run without it."""
    import glm47.engine.llm_engine as module

    model = checkpoint[2]
    ps = prompts([5, 9, 14, 3], seed=7)
    params = [GREEDY, SamplingParams(temperature=0.8, seed=11, max_tokens=12), GREEDY,
              SamplingParams(temperature=0.8, seed=666, max_tokens=12)]
    want = tokens(engine(model).generate(ps[:3], params[:3]))
    real = module.sample

    def faulty(logits, rows, *args, **kwargs):
        if any(p.seed == 666 for p in rows):
            raise RuntimeError("injected")
        return real(logits, rows, *args, **kwargs)

    monkeypatch.setattr(module, "sample", faulty)
    e = engine(model)
    got = e.generate(ps, params)
    assert tokens(got[:3]) == want and [o.finish_reason for o in got[:3]] != ["error"] * 3
    assert got[3].finish_reason == "error" and got[3].token_ids == []
    assert not e.has_unfinished() and e.block_manager.num_free_blocks == e.block_manager.num_blocks


@pytest.mark.parametrize("params, words", [
    (SamplingParams(stop_token_ids=[10**9], min_tokens=1), "stop_token_ids token id 1000000000 is not in"),
    (SamplingParams(logit_bias={10**9: 1.0}), "logit_bias token id"),
    (SamplingParams(min_tokens=50, max_tokens=None), "min_tokens=50 is more than the 37 tokens"),
])
def test_ids_outside_the_vocabulary_and_impossible_minimums_are_refused_at_admission(checkpoint, params, words):
    e = engine(checkpoint[2], max_model_len=40)
    with pytest.raises(ValueError, match=words):
        e.add_request([1, 2, 3], params)
    assert not e.has_unfinished()


def test_a_bf16_cpu_model_has_its_kernels_built_when_it_is_loaded(checkpoint):
    """So that `glm47 serve` (which loads, then listens) says ok on /health only once they are, and no request
    waits for a build."""
    from glm47 import kernels

    kernels.extension.cache_clear()
    glm47.load_model(checkpoint[0], dtype=torch.bfloat16)
    assert kernels.extension.cache_info().currsize == 1
