"""Fixtures of the training tests."""

import pytest

from glm47.training.train import train
from training_util import TINY_RUN


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 4-step tiny training run: (its output directory, its summary). Read-only for the tests that share it."""
    out = tmp_path_factory.mktemp("run4")
    summary = train(TINY_RUN, out, progress=False)
    return out, summary
