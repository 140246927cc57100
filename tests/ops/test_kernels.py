"""glm47.kernels against their torch twins (glm47/ops/reference.py): the skinny bf16 linear against F.linear, the
fused routed experts against the grouped torch path, paged decode attention against the gather + SDPA path, and a
whole bf16 engine's greedy tokens with the kernels on and off. These need the kernels, so an AVX512-BF16 CPU; the
dispatch itself (which implementation runs when) is tested on every CPU in test_ops.py."""


import pytest
import torch
import torch.nn.functional as F

from glm47 import kernels
from glm47.checkpoint.loader import load_model
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.engine.sampling import SamplingParams
from glm47.model import layers
from glm47.model.linear import FusedExperts
from glm47.model.moe import MoE
from glm47.ops import CPU_BF16, REFERENCE, use
from glm47.ops.reference import decode_attention, routed_experts, select_experts

pytestmark = pytest.mark.skipif(not kernels.cpu_has_avx512_bf16(), reason="the kernels need an AVX512-BF16 CPU")


def bf16_close(got, want, min_equal=0.99):
    """Equal up to the order of a float32 sum: nearly every value bit for bit, the rest within a bf16 ulp or two."""
    got, want = got.float(), want.float()
    assert got.shape == want.shape
    equal = (got == want).float().mean().item()
    assert equal >= min_equal, f"only {equal:.4f} of the values are bit-identical"
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-2 * want.abs().max().item() + 1e-30)


def test_the_kernels_build_on_this_machine():
    assert kernels.extension() is not None, "the C++ extension did not build (see the warning in the log)"


LINEAR_SHAPES = [(1, 1, 1), (1, 7, 5), (2, 33, 70), (3, 64, 64), (4, 129, 31), (5, 100, 1000), (8, 96, 2048),
                 (13, 40, 33), (16, 257, 96), (16, 1030, 1024)]


