"""The harness's registries (methods, models, metrics), each a :class:`qdiff.registry.Registry`,
the one registry mechanism. A name is declared once, where its object is defined: the module
registers it (``METHOD = METHODS.add(RecipeMethod("mine", ...))``). A registry imports the
modules below on its first lookup; a package stands for every module in it, so a new file in
``baselines/``, ``bench/models/`` or ``bench/metrics/`` registers itself."""

from __future__ import annotations

from qdiff.registry import Registry

MODELS = Registry("model", ("bench.models",))
# Q-Diffusion, its ablations and the FP reference live in bench.methods; baselines one per file.
METHODS = Registry("method", ("bench.methods", "baselines"))
METRICS = Registry("metric", ("bench.metrics",))
