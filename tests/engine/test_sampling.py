"""Sampling: each filter against hand-computed distributions, penalties against hand-worked numbers, and the batch
sampler's greedy, seeded, statistical and logprob behaviour. CPU only, tiny vocabularies."""

import math

import pytest
import torch

from glm47.engine.sampling import (SamplingParams, argmax_rows, apply_penalties, apply_temperature, mask_stop_tokens,
                                   min_p_filter, sample, token_counts, top_k_filter, top_p_filter)

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor([PROBS]).log()  # (1, 4): softmax gives back PROBS


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def rows(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def draw(logits, params, generators=None, outputs=None):
    n = logits.shape[0]
    return sample(logits, params, generators or [None] * n, [[] for _ in range(n)], outputs or [[] for _ in range(n)])


# ---- filters ----


@pytest.mark.parametrize("top_p, keep", [(0.8, [0, 1]), (0.81, [0, 1, 2]), (0.1, [0]), (0.96, [0, 1, 2, 3]),
                                         (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, keep):
    assert kept(top_p_filter(LOGITS, rows(top_p))) == [keep]


@pytest.mark.parametrize("min_p, keep", [(0.35, [0, 1]), (0.0, [0, 1, 2, 3]), (0.29, [0, 1, 2]), (1.0, [0])])
def test_min_p_drops_tokens_below_min_p_times_the_top_prob(min_p, keep):
    assert kept(min_p_filter(LOGITS, rows(min_p))) == [keep]


@pytest.mark.parametrize("k, keep", [(2, [0, 1]), (1, [0]), (0, [0, 1, 2, 3]), (-1, [0, 1, 2, 3]), (9, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_largest(k, keep):
    assert kept(top_k_filter(LOGITS, rows(k, dtype=torch.long))) == [keep]


def test_one_filter_call_applies_a_different_parameter_to_each_row():
    batch = LOGITS.expand(3, 4)
    assert kept(top_p_filter(batch, rows(0.8, 0.81, 1.0))) == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert kept(top_k_filter(batch, rows(1, 0, 3, dtype=torch.long))) == [[0], [0, 1, 2, 3], [0, 1, 2]]
    assert kept(min_p_filter(batch, rows(0.35, 0.0, 0.5))) == [[0, 1], [0, 1, 2, 3], [0, 1]]


def test_filters_find_the_top_tokens_wherever_they_sit_in_the_vocab():
    shuffled = LOGITS[:, [2, 0, 3, 1]]  # probs [0.15, 0.5, 0.05, 0.3]
    assert kept(top_p_filter(shuffled, rows(0.8))) == [[1, 3]]
    assert kept(top_k_filter(shuffled, rows(2, dtype=torch.long))) == [[1, 3]]


def test_temperature_half_squares_the_probabilities():
    probs = apply_temperature(LOGITS.expand(2, 4), rows(0.5, 0.0)).softmax(-1)
    squared = torch.tensor(PROBS) ** 2
    torch.testing.assert_close(probs[0], squared / squared.sum())  # [0.685, 0.247, 0.062, 0.007]
    torch.testing.assert_close(probs[1], torch.tensor(PROBS))  # a greedy row is left alone


# ---- penalties ----


def test_penalties_match_hand_worked_numbers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]])
    prompt = token_counts([[0, 0]], 5)  # token 0 only in the prompt
    output = token_counts([[1, 2, 1]], 5)  # token 1 twice, token 2 once
    assert output.tolist() == [[0, 2, 1, 0, 0]]
    out = apply_penalties(logits, prompt, output, rows(2.0), rows(0.5), rows(0.25))
    # repetition 2: 2 -> 1, -1 -> -2, 0.5 -> 0.25, 0 stays; then token 1: -(0.25*2 + 0.5), token 2: -(0.25 + 0.5)
    assert out.tolist() == [[1.0, -3.0, -0.5, 0.0, 3.0]]


def test_neutral_penalties_change_nothing():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    counts = token_counts([[0, 1, 2]], 3)
    assert torch.equal(apply_penalties(logits, counts, counts, rows(1.0), rows(0.0), rows(0.0)), logits)


def test_token_counts_pads_short_rows_without_counting_the_padding():
    assert token_counts([[3, 3, 1], [], [0]], 4).tolist() == [[0, 1, 0, 2], [0, 0, 0, 0], [1, 0, 0, 0]]


# ---- sample() ----


def test_greedy_takes_the_argmax_of_each_row():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 4.9]])
    assert draw(logits, [SamplingParams(temperature=0)] * 2).token_ids == [1, 0]


