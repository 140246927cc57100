"""The engine over several tensor-parallel ranks: rank 0 owns the scheduler, the sequences and sampling, and sends
each step's plain input (a StepInput, or a DraftInput for the MTP layer) to the other ranks, which run it on their
shard and their KV cache, so that every collective inside the forward has all ranks at it. Ranks agree on one KV
block count, the smallest any rank can hold.

    rank 0:   engine = LLMEngine(model, config)        # model loaded with this rank's ParallelState
              ... engine.generate(...) ...; engine.shutdown()
    rank > 0: run_rank(model, config)                  # returns when rank 0 shuts down

`start_local_ranks` starts ranks 1 .. N-1 of one host as processes (what `glm47 serve --tensor-parallel-size N`
does); the caller becomes rank 0.

The inputs travel by torch.distributed (broadcast of a pickled object over the tp group: gloo on CPU, NCCL on
GPUs). A shared-memory ring for ranks on one host is still to come (#15).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glm47.engine.config import EngineConfig
from glm47.engine.model_runner import ModelRunner, num_kv_blocks
from glm47.engine.spec_decode import draft
from glm47.model.parallel import ParallelState


class StepBroadcast:
    """Rank 0's side: sends each input the other ranks must run, before running it itself."""

    def __init__(self, parallel: ParallelState):
        self.parallel = parallel

    def send(self, kind: str, payload) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.parallel.tp_group)


def receive(parallel: ParallelState) -> tuple[str, object]:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=parallel.tp_group)
    return box[0]


def agree_num_blocks(num_blocks: int, parallel: ParallelState, device: torch.device) -> int:
    """The smallest KV block count any rank can hold: the one every rank allocates (the same block ids on all).
    The count travels on the model's device (NCCL reduces GPU tensors only)."""
    if parallel.tp_size == 1:
        return num_blocks
    n = torch.tensor([num_blocks], dtype=torch.long, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN, group=parallel.tp_group)
    return int(n.item())


def kv_blocks_for(model, config: EngineConfig) -> int:
    """The KV block count of an engine for `model`: from the options or free memory (num_kv_blocks), the same
    on every tensor-parallel rank (the smallest any of them can hold)."""
    device = model.lm_head.weight.device
    n = num_kv_blocks(config, ModelRunner.kv_bytes_per_block(model, config.block_size), device,
                      config.context_limit(model.config))
    return agree_num_blocks(n, model.parallel, device)


def run_rank(model, engine_config: EngineConfig) -> None:
    """A rank other than 0: allocates its KV cache as rank 0's engine does, then runs every input rank 0 sends
    until it sends "stop"."""
    parallel = model.parallel
    if parallel.tp_rank == 0:
        raise ValueError("rank 0 runs the LLMEngine; run_rank is for the other ranks")
    runner = ModelRunner(model, kv_blocks_for(model, engine_config), engine_config.block_size)
    hidden = None
    while True:
        kind, payload = receive(parallel)
        if kind == "step":
            hidden = runner.execute(payload).hidden
        elif kind == "draft":
            draft(runner, hidden, payload)
        elif kind == "stop":
            return
        else:
            raise ValueError(f"rank {parallel.tp_rank}: unknown input {kind!r} from rank 0")


def init_ranks(rank: int, world: int, port: int, device: torch.device, expert_parallel: bool = False
               ) -> ParallelState:
    """Joins the world of `world` ranks on this host (gloo on CPU, NCCL on GPUs, rendezvous on 127.0.0.1:port)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return ParallelState.from_distributed(expert_parallel)


def _local_rank(rank: int, world: int, port: int, path: str, dtype: str, device: str, options: dict,
                expert_parallel: bool) -> None:
    from glm47.checkpoint.loader import load_model

    dev = torch.device(device if device != "cuda" else f"cuda:{rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    parallel = init_ranks(rank, world, port, dev, expert_parallel)
    try:
        model = load_model(path, dtype=dtype, device=dev, parallel=parallel)
        run_rank(model, EngineConfig(**options))
    finally:
        dist.destroy_process_group()


def start_local_ranks(world: int, port: int, path: str, dtype: str, device: str, options: dict,
                      expert_parallel: bool = False) -> list:
    """Starts ranks 1 .. world-1 as daemon processes of this one (they end with it); each loads its shard of the
    checkpoint (with expert_parallel: whole experts, a block each) and runs what rank 0 sends. Returns them."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_local_rank, args=(r, world, port, str(path), dtype, device, options, expert_parallel),
                         daemon=True, name=f"glm47-rank{r}") for r in range(1, world)]
    for p in procs:
        p.start()
    return procs


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the ranks' rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
