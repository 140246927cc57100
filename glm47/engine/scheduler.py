"""Scheduler: which sequences compute how many tokens this step, within a token budget.

Policy, in order, each step:
  1. Running sequences, decodes (one token left to compute) before unfinished prefills, oldest first.
     A decode with speculative drafts computes them too (its verification), if the budget has room for all.
     The scheduler sees only how many tokens each sequence has to compute (spec_decode owns the drafts).
     A prefill gets what is left of the budget as its next chunk. When the pool has no block for a
     sequence, the newest running sequence not yet scheduled this step is preempted (its blocks are
     freed and it goes back to the front of the queue, to be recomputed later); if none is left, the
     sequence itself is.
  2. Waiting sequences in arrival order (FCFS, no skipping), each starting with its prefix-cache hits,
     while budget, seats (max_num_seqs) and blocks last, and only if nothing was preempted this step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glm47.engine.block_manager import BlockManager
from glm47.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise a step could not give every running sequence its decode token.
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= "
                             f"max_num_seqs={max_num_seqs}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        # counters for metrics
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hit_tokens = 0  # of those, found

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends seq (stop, length or abort) wherever it is and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.max_num_batched_tokens
        bm = self.block_manager

        # 1. running: decodes first (stable sort keeps age order), so one long prompt cannot stall them
        queue = deque(sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1))
        preempted = False
        while queue and budget:
            seq = queue.popleft()
            # All it has to compute if the budget allows (a decode's drafts go all together or not at all), else
            # what the budget leaves of its own tokens: the next prefill chunk, or a decode without its drafts.
            n = seq.num_tokens_to_compute
            if n > budget:
                n = min(seq.num_uncomputed_tokens, budget)
            assert n > 0, seq
            while not bm.allocate(seq, n):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.add(seq, n)
                budget -= n
        if preempted:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]

        # 2. waiting: first come first served; a preempted sequence re-enters at the front
        while self.waiting and budget and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt logprobs need every prompt position's logits: no prefix-cache hits for such a request
            hits = bm.match_prefix(seq) if seq.params.prompt_logprobs is None else []
            n = min(len(seq) - len(hits) * bm.block_size, budget)
            if not bm.allocate(seq, n, hits):
                break
            self.waiting.popleft()
            self.prefix_query_tokens += len(seq)
            self.prefix_hit_tokens += len(hits) * bm.block_size
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop seq's K/V; it keeps its tokens and resumes from the queue front.
        Its full blocks stay in the prefix cache until evicted, so resuming is often cheap."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: list[tuple[Sequence, list[int]]]) -> list[Sequence]:
        """After the forward pass: the scheduled tokens are computed, and each sequence whose last token was
        computed gets its new tokens: the accepted drafts (computed in this step, their K/V is in the cache),
        then the token it sampled. Returns the sequences that finished (their blocks are freed); a sequence
        that finishes on an accepted draft takes none of the tokens after it."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += min(n, seq.num_uncomputed_tokens)  # drafts are no tokens (yet)
        finished = []
        for seq, token_ids in sampled:
            for i, token_id in enumerate(token_ids):
                reason = seq.append_token(token_id)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
                if i < len(token_ids) - 1:  # an accepted draft: computed in this step
                    seq.num_computed_tokens += 1
        return finished
