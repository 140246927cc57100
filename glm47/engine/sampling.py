"""Sampling: sample(), which turns a batch of logits into ids under each row's SamplingParams.
The filters are pure functions of (N, V) logits with one parameter per row, so a batch that mixes greedy,
top-p and seeded requests is a single vectorised pass; only the random noise is drawn per row. Stop strings
and detokenisation are not here (see glm47/text/): the engine only sees stop token ids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# SamplingParams and its errors live in the torch-free glm47/sampling_params.py; the engine imports them from here.
from glm47.sampling_params import GREEDY_BELOW, ParamError, SamplingParams  # noqa: F401

# float32 cumsum drifts by ~1e-7, so a set whose mass is exactly top_p could look just short of it.
_TOP_P_SLACK = 1e-6

# ---- pure filters: logits (N, V) float32 and one parameter per row (N,) -> new logits (N, V) ----


def token_counts(ids: list[list[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, V) float32: how often each token id occurs in each row's list."""
    width = max((len(r) for r in ids), default=0)
    counts = torch.zeros(len(ids), vocab_size + 1, device=device)
    if width:
        # Pad with id vocab_size: the padding is counted in a spare column that is dropped.
        padded = torch.tensor([list(r) + [vocab_size] * (width - len(r)) for r in ids], device=device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, prompt_counts: Tensor, output_counts: Tensor, repetition: Tensor,
                    presence: Tensor, frequency: Tensor) -> Tensor:
    """Repetition penalty as in HF/vLLM (divide positive logits, multiply negative ones) on every token seen in
    the prompt or the output; then OpenAI's penalties on output tokens only:
    logit -= frequency * count + presence * (count > 0)."""
    seen = (prompt_counts > 0) | (output_counts > 0)
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row by its temperature; greedy rows (< GREEDY_BELOW) are left as they are."""
    t = torch.where(temperature < GREEDY_BELOW, torch.ones_like(temperature), temperature)
    return logits / t[:, None]


def top_k_filter(logits: Tensor, k: Tensor) -> Tensor:
    """Keep each row's k largest logits (ties with the k-th survive too); k <= 0 keeps the whole row.
    Only the largest k of the batch are selected (topk), not the whole vocabulary sorted."""
    vocab = logits.shape[-1]
    k = torch.where(k <= 0, vocab, k).clamp(max=vocab)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (N, 1)
    return logits.masked_fill(logits < kth, -math.inf)


# top_p_filter looks at the most likely TOP_P_CANDIDATES tokens first: sorting a 151,552-token row costs
# ~17 ms, and a batch of 64 rows >1 s per step. Rows whose candidates do not reach p (rare: a very flat
# distribution) are done the slow way, so the result is exactly top_p_filter_sorted's.
TOP_P_CANDIDATES = 256


def top_p_filter(logits: Tensor, p: Tensor) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p; the top token always stays."""
    vocab = logits.shape[-1]
    if vocab <= TOP_P_CANDIDATES:
        return top_p_filter_sorted(logits, p)
    top, order = logits.topk(TOP_P_CANDIDATES, dim=-1)  # sorted, most likely first
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()  # probabilities in the whole vocabulary
    mass_before = probs.cumsum(-1) - probs
    drop = (mass_before >= p[:, None] - _TOP_P_SLACK) & (p[:, None] < 1)
    drop[:, 0] = False
    # A row is decided by its candidates when they reach p: every other token comes after them in the order,
    # so it is dropped too. Otherwise (or at p = 1) the row goes through the full sort.
    decided = (mass_before[:, -1] + probs[:, -1] >= p - _TOP_P_SLACK) & (p < 1)
    out = torch.full_like(logits, -math.inf).scatter_(1, order, top.masked_fill(drop, -math.inf))
    out = torch.where(decided[:, None], out, logits)
    rest = (~decided & (p < 1)).nonzero().flatten()
    if rest.numel():
        out[rest] = top_p_filter_sorted(logits[rest], p[rest])
    return out


