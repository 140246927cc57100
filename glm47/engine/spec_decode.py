"""Speculative decoding with the checkpoint's MTP layer: propose drafts after a step, verify them in the next
step, rewind what the model did not keep. The output is the model's own: greedy, the same tokens as plain
decoding; sampled, the same tokens for the same seed.

A sequence's drafts (Sequence.draft_token_ids) are tokens proposed after its last one. The scheduler only
sees how many tokens a sequence has to compute (its drafts count while it decodes, all or none of them);
model_runner.prepare makes its last token and each draft a one-token row with a logits row of its own.
  verify   row j is sampled exactly as plain decoding samples that position, after drafts[:j]; the step keeps
           the drafts the rows confirm, then the first token that differs (or the one after them all). That
           is rejection sampling against a one-hot draft: a draft is accepted with the model's own odds.
  rewind   a seeded generator goes back to its state before the first row not kept. The K/V written for
           rejected drafts lies past the sequence's computed tokens, where the next tokens overwrite it; their
           blocks stay with the sequence, which fills them next.
  propose  (driver) once the step's tokens are settled: the MTP layer catches up on every position the step
           settled (it needs the token after each), and each sequence that got a token drafts from its last
           position, further drafts chained on the MTP output one position on while the pool has slots.
           Out comes a DraftInput, plain data as step.StepInput.
  draft    (every rank) runs a DraftInput with the step's hidden states (which stay on the rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glm47.engine.block_manager import BlockManager
from glm47.engine.model_runner import NATIVE_GEMM_MAX_TOKENS, ModelRunner, Step, onednn
from glm47.engine.paged_attention import ForwardBatch
from glm47.engine.sampling import argmax_rows
from glm47.engine.sequence import Sequence
from glm47.engine.step import Layout


def accepted(drafts: list[int], tokens: list[int]) -> list[int]:
    """The tokens a step keeps from `tokens`, sampled by rows 0..len(drafts) (row j after drafts[:j]): the
    drafts the rows confirm, then the first token that differs, or the one after them all."""
    assert len(tokens) == len(drafts) + 1, (drafts, tokens)
    for j, draft in enumerate(drafts):
        if tokens[j] != draft:
            return tokens[:j + 1]
    return tokens


def verify(seq: Sequence, tokens: list[int], generator_states: list[Tensor | None]) -> list[int]:
    """The tokens seq keeps from its logits rows' samples `tokens` (one more than the drafts it computed);
    rewinds its seeded generator past the rows not kept (generator_states[j]: its state before row j drew),
    so that they drew nothing."""
    kept = accepted(seq.draft_token_ids[:len(tokens) - 1], tokens)
    if len(kept) < len(tokens) and generator_states[len(kept)] is not None:
        seq.generator.set_state(generator_states[len(kept)])
    return kept


@dataclass(slots=True)
class DraftInput:
    """MTP drafting after a step, as plain lists: what every rank runs with the step's hidden states."""

    hidden_rows: list[int]  # rows of the step's hidden states the MTP layer takes (positions it settled)
    token_ids: list[int]  # the token after each of those positions
    layout: Layout  # those positions: the MTP layer's K/V goes to their slots
    heads: list[int]  # per drafting sequence: the row whose MTP output drafts its first token
    num_drafts: list[int]  # per drafting sequence: drafts it makes (1 + the chained ones)
    # per chained draft j = 1, 2, ...: one row per sequence with num_drafts > j, in order, at the position one
    # past the previous draft's
    chain: list[Layout]


