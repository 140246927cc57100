"""The plan: how many GPUs a request needs, and the largest context that fits on them.

    p = plan("glm-4.7", gpu="h200", quant="fp8", context=200_000, batch=1)
    p.min_gpus, p.max_context_at_min_gpus

The model of a GPU: a fraction `mem_fraction` of its memory (default 0.8, the static fraction serving engines
such as SGLang reserve for weights + KV cache; the rest goes to activations, CUDA graphs and the runtime) holds
its share of the weights and of the KV cache. GPUs are counted as a tensor-parallel degree: a power of two
that divides num_attention_heads, up to MAX_GPUS (beyond 8 means several nodes). Under TP the KV cache splits
by KV head, so past num_key_value_heads (8 for GLM-4.7) the heads are replicated and each GPU's KV share stops
shrinking. That is pessimistic for multi-node setups that add pipeline parallelism instead (TP 8 x PP 2 splits
the cache 16 ways), and it is what pure TP does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from glm47.config import ModelConfig, resolve_config
from glm47.planner.gpus import GPU, resolve_gpu
from glm47.planner.memory import (GB, KV_DTYPES, WeightBytes, kv_bytes_per_token, kv_layers, kv_shards,
                                  weight_bytes, weight_bytes_per_gpu)
from glm47.planner.params import ParamCount, count_params, tensor_families

MAX_GPUS = 64
DEFAULT_MEM_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class TPOption:
    """One tensor-parallel degree: each GPU's load for the request, and the largest context it allows."""
    gpus: int
    weights_per_gpu: float  # bytes
    kv_per_gpu: float  # bytes, for the requested context x batch
    kv_shards: int  # ways the KV cache is split (min(gpus, kv heads))
    fits: bool
    kv_token_capacity: int  # tokens of KV cache (all sequences together) the room left after weights holds
    max_context: int  # largest tokens per sequence at this batch (capped at the model's maximum); 0: none

    @property
    def total_per_gpu(self) -> float:
        return self.weights_per_gpu + self.kv_per_gpu


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    config: ModelConfig
    gpu: GPU
    quant: str
    kv_dtype: str
    context: int
    batch: int
    mem_fraction: float
    mtp: bool  # MTP layer loaded (weights) and run (its KV cache)
    params: ParamCount
    weights: WeightBytes
    kv_layers: int
    kv_bytes_per_token: int  # all GPUs together
    kv_cache_bytes: int  # kv_bytes_per_token x context x batch
    usable_bytes_per_gpu: float
    options: list[TPOption]  # every candidate degree, ascending
    min_gpus: int | None  # None: does not fit on MAX_GPUS
    next_gpus: int | None  # the next candidate degree above min_gpus

    def option(self, gpus: int | None) -> TPOption | None:
        return next((o for o in self.options if o.gpus == gpus), None)

    @property
    def max_context_at_min_gpus(self) -> int | None:
        o = self.option(self.min_gpus)
        return o.max_context if o else None

    @property
    def max_context_at_next_gpus(self) -> int | None:
        o = self.option(self.next_gpus)
        return o.max_context if o else None

    def to_json(self) -> dict:
        """Plain JSON types; sizes in decimal GB (and bytes where exact)."""
        at_min = self.option(self.min_gpus)
        return {
            "model": self.model, "gpu": self.gpu.name, "gpu_memory_gb": self.gpu.memory_gb,
            "quant": self.quant, "kv_dtype": self.kv_dtype, "context": self.context, "batch": self.batch,
            "mem_fraction": self.mem_fraction, "mtp": self.mtp,
            "total_params": self.params.total, "active_params": self.params.active,
            "active_params_with_embeddings": self.params.active_with_embeddings,
            "main_params": self.params.main, "mtp_params": self.params.mtp_params,
            "params_by_part": dict(self.params.by_part),
            "weights_bytes": self.weights.total, "weights_gb": self.weights.total / GB,
            "kv_layers": self.kv_layers, "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_bytes": self.kv_cache_bytes, "kv_cache_gb": self.kv_cache_bytes / GB,
            "usable_gb_per_gpu": self.usable_bytes_per_gpu / GB,
            "fits": self.min_gpus is not None, "max_gpus_considered": self.options[-1].gpus,
            "min_gpus": self.min_gpus,
            "per_gpu_gb_at_min_gpus": at_min.total_per_gpu / GB if at_min else None,
            "max_context_at_min_gpus": self.max_context_at_min_gpus,
            "next_gpus": self.next_gpus, "max_context_at_next_gpus": self.max_context_at_next_gpus,
            "max_position_embeddings": self.config.max_position_embeddings,
            "options": [dict(asdict(o), weights_per_gpu=o.weights_per_gpu / GB, kv_per_gpu=o.kv_per_gpu / GB)
                        for o in self.options],
        }


