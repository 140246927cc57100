"""One rank of a tensor-parallel forward over gloo, run as its own process by the parallel tests:

    python tp_worker.py RANK WORLD PORT CHECKPOINT OUT [--ep]

Loads its shard of CHECKPOINT (float32), runs the whole model and its MTP layer on fixed token ids, and rank 0
saves the gathered logits and how many all-reduces one forward made to OUT."""

import sys

import torch
import torch.distributed as dist

from glm47.checkpoint.loader import load_model
from glm47.engine.ranks import init_ranks

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 256, 3, 11, 480], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def main(rank: int, world: int, port: int, checkpoint: str, out: str, expert_parallel: bool) -> None:
    torch.set_num_threads(1)
    parallel = init_ranks(rank, world, port, torch.device("cpu"), expert_parallel)
    try:
        model = load_model(checkpoint, dtype=torch.float32, parallel=parallel)
        calls = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.inference_mode():
            hidden = model(IDS)
            reduces = len(calls)
            logits = model.compute_logits(hidden)
            draft = model.compute_logits(model.mtp_forward(hidden[:, :-1], IDS[:, 1:]), mtp_layer=0)
        dist.all_reduce = real
        if rank == 0:
            torch.save({"logits": logits, "draft": draft, "all_reduces": reduces}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], "--ep" in sys.argv[6:])
