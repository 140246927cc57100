"""The import rules of STYLE.md, checked on the source: which glm47 package may import which, and which
must stay free of torch (so they run in thin clients and fast tests)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "glm47"

# package -> glm47 packages it may import (besides itself)
ALLOWED = {
    "config": set(),
    "sampling_params": set(),
    "parsers": set(),
    "chat": {"config"},
    "planner": {"config"},
    "kernels": set(),
    "model": {"config", "distributed", "kernels"},
    "checkpoint": {"config", "model", "distributed"},
    "engine": {"config", "sampling_params", "model", "checkpoint", "distributed", "planner", "kernels"},
    "training": {"config", "model", "checkpoint", "chat", "distributed", "tools"},
    "tools": set(),
    # the text side of LLM and the server: the engine is handed to it, never imported
    "text": {"config", "sampling_params", "chat", "parsers"},
}
NO_TORCH = {"config", "sampling_params", "parsers", "chat", "planner", "tools", "text"}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    if rel.stem == "__main__":
        return "cli"  # `python -m glm47` is the CLI's entry point
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem == "config" else rel.stem


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layering(path):
    pkg = package_of(path)
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "glm47" and len(parts) > 1:
            target = parts[1]
            assert target != "cli" or pkg == "cli", f"{path.name} imports the CLI"
            if pkg in ALLOWED:
                assert target == pkg or target in ALLOWED[pkg], f"{pkg}/{path.name} imports glm47.{target}"
        if pkg in NO_TORCH:
            assert parts[0] not in ("torch", "transformers"), f"{pkg}/{path.name} imports {name}"
        assert parts[0] != "transformers", f"{path} imports transformers (a test-only dependency)"
