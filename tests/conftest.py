"""Shared test fixtures: where the official reference files are, and a CPU-only torch setup."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference/glm-4.7 next to the checkout holds the official config, template and tokenizer config.
REFERENCE_DIR = REPO.parent / "shared" / "reference" / "glm-4.7"


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
