"""Training the nano model: loss mask, LM + MTP losses, Muon, loss-free balancing, checkpoints that load in
glm47 and transformers, and bit-identical resume. Tiny shapes, a few steps each."""

import dataclasses
import json

import pytest
import torch

from glm47 import load_model
from glm47.chat.tokenizer import Tokenizer
from glm47.cli.main import main
from glm47.config import ModelConfig
from glm47.model.glm4_moe import Glm4MoeForCausalLM
from glm47.model.moe import select_experts
from glm47.training.balance import ExpertLoadTracker, load_ratio, update_bias
from glm47.training.corpus import generate_examples, training_text
from glm47.training.data import BatchSchedule, collate, encode_conversation
from glm47.training.loss import IGNORE, shifted_targets, training_loss
from glm47.training.muon import newton_schulz, orthogonalize
from glm47.training.optim import build_optimizers, lr_at
from glm47.training.recipe import NANO, TrainConfig
from glm47.training.train import STATE_FILE, init_weights, load_train_state, train
from glm47.training.train_tokenizer import train_tokenizer
from training_util import TINY, TINY_RUN

def tiny_model(seed: int = 0, vocab: int = 64) -> Glm4MoeForCausalLM:
    model = Glm4MoeForCausalLM(ModelConfig(vocab_size=vocab, **TINY))
    init_weights(model, seed)
    return model


def random_batch(vocab: int = 64, B: int = 3, T: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    return ids, mask


# Tiny shapes gain nothing from threads, and spinning OpenMP workers get 10x slower whenever another process takes
# a core of a small shared machine (the root conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(training_text(generate_examples(40, seed=2)), 500)


# ---- data and loss mask ------------------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "reasoning_content": "Use the calculator.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "reasoning_content": "It is 5.", "content": "2 + 3 = 5."},
    ]
    ids, mask = encode_conversation(tok, messages, None, enable_thinking=True, clear_thinking=True)
    assert len(ids) == len(mask)
    # The masked tokens, joined, are the two assistant turns with their closing stop tokens; nothing else.
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans.append(tok.decode(current))
    assert spans == [
        "<think>Use the calculator.</think><tool_call>calculator<arg_key>expression</arg_key>"
        "<arg_value>2 + 3</arg_value></tool_call><|observation|>",
        "<think>It is 5.</think>2 + 3 = 5.<|user|>",
    ], spans
    assert ids[-1] == tok.token_to_id("<|user|>")  # appended: the model learns to stop after its answer


def test_batches_are_padded_right_and_seeded():
    rows = [([1] * n, [False] * (n - 2) + [True, True]) for n in range(3, 40)]
    batch = collate(rows[:3], pad_id=0)
    assert batch.input_ids.shape == (3, 5) and batch.valid.sum(1).tolist() == [3, 4, 5]
    assert not batch.loss_mask[~batch.valid].any()
    a, b = BatchSchedule(rows, 4, seed=3, pad_id=0), BatchSchedule(rows, 4, seed=3, pad_id=0)
    assert [a.indices(s) for s in range(20)] == [b.indices(s) for s in range(20)]
    epoch = sorted(i for s in range(a.batches_per_epoch) for i in a.indices(s))
    assert len(set(epoch)) == len(epoch) == a.batches_per_epoch * 4  # each row at most once per epoch


def test_shifted_targets():
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    mask = torch.tensor([[False, True, False, True, True]])
    assert shifted_targets(ids, mask, 1).tolist() == [[11, IGNORE, 13, 14, IGNORE]]
    assert shifted_targets(ids, mask, 2).tolist() == [[IGNORE, 13, 14, IGNORE, IGNORE]]


def test_mtp_loss_uses_targets_shifted_by_two():
    """The MTP layer at i sees h_i and t_{i+1} and is scored on t_{i+2}: recompute it by hand from the
    model's public forward, mtp and compute_logits, and check a one-off shift gives a different value."""
    model = tiny_model()
    ids, mask = random_batch()
    parts = training_loss(model, ids, mask, mtp_weight=0.5)
    hidden = model(ids)
    logits = model.compute_logits(hidden)
    draft = model.compute_logits(model.mtp_forward(hidden[:, :-1], ids[:, 1:]), mtp_layer=0)  # (B, T-1, V)
    # draft row i predicts ids[i + 2]

    def ce(logits, targets, keep):
        return torch.nn.functional.cross_entropy(logits[keep], targets[keep])

    lm = ce(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    mtp = ce(draft[:, :-1], ids[:, 2:], mask[:, 2:])
    wrong = ce(draft[:, :-1], ids[:, 1:-1], mask[:, 1:-1])
    torch.testing.assert_close(parts.lm, lm)
    torch.testing.assert_close(parts.mtp, mtp)
    torch.testing.assert_close(parts.loss, lm + 0.5 * mtp)
    assert abs(wrong.item() - mtp.item()) > 1e-3, (wrong.item(), mtp.item())
    assert parts.mtp_tokens == int(mask[:, 2:].sum())


# ---- optimisation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("adamw_only", [False, True])
def test_few_steps_reduce_the_loss_on_a_fixed_batch(adamw_only):
    model = tiny_model()
    ids, mask = random_batch()
    opts = build_optimizers(model, lr=3e-3, weight_decay=0.0, adamw_only=adamw_only)
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = training_loss(model, ids, mask)
        parts.loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(parts.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_every_parameter_has_one_optimizer_and_muon_gets_the_hidden_matrices():
    model = tiny_model()
    muon, adamw = build_optimizers(model, lr=1e-3, weight_decay=0.1)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in in_adamw if model.get_parameter(names[i]).dim() == 2} == {
        "model.embed_tokens.weight", "lm_head.weight"}
    assert any(g["splits"] == [32, 16, 16] for g in muon.param_groups)  # fused q/k/v of 2x16 / 1x16 heads


def test_newton_schulz_output_has_singular_values_near_one():
    g = torch.randn(3, 48, 32) @ torch.diag(torch.logspace(-1, 0, 32))  # singular values over 10x
    s = torch.linalg.svdvals(newton_schulz(g).float())
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())


