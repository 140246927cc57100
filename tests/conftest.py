"""Fixtures every test folder may use: the official reference files (../shared/reference when beside the checkout,
else the golden data derived from them in tests/golden), a one-thread torch setup, and the random tiny checkpoint
over GLM-4.7's real vocabulary that the engine, text and server tests share. Each folder's conftest.py has the
fixtures of its own tests; helper modules (helpers.py, server_util.py here, *_util.py in a folder) hold plain
functions, and no test module imports another."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference/glm-4.7 next to the checkout holds the official config, template and tokenizer config.
REFERENCE_DIR = REPO.parent / "shared" / "reference" / "glm-4.7"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU each parallel op can wait a whole time
    slice for its second thread (engine/test_engine.py took 100 s instead of 10 s that way). A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    """GLM-4.7's real tokenizer (the vocabulary splintr ships), which the template, text and server tests use."""
    from glm47.chat import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    """A random float32 tiny checkpoint with an MTP layer (seed 3, std 0.2: its drafts are mostly wrong). Shared
    read-only by the model and engine tests."""
    import torch

    from glm47.checkpoint.writer import init_checkpoint
    from glm47.config import preset

    path = tmp_path_factory.mktemp("tiny-fp32")
    init_checkpoint(preset("tiny"), path, seed=3, dtype=torch.float32, std=0.2)
    return path


@pytest.fixture(scope="session")
def tiny_glm47(tmp_path_factory) -> Path:
    """A random tiny checkpoint over GLM-4.7's real vocabulary and stop ids (seed 0, std 0.5, so that its greedy
    output varies), with MTP weights. Shared read-only."""
    from glm47.checkpoint.writer import init_checkpoint
    from glm47.config import preset

    path = tmp_path_factory.mktemp("tiny-glm47")
    init_checkpoint(preset("tiny-glm47"), path, seed=0, std=0.5)
    return path


GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
# GLM47_UPDATE_GOLDEN=1 (with the reference files beside the checkout) rewrites tests/golden from them.
UPDATE_GOLDEN = os.environ.get("GLM47_UPDATE_GOLDEN") == "1"


def _golden(name: str, derive) -> object:
    """Data derived from the official reference files, committed under tests/golden so that a clone alone
    passes. When the reference files are beside the checkout, derive(REFERENCE_DIR) is computed too and must
    equal the committed data (or replaces it with GLM47_UPDATE_GOLDEN=1)."""
    path = GOLDEN_DIR / name
    committed = json.loads(path.read_text()) if path.is_file() else None
    if REFERENCE_DIR.is_dir():
        fresh = json.loads(json.dumps(derive(REFERENCE_DIR)))  # as JSON stores it (tuples become lists)
        if UPDATE_GOLDEN:
            path.write_text(json.dumps(fresh, ensure_ascii=False, indent=1) + "\n")
            return fresh
        assert committed == fresh, f"{path} differs from what the reference files give: GLM47_UPDATE_GOLDEN=1"
    assert committed is not None, f"{path} is missing: run the tests with GLM47_UPDATE_GOLDEN=1 beside the reference"
    return committed


class OfficialTemplate:
    """Renderings of the official chat_template.jinja, for the tests that compare our renderer with it: rendered
    from ../shared/reference when it is there (and checked against tests/golden/official_template.json), else
    looked up there. A case not in the golden file fails: add it with GLM47_UPDATE_GOLDEN=1."""

    def __init__(self):
        self.path = GOLDEN_DIR / "official_template.json"
        file = REFERENCE_DIR / "chat_template.jinja"
        self.template = file.read_text() if file.is_file() else None  # None: the goldens alone
        self.renderings = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.seen: dict[str, str] = {}

    def __call__(self, messages, tools=None, **kw) -> str:
        from glm47.chat.template import render_with_jinja

        key = hashlib.sha256(json.dumps([messages, tools, kw], sort_keys=True, ensure_ascii=False).encode()
                             ).hexdigest()[:16]
        if self.template is None:
            assert key in self.renderings, f"no golden rendering of this case in {self.path}"
            return self.renderings[key]
        out = render_with_jinja(self.template, messages, tools, **kw)
        if not UPDATE_GOLDEN:
            assert self.renderings.get(key) == out, f"{self.path}: stale or missing case: GLM47_UPDATE_GOLDEN=1"
        self.seen[key] = out
        return out

    def save(self) -> None:
        if UPDATE_GOLDEN and self.template is not None:
            self.path.write_text(json.dumps(dict(sorted(self.seen.items())), ensure_ascii=False, indent=0) + "\n")


@pytest.fixture(scope="session")
def golden():
    """golden(name, derive): see _golden."""
    return _golden


@pytest.fixture(scope="session")
def reference_or_none() -> Path | None:
    """The official reference files' folder when it is beside the checkout, else None."""
    return REFERENCE_DIR if REFERENCE_DIR.is_dir() else None


@pytest.fixture(scope="session")
def official_template():
    renderer = OfficialTemplate()
    yield renderer
    renderer.save()


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