class SpecDecoder:
    """Drafting for an LLMEngine: up to `depth` greedy MTP drafts per decoding sequence and step."""

    def __init__(self, runner: ModelRunner, block_manager: BlockManager, depth: int):
        self.runner, self.block_manager, self.depth = runner, block_manager, depth

    def propose(self, step: Step, hidden: Tensor) -> dict[Sequence, list[int]]:
        """Sets the drafts of every sequence of the (settled) step: those that got a token and may get more
        draft; the others have none. hidden: the step's (ModelOutput.hidden). Returns {sequence: drafts}."""
        d, drafting = self.prepare(step)
        drafts = draft(self.runner, hidden, d)
        for seq in step.seqs:
            seq.draft_token_ids = []
        for seq, tokens in zip(drafting, drafts):
            seq.draft_token_ids = tokens
        return dict(zip(drafting, drafts))

    def prepare(self, step: Step) -> tuple[DraftInput, list[Sequence]]:
        """The driver's half of propose: the DraftInput, and the sequences that draft (in heads order). Grows
        the block tables of those that chain drafts: the draft after j drafts runs the MTP layer at position
        len - 2 + j, whose K/V needs a slot; a sequence the pool cannot grow drafts no further."""
        bs = self.block_manager.block_size
        # Per sequence the positions the step settled: every computed token of a prefill chunk, a decode and its
        # accepted drafts (none for a finished one). Single-position rows first, as ForwardBatch wants.
        rows = [(seq, offset, start, seq.num_computed_tokens - start)
                for seq, offset, start in zip(step.seqs, step.offsets, step.starts) if not seq.is_finished]
        rows = sorted((r for r in rows if r[3] > 0), key=lambda r: r[3] > 1)
        hidden_rows, ids, tables, contexts, query_lens, heads, drafting = [], [], [], [], [], [], []
        for seq, offset, start, n in rows:
            hidden_rows.extend(range(offset, offset + n))
            ids.extend(seq.token_ids[start + 1:start + n + 1])
            tables.append(seq.block_table)
            contexts.append(start)
            query_lens.append(n)
            if start + n == len(seq) - 1 and seq.max_drafts > 0:  # it got a token and may get more
                heads.append(len(ids) - 1)
                drafting.append(seq)
        layout = Layout.of(tables, contexts, query_lens, bs)
        num_drafts, chain = [1] * len(drafting), []
        live = range(len(drafting))
        while True:
            live = [i for i in live if num_drafts[i] < min(self.depth, drafting[i].max_drafts)
                    and self._grow(drafting[i], len(drafting[i]) - 1 + num_drafts[i])]
            if not live:
                break
            pos = [len(drafting[i]) - 2 + num_drafts[i] for i in live]
            chain.append(Layout.of([drafting[i].block_table for i in live], pos, [1] * len(live), bs))
            for i in live:
                num_drafts[i] += 1
        return DraftInput(hidden_rows, ids, layout, heads, num_drafts, chain), drafting

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Makes seq's block table cover `tokens` tokens; False when the pool has too few free blocks."""
        return self.block_manager.allocate(seq, max(0, tokens - seq.num_computed_tokens))


@torch.inference_mode()
def draft(runner: ModelRunner, hidden: Tensor, d: DraftInput) -> list[list[int]]:
    """Every rank's half of propose: runs the MTP layer over d's settled positions (filling its KV cache there),
    then drafts greedily from each head, each further draft by running the layer again on its own output one
    position on (that position's MTP K/V is rewritten by the next step). Returns the drafts per head."""
    if not d.token_ids:
        return []
    if runner.broadcast is not None:
        runner.broadcast.send("draft", d)
    model, dev = runner.model, runner.device

    def rows(x: Tensor, index: list[int]) -> Tensor:
        return x.index_select(0, torch.tensor(index, dtype=torch.long, device=dev))

    def mtp(h: Tensor, tokens: list[int], layout: Layout) -> Tensor:
        with onednn(dev.type != "cpu" or len(tokens) > NATIVE_GEMM_MAX_TOKENS):
            return model.mtp_forward(h[None], torch.tensor(tokens, device=dev)[None],
                             torch.tensor(layout.positions, device=dev)[None],
                             ForwardBatch.build(runner.kv, layout, model.ops))[0]

    out = rows(mtp(rows(hidden, d.hidden_rows), d.token_ids, d.layout), d.heads)
    drafts: list[list[int]] = [[] for _ in d.heads]
    live = list(range(len(d.heads)))  # heads still drafting, one row of `out` each
    for layout in [*d.chain, None]:
        if not live:
            break
        with onednn(dev.type != "cpu" or len(live) > NATIVE_GEMM_MAX_TOKENS):
            tokens = argmax_rows(model.compute_logits(out, mtp_layer=0).float()).tolist()
        for i, t in zip(live, tokens):
            drafts[i].append(t)
        if layout is None:
            break
        keep = [r for r, i in enumerate(live) if d.num_drafts[i] > len(drafts[i])]
        live = [live[r] for r in keep]
        out = mtp(rows(out, keep), [drafts[i][-1] for i in live], layout)
    return drafts
