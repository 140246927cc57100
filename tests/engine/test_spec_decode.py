"""Speculative decoding with the MTP layer: the output is the model's own (greedy: the same tokens; sampled: the
same distribution), the drafts are what the uncached MTP forward predicts, and the bookkeeping (stops inside
accepted drafts, max_tokens, prefix caching, preemption, aborts) holds with drafts in flight."""

import dataclasses
import pickle

import pytest
import torch

import glm47
from glm47.assets import default_model_path
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.engine.sampling import SamplingParams
from glm47.engine.spec_decode import accepted


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_fp32):
    """A random float32 model with an MTP layer (the torch paths): its drafts are mostly wrong."""
    return glm47.load_model(tiny_fp32, dtype=torch.float32)


@pytest.fixture(scope="module")
def nano():
    """The embedded trained model in bf16 (the CPU kernels where the CPU has them): its drafts are mostly right."""
    return glm47.load_model(default_model_path(), dtype=torch.bfloat16)


def engine(model, k, **options) -> LLMEngine:
    options = {"block_size": 4, "kv_cache_tokens": 2048, "max_num_batched_tokens": 64, "max_num_seqs": 16,
               "num_speculative_tokens": k, **options}
    return LLMEngine(model, EngineConfig(**options))


def prompts(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def chat_prompts(n):
    from glm47.chat.template import render_ids
    from glm47.chat.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_model_path())
    questions = ["What is 17 + 25?", "Write a haiku about rain.", "Convert 3 miles to km.", "What day is 2026-03-01?",
                 "What is the weather in Paris?", "Say hello.", "What is 9 * 8?", "Tell me a joke."]
    return [render_ids(tok, [{"role": "user", "content": q}]) for q in questions[:n]]


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("drafts, tokens, kept", [
    ([], [5], [5]),  # no drafts: the sampled token
    ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),  # all confirmed: they and the token after them
    ([5, 6, 7], [5, 9, 7, 8], [5, 9]),  # the second differs: the first draft, then the row's own token
    ([5, 6], [4, 6, 1], [4]),  # the first differs: plain decoding's token alone
])
def test_a_step_keeps_the_confirmed_drafts_then_the_first_token_that_differs(drafts, tokens, kept):
    assert accepted(drafts, tokens) == kept


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_with_drafts_equal_plain_decoding_and_most_drafts_are_accepted(nano, k):
    ps = chat_prompts(4)
    want = [o.token_ids for o in engine(nano, 0).generate(ps, greedy(60))]
    e = engine(nano, k)
    assert [o.token_ids for o in e.generate(ps, greedy(60))] == want
    s = e.stats()
    # chained drafts (k > 1) come from an MTP layer trained for one step only: later ones are accepted less
    assert s.spec_draft_tokens > 100 and s.spec_accepted_tokens / s.spec_draft_tokens > {1: 0.7, 2: 0.6, 3: 0.45}[k]
    assert s.num_steps < 4 * 60 / 1.5  # accepted drafts mean fewer steps than tokens
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_greedy_tokens_with_drafts_equal_plain_decoding_with_chunked_prefill_and_a_tight_budget(tiny):
    """Prompts prefilled in 8-token chunks next to decodes; a budget too small for every decode's drafts."""
    ps = prompts([1, 3, 17, 40, 5, 30], tiny.config.vocab_size)
    want = [o.token_ids for o in engine(tiny, 0, max_num_batched_tokens=8, max_num_seqs=6).generate(ps, greedy(15))]
    e = engine(tiny, 2, max_num_batched_tokens=8, max_num_seqs=6)
    assert [o.token_ids for o in e.generate(ps, greedy(15))] == want
    assert e.stats().spec_draft_tokens > 0


def spy_drafts(e: LLMEngine) -> list[tuple[list[int], list[int]]]:
    """Records (sequence tokens, drafts) each time the engine proposes drafts."""
    seen, propose = [], e.spec.propose

    def spy(*args, **kw):
        got = propose(*args, **kw)
        seen.extend((list(s.token_ids), list(d)) for s, d in got.items())
        return got

    e.spec.propose = spy
    return seen


def uncached_drafts(model, ids: list[int], depth: int) -> list[int]:
    """The drafts for the token after ids, from the whole sequence without a cache: MTP at position len - 2 from
    the main hidden there and the last token, then each further draft from the MTP output one position on."""
    with torch.no_grad():
        hidden = model(torch.tensor([ids]))
        h, nxt, drafts = hidden[:, :-1], ids[1:], []
        for _ in range(depth):
            out = model.mtp_forward(h, torch.tensor([nxt]))
            drafts.append(int(model.compute_logits(out, mtp_layer=0)[0, -1].argmax()))
            h, nxt = torch.cat([h, out[:, -1:]], 1), nxt + [drafts[-1]]
    return drafts


