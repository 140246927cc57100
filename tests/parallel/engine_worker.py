"""One rank of a tensor-parallel engine over gloo, run as its own process by the parallel tests:

    python engine_worker.py RANK WORLD PORT CHECKPOINT OUT DRAFTS

Rank 0 runs the LLMEngine on its shard and saves the greedy tokens of PROMPTS to OUT; the other ranks run
engine.ranks.run_rank until rank 0 shuts the engine down."""

import sys

import torch
import torch.distributed as dist

from glm47.checkpoint.loader import load_model
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.engine.ranks import init_ranks, run_rank
from glm47.engine.sampling import SamplingParams

# Prompts longer than a prefill chunk (16 tokens a step) and shorter; two share a prefix (prefix caching).
PROMPTS = [[5, 17, 300, 42, 7], list(range(2, 40)), [9] * 3, list(range(2, 22)) + [77, 78]]


def config(drafts: int) -> EngineConfig:
    return EngineConfig(block_size=4, kv_cache_tokens=512, max_num_batched_tokens=16, max_num_seqs=4,
                        num_speculative_tokens=drafts)


def generate(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


def main(rank: int, world: int, port: int, checkpoint: str, out: str, drafts: int) -> None:
    torch.set_num_threads(1)
    parallel = init_ranks(rank, world, port, torch.device("cpu"))
    try:
        model = load_model(checkpoint, dtype=torch.float32, parallel=parallel)
        if rank == 0:
            engine = LLMEngine(model, config(drafts))
            try:
                tokens = generate(engine)
                stats = engine.stats()
            finally:
                engine.shutdown()
            torch.save({"tokens": tokens, "free": stats.num_free_blocks, "blocks": stats.num_kv_blocks}, out)
        else:
            run_rank(model, config(drafts))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