@pytest.mark.parametrize("M, N, K", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(M, N, K, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if with_bias else None
    bf16_close(kernels.linear(x, w, b), F.linear(x, w, b))
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = kernels.linear(x, w, b, float_out=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_linear_takes_leading_dims_and_strided_rows():
    x = torch.randn(2, 3, 80).bfloat16()
    w = torch.randn(50, 80).bfloat16()
    bf16_close(kernels.linear(x, w), F.linear(x, w))
    rows = torch.randn(4, 160).bfloat16()[:, :80]  # row stride 160
    bf16_close(kernels.linear(rows, w), F.linear(rows, w))


def random_experts(E, H, I, seed):
    torch.manual_seed(seed)
    ex = FusedExperts(E, H, I, fmt=torch.bfloat16).requires_grad_(False)
    torch.nn.init.normal_(ex.w13, std=H ** -0.5)
    torch.nn.init.normal_(ex.w2, std=I ** -0.5)
    return ex


def routing(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return torch.rand(T, K, generator=g) * 2, ids


# (E, H, I) x (T tokens, top-K): few tokens leave most experts idle; I = 20 and H = 40 leave vector tails. The last
# ones have >= 32 rows per expert, a prefill chunk's path (activations packed by 16 tokens): group tails, K tails
# of the 16-wide transposes (H = 40, 96), column chunks of 8 (I = 40); an odd H cannot pack and reads in place.
EXPERT_CASES = [(E, H, I, T, K) for E, H, I in [(8, 64, 32), (6, 40, 20), (16, 256, 96)]
                for T, K in [(1, 1), (1, 6), (3, 2), (5, 5), (16, 6), (16, 1)]] + [(64, 128, 64, 16, 8)] + [
                (6, 40, 20, 100, 3), (8, 64, 32, 300, 2), (4, 96, 40, 70, 4), (64, 256, 64, 600, 8),
                (4, 33, 16, 100, 2)]


@pytest.mark.parametrize("E, H, I, T, K", EXPERT_CASES)
def test_routed_experts_equal_the_grouped_torch_path(E, H, I, T, K):
    ex = random_experts(E, H, I, seed=T * 10 + K)
    x = torch.randn(T, H).bfloat16()
    weights, ids = routing(T, E, K, seed=T + K)
    got = kernels.routed_experts(x, ex.w13, ex.w2, weights, ids)
    want = routed_experts(x, ex.w13, ex.w2, weights, ids)
    bf16_close(got, want, min_equal=0.95)


def test_routed_experts_with_every_token_on_one_expert_and_most_experts_idle():
    ex = random_experts(8, 64, 48, seed=1)
    x = torch.randn(11, 64).bfloat16()
    ids = torch.full((11, 1), 5)
    weights = torch.rand(11, 1)
    got = kernels.routed_experts(x, ex.w13, ex.w2, weights, ids)
    bf16_close(got, routed_experts(x, ex.w13, ex.w2, weights, ids), min_equal=0.95)


def test_routed_experts_rejects_an_expert_id_out_of_range():
    ex = random_experts(4, 32, 16, seed=0)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.routed_experts(torch.randn(1, 32).bfloat16(), ex.w13, ex.w2, torch.ones(1, 1), torch.tensor([[4]]))


def moe_layer(config, seed):
    torch.manual_seed(seed)
    moe = MoE(config, fmt=torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=config.hidden_size ** -0.5)
    moe.gate.e_score_correction_bias.normal_(0, 0.01)
    use(moe, CPU_BF16)
    return moe.requires_grad_(False)


@pytest.mark.parametrize("T", [1, 3, 16, 100, 300])
@pytest.mark.parametrize("shared_width", [0, 1, 2])  # no shared expert, one as wide as a routed one, twice as wide
def test_moe_block_with_router_and_shared_expert_kernels_equals_the_torch_path(monkeypatch, T, shared_width):
    """MoE.forward takes kernels.route (for <= ROUTE_MAX_TOKENS tokens) and one routed_experts call with the shared
    expert inside; the torch twin (select_experts, routed_experts, MLP, y + shared) gives the same bf16 values."""
    config = preset("bench").replace(hidden_size=96, moe_intermediate_size=40, n_routed_experts=12,
                                     num_experts_per_tok=4, n_shared_experts=shared_width)
    moe = moe_layer(config, seed=T + shared_width)
    x = torch.randn(1, T, 96).bfloat16()
    calls = []
    for name in ("route", "routed_experts"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        got = moe(x)
        assert len(calls) == (2 if T <= kernels.ROUTE_MAX_TOKENS else 1)
        use(moe, REFERENCE)
        want = moe(x)
    bf16_close(got, want, min_equal=0.95)


@pytest.mark.parametrize("E, K, n_group, topk_group", [(64, 8, 1, 1), (16, 3, 4, 2), (8, 2, 2, 1), (12, 12, 1, 1)])
def test_route_equals_select_experts(E, K, n_group, topk_group):
    config = preset("bench").replace(n_routed_experts=E, num_experts_per_tok=K, n_group=n_group,
                                     topk_group=topk_group)
    g = moe_layer(config, seed=E + K).gate
    x = torch.randn(64, config.hidden_size).bfloat16()
    weights, ids = kernels.route(x, g.weight, g.e_score_correction_bias, K, n_group, topk_group, g.norm_topk_prob,
                                 g.scale)
    want_weights, want_ids = select_experts(F.linear(x.float(), g.weight), g.e_score_correction_bias, K, n_group,
                                            topk_group, g.norm_topk_prob, g.scale)
    assert torch.equal(ids, want_ids)  # the same experts in the same (descending) order
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-6)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32


# (num_blocks, block_size, Hkv, head_dim, H) x (B decodes, longest context): GQA groups of 8, 2 and 6 heads; the
# longer contexts split into chunks of keys (split-K) that the kernel merges.
ATTENTION_CASES = [(c, B, S) for c in [(64, 16, 2, 128, 16), (40, 4, 2, 32, 4), (40, 4, 1, 64, 6)]
                   for B, S in [(1, 1), (1, 7), (1, 100), (3, 37), (16, 60)]] + [
                  ((400, 16, 2, 128, 16), 1, 3000), ((800, 8, 1, 64, 6), 3, 1500),
                  ((60, 12, 2, 64, 8), 2, 300)]  # blocks of 12: not a power of two


@pytest.mark.parametrize("cache, B, S", ATTENTION_CASES)
def test_decode_attention_is_as_exact_as_the_gathered_sdpa(cache, B, S):
    """Against float64 attention over the same bf16 inputs, the kernel's error is no larger than that of its twin
    (gathered blocks, SDPA in bf16), and the two agree within a bf16 ulp or two."""
    nb, bs, Hkv, D, H = cache
    g = torch.Generator().manual_seed(B * 100 + S)
    k_cache = torch.randn(nb, bs, Hkv, D, generator=g).bfloat16()
    v_cache = torch.randn(nb, bs, Hkv, D, generator=g).bfloat16()
    width = -(-S // bs)
    tables = torch.stack([torch.randperm(nb, generator=g)[:width] for _ in range(B)])  # scattered blocks
    lens = torch.randint(1, S + 1, (B,), generator=g)
    lens[0] = S
    q = 2 * torch.randn(B, H, D, generator=g).bfloat16()
    mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :] if B > 1 else None
    got = kernels.decode_attention(q, k_cache, v_cache, tables, lens).float()
    twin = decode_attention(q, k_cache, v_cache, tables, mask, S, lens).float()
    exact = decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, mask, S, lens).float()
    assert (got - exact).abs().mean() <= 1.05 * (twin - exact).abs().mean() + 1e-6
    assert (got - exact).abs().max() <= 1.05 * (twin - exact).abs().max() + 1e-6
    bf16_close(got, twin, min_equal=0.6)


# (n queries, context_len, H, Hkv, D, block_size): a single query, a chunk shorter and longer than a key block
# (64), contexts shorter and longer than the chunk, GQA groups of 1, 2, 4, 6 and 8 (30 rows a task: row tails),
# head_dim 32 to 256 (96: not a multiple of 64), blocks of 12 (not a power of two).
PREFILL_CASES = [(1, 0, 4, 2, 64, 16), (5, 0, 16, 2, 128, 16), (70, 0, 4, 4, 32, 16), (37, 100, 8, 2, 128, 32),
                 (200, 3, 16, 2, 128, 16), (129, 64, 4, 1, 256, 16), (64, 64, 8, 8, 32, 4), (33, 10, 6, 1, 96, 16),
                 (40, 20, 4, 2, 64, 12)]


def attention_reference(q, k_cache, v_cache, table, ctx, dtype):
    """Gathered blocks, explicit causal mask shifted by the context, SDPA in `dtype`."""
    n = q.shape[0]
    k = k_cache[table].flatten(0, 1)[:ctx + n].to(dtype).transpose(0, 1)[None]
    v = v_cache[table].flatten(0, 1)[:ctx + n].to(dtype).transpose(0, 1)[None]
    mask = torch.arange(ctx + n)[None, :] <= torch.arange(ctx, ctx + n)[:, None]
    o = F.scaled_dot_product_attention(q.to(dtype).transpose(0, 1)[None], k, v, attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1).float()


@pytest.mark.parametrize("n, ctx, H, Hkv, D, bs", PREFILL_CASES)
def test_prefill_attention_is_as_exact_as_bf16_sdpa(n, ctx, H, Hkv, D, bs):
    """Against float64 attention over the same bf16 inputs, the kernel's error is no larger than SDPA's in bf16
    (both round the probabilities to bf16 for P.V), and the two agree within a bf16 ulp or two."""
    g = torch.Generator().manual_seed(n * 1000 + ctx)
    width = -(-(ctx + n) // bs)
    k_cache = torch.randn(width + 5, bs, Hkv, D, generator=g).bfloat16()
    v_cache = torch.randn(width + 5, bs, Hkv, D, generator=g).bfloat16()
    table = torch.randperm(width + 5, generator=g)[:width]  # scattered blocks
    q = (1.5 * torch.randn(n, H, D, generator=g)).bfloat16()
    got = kernels.prefill_attention(q, k_cache, v_cache, table, ctx).float()
    exact = attention_reference(q, k_cache, v_cache, table, ctx, torch.float64)
    sdpa_bf16 = attention_reference(q, k_cache, v_cache, table, ctx, torch.bfloat16)
    assert (got - exact).abs().mean() <= 1.05 * (sdpa_bf16 - exact).abs().mean() + 1e-6
    assert (got - exact).abs().max() <= 1.05 * (sdpa_bf16 - exact).abs().max() + 1e-6
    bf16_close(got, sdpa_bf16, min_equal=0.7)


def test_prefill_attention_rejects_a_block_table_too_short():
    k_cache = torch.zeros(4, 16, 2, 32).bfloat16()
    with pytest.raises(RuntimeError, match="does not cover 40 keys"):
        kernels.prefill_attention(torch.zeros(8, 4, 32).bfloat16(), k_cache, k_cache, torch.tensor([0, 1]), 32)


@pytest.mark.parametrize("T, H, Hkv, D, rot, norm", [(1, 16, 2, 128, 64, True), (16, 16, 2, 128, 64, True),
                                                     (7, 4, 2, 32, 16, True), (5, 4, 4, 64, 64, False),
                                                     (300, 8, 1, 128, 128, True), (3, 4, 2, 96, 40, True)])
def test_qk_norm_rope_equals_rmsnorm_then_apply_rope(T, H, Hkv, D, rot, norm):
    g = torch.Generator().manual_seed(T * 10 + D)
    qkv = (3 * torch.randn(2, T, (H + 2 * Hkv) * D, generator=g)).bfloat16()
    q_norm, k_norm = layers.RMSNorm(D, 1e-5, torch.bfloat16), layers.RMSNorm(D, 1e-5, torch.bfloat16)
    q_norm.weight.data = (torch.rand(D, generator=g) + 0.5).bfloat16()
    k_norm.weight.data = (torch.rand(D, generator=g) + 0.5).bfloat16()
    cos, sin = layers.RotaryEmbedding(rot, 1e6)(torch.randint(0, 200000, (2, T), generator=g), torch.bfloat16)
    with torch.inference_mode():
        q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.view(2, T, H, D), k.view(2, T, Hkv, D)
        if norm:
            q, k = q_norm(q), k_norm(k)
        want_q, want_k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        got_q, got_k = kernels.qk_norm_rope(qkv, H, Hkv, D, q_norm.weight if norm else None,
                                            k_norm.weight if norm else None, 1e-5, cos, sin)
    bf16_close(got_q, want_q, min_equal=0.999)
    bf16_close(got_k, want_k, min_equal=0.999)


@pytest.mark.parametrize("T, D", [(1, 1024), (16, 1024), (300, 96), (5, 40)])
def test_rms_norm_and_add_and_norm_equal_the_torch_rmsnorm(T, D):
    g = torch.Generator().manual_seed(T + D)
    norm = layers.RMSNorm(D, 1e-5, torch.bfloat16)
    norm.weight.data = (torch.rand(D, generator=g) + 0.5).bfloat16()
    x = (4 * torch.randn(2, T, D, generator=g)).bfloat16()
    h = torch.randn(2, T, D, generator=g).bfloat16()
    with torch.inference_mode():
        got = kernels.rms_norm(x, norm.weight, 1e-5)
        norm.ops = CPU_BF16
        got_sum, got_norm = norm.add_and_norm(x, h)
        norm.ops = REFERENCE
        want = norm(x)
        want_sum, want_norm = norm.add_and_norm(x, h)
    bf16_close(got, want, min_equal=0.999)
    assert torch.equal(got_sum, want_sum)  # one bf16 add: exact
    bf16_close(got_norm, want_norm, min_equal=0.999)


# ---- a whole model


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bf16")
    init_checkpoint(preset("tiny"), path, seed=0)
    return load_model(path, dtype=torch.bfloat16)  # GLM47_KERNELS unset: the kernels


def generate(model, prompts, max_tokens=10):
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_tokens=1024, max_num_batched_tokens=16,
                                           max_num_seqs=8))
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                        ignore_eos=True))]


