"""The engine over tensor-parallel ranks: rank 0 schedules and samples, the other ranks run each step's plain input
on their shard and KV cache. Greedy tokens over 2 gloo processes are one process's, with chunked prefill, prefix
caching and MTP drafts, and every KV block is free at the end."""

from pathlib import Path

import pytest
import torch
from engine_worker import config, generate
from parallel_util import run_ranks

from glm47.checkpoint.loader import load_model
from glm47.engine.llm_engine import LLMEngine

WORKER = Path(__file__).with_name("engine_worker.py")


@pytest.mark.parametrize("drafts", [0, 2], ids=["plain", "mtp-drafts"])
def test_two_ranks_give_the_greedy_tokens_of_one_process(tiny_fp32, tmp_path, drafts):
    got = run_ranks(WORKER, 2, tiny_fp32, tmp_path / "out.pt", str(drafts))
    engine = LLMEngine(load_model(tiny_fp32, dtype=torch.float32), config(drafts))
    assert got["tokens"] == generate(engine)
    assert got["free"] == got["blocks"] == engine.stats().num_kv_blocks


def test_the_engine_runs_on_rank_0_only():
    from glm47.config import preset
    from glm47.model.glm4_moe import Glm4MoeForCausalLM
    from glm47.model.parallel import ParallelState

    model = Glm4MoeForCausalLM(preset("tiny"), parallel=ParallelState(tp_rank=1, tp_size=2))
    with pytest.raises(ValueError, match="rank 1 runs engine.ranks.run_rank"):
        LLMEngine(model, config(0))