def test_greedy_argmax_comes_after_penalties():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], [None], [[0]], [[]])
    assert out.token_ids == [1]  # token 0 falls to 1.0 < 1.5


def test_logit_bias_is_added_after_penalties_for_greedy_and_sampled_rows_but_not_to_logprobs():
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    raw = logits.log_softmax(-1)[0]
    greedy = SamplingParams(temperature=0, logit_bias={1: 0.6}, logprobs=0)
    assert sample(logits, [greedy, SamplingParams(temperature=0)], [None] * 2, [[], []], [[], []]).token_ids == [1, 0]
    # 2.0 / 2 (repetition) + 0.4 = 1.4 < 1.5: the penalty comes first, then the bias
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={0: 0.4})
    assert sample(logits[:1], [p], [None], [[0]], [[]]).token_ids == [1]
    out = sample(logits[:1], [greedy], [None], [[]], [[]])
    assert out.logprobs[0] == pytest.approx(raw[1].item())  # the model's own logprob of the chosen token
    # -100 all but bans the top token of a hot row, +100 all but forces a cold one
    hot = [SamplingParams(temperature=1.0, logit_bias={0: -100.0}), SamplingParams(temperature=1.0, logit_bias={2: 100})]
    for seed in range(50):
        g = [torch.Generator().manual_seed(seed) for _ in range(2)]
        assert sample(logits, hot, g, [[], []], [[], []]).token_ids[0] != 0
        assert sample(logits, hot, g, [[], []], [[], []]).token_ids[1] == 2


def test_top_k_one_always_takes_the_top_token_even_when_hot():
    logits = torch.tensor([[0.0, 0.1, 0.05]]).expand(64, 3)
    assert set(draw(logits, [SamplingParams(temperature=5.0, top_k=1)] * 64).token_ids) == {1}


def _steps(logits, p, gen, steps, batch=None):
    """Sample `steps` tokens for one request, alone or as row `at` of a batch of mixed requests."""
    out = []
    for _ in range(steps):
        if batch is None:
            out.append(draw(logits, [p], [gen]).token_ids[0])
        else:
            others_logits, others_params, others_gens, at = batch
            full = torch.cat([others_logits[:at], logits, others_logits[at:]])
            params = others_params[:at] + [p] + others_params[at:]
            gens = others_gens[:at] + [gen] + others_gens[at:]
            out.append(draw(full, params, gens).token_ids[at])
    return out


def test_seeded_request_gets_the_same_tokens_alone_or_in_a_mixed_batch_of_16():
    vocab = 50
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(7))
    p = SamplingParams(temperature=1.3, top_p=0.9, seed=1234)
    alone = _steps(logits, p, torch.Generator().manual_seed(1234), 20)

    others_logits = torch.randn(15, vocab, generator=torch.Generator().manual_seed(8))
    others_params = [SamplingParams(temperature=[0.0, 0.7, 1.0][i % 3], top_k=i % 4, min_p=0.05 * (i % 2),
                                    presence_penalty=0.5 * (i % 2), logprobs=i % 3) for i in range(15)]
    others_gens = [torch.Generator().manual_seed(i) if i % 2 else None for i in range(15)]
    batched = _steps(logits, p, torch.Generator().manual_seed(1234), 20, (others_logits, others_params, others_gens, 7))
    assert alone == batched


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, 50)
    p = SamplingParams(temperature=1.0)
    a = _steps(logits, p, torch.Generator().manual_seed(1), 20)
    b = _steps(logits, p, torch.Generator().manual_seed(2), 20)
    assert a != b, a


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs) if p > 0)


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(), PROBS),
    (SamplingParams(temperature=0.5), [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]),
    (SamplingParams(top_p=0.8), [0.625, 0.375, 0.0, 0.0]),
    (SamplingParams(min_p=0.25), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
])
def test_empirical_frequencies_match_the_distribution(params, expected):
    n = 20000
    torch.manual_seed(0)
    tokens = draw(LOGITS.expand(n, 4), [params] * n).token_ids
    counts = [tokens.count(t) for t in range(4)]
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0), counts
    # 3 degrees of freedom: P(chi2 > 16.3) = 0.001 for a correct sampler; the fixed seed makes it deterministic.
    assert chi_square(counts, expected) < 16.3, (counts, [round(n * p) for p in expected])


