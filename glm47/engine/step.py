"""What one forward pass of the engine is, as plain data: the driver (rank 0, which owns the scheduler and the
sequences) builds it and every rank runs it. Lists of ints only, so a StepInput pickles as it is and crosses
to another process unchanged; no Sequence objects, no tensors. model_runner.prepare builds it,
model_runner.execute runs it; spec_decode.DraftInput reuses Layout for the MTP passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Layout:
    """Where the tokens of a flat batch sit in the paged KV cache. A row is one sequence's tokens this pass;
    the single-token rows come first (paged_attention.ForwardBatch runs them as one decode batch)."""

    positions: list[int]  # (T,) position of each token in its sequence
    slot_mapping: list[int]  # (T,) KV-cache slot of each token: block * block_size + offset
    block_tables: list[list[int]]  # per row: its sequence's blocks (at least those covering its tokens)
    context_lens: list[int]  # per row: tokens of the sequence already in the cache
    query_lens: list[int]  # per row: tokens it computes

    @classmethod
    def of(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
           block_size: int) -> Layout:
        """Row i covers positions context_lens[i] .. context_lens[i] + query_lens[i] - 1."""
        positions: list[int] = []
        slots: list[int] = []
        for table, ctx, n in zip(block_tables, context_lens, query_lens):
            positions.extend(range(ctx, ctx + n))
            p, end = ctx, ctx + n
            while p < end:  # one range per block the row touches
                b = p // block_size
                hi = min(end, (b + 1) * block_size)
                base = (table[b] - b) * block_size  # slot of position p is base + p
                slots.extend(range(base + p, base + hi))
                p = hi
        return cls(positions, slots, [list(t) for t in block_tables], list(context_lens), list(query_lens))


@dataclass(slots=True)
class StepInput:
    """One step of the main model: its tokens, their layout, and which rows come back as what."""

    token_ids: list[int]  # (T,) decode rows (a decode's drafts each a row of their own) first, then prefill chunks
    layout: Layout
    logits_rows: list[int]  # flat indices whose logits come back, in order (sampled positions only)
    # Prompt logprobs, one entry per request that asked for them and has positions to score in this step:
    prompt_rows: list[list[int]] = field(default_factory=list)  # flat indices scored
    prompt_targets: list[list[int]] = field(default_factory=list)  # the prompt token each of them scores
    prompt_top: list[int] = field(default_factory=list)  # how many alternatives the request wants
    keep_hidden: bool = False  # return every token's hidden state (MTP drafting follows the step)
