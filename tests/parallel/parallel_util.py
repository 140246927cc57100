"""Starting the ranks of a parallel test: one process per rank on loopback (gloo), each ended by the caller within
a time bound, whatever happens."""

import subprocess
import sys
from pathlib import Path

import torch
from server_util import free_port


def run_ranks(worker: Path, world: int, checkpoint: Path, out: Path, *args: str, timeout: float = 240) -> dict:
    """Runs `python worker RANK WORLD PORT CHECKPOINT OUT *args` for every rank; returns what rank 0 saved to OUT.
    Fails with every rank's output when one fails or the time runs out; kills every rank in any case."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(checkpoint), str(out),
                               *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out)
