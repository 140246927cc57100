import torch
import torch.nn.functional as F

from glm47.config import preset
from glm47.model.moe import MoE, select_experts


def logit(p: float) -> float:  # the router logit whose sigmoid is p
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def route(scores, bias, **kw):
    logits = torch.tensor([[logit(s) for s in scores]], dtype=torch.float32)
    args = dict(top_k=2, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0) | kw
    w, ids = select_experts(logits, torch.tensor(bias, dtype=torch.float32), **args)
    order = ids[0].argsort()
    return ids[0][order].tolist(), w[0][order].tolist()


def test_top_k_picks_highest_sigmoid_scores():
    ids, w = route([0.1, 0.9, 0.5, 0.7], [0, 0, 0, 0])
    assert ids == [1, 3]
    assert w == pytest_approx([0.9, 0.7])


def test_bias_changes_selection_but_not_weights():
    # +0.5 on expert 0 lifts its choice score 0.1 -> 0.6 above expert 2's 0.5 (but not above 0.7 / 0.9)
    ids, w = route([0.1, 0.9, 0.5, 0.7], [0.5, 0, 0, 0], top_k=3)
    assert ids == [0, 1, 3]
    assert w == pytest_approx([0.1, 0.9, 0.7])  # the weight of expert 0 is its unbiased score 0.1


def test_norm_topk_prob_and_scaling():
    ids, w = route([0.2, 0.6, 0.1, 0.2], [0, 0, 0, 0], norm_topk_prob=True, routed_scaling_factor=2.5)
    # chosen 0.6 and one of the 0.2s; normalised 0.6/0.8 = 0.75 and 0.25, times 2.5
    assert ids[1] == 1 or ids[0] == 1
    assert sorted(w) == pytest_approx([0.625, 1.875])


def test_group_limited_routing_keeps_only_best_groups():
    # 2 groups of 3: group 0 = [0.9, 0.1, 0.1] (top-2 sum 1.0), group 1 = [0.6, 0.6, 0.1] (top-2 sum 1.2).
    # Plain top-2 would take experts 0 and 3/4; with topk_group=1 only group 1 is eligible.
    scores = [0.9, 0.1, 0.1, 0.6, 0.6, 0.1]
    assert route(scores, [0] * 6)[0] == [0, 3] or route(scores, [0] * 6)[0] == [0, 4]
    ids, w = route(scores, [0] * 6, n_group=2, topk_group=1)
    assert ids == [3, 4] and w == pytest_approx([0.6, 0.6])
    # A bias on expert 1 makes group 0 win (0.9 + 0.1 + 0.4 = 1.4 > 1.2) and picks expert 1, weight 0.1.
    ids, w = route(scores, [0, 0.4, 0, 0, 0, 0], n_group=2, topk_group=1)
    assert ids == [0, 1] and w == pytest_approx([0.9, 0.1])


def pytest_approx(values):
    import pytest

    return pytest.approx(values, abs=1e-6)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The reference: loop over experts, mask the tokens routed to each (as transformers does)."""
    weights, ids = moe.gate(x)
    out = torch.zeros_like(x, dtype=torch.float32)
    E, inter = moe.experts.num_experts, moe.experts.intermediate_size
    for e in range(E):
        tok, slot = torch.where(ids == e)
        if len(tok) == 0:
            continue
        w13 = moe.experts.w13[e]
        h = F.silu(x[tok] @ w13[:inter].T) * (x[tok] @ w13[inter:].T)
        out[tok] += (h @ moe.experts.w2[e].T).float() * weights[tok, slot, None]
    return out.to(x.dtype) + moe.shared_experts(x)


def test_grouped_experts_equal_naive_loop():
    torch.manual_seed(0)
    config = preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
        for n in (1, 7, 64):  # decode-sized and prefill-sized batches
            x = torch.randn(n, config.hidden_size)
            got, want = moe(x), naive_moe(moe, x)
            assert (got - want).abs().max() < 1e-5, n


def test_gemm_rows_cover_the_range_with_few_sizes():
    from glm47.model.moe import gemm_rows

    assert gemm_rows(5, 0) == []
    for n in (1, 15, 16, 17, 100, 1000):
        rows = gemm_rows(5, n)
        assert [lo for lo, _ in rows] == [5] + [hi for _, hi in rows[:-1]] and rows[-1][1] == 5 + n
        sizes = [hi - lo for lo, hi in rows]
        assert all(s >= 16 and s & (s - 1) == 0 for s in sizes[:-1]), sizes  # powers of two, then one remainder