def test_a_row_with_its_own_generator_draws_from_the_distribution():
    gen = torch.Generator().manual_seed(3)
    tokens = [draw(LOGITS, [SamplingParams()], [gen]).token_ids[0] for _ in range(1000)]
    assert chi_square([tokens.count(t) for t in range(4)], PROBS) < 16.3, [tokens.count(t) for t in range(4)]


def test_logprobs_are_the_raw_log_softmax_of_the_model_logits():
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0, -1.0]])
    raw = logits.log_softmax(-1)[0]
    # Penalties and temperature change what is sampled, not the reported logprobs (vLLM's raw_logprobs).
    p = SamplingParams(temperature=0, logprobs=3, presence_penalty=2.0)
    out = sample(logits, [p], [None], [[]], [[1]])
    assert out.token_ids == [3]  # 3.0 - 2.0 = 1.0 < 2.0
    assert out.logprobs[0] == pytest.approx(raw[3].item())
    assert [t for t, _ in out.top_logprobs[0]] == [1, 3, 0]
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(raw[[1, 3, 0]].tolist())
    assert math.exp(out.logprobs[0]) == pytest.approx(math.exp(2) / sum(math.exp(x) for x in logits[0].tolist()))


def test_logprobs_zero_gives_only_the_sampled_token_and_none_gives_nothing():
    logits = torch.tensor([[1.0, 3.0, 0.5]]).expand(2, 3)
    out = draw(logits, [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0)])
    assert out.logprobs[0] == pytest.approx(logits[0].log_softmax(-1)[1].item())
    assert out.top_logprobs == [[], []] and out.logprobs[1] is None


def test_mask_stop_tokens_forbids_ids_only_in_the_given_rows():
    out = mask_stop_tokens(torch.zeros(2, 4), [1], [[2, 3]])
    assert out.tolist() == [[0, 0, 0, 0], [0, 0, -math.inf, -math.inf]]


def test_min_tokens_keeps_eos_out_until_enough_tokens_were_generated():
    logits = torch.tensor([[0.0, 1.0, 9.0]])  # 2 = eos, by far the most likely
    p = SamplingParams(temperature=0, min_tokens=2, logprobs=0)
    early = sample(logits, [p], [None], [[]], [[1]], stop_ids=[[2]])
    assert early.token_ids == [1]
    assert early.logprobs[0] == pytest.approx(logits.log_softmax(-1)[0, 1].item())  # raw, not masked
    assert sample(logits, [p], [None], [[]], [[1, 1]], stop_ids=[[2]]).token_ids == [2]
    # Without stop_ids, the request's own stop_token_ids are masked.
    own = SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[2])
    assert sample(logits, [own], [None], [[]], [[]]).token_ids == [1]


