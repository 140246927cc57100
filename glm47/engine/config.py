"""EngineConfig: how the engine batches and how big its paged KV cache is. Stdlib only.

The model's shape lives in ModelConfig and each request's decoding knobs in SamplingParams; this is the
third, engine-wide set. Hardware is not probed here: model_runner turns the KV options into a block count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # sequences running at once
    # Tokens computed per step (prefill chunks + decodes). It bounds activation memory: a step's MoE holds
    # a few (tokens * top_k, hidden) buffers, so 2048 keeps them small next to the weights.
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # context limit; None: the model's max_position_embeddings
    # KV pool size: at most one of tokens or bytes; neither = kv_cache_memory_fraction of the free memory
    # (None: 0.9 of free GPU memory, 0.5 of available RAM on CPU), capped at max_num_seqs full contexts.
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float | None = None
    enable_prefix_caching: bool = True
    # Speculative decoding with the checkpoint's MTP layer: tokens drafted per decode step (0 = off). Each
    # draft is verified by the main model in the next step, so the output is the model's own (greedy: the same
    # tokens; sampled: the same distribution). 1 is what vLLM and SGLang run GLM-4.x with; more chain the MTP
    # layer on its own output, which it was not trained for, so later drafts are accepted less often.
    num_speculative_tokens: int = 0
    # On CPU, decode steps run on the cores other processes leave free (glm47/engine/threads.py): a busy machine
    # slows decoding in proportion instead of stalling every parallel region. Never changes results.
    adaptive_threads: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if (isinstance(self.num_speculative_tokens, bool) or not isinstance(self.num_speculative_tokens, int)
                or not 0 <= self.num_speculative_tokens <= 8):
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens!r} must be an integer in [0, 8]")
        for name in ("max_model_len", "kv_cache_tokens", "kv_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise ValueError(f"give kv_cache_tokens={self.kv_cache_tokens} or kv_cache_bytes="
                             f"{self.kv_cache_bytes}, not both")
        f = self.kv_cache_memory_fraction
        if f is not None and not 0 < f <= 1:
            raise ValueError(f"kv_cache_memory_fraction={f!r} must be in (0, 1]")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (every running sequence decodes each step)")

    def context_limit(self, model_config) -> int:
        """Tokens a sequence may hold: max_model_len, at most the model's max_position_embeddings."""
        n = model_config.max_position_embeddings
        return min(n, self.max_model_len or n)
