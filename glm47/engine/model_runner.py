"""ModelRunner: owns the KV pool and runs one scheduled step through the model as a single flat batch.

The step's tokens (decodes first, then prefill chunks) go through the model as B=1, T=total tokens, so
every linear layer and the MoE (grouped by expert) see the whole batch at once; a ForwardBatch tells
attention where each sequence starts. Only the last token of a sequence whose prompt is complete reaches
the LM head. Sampling is not here. Also: the KV pool's size from the options or the free memory.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from glm47.engine.config import EngineConfig
from glm47.engine.paged_attention import ForwardBatch, KVPool
from glm47.engine.sequence import Sequence


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV pool: free GPU memory, or MemAvailable on Linux (psutil is not a dependency)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, device: torch.device, max_model_len: int) -> int:
    """Explicit kv_cache_tokens / kv_cache_bytes, else a fraction of free memory capped at what
    max_num_seqs sequences of max_model_len tokens could ever use."""
    bs = config.block_size
    if config.kv_cache_tokens is not None:
        return -(-config.kv_cache_tokens // bs)
    if config.kv_cache_bytes is not None:
        n = config.kv_cache_bytes // bytes_per_block
        if n < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} is below one block ({bytes_per_block} bytes)")
        return n
    fraction = config.kv_cache_memory_fraction or (0.9 if device.type == "cuda" else 0.5)
    n = int(available_memory(device) * fraction) // bytes_per_block
    n = min(n, config.max_num_seqs * -(-max_model_len // bs))
    if n < 1:
        raise ValueError(f"no memory left for the KV cache on {device} (one block is {bytes_per_block} bytes)")
    return n


# On CPU, oneDNN's bf16 GEMM is slower than ATen's own kernel when it is a GEMV: measured on an AVX512-BF16
# EPYC, a whole batch-1 decode step ran 2x faster without oneDNN, 2 tokens 1.4x, 4 even, 16 1.6x slower.
NATIVE_GEMM_MAX_TOKENS = 2


@contextmanager
def onednn(enabled: bool):
    """Turns oneDNN (mkldnn) off for the block when enabled is False, and restores the previous setting."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and before
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@dataclass(slots=True)
class StepResult:
    seqs: list[Sequence]  # the step's sequences in flat-batch order (decodes first)
    query_lens: list[int]  # tokens each computed
    sampled: list[Sequence]  # sequences whose last token was computed: one logits row each, in this order
    logits: Tensor  # (len(sampled), V) float32
    hidden: Tensor | None  # (T, hidden_size) final-normed hidden states in flat order, when asked


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        config = model.config
        param = model.lm_head.weight
        self.model = model
        self.device, self.dtype = param.device, param.dtype
        # The MTP layers (index num_hidden_layers + j) attend like any layer, so they get cache layers too.
        self.num_layers = config.num_hidden_layers + len(model.mtp)
        self.kv = KVPool(self.num_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim,
                         self.dtype, self.device)

    @staticmethod
    def kv_bytes_per_block(model, block_size: int) -> int:
        c, dtype = model.config, model.lm_head.weight.dtype
        return KVPool.bytes_per_block(c.num_hidden_layers + len(model.mtp), block_size, c.num_key_value_heads,
                                      c.head_dim, dtype)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_tokens: list[int], return_hidden: bool = False) -> StepResult:
        """Computes num_tokens[i] tokens of seqs[i] (from its num_computed_tokens on), whose blocks are
        allocated. Does not advance num_computed_tokens (the scheduler does, after sampling)."""
        rows = sorted(zip(seqs, num_tokens), key=lambda r: r[1] > 1)  # single-token rows first, stable
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []  # flat index of the last token of each sampled sequence
        sampled: list[Sequence] = []
        for seq, n in rows:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            if start + n == len(seq):
                last.append(len(ids) - 1)
                sampled.append(seq)
        batch = ForwardBatch.build(self.kv, [s.block_table for s, _ in rows],
                                   [s.num_computed_tokens for s, _ in rows], [n for _, n in rows])
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[None]
        # Slice before the LM head: a 2,048-token prefill needs one row of logits, not 2,048.
        index = torch.tensor(last, dtype=torch.long, device=self.device)
        with onednn(self.device.type != "cpu" or len(ids) > NATIVE_GEMM_MAX_TOKENS):
            hidden = self.model.model(input_ids, pos, batch)[0]  # (T, hidden)
            logits = self.model.lm_head(hidden.index_select(0, index)).float()
        return StepResult([s for s, _ in rows], [n for _, n in rows], sampled, logits,
                          hidden if return_hidden else None)
