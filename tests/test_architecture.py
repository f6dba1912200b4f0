"""The house's shape: every import points down a fixed stack of layers, and no module imports
itself back through others. A new module gets a layer here; an import that would point up is
a sign the code belongs lower (or the caller higher)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qdiff", "bench", "baselines")

# Lowest first. A module may import its own layer or any below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("qdiff",),  # the library: knows nothing of the harness
    (
        "bench$",  # the package itself: imports qdiff first, which quiets diffusers' import
        "bench.errors",
        "bench.fsio",
        "bench.markdown",
        "bench.progress",
        "bench.stats",
        "bench.frechet",
        "bench.images",
        "bench.prompts",
        "bench.provenance",
        "bench.cache",
        "bench.embedded.data",
        "bench.embedded.model",
    ),
    ("bench.registry",),  # names the registering packages; imports none of them
    ("bench.spec",),  # the run schema
    ("bench.models", "bench.methods", "baselines", "bench.embedded.train"),
    ("bench.metrics",),
    ("bench.matrix",),  # loads, validates and expands matrix files
    (
        "bench.store",
        "bench.runner",
        "bench.estimate",
        "bench.estimatecheck",  # validate's estimate against the recorded wall times
        "bench.ray_executor",
        "bench.scaleout",
        "bench.storescale",
        "bench.contracts",  # the shared checks of methods, models and metrics (`qdiff-bench check`)
    ),
    ("bench.claims", "bench.report", "bench.compare", "bench.history"),
    ("bench.api",),  # what `qdiff-bench run` does, as a Python call
    ("bench.cli",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of ``module``: its longest matching prefix (a prefix ending in ``.`` matches
    the modules below it only, not the package itself; one ending in ``$`` that module only)."""
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if p.endswith("$"):  # that module only
                hit = module == p[:-1]
            else:
                hit = module.startswith(p) if p.endswith(".") else module == p or module.startswith(p + ".")
            if hit and len(p) > depth:
                best, depth = i, len(p)
    if best is None:
        raise AssertionError(f"module {module} has no layer in tests/test_architecture.py LAYERS; add it")
    return best


def imports(path: Path) -> set[str]:
    """Every first-party module ``path`` imports, at any depth of the file (lazy imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import sub`` may name a submodule: count it as that module.
            names = [f"{node.module}.{a.name}" if (ROOT / node.module.replace(".", "/") / a.name).exists()
                     or (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists() else node.module
                     for a in node.names]  # fmt: skip
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {module_name(p): imports(p) - {module_name(p)} for p in files}


def test_every_import_points_down() -> None:
    upward = [
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in graph().items()
        for dst in targets
        if layer(dst) > layer(src)
    ]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            nxt = nxt if nxt in edges else nxt.rpartition(".")[0]  # "pkg.attr" → "pkg"
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt in edges and not state.get(nxt):
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            visit(node, [node])


def test_importing_the_library_and_the_harness_prints_nothing():
    """No library warning on `import qdiff` (then diffusers, as a user does) or on loading every
    registered method, model and metric (torchao's and diffusers' import-time warnings)."""
    import subprocess
    import sys

    code = (
        "import qdiff; from diffusers import UNet2DModel; import bench.cli\n"
        "from bench.registry import METHODS, MODELS, METRICS\n"
        "for r in (METHODS, MODELS, METRICS): list(r.names())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
