from glm47.checkpoint.writer import init_checkpoint
from glm47.cli.main import main
from glm47.config import preset


def test_bench_reports_every_measurement(tmp_path, capsys):
    init_checkpoint(preset("tiny-glm47"), tmp_path, seed=0)
    rc = main(["bench", "--model", str(tmp_path), "--dtype", "float32", "--decode-tokens", "4", "--concurrent", "3",
               "--prefill", "40", "--history", "64", "--kv-cache-tokens", "1024"])
    out = capsys.readouterr().out
    assert rc == 0
    for words in ("batch-1 decode", "roofline", "3 concurrent", "roofline of 3-token decode steps", "prefill    40",
                  "with prefix caching"):
        assert words in out, out


def test_bench_rejects_a_nonsense_size(capsys):
    assert main(["bench", "--model", "x", "--prefill", "0"]) == 2
    assert "--prefill must be at least 2" in capsys.readouterr().err


def test_active_weight_bytes_counts_the_experts_a_step_can_touch():
    import torch

    from glm47.bench import active_weight_bytes
    from glm47.model.glm4_moe import Glm4MoeForCausalLM

    c = preset("bench")  # 64 experts, top-8, 7 MoE layers, bf16
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(c, mtp=False, fmt=torch.bfloat16)
    expert_bytes = 7 * 64 * 3 * c.hidden_size * c.moe_intermediate_size * 2  # all routed experts
    embed_bytes = c.vocab_size * c.hidden_size * 2
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) - expert_bytes - embed_bytes
    row = c.hidden_size * 2
    assert active_weight_bytes(model) == rest + expert_bytes // 8 + row  # top-8 of 64, one embedding row
    share = 1 - (1 - 8 / 64) ** 16  # experts one of 16 uniformly routed tokens uses
    want = rest + expert_bytes * share + 16 * row
    assert abs(active_weight_bytes(model, 16) - want) <= 14  # each of the 14 expert tensors rounds down once


def test_prefill_flops_counts_active_parameters_causal_attention_and_one_head_row_per_prompt():
    import torch

    from glm47.bench import prefill_flops
    from glm47.model.glm4_moe import Glm4MoeForCausalLM

    c = preset("bench")
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(c, mtp=False, fmt=torch.bfloat16)
    H, V, D, heads, L = c.hidden_size, c.vocab_size, c.head_dim, c.num_attention_heads, c.num_hidden_layers
    total = sum(p.numel() for p in model.parameters())
    routed = 7 * 64 * 3 * H * c.moe_intermediate_size
    per_token = 2 * (total - 2 * V * H - routed + routed * 8 / 64)  # no embedding, no LM head, top-8 of 64
    want = per_token * 30 + L * 4 * (10 * 11 / 2 + 20 * 21 / 2) * D * heads + 2 * 2 * V * H
    assert abs(prefill_flops(model, [10, 20]) - want) <= 1e-9 * want
