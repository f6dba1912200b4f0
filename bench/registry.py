"""The harness's registries (methods, models, metrics), each a :class:`qdiff.registry.Registry`,
the one registry mechanism. A name is declared once, where its object is defined: the module
registers it (``METHOD = METHODS.add(RecipeMethod("mine", ...))``). A registry imports the
modules below on its first lookup; a package stands for every module in it, so a new file in
``baselines/``, ``bench/models/`` or ``bench/metrics/`` registers itself.

Plugins register the same way from outside the repository: an installed package through an
entry point of the registry's group (``qdiff_bench.methods``, ``qdiff_bench.models``,
``qdiff_bench.metrics``; the entry point names the module to import), or a folder of modules
named by :func:`include` (``qdiff-bench run --include DIR``, a matrix's ``plugins:``)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from qdiff.registry import Registry

# The folders of plugin modules, as :func:`include` names them: worker processes and Ray tasks
# inherit the variable, so their registries load the same plugins.
INCLUDE_ENV = "QDIFF_BENCH_INCLUDE"


class HarnessRegistry(Registry):
    """A registry that, on its first lookup, also loads the folders :func:`include` named."""

    def _all(self):
        first = not self._imported
        entries = super()._all()
        if first:
            load_included()
        return entries


MODELS = HarnessRegistry("model", ("bench.models",), entry_points="qdiff_bench.models")
# Q-Diffusion, its ablations and the FP reference live in bench.methods; baselines one per file.
METHODS = HarnessRegistry("method", ("bench.methods", "baselines"), entry_points="qdiff_bench.methods")
METRICS = HarnessRegistry("metric", ("bench.metrics",), entry_points="qdiff_bench.metrics")

_INCLUDED: set[Path] = set()  # plugin files loaded by this process


def include(folder: str | Path) -> None:
    """Load every module (``*.py``, not recursively) of ``folder`` as a plugin, now and in every
    process this one starts. A module that fails to import, or registers a name that is taken,
    is one logged line; the others load.

    Raises:
        FileNotFoundError: ``folder`` is no folder.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"plugin folder {folder}: no such folder")
    folders = [f for f in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if f]
    if str(path) not in folders:
        os.environ[INCLUDE_ENV] = os.pathsep.join([*folders, str(path)])
    load_included()


def load_included() -> None:
    """Load the modules of the folders in ``$QDIFF_BENCH_INCLUDE`` that this process has not."""
    for folder in [Path(f) for f in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if f]:
        for path in sorted(folder.glob("*.py")):
            if path in _INCLUDED:
                continue
            _INCLUDED.add(path)
            # A name of its own: a plugin file called ``bench.py`` must not shadow the suite's.
            module = f"qdiff_bench_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}_{path.stem}"
            spec = importlib.util.spec_from_file_location(module, path)

            def run(spec=spec, module=module) -> None:
                loaded = importlib.util.module_from_spec(spec)
                sys.modules[module] = loaded
                spec.loader.exec_module(loaded)

            METHODS.load(module, run, str(path))
