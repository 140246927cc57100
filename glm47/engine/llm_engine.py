"""LLMEngine: token ids in, token ids out. add_request / step / abort over the scheduler and model runner.

Each step schedules sequences (scheduler), turns them into a plain StepInput (runner.prepare) that runs as
one flat batch (runner.execute: the part every rank would run), samples the sequences whose prompt is
complete, keeps what verifies of their drafts (spec_decode), and reports new tokens per request; with
speculative decoding on, the MTP layer then proposes the next drafts. Text is not here: detokenizing and
stop strings are glm47/text's TextDriver, chat templates the LLM facade's and the server's; `n > 1` neither:
they add n requests with the same prompt (the prefix cache shares their blocks) and distinct seeds
(SamplingParams.for_sample).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from glm47 import kernels
from glm47.checkpoint.loader import load_model
from glm47.engine.block_manager import BlockManager
from glm47.engine.config import EngineConfig
from glm47.engine.model_runner import ModelRunner, Step
from glm47.engine.ranks import StepBroadcast, kv_blocks_for
from glm47.engine.sampling import ParamError, SampleOutput, SamplingParams, sample
from glm47.engine.scheduler import ScheduledBatch, Scheduler
from glm47.engine.sequence import Sequence
from glm47.engine.spec_decode import SpecDecoder, verify
from glm47.engine.threads import ThreadGovernor
from glm47.model.parallel import ParallelState
from glm47.sampling_params import ContextTooLong

log = logging.getLogger("glm47.engine")

@dataclass(slots=True)
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    # 'stop' | 'length' | 'abort' once finished; 'error' when stepping this request raised (`error` says what):
    # the request ends, the others go on
    finish_reason: str | None = None
    logprobs: list[float] | None = None  # per new token, when the request asked for logprobs
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: (id, logprob), best first
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (OpenAI usage.cached_tokens)
    # With params.prompt_logprobs, on the request's first output: per prompt token its logprob (None for the
    # first) and its top alternatives ([] for the first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None

    def head(self, n: int) -> StepOutput:
        """This output cut to its first n new tokens (a stop string ended the text at the n-th)."""
        if n == len(self.new_token_ids):
            return self
        return replace(self, new_token_ids=self.new_token_ids[:n], logprobs=self.logprobs and self.logprobs[:n],
                       top_logprobs=self.top_logprobs and self.top_logprobs[:n])


@dataclass(slots=True)
class RequestOutput:
    """What generate() returns per prompt: every generated token of the request."""
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by live sequences
    num_kv_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, found cached (not recomputed)
    prompt_tokens_computed: int  # prompt tokens run through the model (recomputes after preemption included)
    generation_tokens: int  # tokens sampled
    tokens_computed: int  # all tokens run through the model
    num_preemptions: int
    num_steps: int
    spec_draft_tokens: int = 0  # MTP drafts verified by the model
    spec_accepted_tokens: int = 0  # of those, accepted


class LLMEngine:
    def __init__(self, model, engine_config: EngineConfig | None = None, eos_token_ids: list[int] | None = None):
        """model: a Glm4MoeForCausalLM in eval mode. eos_token_ids: the stop ids of generation_config.json
        (default: the model config's eos_token_id)."""
        self.config = config = engine_config or EngineConfig()
        mc = model.config
        self.eos_token_ids = frozenset(mc.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.vocab_size = mc.vocab_size
        self.max_model_len = config.context_limit(mc)
        device = model.lm_head.weight.device
        if config.num_speculative_tokens and not model.has_mtp:
            raise ValueError(f"num_speculative_tokens={config.num_speculative_tokens} drafts with the checkpoint's "
                             f"MTP layer (model.layers.{mc.num_hidden_layers}.*), and this model has none")
        parallel = model.parallel
        if parallel.tp_rank != 0:
            raise ValueError(f"the engine runs on tp rank 0; rank {parallel.tp_rank} runs engine.ranks.run_rank")
        num_blocks = kv_blocks_for(model, config)  # the same on every rank
        self.runner = ModelRunner(model, num_blocks, config.block_size,
                                  StepBroadcast(parallel) if parallel.tp_size > 1 else None)
        self.threads = ThreadGovernor(max_rows=kernels.LINEAR_MAX_ROWS,
                                      enabled=config.adaptive_threads and device.type == "cpu")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.spec = (SpecDecoder(self.runner, self.block_manager, config.num_speculative_tokens)
                     if config.num_speculative_tokens else None)
        self.pool_tokens = num_blocks * config.block_size
        self._requests: dict[str, Sequence] = {}
        self._pending: list[StepOutput] = []  # abort notices, reported by the next step()
        self._ids = itertools.count()
        self._prompt_tokens_computed = self._generation_tokens = self._tokens_computed = self._steps = 0
        self._drafted = self._accepted = 0

    @classmethod
    def from_path(cls, path: str | Path, dtype: torch.dtype | str | None = torch.bfloat16,
                  device: str | torch.device = "cpu", parallel: ParallelState | None = None, **options) -> LLMEngine:
        """Loads a checkpoint directory (this rank's shard with `parallel`: rank 0's engine); options are
        EngineConfig fields. Stop ids come from generation_config.json when it has them."""
        model = load_model(path, dtype=dtype, device=device, parallel=parallel)
        eos = None
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos = None if e is None else [e] if isinstance(e, int) else list(e)
        return cls(model, EngineConfig(**options), eos)

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues a request; raises ValueError for one that is malformed or could never fit."""
        params = params or SamplingParams()
        if request_id is None:
            request_id = str(next(self._ids))
            while request_id in self._requests:  # a caller may have picked a number as an id
                request_id = str(next(self._ids))
        elif request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token id")
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ParamError("prompt", f"prompt token id {bad!r} is not in the vocabulary [0, {self.vocab_size})")
        if params.top_k > self.vocab_size:
            raise ParamError("top_k", f"top_k must be at most the vocabulary size {self.vocab_size} "
                                      f"(0 or -1 = off), got {params.top_k}")
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if ids and max(ids) >= self.vocab_size:
                raise ParamError(name, f"{name} token id {max(ids)} is not in the vocabulary "
                                       f"[0, {self.vocab_size})")
        if params.n != 1:
            raise ValueError(f"n={params.n}: the engine runs one sequence per request; add n requests instead")
        limit = min(self.max_model_len, self.pool_tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(prompt)
        if len(prompt) + max(max_tokens, 1) > limit:
            if limit == self.max_model_len:
                raise ContextTooLong(len(prompt), params.max_tokens, limit)
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} exceeds the KV cache "
                             f"pool of {self.pool_tokens} tokens (raise kv_cache_tokens or kv_cache_bytes)")
        if params.min_tokens > max_tokens:
            raise ParamError("min_tokens", f"min_tokens={params.min_tokens} is more than the {max_tokens} tokens this "
                                           f"request can generate")
        stop = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(request_id, prompt, params, max_tokens, stop, generator)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stops a request now and frees its blocks; the next step() reports it with finish_reason 'abort'.
        Returns False when the request is unknown or already finished."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._pending.append(StepOutput(request_id, [], True, "abort", num_cached_tokens=seq.num_cached_tokens))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._pending)

    # ---- stepping -----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Runs one scheduled batch; returns one output per request that got a token or finished."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            # Admission checks guarantee a lone request fits the pool, so an idle step with work left is a bug.
            assert not self.scheduler.has_unfinished(), "scheduler made no progress with requests left"
            return outputs
        threads = self.threads.threads_for(sum(batch.num_tokens))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        step = self.runner.prepare(batch, keep_hidden=self.spec is not None)
        result = self.runner.execute(step.input)
        self._count(batch)
        for seq, (lps, tops) in zip(step.scored, result.prompt_logprobs):
            seq.prompt_logprobs += lps
            seq.prompt_top_logprobs += tops
        # One logits row per sampled sequence, or 1 + its drafts: row j is sampled as plain decoding would sample
        # that position, the drafts before it counting as outputs for penalties and min_tokens (spec_decode).
        params, gens, prompts, outs, stops = [], [], [], [], []
        for seq, r in zip(step.sampled, step.num_logits):
            for j in range(r):
                params.append(seq.params)
                gens.append(seq.generator)
                prompts.append(seq.prompt_token_ids)
                outs.append(seq.output_token_ids + seq.draft_token_ids[:j])
                stops.append(list(seq.stop_token_ids))
        out, failed = None, {}
        if params:
            out, failed = self._sample(step, result.logits, params, gens, prompts, outs, stops)
        new_tokens: list[tuple[Sequence, list[int], int]] = []  # (seq, tokens, first logits row)
        row = 0
        for seq, r in zip(step.sampled, step.num_logits):
            if seq not in failed:
                tokens = verify(seq, out.token_ids[row:row + r], out.generator_states[row:row + r])
                self._drafted += r - 1
                self._accepted += len(tokens) - 1
                new_tokens.append((seq, tokens, row))
            row += r
        lengths = [len(seq) for seq, _, _ in new_tokens]
        finished = self.scheduler.update(batch, [(seq, tokens) for seq, tokens, _ in new_tokens])
        for seq in finished:
            del self._requests[seq.request_id]
        for seq, error in failed.items():
            self.scheduler.finish(seq, "error")
            del self._requests[seq.request_id]
            outputs.append(StepOutput(seq.request_id, [], True, "error", num_cached_tokens=seq.num_cached_tokens,
                                      error=error))
        for (seq, tokens, row), before in zip(new_tokens, lengths):
            taken = len(seq) - before  # fewer than tokens when it finished on an accepted draft
            o = StepOutput(seq.request_id, tokens[:taken], seq.is_finished, seq.finish_reason,
                           num_cached_tokens=seq.num_cached_tokens)
            if seq.params.logprobs is not None:
                o.logprobs = out.logprobs[row:row + taken]
                o.top_logprobs = out.top_logprobs[row:row + taken]
            if seq.params.prompt_logprobs is not None and before == seq.num_prompt_tokens:  # its first tokens
                o.prompt_logprobs = [None] + seq.prompt_logprobs
                o.prompt_top_logprobs = [[]] + seq.prompt_top_logprobs
            outputs.append(o)
            self._generation_tokens += taken
        if self.spec is not None:
            self.spec.propose(step, result.hidden)
        self._steps += 1
        if not self.has_unfinished() and torch.get_num_threads() != self.threads.max_threads:
            torch.set_num_threads(self.threads.max_threads)  # idle: the process gets its threads back
        return outputs

    def _sample(self, step: Step, logits: torch.Tensor, params, gens, prompts, outs, stops
                ) -> tuple[SampleOutput, dict[Sequence, str]]:
        """sample() over all rows at once. Should that raise, each sequence's rows are sampled again on their
        own (generators rewound first), so a request that makes sampling fail fails alone: it is returned with
        its error, its rows hold no tokens, and every other request gets exactly the tokens it would have."""
        seeded = {id(g): (g, g.get_state()) for g in gens if g is not None}
        try:
            return sample(logits, params, gens, prompts, outs, stop_ids=stops), {}
        except Exception:
            log.exception("sampling a batch of %d rows failed; sampling each request on its own", len(params))
        for g, state in seeded.values():
            g.set_state(state)
        parts, failed, row = [], {}, 0
        for seq, r in zip(step.sampled, step.num_logits):
            rows = slice(row, row + r)
            try:
                parts.append(sample(logits[rows], params[rows], gens[rows], prompts[rows], outs[rows],
                                    stop_ids=stops[rows]))
            except Exception as e:
                failed[seq] = f"sampling failed: {type(e).__name__}: {e}"
                parts.append(SampleOutput([0] * r, [None] * r, [[] for _ in range(r)], [None] * r))
            row += r
        merged = SampleOutput(*([x for p in parts for x in getattr(p, f)] for f in SampleOutput.__slots__))
        return merged, failed

    def _count(self, batch: ScheduledBatch) -> None:
        for seq, n in zip(batch.seqs, batch.num_tokens):
            self._tokens_computed += n
            self._prompt_tokens_computed += max(0, min(n, seq.num_prompt_tokens - seq.num_computed_tokens))

    def shutdown(self) -> None:
        """Tells the other tensor-parallel ranks to return from run_rank (nothing to do in one process)."""
        if self.runner.broadcast is not None:
            self.runner.broadcast.send("stop", None)
            self.runner.broadcast = None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Adds the prompts, steps until every request in the engine is done, and returns the outputs of
        these prompts in their order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp))
        except ValueError:
            for rid in ids:
                self.abort(rid)
            self._pending = [o for o in self._pending if o.request_id not in ids]
            raise
        results = {rid: RequestOutput(rid) for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                r = results.get(o.request_id)
                if r is None:
                    continue
                r.token_ids.extend(o.new_token_ids)
                r.finish_reason, r.num_cached_tokens = o.finish_reason, o.num_cached_tokens
                if o.prompt_logprobs is not None:
                    r.prompt_logprobs, r.prompt_top_logprobs = o.prompt_logprobs, o.prompt_top_logprobs
                if o.logprobs is not None:
                    if r.logprobs is None:
                        r.logprobs, r.top_logprobs = [], []
                    r.logprobs.extend(o.logprobs)
                    r.top_logprobs.extend(o.top_logprobs)
        return [results[rid] for rid in ids]

    # ---- metrics ------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        return EngineStats(len(sch.running), len(sch.waiting), bm.usage, bm.num_blocks, bm.num_free_blocks,
                           sch.prefix_query_tokens, sch.prefix_hit_tokens, self._prompt_tokens_computed,
                           self._generation_tokens, self._tokens_computed, sch.num_preemptions, self._steps,
                           self._drafted, self._accepted)
