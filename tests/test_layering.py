"""The import rules of STYLE.md, checked on the source: which glm47 package may import which, which must stay free
of torch (so they run in thin clients and fast tests), and which third-party libraries stay inside one package.
Every module belongs to a package of ALLOWED: a new top-level module or package fails here until it has a row.
The rows are the imports as they are, where they are stricter than STYLE.md's table (e.g. the model reaches the
kernels only through ops, and chat needs no config)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "glm47"

# package -> the glm47 packages it may import (besides itself). "glm47" is glm47/__init__.py, the front door.
ALLOWED = {
    "glm47": {"config", "sampling_params", "checkpoint", "llm"},  # LLM and load_model, imported on first use
    "config": set(),
    "sampling_params": set(),
    "parsers": set(),
    "tools": set(),
    "chat": set(),
    "planner": {"config"},
    "kernels": set(),
    "ops": {"config", "kernels"},
    "model": {"config", "ops"},
    "checkpoint": {"config", "model", "ops"},
    "engine": {"config", "sampling_params", "model", "checkpoint", "ops", "kernels"},
    # the text side of LLM and the server: the engine is handed to it, never imported
    "text": {"config", "sampling_params", "chat", "parsers"},
    "llm": {"config", "sampling_params", "chat", "parsers", "text", "engine"},
    # the server is handed its engine (server/scripted.py uses the engine's output types only)
    "server": {"config", "sampling_params", "chat", "parsers", "text", "tools", "engine"},
    "agent": {"parsers", "tools"},
    "training": {"config", "model", "checkpoint", "chat", "tools"},
    "evaluate": {"config", "model", "checkpoint", "chat", "parsers", "training"},
    "bench": {"config", "sampling_params", "model", "engine"},
    "assets": set(),
    "cli": None,  # anything; and nothing imports the CLI
}
NO_TORCH = {"glm47", "config", "sampling_params", "parsers", "tools", "chat", "planner", "text", "server", "agent"}
# third-party libraries that stay inside the packages named
CONFINED = {
    "transformers": set(),  # a test-only dependency: the numerical reference
    "safetensors": {"checkpoint"},  # only the checkpoint knows files
    "fastapi": {"server"}, "uvicorn": {"server", "cli"}, "starlette": {"server"}, "pydantic": {"server"},
}
FILES = sorted(PKG.rglob("*.py"))


def is_package(name: str) -> bool:
    """A package or module directly under glm47/."""
    return (PKG / name).is_dir() or (PKG / f"{name}.py").is_file()


def imports_of(path: Path, text: str | None = None) -> set[str]:
    """Every module a file imports, at the top or inside a function; relative imports made absolute, and
    `from glm47 import kernels` read as glm47.kernels."""
    here = ["glm47", *path.relative_to(PKG).with_suffix("").parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the folder the file is in
                folder = here[: len(here) - node.level]
                base = ".".join(folder + ([base] if base else []))
            if base == "glm47":  # `from glm47 import kernels` imports glm47.kernels; `... import load_model`, glm47
                names.update(f"glm47.{a.name}" if is_package(a.name) else "glm47" for a in node.names)
            else:
                names.add(base)
    return names


def package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    if rel == Path("__init__.py"):
        return "glm47"
    if rel == Path("__main__.py"):
        return "cli"  # `python -m glm47` is the CLI's entry point
    return rel.parts[0].removesuffix(".py")


def test_every_module_belongs_to_a_package_with_rules():
    unknown = sorted(str(p.relative_to(PKG)) for p in FILES if package_of(p) not in ALLOWED)
    assert not unknown, f"modules of no package in ALLOWED (give each new package a row): {unknown}"
    packages = {package_of(p) for p in FILES}
    assert packages == set(ALLOWED), f"rows for packages that are gone: {sorted(set(ALLOWED) - packages)}"
    for pkg, targets in ALLOWED.items():
        assert targets is None or targets <= set(ALLOWED) - {"cli", "glm47"}, (pkg, targets)
    assert NO_TORCH <= set(ALLOWED) and all(p <= set(ALLOWED) for p in CONFINED.values())


def test_the_rules_see_every_kind_of_import():
    """`from glm47 import kernels` and relative imports count as `import glm47.kernels` does."""
    text = "from glm47 import kernels\nfrom .layers import RMSNorm\nfrom ..ops import linear\nimport glm47.config\n"
    assert imports_of(PKG / "model" / "example.py", text) >= {"glm47.kernels", "glm47.model.layers", "glm47.ops",
                                                               "glm47.config"}
    assert imports_of(PKG / "model" / "__init__.py", "from .layers import RMSNorm\n") == {"glm47.model.layers"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_layering(path):
    pkg = package_of(path)
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "glm47":  # glm47.X, or the front door itself (`import glm47`, `from glm47 import load_model`)
            target = parts[1] if len(parts) > 1 and is_package(parts[1]) else "glm47"
            assert target != "cli" or pkg == "cli", f"{path.name} imports the CLI"
            if ALLOWED.get(pkg) is not None:
                assert target == pkg or target in ALLOWED[pkg], f"{pkg}: {path.name} imports {name}"
        if pkg in NO_TORCH:
            assert parts[0] != "torch", f"{pkg}: {path.name} imports {name}"
        if parts[0] in CONFINED:
            assert pkg in CONFINED[parts[0]], f"{pkg}: {path.name} imports {name}"
