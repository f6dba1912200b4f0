"""The contracts every registered method, model and metric passes, as plain checks.

The test suite runs them over every registered name (``tests/test_contracts.py``); ``qdiff-bench
check NAME`` runs those that apply to one name — a plugin's, from an installed package or an
``--include`` folder — with no test files and no pytest. A check raises ``AssertionError`` (the
contract is broken, with what broke it) or :class:`Skip` (it does not apply here, with why).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import torch

import qdiff
from bench.errors import AvailabilityError, UnknownNameError
from bench.methods import Method
from bench.metrics.quality import Metric, Work
from bench.models.base import DiffusionAdapter
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import FP_METHOD, Bits, Budget, Evaluation, ModelTraits

BITS = [Bits.parse(label) for label in ("W8A8", "W4A8", "W4A4", "W8A32", "W4A32")]
TINY = Budget(calib_timesteps=2, calib_samples=4, weight_iters=2, act_iters=1, weight_lr=0.2, act_lr=0.02)
ARCHITECTURES = ("unet", "transformer")


class Skip(Exception):
    """A check that does not apply here; its message says why."""


def supported(method: Method) -> list[Bits]:
    return [b for b in BITS if method.unsupported(b) is None]


def capabilities() -> set[str]:
    """What the registered models offer the metrics, together."""
    return set().union(*(MODELS.get(name).CAPABILITIES for name in MODELS.names()))


def calib_for(unet, n: int = 32, cond_dim: int | None = None, seed: int = 0, timesteps: int | None = None):
    """Random but plausible denoiser inputs (x_t ~ N(0, 1), timesteps across the schedule; with
    ``timesteps``, n // timesteps inputs at each of that many timesteps, as a sampler records)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    s = unet.config.sample_size
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    if timesteps is not None:
        t = torch.linspace(999, 0, timesteps).round().long().repeat_interleave(n // timesteps)
    cond = {} if cond_dim is None else {"encoder_hidden_states": torch.randn(n, 5, cond_dim, generator=g)}
    return qdiff.CalibData(x, t, cond)


@cache
def embedded_denoiser(architecture: str):
    """The embedded digits UNet (real widths: torchao's int4 groups need multiples of 32), or
    the embedded class-conditional DiT."""
    from bench.embedded.model import load_dit, load_unet

    return load_unet() if architecture == "unet" else load_dit()


# --- methods --------------------------------------------------------------------------------


def method_declares_the_contract(name: str) -> None:
    method = METHODS.get(name)
    assert isinstance(method, Method), f"{name} lacks a member of bench.methods.Method"
    assert method.name == name and method.description, f"{name}: name and description"
    assert isinstance(method.checkpointable, bool) and (
        method.backend is None or isinstance(method.backend, str)
    ), f"{name}: checkpointable is a bool, backend None or a backend's name"
    assert supported(method), f"{name} supports none of {[b.label for b in BITS]}"
    for traits in {MODELS.get(m).traits() for m in MODELS.names()}:
        reason = method.unsupported_on(traits)
        assert reason is None or (isinstance(reason, str) and name in reason), f"unsupported_on: {reason!r}"
    for bits in BITS:
        reason = method.unsupported(bits)
        assert reason is None or (isinstance(reason, str) and bits.label in reason) or reason
        if reason is not None:
            continue
        config = method.configure(bits, TINY)
        assert config == method.configure(bits, TINY), "configure is not deterministic (it keys the cache)"
        json.dumps(config.to_dict(), allow_nan=False)  # the rows' qconfig column
        for base, base_bits in method.bases(bits):
            assert METHODS.get(base).unsupported(base_bits) is None, f"{name} builds on an unsupported cell"
        if method.bases(bits):
            first, first_bits = method.bases(bits)[0]
            assert METHODS.get(first).configure(first_bits, TINY) == config


def method_quantizes_and_deploys(name: str, architecture: str) -> None:
    """At its first supported bit width, the method (or its bases, then ``refine``) turns the
    embedded UNet, and the embedded DiT where it applies to transformers, into a deployable
    that runs, without touching the FP model."""
    method = METHODS.get(name)
    reason = method.unsupported_on(ModelTraits(architecture))
    if reason:
        raise Skip(reason)
    model = embedded_denoiser(architecture)
    bits = supported(method)[0]
    config = method.configure(bits, TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = calib_for(model, 8, timesteps=2)
    if architecture == "transformer":
        data = qdiff.CalibData(data.x, data.t, {"class_labels": torch.arange(8) % 11})

    def calibration(_calib):
        return data

    try:
        if method.bases(bits):
            bases = [METHODS.get(b).quantize(model, METHODS.get(b).configure(bb, TINY), calibration)[0]
                     for b, bb in method.bases(bits)]  # fmt: skip
            alphas = torch.linspace(0.9999, 0.01, 1000)
            qmodel, report = method.refine(model, bases, config, calibration, alphas), None
        else:
            qmodel, report = method.quantize(model, config, calibration)
    except AvailabilityError as exc:
        raise Skip(str(exc)) from None
    assert report is None or json.dumps(report, allow_nan=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the FP model changed"
    deployed = method.deploy(qmodel, "fake")
    with torch.no_grad():
        out = deployed(data.x[:2], data.t[:2], **{k: v[:2] for k, v in data.cond.items()}).sample
    assert out.shape == data.x[:2].shape and torch.isfinite(out).all(), "the deployed model's output"
    kernels = method.kernels(deployed)
    assert kernels and all(isinstance(k, str) and n > 0 for k, n in kernels.items()), f"kernels: {kernels}"


# --- models ---------------------------------------------------------------------------------


def model_declares_what_its_metrics_need(name: str) -> None:
    adapter = MODELS.get(name)
    assert issubclass(adapter, DiffusionAdapter) and adapter.name == name, f"{name}: a DiffusionAdapter"
    assert isinstance(adapter.CAPABILITIES, frozenset) and isinstance(adapter.ARGS, tuple)
    assert adapter.ARCHITECTURE in ARCHITECTURES, f"ARCHITECTURE {adapter.ARCHITECTURE!r}"
    for metric in adapter.DEFAULT_METRICS:
        missing = METRICS.get(metric).requires - adapter.CAPABILITIES
        assert not missing, f"{name}'s default metric {metric} needs {missing}"


# --- metrics --------------------------------------------------------------------------------

TINY_MATRIX = """name: contract
models: [embedded-digits]
methods: [linear]
bits: [W8A8]
settings: {device: cpu, samples: 24, steps: 4, batch_size: 24, calib_timesteps: 2, calib_samples: 4}
"""


def metric_declares_its_row_and_needs(name: str) -> None:
    from bench.matrix import load_matrix

    metric = METRICS.get(name)
    assert isinstance(metric, Metric) and metric.name == name, f"{name}: a Metric named {name}"
    assert metric.unit and isinstance(metric.higher_is_better, bool) and metric.kind in ("quality", "cost")
    assert set(metric.settings) <= {f.name for f in dataclasses.fields(Evaluation)}, "settings"
    assert metric.requires <= capabilities(), f"no model offers {metric.requires - capabilities()}"
    assert metric.check(Evaluation()) is None or isinstance(metric.check(Evaluation()), str)
    # What the report and the estimate read from it instead of its name.
    assert isinstance(metric.real_kernels_only, bool) and isinstance(metric.includes_bases, bool)
    assert not metric.real_kernels_only or metric.kind == "cost", "real_kernels_only is for cost metrics"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "contract.yaml"
        path.write_text(TINY_MATRIX, "utf-8")
        runs = load_matrix(path).runs
    for run in runs:  # FP, quantized
        work = metric.work(dataclasses.replace(run, metrics=(name,)))
        assert isinstance(work, Work) and work.passes >= 0 and work.feature_images >= 0, f"work: {work}"


# --- one name -------------------------------------------------------------------------------


def checks(name: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(description, check)`` of every contract that applies to ``name``: a method's, a
    model's or a metric's (a name may be several); an unknown name raises the registry's error."""
    found = False
    if name in METHODS and name != FP_METHOD:
        found = True
        yield f"method {name} declares the contract", lambda: method_declares_the_contract(name)
        for arch in ARCHITECTURES:
            yield (
                f"method {name} quantizes and deploys the embedded {arch}",
                lambda arch=arch: method_quantizes_and_deploys(name, arch),
            )
    if name in MODELS:
        found = True
        yield (
            f"model {name} declares what its metrics need",
            lambda: model_declares_what_its_metrics_need(name),
        )
    if name in METRICS:
        found = True
        yield f"metric {name} declares its row and needs", lambda: metric_declares_its_row_and_needs(name)
    if not found:
        registries = (METHODS, MODELS, METRICS)
        problems = [r.problems[name] for r in registries if name in r.problems]  # a broken plugin's
        close = difflib.get_close_matches(name, [n for r in registries for n in r.names()], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(
            "; ".join(problems)
            or f"no method, model or metric is named {name!r}{hint} (`qdiff-bench ls` lists them; a "
            "plugin's need its package installed or --include DIR)"
        )