def top_p_filter_sorted(logits: Tensor, p: Tensor) -> Tensor:
    """top_p_filter by sorting each whole row: the reference (and the fallback for flat rows)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop = (mass_before >= p[:, None] - _TOP_P_SLACK) & (p[:, None] < 1)  # the slack must not bite at p = 1
    drop[:, 0] = False
    drop = torch.empty_like(drop).scatter_(1, order, drop)  # back to vocab order
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability; min_p 0 keeps all."""
    # p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p): no softmax needed, and log(0) = -inf drops none.
    limit = logits.amax(-1, keepdim=True) + min_p[:, None].log()
    return logits.masked_fill(logits < limit, -math.inf)


def apply_logit_bias(logits: Tensor, rows: list[int], ids: list[int], values: list[float]) -> Tensor:
    """logits[rows[j], ids[j]] += values[j], on a copy."""
    dev = logits.device
    return logits.index_put((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                            torch.tensor(values, dtype=logits.dtype, device=dev), accumulate=True)


def mask_stop_tokens(logits: Tensor, rows: list[int], ids: list[list[int]]) -> Tensor:
    """Forbid ids[j] in row rows[j]; used while a sequence has fewer than min_tokens outputs."""
    r = [row for row, row_ids in zip(rows, ids, strict=True) for _ in row_ids]
    c = [t for row_ids in ids for t in row_ids]
    out = logits.clone()
    out[r, c] = -math.inf
    return out


# ---- the batch sampler ----


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # the sampled token's raw log-prob; None where the request asked for none
    top_logprobs: list[list[tuple[int, float]]]  # (id, raw log-prob), most likely first; [] when not asked
    # per row, its generator's state before the row drew its noise (None: greedy or no generator of its own);
    # speculative decoding rewinds a generator to the first row whose token it did not keep
    generator_states: list[Tensor | None]


def argmax_rows(x: Tensor, chunk: int = 1024) -> Tensor:
    """x.argmax(-1) for a 2-D float tensor, found through the maxima of `chunk`-wide slices (one vectorised pass)
    and then the first best slice of each row: torch's argmax over a 151,552-wide row is scalar, ~0.7 ms for 16
    rows against ~0.1 ms this way. The same index in every case, ties (the first) and NaN (the first) included."""
    n, vocab = x.shape
    if vocab % chunk or vocab <= chunk:
        return x.argmax(-1)
    slices = x.view(n, vocab // chunk, chunk)
    best = slices.amax(-1).argmax(-1)  # the first slice holding the row's maximum (or its first NaN)
    return best * chunk + slices[torch.arange(n, device=x.device), best].argmax(-1)


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           prompt_ids: list[list[int]], output_ids: list[list[int]], stop_ids: list[list[int]] | None = None,
           default_generator: torch.Generator | None = None) -> SampleOutput:
    """One token per row of logits (N, V). Order: min_tokens mask, penalties, logit_bias, then greedy argmax, or
    temperature, top-k, top-p, min-p (HF's order) and the Gumbel-max draw (probs / Exp(1) noise, argmax).

    A row with its own generator draws its noise from it alone, so a seeded request gets the same tokens whatever
    else is in the batch; rows without one share default_generator (None = torch's global RNG). Generators must
    live on logits.device. stop_ids[i] are the ids masked while row i has fewer than min_tokens outputs: the
    engine passes stop_token_ids plus eos (unless ignore_eos); without it, params[i].stop_token_ids is used.
    Logprobs are the model's own log-softmax of the raw logits (vLLM's default), untouched by penalties,
    temperature and filters: they say how likely the model found the token, which is what clients expect."""
    n, vocab = logits.shape
    assert len(params) == len(generators) == len(prompt_ids) == len(output_ids) == n, (
        n, len(params), len(generators), len(prompt_ids), len(output_ids))
    raw = logits.float()
    dev = raw.device
    logits = raw

    short = [i for i, p in enumerate(params) if len(output_ids[i]) < p.min_tokens]
    if short:
        ids = [stop_ids[i] if stop_ids is not None else (params[i].stop_token_ids or []) for i in short]
        logits = mask_stop_tokens(logits, short, ids)

    penalised = [p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params]
    if any(penalised):
        # Rows without a penalty get empty lists: their counts stay zero, so their logits pass through unchanged.
        prompt = [ids if p.repetition_penalty != 1 else [] for p, ids in zip(params, prompt_ids)]
        output = [ids if on else [] for on, ids in zip(penalised, output_ids)]
        logits = apply_penalties(logits, token_counts(prompt, vocab, dev), token_counts(output, vocab, dev),
                                 _column(params, "repetition_penalty", dev), _column(params, "presence_penalty", dev),
                                 _column(params, "frequency_penalty", dev))

    biased = [(i, t, v) for i, p in enumerate(params) if p.logit_bias for t, v in p.logit_bias.items()]
    if biased:
        rows, cols, values = zip(*biased)
        logits = apply_logit_bias(logits, list(rows), list(cols), list(values))

    token_ids = argmax_rows(logits)
    states: list[Tensor | None] = [None] * n
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = [params[i] for i in rows]
        idx = torch.tensor(rows, device=dev)
        x = apply_temperature(logits[idx], _column(sub, "temperature", dev))
        if any(p.top_k > 0 for p in sub):
            x = top_k_filter(x, _column(sub, "top_k", dev, torch.long))
        if any(p.top_p < 1 for p in sub):
            x = top_p_filter(x, _column(sub, "top_p", dev))
        if any(p.min_p > 0 for p in sub):
            x = min_p_filter(x, _column(sub, "min_p", dev))
        noise, row_states = _exponential_noise(x, [generators[i] for i in rows], default_generator)
        token_ids[idx] = argmax_rows(x.softmax(-1) / noise)
        for j, i in enumerate(rows):
            states[i] = row_states[j]

    logprobs: list[float | None] = [None] * n
    top: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        idx = torch.tensor(want, device=dev)
        chosen, best = token_logprobs(raw[idx], token_ids[idx], [params[i].logprobs for i in want])
        for j, i in enumerate(want):
            logprobs[i], top[i] = chosen[j], best[j]
    return SampleOutput(token_ids.tolist(), logprobs, top, states)


def token_logprobs(logits: Tensor, ids: Tensor, k: list[int]) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Per row of raw logits (N, V): the log-softmax of ids[row] and the k[row] most likely (id, logprob)."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, ids[:, None]).squeeze(1).tolist()
    most = min(max(k), lp.shape[-1])
    top_v, top_i = lp.topk(most, dim=-1) if most else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return chosen, [list(zip(i[:n], v[:n])) for i, v, n in zip(top_i, top_v, k)]


def _column(params: list[SamplingParams], name: str, device: torch.device, dtype=torch.float32) -> Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)


def _exponential_noise(like: Tensor, generators: list[torch.Generator | None],
                       default_generator: torch.Generator | None) -> tuple[Tensor, list[Tensor | None]]:
    """Exp(1) noise shaped like `like`; each row with a generator draws exactly V values from it per step, rows
    in order. Also returns each such row's generator state from before its draw (None for the others)."""
    noise = torch.empty_like(like)
    states: list[Tensor | None] = [None] * len(generators)
    shared = [j for j, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        noise.exponential_(generator=default_generator)
    elif shared:
        noise[shared] = torch.empty(len(shared), like.shape[1], device=like.device).exponential_(
            generator=default_generator)
    for j, g in enumerate(generators):
        if g is not None:
            states[j] = g.get_state()
            noise[j].exponential_(generator=g)
    # A draw of exactly 0 would make a filtered token's 0 / 0 = NaN, which argmax picks; tiny keeps it 0.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny), states
