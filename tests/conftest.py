"""Shared test fixtures: where the official reference files are, and a CPU-only torch setup."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference/glm-4.7 next to the checkout holds the official config, template and tokenizer config.
REFERENCE_DIR = REPO.parent / "shared" / "reference" / "glm-4.7"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU each parallel op can wait a whole time
    slice for its second thread (test_engine.py took 100 s instead of 10 s that way). A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert REFERENCE_DIR.is_dir(), f"official reference files not found at {REFERENCE_DIR}"
    return REFERENCE_DIR


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
