"""Sequence: one request's token ids, where its K/V lives (a block table) and how far it has been computed.

A sequence is prompt + generated tokens in one list; `num_computed_tokens` of them have K/V in the paged
cache. Each step computes some of the rest (a prefill chunk, or the one new token of a decode). No tensors
here, and no scheduling: block_manager fills the block table, scheduler moves the status.
"""

from __future__ import annotations

from enum import Enum, auto

import torch

from glm47.engine.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "params", "max_tokens", "stop_token_ids",
                 "generator", "status", "finish_reason", "block_table", "block_hashes", "num_registered_blocks",
                 "num_computed_tokens", "num_cached_tokens", "draft_token_ids", "prompt_logprobs",
                 "prompt_top_logprobs")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, max_tokens: int,
                 stop_token_ids: frozenset[int], generator: torch.Generator | None = None):
        """max_tokens: the resolved limit (params.max_tokens, or what the context leaves when it is None).
        stop_token_ids: params.stop_token_ids plus the model's eos ids unless params.ignore_eos."""
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.stop_token_ids = stop_token_ids
        self.generator = generator  # seeded per request, so its draws do not depend on the batch
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # 'stop' | 'length' | 'abort'
        self.block_table: list[int] = []  # physical block of the i-th block_size tokens
        self.block_hashes: list[bytes] = []  # chained hash of each full block so far (prefix caching)
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache
        self.num_cached_tokens = 0  # of those, how many the prefix cache supplied at the last admission
        # Speculative decoding (spec_decode): tokens the MTP layer proposed after token_ids, not part of the
        # sequence until the main model accepts them. A step that schedules them computes positions len(self)
        # onwards too; they count only while the sequence decodes (a preempted one recomputes first).
        self.draft_token_ids: list[int] = []
        # params.prompt_logprobs: prompt tokens 1.. scored so far (a recompute after preemption adds none twice)
        self.prompt_logprobs: list[float] = []
        self.prompt_top_logprobs: list[list[tuple[int, float]]] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_tokens_to_compute(self) -> int:
        """What a step could compute for this sequence: its uncomputed tokens, and its drafts while it decodes."""
        n = self.num_uncomputed_tokens
        return n + len(self.draft_token_ids) if n == 1 else n

    @property
    def max_drafts(self) -> int:
        """Drafts worth proposing: a step emits accepted drafts + 1 token, which must stay within max_tokens."""
        return max(0, self.max_tokens - self.num_output_tokens - 1)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> str | None:
        """Adds a sampled token; returns why the sequence is now done ('stop' | 'length') or None."""
        self.token_ids.append(token_id)
        n = self.num_output_tokens
        if token_id in self.stop_token_ids and n >= self.params.min_tokens:
            return "stop"
        if n >= self.max_tokens:
            return "length"
        return None