def test_bf16_engine_gives_the_same_greedy_tokens_with_kernels_on_and_off(bf16_model, monkeypatch):
    """Steps of 1 to 16 tokens (decodes next to chunked prefills): every linear layer, MoE, decode and prefill
    attention goes through the kernels, and the greedy tokens are those of the torch path."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (1, 5, 12, 30, 3, 9)]
    counts = {"linear": 0, "routed_experts": 0, "decode_attention": 0, "prefill_attention": 0,
              "qk_norm_rope": 0, "route": 0, "rms_norm": 0}
    for name in counts:
        real = getattr(kernels, name)

        def spy(*args, name=name, real=real, **kw):
            counts[name] += 1
            return real(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    assert bf16_model.ops is CPU_BF16
    on = generate(bf16_model, prompts)
    assert all(counts.values()), counts
    bf16_model.use_ops(REFERENCE)
    before = dict(counts)
    try:
        off = generate(bf16_model, prompts)
    finally:
        bf16_model.use_ops(CPU_BF16)
    assert counts == before, "the torch ops must keep every call off the kernels"
    assert on == off


@pytest.mark.parametrize("first, T, K", [(0, 5, 3), (4, 16, 2), (4, 300, 4)])
def test_routed_experts_of_one_expert_parallel_rank_equal_the_twin(first, T, K):
    """A rank holding experts first .. first + 3 of 8 computes only the copies routed to them, as the twin does
    (the other ranks' sums complete it); its shared expert is added whole."""
    ex = random_experts(8, 64, 32, seed=first + T)
    x = torch.randn(T, 64).bfloat16()
    weights, ids = routing(T, 8, K, seed=T)
    w13, w2 = ex.w13[first:first + 4].contiguous(), ex.w2[first:first + 4].contiguous()
    got = kernels.routed_experts(x, w13, w2, weights, ids, first=first)
    bf16_close(got, routed_experts(x, w13, w2, weights, ids, first), min_equal=0.95)
    other = 4 - first
    rest = kernels.routed_experts(x, ex.w13[other:other + 4].contiguous(), ex.w2[other:other + 4].contiguous(),
                                  weights, ids, first=other)
    whole = routed_experts(x, ex.w13, ex.w2, weights, ids)
    torch.testing.assert_close((got.float() + rest.float()), whole.float(), rtol=2 ** -6, atol=2e-2)
