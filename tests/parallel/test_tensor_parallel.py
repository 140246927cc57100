"""Tensor and expert parallelism for real: 2 and 4 processes over gloo on loopback, each loading only its shard of a
tiny float32 checkpoint, give the logits of one process (and of the MTP layer), with 2 all-reduces per decoder
layer and 1 for the embedding. Every process is ended by the test, within a time bound."""

from pathlib import Path

import pytest
import torch
from parallel_util import run_ranks
from tp_worker import IDS

from glm47.checkpoint.loader import load_model
from glm47.config import preset

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.fixture(scope="module")
def single(tiny_fp32):
    model = load_model(tiny_fp32, dtype=torch.float32)
    with torch.inference_mode():
        hidden = model(IDS)
        return model.compute_logits(hidden), model.compute_logits(model.mtp_forward(hidden[:, :-1], IDS[:, 1:]),
                                                                  mtp_layer=0)


@pytest.mark.parametrize("world, flags", [(2, ()), (4, ()), (2, ("--ep",))], ids=["tp2", "tp4-kv-replicated", "tp2-ep2"])
def test_sharded_forward_gives_the_logits_of_one_process(tiny_fp32, single, tmp_path, world, flags):
    got = run_ranks(WORKER, world, tiny_fp32, tmp_path / "out.pt", *flags)
    logits, draft = single
    torch.testing.assert_close(got["logits"], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["draft"], draft, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["logits"].argmax(-1), logits.argmax(-1))
    layers = preset("tiny").num_hidden_layers
    assert got["all_reduces"] == 2 * layers + 1  # after o_proj and after the MoE / MLP, and the embedding's