@pytest.mark.parametrize("k", [1, 3])
def test_drafts_equal_the_uncached_mtp_forward_through_chunks_caching_and_decodes(tiny, k):
    """The MTP layer's KV cache is filled for every position (prefill chunks, decodes, accepted drafts, and
    blocks another request left in the prefix cache), so each draft is what the whole-sequence forward gives."""
    e = engine(tiny, k, max_num_batched_tokens=12, max_num_seqs=4)
    seen = spy_drafts(e)
    base = prompts([21], tiny.config.vocab_size)[0]
    # The second prompt shares 3 blocks with the first and parts from it inside the 4th, so the MTP K/V that came
    # with the cached blocks is the one it would compute (the MTP input at a block's last position is the next
    # block's first token: a prompt parting exactly at a block edge gets drafts from slightly stale MTP K/V).
    e.generate([base, base[:13] + [5, 6, 7]], greedy(8))
    assert e.stats().prefix_cache_hits == 12 and len(seen) > 8
    for ids, drafts in seen:
        assert drafts == uncached_drafts(tiny, ids, len(drafts)), ids
        outputs = len(ids) - (len(base) if ids[:len(base)] == base else 16)
        assert len(drafts) == min(k, 8 - outputs - 1)  # fewer only where max_tokens leaves no room


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there(nano):
    ps = chat_prompts(3)
    plain = engine(nano, 0).generate(ps, greedy(40))
    # Stop at the 20th token of each plain reply (not a token seen before it, so that it cannot stop earlier).
    stops = [next(t for i, t in enumerate(o.token_ids) if i >= 20 and t not in o.token_ids[:i]) for o in plain]
    e = engine(nano, 3)
    for p, o, stop in zip(ps, plain, stops):
        got = e.generate([p], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop]))[0]
        assert got.token_ids == o.token_ids[:o.token_ids.index(stop) + 1] and got.finish_reason == "stop"
    assert e.stats().spec_accepted_tokens > 0
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_max_tokens_is_exact_with_drafts(nano, n):
    out = engine(nano, 3).generate(chat_prompts(2), greedy(n))
    assert [len(o.token_ids) for o in out] == [n, n] and all(o.finish_reason == "length" for o in out)


def test_logprobs_come_one_per_token_and_match_plain_decoding(nano):
    p = chat_prompts(1)
    a = engine(nano, 0).generate(p, greedy(20, logprobs=2, prompt_logprobs=1))[0]
    b = engine(nano, 2).generate(p, greedy(20, logprobs=2, prompt_logprobs=1))[0]
    assert b.token_ids == a.token_ids and len(b.logprobs) == len(b.top_logprobs) == 20
    assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert b.prompt_logprobs == a.prompt_logprobs and len(a.prompt_logprobs) == len(p[0])
    assert [[t for t, _ in row] for row in b.top_logprobs] == [[t for t, _ in row] for row in a.top_logprobs]


def test_prefix_caching_and_preemption_with_drafts_give_the_plain_tokens(nano):
    ps = chat_prompts(8)
    want = [o.token_ids for o in engine(nano, 0).generate(ps, greedy(30))]
    cached = engine(nano, 2)
    cached.generate(ps[:2], greedy(5))
    assert [o.token_ids for o in cached.generate(ps, greedy(30))] == want
    assert cached.stats().prefix_cache_hits > 0
    # 8 requests of ~30 + 30 tokens in a pool of 96 tokens: they must preempt each other.
    small = engine(nano, 2, kv_cache_tokens=96, max_num_batched_tokens=32)
    assert [o.token_ids for o in small.generate(ps, greedy(30))] == want
    assert small.stats().num_preemptions > 0
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_abort_with_drafts_in_flight_frees_every_block(nano):
    e = engine(nano, 2)
    ids = [e.add_request(p, greedy(50)) for p in chat_prompts(4)]
    for _ in range(5):
        e.step()
    assert any(s.draft_token_ids for s in e.scheduler.running)
    for rid in ids:
        e.abort(rid)
    e.step()
    assert not e.has_unfinished() and e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_sampled_tokens_with_drafts_equal_plain_decoding_for_the_same_seed_alone_or_in_a_batch(nano):
    """A row is sampled exactly as plain decoding samples its position and a seeded generator is rewound past the
    rows not kept, so drafts change the speed only: the same seed gives the same tokens with or without them,
    whatever else is in the batch (whose unseeded requests share torch's generator); penalties and logit_bias
    included."""
    ps = chat_prompts(6)
    seeded = [SamplingParams(temperature=t, top_p=0.95, max_tokens=30, seed=7 + i, ignore_eos=True, min_tokens=3,
                             presence_penalty=0.5, logit_bias={13: -5.0, 11: 2.0})
              for i, t in enumerate([1.0, 0.7, 0.4])]
    others = [SamplingParams(temperature=0.8, max_tokens=25)] * 3
    want = [o.token_ids for o in engine(nano, 0).generate(ps[:3], seeded)]
    e = engine(nano, 2)
    assert [o.token_ids for o in e.generate(ps[:3], seeded)] == want
    assert [o.token_ids for o in engine(nano, 2).generate(ps, seeded + others)][:3] == want
    assert e.stats().spec_accepted_tokens > 0.3 * e.stats().spec_draft_tokens > 0