def test_fused_blocks_are_orthogonalised_one_by_one():
    g = torch.randn(64, 32)
    fused = orthogonalize(g, [32, 16, 16])
    torch.testing.assert_close(fused[32:48], orthogonalize(g[32:48]))
    assert fused.shape == g.shape


def test_cosine_schedule_with_warmup():
    lrs = [lr_at(s, total=100, peak=1.0, warmup=10, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


# ---- loss-free balancing ---------------------------------------------------------------------------------

def test_bias_update_moves_load_toward_balance():
    """Routing skewed towards experts 0 and 1: repeated bias steps spread the tokens out."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g) + torch.tensor([2.0, 1.5, 0, 0, 0, 0, 0, 0])
    bias = torch.zeros(8)
    ratios = []
    for _ in range(300):
        _, ids = select_experts(logits, bias, 2, 1, 1, True, 1.0)
        load = torch.bincount(ids.flatten(), minlength=8)
        ratios.append(float(load_ratio(load)))
        bias = update_bias(bias, load, rate=1e-2)
    assert ratios[0] > 2.5 and ratios[-1] < 1.3, (ratios[0], ratios[-1])
    assert bias[0] < 0 and bias[1] < 0 and (bias[2:] > 0).all(), bias


def test_tracker_counts_valid_tokens_per_moe_layer_and_moves_the_biases():
    model = tiny_model()
    tracker = ExpertLoadTracker(model)
    assert tracker.names == ["model.layers.1.mlp", "mtp.0.mlp"]
    ids, _ = random_batch(B=2, T=10)
    tracker.valid = torch.arange(10).expand(2, 10) < 7  # 14 real tokens
    model(ids)
    assert tracker.counts[0].sum() == 14 * 2  # top-2
    before = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    counts = tracker.counts[0].clone()
    tracker.rebalance(rate=0.01)
    after = model.model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(after - before, 0.01 * torch.sign(counts.float().mean() - counts.float()))
    assert tracker.counts.sum() == 0
    tracker.close()


# ---- whole runs ------------------------------------------------------------------------------------------

def test_training_writes_a_checkpoint_with_its_tokenizer_and_stop_ids(trained):
    out, summary = trained
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", STATE_FILE} <= {
        p.name for p in out.iterdir()}
    tok = Tokenizer.from_dir(out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(tok.eos_token_ids)
    config = ModelConfig.from_file(out)
    assert config.vocab_size >= tok.vocab_size and config.torch_dtype == "bfloat16"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    assert summary.steps == 4 and summary.tokens > 0 and len(summary.load_ratios) == 2


def test_trained_checkpoint_loads_in_glm47_and_transformers_with_equal_logits(trained):
    import transformers

    out, _ = trained
    ours = load_model(out, dtype=torch.float32)
    assert ours.has_mtp
    ref = transformers.Glm4MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.from_dir(out).encode("What is 12 * 34? It is 408.")])
    with torch.no_grad():
        torch.testing.assert_close(ours.compute_logits(ours(ids)), ref(ids).logits, atol=1e-4, rtol=1e-4)
    # The bf16 checkpoint is the trained float32 model, rounded.
    state = load_train_state(out)["model"]
    torch.testing.assert_close(ours.lm_head.weight, state["lm_head.weight"].bfloat16().float())


def test_resume_continues_identically(trained, tmp_path):
    full, _ = trained
    train(dataclasses.replace(TINY_RUN, steps=2), tmp_path, progress=False)
    train(TINY_RUN, tmp_path, resume=True, progress=False)
    a, b = load_train_state(full), load_train_state(tmp_path)
    assert a["step"] == b["step"] == 4
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name


def test_resume_refuses_changed_settings(trained):
    out, _ = trained
    with pytest.raises(ValueError, match="lr=0.1"):
        train(dataclasses.replace(TINY_RUN, lr=0.1), out, resume=True, progress=False)


def test_nano_checkpoint_fits_40_mb():
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(ModelConfig(vocab_size=TrainConfig().vocab_size, **NANO))
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 < 38e6, f"{n / 1e6:.1f}M parameters = {n * 2 / 1e6:.1f} MB in bf16 (+ ~0.1 MB tokenizer.json)"


@pytest.mark.slow
def test_cli_trains_and_resumes(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path), "--examples", "6", "--batch-size", "2", "--vocab-size", "300",
            "--no-progress"]
    assert main(args + ["--steps", "1"]) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "2", "--no-progress"]) == 0
    assert load_train_state(tmp_path)["step"] == 2
    assert "trained 2 steps" in capsys.readouterr().out
