"""ModelRunner: owns the KV pool and runs one scheduled step through the model as a single flat batch.

Two halves, so that many ranks can run one step: `prepare` (the driver: sequences in, a plain, picklable
step.StepInput out, plus the driver's own record of the rows, `Step`) and `execute` (every rank: a StepInput
in, logits out). The step's tokens (decodes first, then prefill chunks) go through the model as B=1,
T=total tokens, so every linear layer and the MoE (grouped by expert) see the whole batch at once; a
ForwardBatch tells attention where each sequence starts. Only the last token of a sequence whose prompt is
complete reaches the LM head. Sampling is not here, nor drafting (spec_decode). Also: the KV pool's size
from the options or the free memory.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from glm47.engine.config import EngineConfig
from glm47.engine.paged_attention import ForwardBatch, KVPool
from glm47.engine.sampling import token_logprobs
from glm47.engine.scheduler import ScheduledBatch
from glm47.engine.sequence import Sequence
from glm47.engine.step import Layout, StepInput


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
class Step:
    """A prepared step: `input` goes to every rank; the rest is the driver's record of which sequence each part
    of the flat batch and of the logits belongs to."""

    input: StepInput
    seqs: list[Sequence]  # the step's sequences in flat-batch order (decodes first)
    offsets: list[int]  # where each starts in the flat batch
    starts: list[int]  # its first position computed (num_computed_tokens before the step)
    sampled: list[Sequence]  # sequences whose last token is computed, in logits order
    num_logits: list[int]  # logits rows of each sampled sequence: 1 + its drafts
    scored: list[Sequence]  # the requests of input.prompt_rows, in order


@dataclass(slots=True)
class ModelOutput:
    """What execute returns (on every rank; the driver reads its own)."""

    logits: Tensor  # (len(logits_rows), V) float32
    # per input.prompt_rows entry: the logprob of each target and the top alternatives, best first
    prompt_logprobs: list[tuple[list[float], list[list[tuple[int, float]]]]]
    hidden: Tensor | None  # (T, hidden_size) final-normed hidden states in flat order, with input.keep_hidden


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, broadcast=None):
        """broadcast: on rank 0 of several tensor-parallel ranks, the StepBroadcast that sends every input to the
        other ranks before this one runs it (engine/ranks.py)."""
        param = model.lm_head.weight
        self.model, self.broadcast = model, broadcast
        self.device, self.dtype = param.device, param.dtype
        self.kv = KVPool(model.num_kv_layers, num_blocks, block_size, model.num_kv_heads, model.config.head_dim,
                         self.dtype, self.device)

    @staticmethod
    def kv_bytes_per_block(model, block_size: int) -> int:
        return KVPool.bytes_per_block(model.num_kv_layers, block_size, model.num_kv_heads, model.config.head_dim,
                                      model.lm_head.weight.dtype)

    def prepare(self, batch: ScheduledBatch, keep_hidden: bool = False) -> Step:
        """The driver's half: batch.num_tokens[i] tokens of batch.seqs[i] (from its num_computed_tokens on),
        whose blocks are allocated. Changes no sequence. A decode that brings drafts (num_tokens > its
        uncomputed tokens) computes them as that many more one-token rows, each exactly as a plain decode step
        would compute it, and gets a logits row for each."""
        # single-token rows first (decodes and their drafts), stable
        rows = sorted(zip(batch.seqs, batch.num_tokens), key=lambda r: 1 < r[1] <= r[0].num_uncomputed_tokens)
        ids: list[int] = []
        logits_rows: list[int] = []  # flat index of each logits row
        tables, contexts, query_lens, offsets, starts, sampled, num_logits = [], [], [], [], [], [], []
        scored, prompt_rows, prompt_targets, prompt_top = [], [], [], []
        for seq, n in rows:
            start = seq.num_computed_tokens
            offsets.append(len(ids))
            starts.append(start)
            if n > seq.num_uncomputed_tokens:  # the last token and its drafts, one decode row each
                assert seq.num_uncomputed_tokens == 1 and n == 1 + len(seq.draft_token_ids), seq
                logits_rows.extend(range(len(ids), len(ids) + n))
                ids.append(seq.token_ids[-1])
                ids.extend(seq.draft_token_ids)
                tables.extend([seq.block_table] * n)
                contexts.extend(range(start, start + n))
                query_lens.extend([1] * n)
                sampled.append(seq)
                num_logits.append(n)
                continue
            ids.extend(seq.token_ids[start:start + n])
            tables.append(seq.block_table)
            contexts.append(start)
            query_lens.append(n)
            if start + n == len(seq):
                logits_rows.append(len(ids) - 1)
                sampled.append(seq)
                num_logits.append(1)
            if seq.params.prompt_logprobs is not None:
                flat, targets = self._prompt_targets(seq, start, n, offsets[-1])
                if flat:
                    scored.append(seq)
                    prompt_rows.append(flat)
                    prompt_targets.append(targets)
                    prompt_top.append(seq.params.prompt_logprobs)
        layout = Layout.of(tables, contexts, query_lens, self.kv.block_size)
        step = StepInput(ids, layout, logits_rows, prompt_rows, prompt_targets, prompt_top, keep_hidden)
        return Step(step, [s for s, _ in rows], offsets, starts, sampled, num_logits, scored)

    @staticmethod
    def _prompt_targets(seq: Sequence, start: int, n: int, offset: int) -> tuple[list[int], list[int]]:
        """For a request that wants prompt logprobs: the flat rows of this chunk whose next token is a prompt token
        not scored yet (position p's logits score token p+1), and those tokens."""
        first = max(start, len(seq.prompt_logprobs))  # position 0 scores token 1
        last = min(start + n, seq.num_prompt_tokens - 1)
        return [offset + p - start for p in range(first, last)], seq.token_ids[first + 1:last + 1]

    @torch.inference_mode()
    def execute(self, step: StepInput) -> ModelOutput:
        """Every rank's half: runs the step through the model, writing its K/V into the pool; does not look at
        any sequence."""
        if self.broadcast is not None:
            self.broadcast.send("step", step)
        dev = self.device
        batch = ForwardBatch.build(self.kv, step.layout, self.model.ops)
        input_ids = torch.tensor(step.token_ids, dtype=torch.long, device=dev)[None]  # (1, T)
        positions = torch.tensor(step.layout.positions, dtype=torch.long, device=dev)[None]
        # Slice before the LM head: a 2,048-token prefill needs one row of logits, not 2,048.
        index = torch.tensor(step.logits_rows, dtype=torch.long, device=dev)
        with onednn(dev.type != "cpu" or len(step.token_ids) > NATIVE_GEMM_MAX_TOKENS):
            hidden = self.model(input_ids, positions, batch)[0]  # (T, hidden)
            logits = self.model.compute_logits(hidden.index_select(0, index)).float()
            prompt = [self._score(hidden, flat, targets, k)
                      for flat, targets, k in zip(step.prompt_rows, step.prompt_targets, step.prompt_top)]
        return ModelOutput(logits, prompt, hidden if step.keep_hidden else None)

    def _score(self, hidden: Tensor, flat: list[int], targets: list[int], k: int, rows: int = 256
               ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Log-probabilities of `targets` under the logits of hidden[flat], and the k best, `rows` logits rows at
        a time (a 2,048-token chunk's full logits would be 1.2 GB in float32 at GLM-4.7's vocabulary)."""
        chosen, best = [], []
        for i in range(0, len(flat), rows):
            index = torch.tensor(flat[i:i + rows], dtype=torch.long, device=self.device)
            ids = torch.tensor(targets[i:i + rows], dtype=torch.long, device=self.device)
            c, b = token_logprobs(self.model.compute_logits(hidden.index_select(0, index)), ids, [k] * len(ids))
            chosen += c
            best += b
        return chosen, best
