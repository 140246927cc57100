"""The nano GLM-4.7 recipe: the model shape that `glm47 train` builds by default and the training
hyper-parameters, as plain data. Everything here is a default a CLI flag can override.

The shape keeps every GLM-4.7 feature (a dense first layer, MoE with a shared expert and a sigmoid router
with the balancing bias, qk-norm, partial RoPE, attention bias, one MTP layer) at a size that trains on
two CPU cores in under an hour and ships as a ~28 MB bf16 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# vocab_size and the token ids come from the trained tokenizer (train.model_config fills them in).
NANO: dict = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
    use_qk_norm=True, attention_bias=True, rope_theta=10000.0, partial_rotary_factor=0.5, rms_norm_eps=1e-5,
    num_nextn_predict_layers=1, max_position_embeddings=2048, initializer_range=0.02,
)


@dataclass(slots=True)
class TrainConfig:
    """Everything that decides a training run; with the same values a run is reproduced exactly."""

    seed: int = 0
    examples: int = 16_000  # training conversations (glm47.training.corpus, split "train"): one epoch
    vocab_size: int = 2048  # BPE + the 36 added tokens; the corpus saturates at ~2.7k, so 2k loses little
    steps: int = 1000  # a 600-step run still copied tool results into only 25 % of answers at step 200
    batch_size: int = 16  # conversations per step, one per row, right-padded to the longest in the batch
    max_len: int = 1024  # longer conversations are cut (none are at the default corpus)
    lr: float = 3e-3  # peak; Muon updates are scaled to AdamW's RMS, so one lr serves both
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # DeepSeek-V3 uses 0.3 early in training
    bias_rate: float = 5e-3  # loss-free balancing: bias step per update towards the mean load (1e-3 lags a short run)
    adamw_only: bool = False  # Muon for hidden matrices unless this is set
    autocast: bool = True  # bf16 autocast on CPU (RMSNorm and the losses still compute in float32)
    save_every: int = 100
    model: dict = field(default_factory=lambda: dict(NANO))
