import torch

from glm47.config import preset
from glm47.model.glm4_moe import Glm4MoeForCausalLM
from glm47.engine.paged_attention import ForwardBatch, KVPool
from glm47.engine.step import Layout
from glm47.model.kv_cache import AttentionCache, KVCache, NoCache


def random_model(name="tiny", **kw):
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(preset(name, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model


def logits(model, *args):
    return model.compute_logits(model(*args))


def test_incremental_decoding_matches_full_forward_token_by_token():
    model = random_model()
    B, T = 2, 20
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = logits(model, ids)
        cache = KVCache.for_model(model.config, B, 32)
        pieces = []
        # a prefill chunk, a second chunk, then one token at a time
        for start, end in [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, T)]:
            pos = torch.arange(start, end).expand(B, -1)
            pieces.append(logits(model, ids[:, start:end], pos, cache))
    stepped = torch.cat(pieces, dim=1)
    assert (stepped - full).abs().max() < 1e-5


def test_rows_at_different_positions_share_one_cache():
    model = random_model()
    a = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_a, want_b = logits(model, a)[0, -1], logits(model, b)[0, -1]
        cache = KVCache.for_model(model.config, 2, 16)
        model(a[:, :8], torch.arange(8)[None], _row_view(cache, 0))
        model(b[:, :4], torch.arange(4)[None], _row_view(cache, 1))
        step = logits(model, torch.tensor([[a[0, 8]], [b[0, 4]]]), torch.tensor([[8], [4]]), cache)
    assert (step[0, 0] - want_a).abs().max() < 1e-5
    assert (step[1, 0] - want_b).abs().max() < 1e-5


def _row_view(cache: KVCache, row: int) -> KVCache:
    view = KVCache.__new__(KVCache)
    view.k, view.v, view.max_len = cache.k[:, row:row + 1], cache.v[:, row:row + 1], cache.max_len
    return view


def test_position_beyond_cache_is_a_clear_error():
    model = random_model()
    cache = KVCache.for_model(model.config, 1, 4)
    try:
        model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], cache)
    except ValueError as e:
        assert "beyond the cache length 4" in str(e)
    else:
        raise AssertionError("no error")


def test_every_cache_implements_the_attention_protocol():
    """Attention calls cache.attend(layer_idx, q, k, v, positions): NoCache, KVCache and the engine's paged
    ForwardBatch all provide it, and the model declares num_kv_layers layers for them (decoder + MTP)."""
    model = random_model()
    pool = KVPool(model.num_kv_layers, 4, 4, 1, 2, torch.float32)
    paged = ForwardBatch.build(pool, Layout.of([[1]], [0], [3], 4))
    for cache in (NoCache(), KVCache.for_model(model.config, 1, 8), paged):
        assert isinstance(cache, AttentionCache), cache
    assert model.num_kv_layers == model.config.num_hidden_layers + len(model.mtp) == 4
