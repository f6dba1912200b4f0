"""Matrix files: models × methods × bit widths × seeds, expanded into hashed :class:`RunSpec` s.

A matrix file is YAML::

    name: default                      # results/<name>/ and the ``matrix`` column
    extends: base.yaml                 # optional, relative to this file (see below)
    preset: quick                      # optional: a named budget (bench.spec.PRESETS: quick, paper)
    plugins: [my_plugins]              # optional: folders of plugin modules (relative to this file)
    models: [embedded-digits]          # or {name: sd-1.5, source: /local/dir, samples: 100,
                                       #      metrics: [clip_score]}  (this model's metrics)
    methods: [linear, qdiff]           # or {name: qdiff, weight_iters: 2000}
    bits: [W8A8, W4A8, W4A32]          # W<weight bits>A<activation bits>; 32 = full precision
    backends: [fake, x86]              # optional: deploy each quantized run on each (default:
                                       # the ``backend`` setting); rules may name a backend
    compile: [off, inductor]           # optional: time every run (FP included) each way; the
                                       # first mode measures everything, the others re-measure
                                       # only the metrics that read ``compile`` (latency, memory);
                                       # rules may name a mode
    seeds: [0]                         # sampling seeds: the noise the images start from
    calib_seeds: [0, 1]                # calibration seeds: which calibration trajectories and
                                       # minibatch order (quantized runs only); a cell is the
                                       # mean over both kinds
    metrics: [digits_fd]               # optional; default: each model's own metrics
    settings: {samples: 500, steps: 25, fid_backend: clean-fid}   # Sampling, Budget, Evaluation
                                       # and ``executor: ray`` (bench.spec.ExecutorSpec)
    exclude: [{method: linear, bits: W4A32}]
    include: [{method: qdiff, bits: W2A8}]

``extends`` names a file relative to the extending file's folder. The extending file's keys
replace the parent's whole (``methods``, ``bits``, ``exclude``, ``include``, ...: a list is never
merged), except ``settings``, which merges key by key (the extending file's values win);
``validate`` lists what a file inherited. A budget comes from :class:`Budget`'s defaults (the
paper's), then ``preset``, then ``settings``.

Every problem of a file is reported at once, with a suggestion for a misspelt key or name; an
``exclude`` rule that matches no run is a problem (a typo would otherwise exclude nothing).

``settings`` holds three typed groups: :class:`Sampling` (how images are made),
:class:`Budget` (the quantization budget every method gets) and :class:`Evaluation` (how the
metrics are computed). A model or method entry may be a mapping whose extra keys override
``settings`` for that entry (and, for a model, set its arguments such as ``source``). Every
quantized run gets an FP run of the same model, seed and sampling settings, which is its
paired reference.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.errors import MatrixError
from bench.matrix.expand import build
from bench.matrix.load import Problems, by_parent, read_merged
from bench.registry import include
from bench.spec import RULE_KEYS, MatrixSpec

__all__ = ["MatrixSpec", "load_matrix", "parse_rules"]


def parse_rules(items: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``["method=qdiff*", "bits=W4A8,W4A32"]`` → ``{"method": ("qdiff*",), ...}`` (for ``--only``)."""
    rules: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in RULE_KEYS or not value.strip():
            raise MatrixError(
                f"--only {item!r} is not KEY=PATTERN[,PATTERN]; keys: {', '.join(RULE_KEYS)} "
                "(e.g. --only method=qdiff --only bits=W4*)"
            )
        rules[key] = rules.get(key, ()) + tuple(v.strip() for v in value.split(",") if v.strip())
    return rules


def _plugins(path: Path, folders, problems: Problems) -> None:
    """Load the plugin folders a matrix names (``plugins: [dir, ...]``, relative to its file's
    folder) before its methods, models and metrics are looked up."""
    if folders is None:
        return
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        problems.add(f"{path}: 'plugins' must be a list of folders (relative to {path.parent})")
        return
    for folder in folders:
        try:
            include(path.parent / Path(folder).expanduser())
        except FileNotFoundError:
            problems.add(f"{path}: plugins: {folder!r}: no such folder (relative to {path.parent})")


def load_matrix(path: str | Path, runs_on: str | None = None) -> MatrixSpec:
    """Read, merge (``extends``), validate and expand a matrix file. ``runs_on``: the executor
    (``local``, ``ray``) its runs go to when not the file's ``executor`` setting (``--executor``):
    on Ray, this machine's memory bounds nothing (each node checks its own).

    Raises:
        MatrixError: with the file, the key and the fix for every problem found (one line
            for one problem; a count and one line each for several).
    """
    path = Path(path)
    inherited: dict[str, str] = {}
    problems = Problems(path)
    data = read_merged(path, (), inherited, problems)
    _plugins(path, data.pop("plugins", None), problems)
    spec = build(data, path, problems, runs_on)
    problems.raise_any()
    notes = [f"inherited from {parent}: {', '.join(keys)}" for parent, keys in by_parent(inherited).items()]
    return dataclasses.replace(spec, notes=(*notes, *spec.notes))
