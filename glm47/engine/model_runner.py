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
from glm47.engine.sampling import argmax_rows, token_logprobs
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
    query_lens: list[int]  # tokens each computed (drafts included)
    sampled: list[Sequence]  # sequences whose last token was computed, in logits order
    num_logits: list[int]  # logits rows of each sampled sequence: 1 + its drafts
    logits: Tensor  # (sum(num_logits), V) float32
    hidden: Tensor | None  # (T, hidden_size) final-normed hidden states in flat order, when asked
    offsets: list[int]  # where each of seqs starts in the flat batch
    starts: list[int]  # its first position computed (num_computed_tokens before the step)
    # (seq, logprobs, top logprobs) of the prompt tokens this step scored, for requests that ask
    prompt_logprobs: list[tuple[Sequence, list[float], list[list[tuple[int, float]]]]]


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
        allocated. Does not advance num_computed_tokens (the scheduler does, after sampling). A decode that
        brings drafts (num_tokens > its uncomputed tokens) computes them as that many more one-token rows, each
        exactly as a plain decode step would compute it, and gets a logits row for each."""
        # single-token rows first (decodes and their drafts), stable
        rows = sorted(zip(seqs, num_tokens), key=lambda r: r[1] > 1 and not r[0].draft_token_ids)
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []  # flat index of each logits row
        sampled: list[Sequence] = []
        num_logits: list[int] = []
        tables, contexts, query_lens, offsets, starts, scored = [], [], [], [], [], []
        for seq, n in rows:
            start = seq.num_computed_tokens
            offsets.append(len(ids))
            starts.append(start)
            if n > seq.num_uncomputed_tokens:  # the last token and its drafts, one decode row each
                assert seq.num_uncomputed_tokens == 1 and n == 1 + len(seq.draft_token_ids), seq
                last.extend(range(len(ids), len(ids) + n))
                ids.append(seq.token_ids[-1])
                ids.extend(seq.draft_token_ids)
                tables.extend([seq.block_table] * n)
                contexts.extend(range(start, start + n))
                query_lens.extend([1] * n)
                sampled.append(seq)
                num_logits.append(n)
            else:
                ids.extend(seq.token_ids[start:start + n])
                tables.append(seq.block_table)
                contexts.append(start)
                query_lens.append(n)
                if start + n == len(seq):
                    last.append(len(ids) - 1)
                    sampled.append(seq)
                    num_logits.append(1)
                if seq.params.prompt_logprobs is not None:
                    scored.append(self._prompt_targets(seq, start, n, offsets[-1]))
            positions.extend(range(start, start + n))
        batch = ForwardBatch.build(self.kv, tables, contexts, query_lens)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[None]
        # Slice before the LM head: a 2,048-token prefill needs one row of logits, not 2,048.
        index = torch.tensor(last, dtype=torch.long, device=self.device)
        with onednn(self.device.type != "cpu" or len(ids) > NATIVE_GEMM_MAX_TOKENS):
            hidden = self.model.model(input_ids, pos, batch)[0]  # (T, hidden)
            logits = self.model.lm_head(hidden.index_select(0, index)).float()
            prompt = [(seq, *self._score(hidden, flat, targets, seq.params.prompt_logprobs))
                      for seq, flat, targets in scored if flat]
        return StepResult([s for s, _ in rows], [n for _, n in rows], sampled, num_logits, logits,
                          hidden if return_hidden else None, offsets, starts, prompt)

    @staticmethod
    def _prompt_targets(seq: Sequence, start: int, n: int, offset: int) -> tuple[Sequence, list[int], list[int]]:
        """For a request that wants prompt logprobs: the flat rows of this chunk whose next token is a prompt token
        not scored yet (position p's logits score token p+1), and those tokens."""
        first = max(start, len(seq.prompt_logprobs))  # position 0 scores token 1
        last = min(start + n, seq.num_prompt_tokens - 1)
        return seq, [offset + p - start for p in range(first, last)], seq.token_ids[first + 1:last + 1]

    def _score(self, hidden: Tensor, flat: list[int], targets: list[int], k: int, rows: int = 256
               ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Log-probabilities of `targets` under the logits of hidden[flat], and the k best, `rows` logits rows at
        a time (a 2,048-token chunk's full logits would be 1.2 GB in float32 at GLM-4.7's vocabulary)."""
        chosen, best = [], []
        for i in range(0, len(flat), rows):
            index = torch.tensor(flat[i:i + rows], dtype=torch.long, device=self.device)
            ids = torch.tensor(targets[i:i + rows], dtype=torch.long, device=self.device)
            c, b = token_logprobs(self.model.lm_head(hidden.index_select(0, index)), ids, [k] * len(ids))
            chosen += c
            best += b
        return chosen, best

    @torch.inference_mode()
    def draft(self, result: StepResult, valid: list[int], depth: int, grow) -> dict[Sequence, list[int]]:
        """MTP drafting once a step's tokens are settled. For each of result.seqs with valid[i] > 0 the MTP layer
        runs over its first valid[i] computed positions p (main hidden at p and the token at p+1, all known now),
        which fills the MTP layer's KV cache there. A sequence whose last position is among them (it got a new
        token) and has room drafts up to `depth` tokens (greedy): the first from that position, each further one
        by running the layer again on its own output one position on (that position's MTP K/V is rewritten by
        the next step). grow(seq, tokens) must make the block table cover `tokens` tokens, or return False (then
        the sequence drafts no further). Returns {sequence: drafts}."""
        model, dev = self.model, self.device
        flat, ids, positions, tables, contexts, query_lens, heads, drafting = [], [], [], [], [], [], [], []
        rows = sorted((r for r in zip(result.seqs, result.offsets, result.starts, valid) if r[3] > 0),
                      key=lambda r: r[3] > 1)  # single-position rows first, as ForwardBatch wants
        for seq, offset, start, n in rows:
            flat.extend(range(offset, offset + n))
            ids.extend(seq.token_ids[start + 1:start + n + 1])
            positions.extend(range(start, start + n))
            tables.append(seq.block_table)
            contexts.append(start)
            query_lens.append(n)
            if start + n == len(seq) - 1 and seq.max_drafts > 0:
                heads.append(len(ids) - 1)
                drafting.append(seq)
        if not flat:
            return {}

        def select(x: Tensor, index: list[int]) -> Tensor:
            return x.index_select(0, torch.tensor(index, dtype=torch.long, device=dev))

        def mtp(hidden: Tensor, tokens: list[int], pos: list[int], batch: ForwardBatch) -> Tensor:
            with onednn(dev.type != "cpu" or len(tokens) > NATIVE_GEMM_MAX_TOKENS):
                return model.mtp_hidden(hidden[None], torch.tensor(tokens, device=dev)[None],
                                        torch.tensor(pos, device=dev)[None], batch)[0]

        out = select(mtp(select(result.hidden, flat), ids, positions,
                         ForwardBatch.build(self.kv, tables, contexts, query_lens)), heads)
        drafts: list[list[int]] = [[] for _ in drafting]
        live = list(range(len(drafting)))  # drafting sequences still going, one row of `out` each
        while live:
            with onednn(dev.type != "cpu" or len(live) > NATIVE_GEMM_MAX_TOKENS):
                tokens = argmax_rows(model.mtp_head(out).float()).tolist()
            for i, t in zip(live, tokens):
                drafts[i].append(t)
            # The next draft runs the layer at position len - 2 + j (j drafts so far), whose K/V needs a slot.
            keep = [r for r, i in enumerate(live) if len(drafts[i]) < min(depth, drafting[i].max_drafts)
                    and grow(drafting[i], len(drafting[i]) - 1 + len(drafts[i]))]
            if not keep:
                break
            live = [live[r] for r in keep]
            seqs = [drafting[i] for i in live]
            pos = [len(s) - 2 + len(drafts[i]) for s, i in zip(seqs, live)]
            out = mtp(select(out, keep), [drafts[i][-1] for i in live], pos,
                      ForwardBatch.build(self.kv, [s.block_table for s in seqs], pos, [1] * len(seqs)))
        return {seq: d for seq, d in zip(drafting, drafts)}