# ---- SamplingParams ----


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", temperature=1, stop_token_ids=(5,))
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop, p.stop_token_ids) == (1.0, 1.0, 0, 16, ["###"], [5])
    assert isinstance(p.temperature, float) and not p.greedy
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "hot"),
    ("temperature", True), ("top_p", 0.0), ("top_p", 1.01), ("top_p", None), ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.1), ("frequency_penalty", "0"), ("max_tokens", 0), ("max_tokens", "16"),
    ("min_tokens", -1), ("n", 0), ("n", 1.0), ("logprobs", -1), ("logprobs", 21), ("stop", [""]),
    ("stop", ["ok", 3]), ("stop", 3), ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", 2),
    ("seed", "42"), ("seed", 1.5), ("seed", 2**64), ("ignore_eos", "yes"), ("skip_special_tokens", None),
    ("include_stop_str_in_output", 1), ("logit_bias", [1, 2]), ("logit_bias", {"1": 5}), ("logit_bias", {1: 101}),
    ("logit_bias", {-1: 5}), ("logit_bias", {1: float("nan")}), ("prompt_logprobs", 21), ("prompt_logprobs", True),
    # bounds: what a tensor can hold, and work per step kept small
    ("top_k", 2**63), ("top_k", 2**31), ("n", 129), ("temperature", 10**400), ("logit_bias", {1: 10**400}),
    ("stop", [f"s{i}" for i in range(65)]), ("stop", ["x" * 1025]), ("stop_token_ids", list(range(1025))),
    ("logit_bias", {i: 1.0 for i in range(1025)}),
])
def test_bad_sampling_param_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field  # a ParamError: a server names the field without reading the message


def test_an_error_message_does_not_echo_a_huge_value():
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["x"] * 10 + [3] * 10)
    with pytest.raises(ValueError) as big:
        SamplingParams(seed="9" * 100_000)
    assert len(str(e.value)) < 300 and len(str(big.value)) < 300


def test_the_bounds_themselves_are_accepted():
    p = SamplingParams(top_k=2**31 - 1, n=128, stop=["x" * 1024] * 64, stop_token_ids=list(range(1024)),
                       logit_bias={i: -100 for i in range(1024)}, seed=2**64 - 1)
    assert (p.top_k, len(p.stop), len(p.stop_token_ids), len(p.logit_bias)) == (2**31 - 1, 64, 1024, 1024)


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens=5 must be <= max_tokens=4"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=5, max_tokens=None).min_tokens == 5


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat rows (the candidates fall short of p) to peaked ones
def test_fast_top_p_equals_sorting_the_whole_vocabulary(scale):
    from glm47.engine.sampling import TOP_P_CANDIDATES, top_p_filter_sorted

    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(6, 8 * TOP_P_CANDIDATES, generator=g) * scale
    p = torch.tensor([0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
    fast, slow = top_p_filter(logits, p), top_p_filter_sorted(logits, p)
    assert torch.equal(fast, slow)
    assert kept(fast[:1]) and len(kept(fast[-1:])[0]) == logits.shape[1]  # p = 1 keeps everything


def test_top_k_filter_with_mixed_k_keeps_exactly_k_per_row():
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    out = top_k_filter(logits, torch.tensor([1, 50, 0]))
    assert [int(torch.isfinite(r).sum()) for r in out] == [1, 50, 5000]
    assert int(out[1].argmax()) == int(logits[1].argmax())


def test_argmax_rows_equals_torch_argmax_with_ties_nan_and_infinities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8 * 1024, generator=g)
    x[1, 5000] = x[1, 300] = 50.0  # a tie across slices: the first wins
    x[2, 100] = x[2, 101] = 50.0  # a tie inside a slice
    x[3, 7000] = float("nan")  # NaN counts as the largest
    x[3, 9] = float("inf")
    x[4] = float("-inf")  # nothing finite: index 0
    x[5, 6000] = float("nan")
    x[5, 2000] = float("nan")
    x[6] = 1.0  # all equal
    x[7, -1] = 9.0  # the very last index
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    odd = torch.randn(3, 1000, generator=g)  # shorter than a slice, and not a multiple of it: plain argmax
    assert torch.equal(argmax_rows(odd), odd.argmax(-1))
    small = torch.randint(0, 5, (6, 3003), generator=g).float()  # many ties, slices of 7
    assert torch.equal(argmax_rows(small, chunk=7), small.argmax(-1))
