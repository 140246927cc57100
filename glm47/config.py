"""Model configuration: a dataclass whose field names are the keys of the checkpoint's config.json.

Reads the official layout (rope_theta / partial_rotary_factor / torch_dtype at top level) and the one
transformers >= 5 writes (`rope_parameters`, `dtype`); writes the official layout. Validation is about the
config alone, never the hardware. Stdlib only, so the planner and the server can import it without torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_TYPE = "glm4_moe"
ARCHITECTURE = "Glm4MoeForCausalLM"


@dataclass(slots=True)
class ModelConfig:
    # Shapes that identify a model: required, so a config.json missing one fails loudly.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    # Everything else defaults as transformers' Glm4MoeConfig does.
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = False
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    torch_dtype: str = "bfloat16"
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # ---- derived values ----------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones); the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return max(self.num_hidden_layers - self.first_k_dense_replace, 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers below first_k_dense_replace are dense; the MTP layer (index num_hidden_layers) is MoE."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid config: {name}={getattr(self, name)!r} {why}")

        if self.model_type != MODEL_TYPE:
            raise bad("model_type", f"is not supported (expected {MODEL_TYPE!r})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                     "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"is not divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise bad("intermediate_size", "must be positive when there are dense layers")
        if self.num_moe_layers > 0 or self.num_nextn_predict_layers > 0:
            if self.n_routed_experts <= 0:
                raise bad("n_routed_experts", "must be positive when there are MoE layers")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be positive when there are MoE layers")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must be positive and divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise bad("n_group", "leaves fewer than 2 experts per group (group score is a top-2 sum)")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise bad("num_experts_per_tok", f"exceeds the {self.topk_group * per_group} experts in "
                          f"topk_group={self.topk_group} groups")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise bad("partial_rotary_factor", f"must give an even rotary dim in (0, head_dim={self.head_dim}]")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "must be positive")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", "default") != "default":
            raise bad("rope_scaling", "is not supported (GLM-4.x uses plain RoPE)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported (expected 'silu')")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "must be positive")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "is not supported: GLM-4.x has an untied lm_head")

    # ---- reading and writing -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a config.json dict, official or transformers>=5 layout. Unknown keys are dropped on purpose."""
        d = dict(d)
        rope = d.pop("rope_parameters", None) or {}
        if rope:
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"invalid config: rope_parameters.rope_type={rope['rope_type']!r} is not supported")
            for k in ("rope_theta", "partial_rotary_factor"):
                if k in rope:
                    d.setdefault(k, rope[k])
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"invalid config: missing required key(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Reads config.json (or a checkpoint directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ValueError(f"no config.json at {p}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The official layout (top-level rope fields and torch_dtype), which transformers 4.x and 5.x read."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["architectures"] = list(self.architectures)
        return dict(sorted(d.items()))

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---- presets ---------------------------------------------------------------------------------------
# The three big models share one architecture; GLM-4.5 has the shorter context. Token ids as in the
# official config.json (pad = <|endoftext|>; stop on <|endoftext|>, <|user|>, <|observation|>).
_GLM_IDS = dict(vocab_size=151552, eos_token_id=[151329, 151336, 151338], pad_token_id=151329)
_GLM_355B = dict(
    _GLM_IDS, hidden_size=5120, intermediate_size=12288, num_hidden_layers=92, num_attention_heads=96,
    num_key_value_heads=8, head_dim=128, moe_intermediate_size=1536, n_routed_experts=160, num_experts_per_tok=8,
    n_shared_experts=1, first_k_dense_replace=3, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, rope_theta=1000000, partial_rotary_factor=0.5,
    rms_norm_eps=1e-5, num_nextn_predict_layers=1, max_position_embeddings=202752,
)
# Tiny shapes for tests: every feature switched on, small enough to run in milliseconds on a CPU.
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, rope_theta=1000000, partial_rotary_factor=0.5,
    rms_norm_eps=1e-5, num_nextn_predict_layers=1, max_position_embeddings=4096, eos_token_id=[1], pad_token_id=0,
)

PRESETS: dict[str, dict[str, Any]] = {
    "glm-4.7": _GLM_355B,
    "glm-4.6": _GLM_355B,
    "glm-4.5": dict(_GLM_355B, max_position_embeddings=131072),
    "glm-4.5-air": dict(
        _GLM_IDS, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, use_qk_norm=False, attention_bias=True, rope_theta=1000000,
        partial_rotary_factor=0.5, rms_norm_eps=1e-5, num_nextn_predict_layers=1, max_position_embeddings=131072,
    ),
    "tiny": _TINY,
    # Tiny shapes over GLM-4.7's real vocabulary and stop ids: what `glm47 init` makes for a CPU demo.
    "tiny-glm47": dict(_TINY, **_GLM_IDS),
    "tiny-dense": dict(_TINY, first_k_dense_replace=3, num_nextn_predict_layers=0),
    "tiny-mqa": dict(_TINY, num_key_value_heads=1, use_qk_norm=False, attention_bias=False, n_group=1,
                     norm_topk_prob=False),
    # The shape the engine benchmarks use: GLM-4.7's vocabulary and head layout, 8 layers.
    "bench": dict(
        _GLM_IDS, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, rope_theta=1000000,
        partial_rotary_factor=0.5, rms_norm_eps=1e-5, num_nextn_predict_layers=1, max_position_embeddings=202752,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with optional field overrides (validated like any config)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def resolve_config(spec: str | Path) -> ModelConfig:
    """A preset name, a config.json file or a checkpoint directory."""
    if str(spec) in PRESETS:
        return preset(str(spec))
    p = Path(spec)
    if p.exists():
        return ModelConfig.from_file(p)
    raise ValueError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a path to a config")