def tp_degrees(c: ModelConfig, max_gpus: int = MAX_GPUS) -> list[int]:
    """Powers of two up to max_gpus that divide the attention heads (engines require it)."""
    out, tp = [], 1
    while tp <= max_gpus:
        if c.num_attention_heads % tp == 0:
            out.append(tp)
        tp *= 2
    return out


def plan(model: str | ModelConfig, gpu: str | GPU, quant: str, context: int, batch: int = 1,
         kv_dtype: str = "auto", mem_fraction: float = DEFAULT_MEM_FRACTION, mtp: bool = True,
         name: str | None = None) -> Plan:
    """The smallest TP degree whose usable memory holds weights + KV cache for `batch` sequences of `context`
    tokens. model: a preset name, a config path or a ModelConfig (then `name` labels it). kv_dtype "auto": FP8
    when the weights are FP8, else BF16. ValueError on bad input."""
    config = model if isinstance(model, ModelConfig) else resolve_config(model)
    name = name or (str(model) if not isinstance(model, ModelConfig) else "custom config")
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive number of sequences, got {batch!r}")
    if context > config.max_position_embeddings:
        raise ValueError(f"context {context:,} exceeds the model's maximum of {config.max_position_embeddings:,} "
                         f"tokens (max_position_embeddings)")
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"mem_fraction must be in (0, 1], got {mem_fraction!r}")
    if kv_dtype == "auto":
        kv_dtype = "fp8" if quant == "fp8" else "bf16"
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; known: auto, {', '.join(KV_DTYPES)}")
    mtp = mtp and config.num_nextn_predict_layers > 0

    families = tensor_families(config, mtp)
    weights = weight_bytes(families, quant)  # validates quant
    per_token = kv_bytes_per_token(config, kv_dtype, mtp)
    usable = gpu.memory_gb * GB * mem_fraction
    options = []
    for tp in tp_degrees(config):
        w = weight_bytes_per_gpu(families, quant, tp, config.num_key_value_heads)
        shards = kv_shards(config, tp)
        # Tokens the room left after weights holds: (usable - weights) / (KV bytes per token per GPU);
        # the largest context is that over the batch. fits and max_context come from the same number.
        room = usable - w
        capacity = int(room * shards // per_token) if room > 0 else 0
        largest = capacity // batch
        options.append(TPOption(gpus=tp, weights_per_gpu=w, kv_per_gpu=per_token * context * batch / shards,
                                kv_shards=shards, fits=context <= largest, kv_token_capacity=capacity,
                                max_context=min(largest, config.max_position_embeddings)))
    fitting = [o.gpus for o in options if o.fits]
    min_gpus = fitting[0] if fitting else None
    bigger = [o.gpus for o in options if min_gpus is not None and o.gpus > min_gpus]
    return Plan(model=name, config=config, gpu=gpu, quant=quant, kv_dtype=kv_dtype, context=context, batch=batch,
                mem_fraction=mem_fraction, mtp=mtp, params=count_params(config, mtp), weights=weights,
                kv_layers=kv_layers(config, mtp), kv_bytes_per_token=per_token,
                kv_cache_bytes=per_token * context * batch, usable_bytes_per_gpu=usable, options=options,
                min_gpus=min_gpus, next_gpus=bigger[0] if bigger else None)