def test_speculative_decoding_needs_an_mtp_layer(tmp_path):
    init_checkpoint(preset("tiny"), tmp_path, seed=0, dtype=torch.float32, mtp=False)
    model = glm47.load_model(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_speculative_tokens=1 .*MTP layer"):
        engine(model, 1)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=-1)


def test_a_stop_string_inside_a_speculative_step_ends_the_output_at_its_own_token():
    """A step can bring several tokens; a stop string completed by the first of them ends the output there:
    the same text, token ids and logprobs as plain decoding, streamed or whole."""
    from glm47 import LLM

    msgs = [{"role": "user", "content": "Write a haiku about rain."}]
    plain = LLM(default_model_path()).chat(msgs, sampling_params=greedy(60))
    words = (plain.reasoning_content or "").split()
    stop = " ".join(words[2:4])  # "my tools": with drafts, " tools" comes third of a step's four tokens
    outs = []
    for k in (0, 3):
        llm = LLM(default_model_path(), num_speculative_tokens=k)
        params = SamplingParams(temperature=0, max_tokens=60, stop=[stop], logprobs=0)
        whole = llm.generate(prompt_token_ids=[chat_prompts(2)[1]], sampling_params=params)[0]
        deltas = list(llm.generate_stream(prompt_token_ids=[chat_prompts(2)[1]], sampling_params=params))
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids
        outs.append((whole.text, whole.token_ids, whole.finish_reason, len(whole.logprobs)))
        if k:
            assert llm.engine.stats().spec_accepted_tokens > 0
    assert outs[0] == outs[1] and outs[0][2] == "stop" and stop not in outs[0][0]
    assert outs[0][3] == len(outs[0][1])


def plain(x) -> bool:
    """Only ints, bools, lists of them and dataclasses of those: data another process can take as it is."""
    if dataclasses.is_dataclass(x):
        return all(plain(getattr(x, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, list):
        return all(plain(v) for v in x)
    return type(x) in (int, bool)


def test_step_and_draft_inputs_are_plain_data_that_run_the_same_after_pickling(tiny):
    """What the driver hands every rank (the StepInput of each step, the DraftInput after it) is plain data: each
    step's input pickled and unpickled gives the same logits, hidden states and prompt logprobs, and an engine
    that runs every step and every drafting pass from pickled copies gives plain decoding's tokens."""
    ps = prompts([1, 3, 17, 30], tiny.config.vocab_size)
    params = [greedy(10, prompt_logprobs=1 if i == 2 else None) for i in range(len(ps))]
    want = [o.token_ids for o in engine(tiny, 0, max_num_batched_tokens=12, max_num_seqs=4).generate(ps, params)]
    e = engine(tiny, 2, max_num_batched_tokens=12, max_num_seqs=4)
    execute, prepare, steps, drafts = e.runner.execute, e.spec.prepare, [], []

    def execute_copy(step):
        copy = pickle.loads(pickle.dumps(step))
        assert copy == step and plain(copy)
        a, b = execute(step), execute(copy)  # the second rewrites the same K/V into the same slots
        assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
        assert a.prompt_logprobs == b.prompt_logprobs
        steps.append(copy)
        return b

    def prepare_copy(step):
        d, drafting = prepare(step)
        copy = pickle.loads(pickle.dumps(d))
        assert copy == d and plain(copy)
        drafts.append(copy)
        return copy, drafting

    e.runner.execute, e.spec.prepare = execute_copy, prepare_copy
    assert [o.token_ids for o in e.generate(ps, params)] == want
    # the steps had it all: decodes with drafts next to prefill chunks, scored prompts, chained drafts
    assert any(len(s.logits_rows) > 1 and max(s.layout.query_lens) > 1 for s in steps)
    assert any(s.prompt_rows for s in steps) and any(d.chain for d in drafts)
    assert e.stats().spec_draft_tokens > 0
