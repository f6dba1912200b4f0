"""Contracts every registered method, model, metric, backend and transform passes (as diffusers'
tester mixins): a new one is added in its own file, registered, and must pass these unchanged.

Each test is parametrised over the registry, so adding ``baselines/my_method.py`` (which
registers itself) makes ``pytest tests/test_contracts.py -k my_method`` the check to run.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import calib_for, tiny_matrix
from torch import nn

import qdiff
from bench.errors import AvailabilityError
from bench.matrix import load_matrix
from bench.methods import Method
from bench.metrics.quality import Metric, Work
from bench.models.base import DiffusionAdapter
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import FP_METHOD, Bits, Budget, Evaluation, ModelTraits
from qdiff.backends import BACKENDS, layer_report
from qdiff.transforms.base import KINDS, LayerTransform, Transform, transform_class

BITS = [Bits.parse(label) for label in ("W8A8", "W4A8", "W4A4", "W8A32", "W4A32")]
TINY = Budget(calib_timesteps=2, calib_samples=4, weight_iters=2, act_iters=1, weight_lr=0.2, act_lr=0.02)
QUANT_METHODS = [name for name in METHODS.names() if name != FP_METHOD]
ARCHITECTURES = ("unet", "transformer")
CAPABILITIES = set().union(*(MODELS.get(name).CAPABILITIES for name in MODELS.names()))


def supported(method: Method) -> list[Bits]:
    return [b for b in BITS if method.unsupported(b) is None]


# --- methods --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANT_METHODS)
def test_method_declares_the_contract(name):
    method = METHODS.get(name)
    assert isinstance(method, Method), f"{name} lacks a member of bench.methods.Method"
    assert method.name == name and method.description
    assert isinstance(method.checkpointable, bool) and (
        method.backend is None or isinstance(method.backend, str)
    )
    assert supported(method), f"{name} supports none of {[b.label for b in BITS]}"
    for traits in {MODELS.get(m).traits() for m in MODELS.names()}:
        reason = method.unsupported_on(traits)
        assert reason is None or (isinstance(reason, str) and name in reason)
    for bits in BITS:
        reason = method.unsupported(bits)
        assert reason is None or ((isinstance(reason, str) and bits.label in reason) or reason)
        if reason is not None:
            continue
        config = method.configure(bits, TINY)
        assert config == method.configure(bits, TINY)  # deterministic: it keys the cache
        json.dumps(config.to_dict(), allow_nan=False)  # the rows' qconfig column
        for base, base_bits in method.bases(bits):
            assert METHODS.get(base).unsupported(base_bits) is None, f"{name} builds on an unsupported cell"
        if method.bases(bits):
            first, first_bits = method.bases(bits)[0]
            assert METHODS.get(first).configure(first_bits, TINY) == config


@pytest.fixture(scope="module")
def embedded_unet():
    """The embedded digits UNet: real widths (torchao's int4 groups need multiples of 32)."""
    from bench.embedded.model import load_unet

    return load_unet()


@pytest.fixture(scope="module")
def embedded_dit():
    """The embedded class-conditional DiT: a transformer denoiser with class labels."""
    from bench.embedded.model import load_dit

    return load_dit()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("name", QUANT_METHODS)
def test_method_quantizes_and_deploys_a_denoiser(name, architecture, embedded_unet, embedded_dit):
    """At its first supported bit width, the method (or its bases, then ``refine``) turns the
    embedded UNet, and the embedded DiT where it applies to transformers, into a deployable
    that runs, without touching the FP model."""
    method = METHODS.get(name)
    reason = method.unsupported_on(ModelTraits(architecture))
    if reason:
        pytest.skip(reason)
    tiny_unet = embedded_unet if architecture == "unet" else embedded_dit
    bits = supported(method)[0]
    config = method.configure(bits, TINY)
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    data = calib_for(tiny_unet, 8, timesteps=2)
    if architecture == "transformer":
        data = qdiff.CalibData(data.x, data.t, {"class_labels": torch.arange(8) % 11})

    def calibration(_calib):
        return data

    try:
        if method.bases(bits):
            bases = [METHODS.get(b).quantize(tiny_unet, METHODS.get(b).configure(bb, TINY), calibration)[0]
                     for b, bb in method.bases(bits)]  # fmt: skip
            alphas = torch.linspace(0.9999, 0.01, 1000)
            qmodel, report = method.refine(tiny_unet, bases, config, calibration, alphas), None
        else:
            qmodel, report = method.quantize(tiny_unet, config, calibration)
    except AvailabilityError as exc:
        pytest.skip(str(exc))
    assert report is None or json.dumps(report, allow_nan=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_unet.state_dict().items()), "the FP model changed"
    deployed = method.deploy(qmodel, "fake")
    with torch.no_grad():
        out = deployed(data.x[:2], data.t[:2], **{k: v[:2] for k, v in data.cond.items()}).sample
    assert out.shape == data.x[:2].shape and torch.isfinite(out).all()
    kernels = method.kernels(deployed)
    assert kernels and all(isinstance(k, str) and n > 0 for k, n in kernels.items())


# --- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_model_declares_what_its_metrics_need(name):
    adapter = MODELS.get(name)
    assert issubclass(adapter, DiffusionAdapter) and adapter.name == name
    assert isinstance(adapter.CAPABILITIES, frozenset) and isinstance(adapter.ARGS, tuple)
    assert adapter.ARCHITECTURE in ARCHITECTURES
    for metric in adapter.DEFAULT_METRICS:
        missing = METRICS.get(metric).requires - adapter.CAPABILITIES
        assert not missing, f"{name}'s default metric {metric} needs {missing}"


# --- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_declares_its_row_and_needs(name, tmp_path):
    metric = METRICS.get(name)
    assert isinstance(metric, Metric) and metric.name == name
    assert metric.unit and isinstance(metric.higher_is_better, bool) and metric.kind in ("quality", "cost")
    assert set(metric.settings) <= {f.name for f in dataclasses.fields(Evaluation)}
    assert metric.requires <= CAPABILITIES, f"no model offers {metric.requires - CAPABILITIES}"
    assert metric.check(Evaluation()) is None or isinstance(metric.check(Evaluation()), str)
    # What the report and the estimate read from it instead of its name.
    assert isinstance(metric.real_kernels_only, bool) and isinstance(metric.includes_bases, bool)
    assert not metric.real_kernels_only or metric.kind == "cost"
    for run in load_matrix(tiny_matrix(tmp_path, methods="[linear]", bits="[W8A8]")).runs:  # FP, quantized
        work = metric.work(dataclasses.replace(run, metrics=(name,)))
        assert isinstance(work, Work) and work.passes >= 0 and work.feature_images >= 0


def test_a_new_metric_is_read_by_the_report_and_the_estimate_through_what_it_declares(monkeypatch):
    """The report and the estimate look nothing up by a metric's name: a metric registered by a
    test, declared a real-kernel cost with work of its own, is treated as one."""
    from types import SimpleNamespace

    from bench import estimate
    from bench.report.cells import simulated
    from qdiff.registry import Registry

    class Joules(Metric):
        name, unit, higher_is_better, kind, real_kernels_only = "joules", "J", False, "cost", True

        def work(self, spec):
            return Work(passes=10.0, feature_images=0)

    metrics = Registry("metric")
    metrics.add(Joules())
    monkeypatch.setattr("bench.report.cells.METRICS", metrics)
    monkeypatch.setattr("bench.estimate.METRICS", metrics)
    assert simulated(SimpleNamespace(metric="joules", backend="fake"))
    assert not simulated(SimpleNamespace(metric="joules", backend="x86"))
    assert not simulated(SimpleNamespace(metric="written-by-another-version", backend="fake"))
    spec = SimpleNamespace(metrics=("joules",), sampling=SimpleNamespace(device="cpu"))
    assert estimate._metrics_seconds(spec, r=0.5) == pytest.approx(5.0)


# --- backends -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_declares_where_it_runs_and_deploys_here_if_it_can(name, tiny_unet):
    backend = BACKENDS[name]
    assert backend.name == name and backend.device in ("any", "cpu", "cuda") and backend.description
    assert backend.problem(None, None, "cpu") or backend.problem(None, None, "cuda")  # FP has no weights
    if backend.device == "cuda":
        pytest.skip("runs on CUDA (tests/test_backends.py runs its kernels interpreted)")
    bits = next(b for b in BITS if backend.problem(b.w, b.a, "cpu") is None)
    cfg = qdiff.QConfig(
        weight=qdiff.QuantSpec(bits.w, True, "channel"),
        act=None if bits.a is None else qdiff.QuantSpec(bits.a),
        recon=qdiff.ReconConfig(method="none"),
    )
    data = calib_for(tiny_unet, 8)
    qmodel, _ = qdiff.quantize(tiny_unet, cfg, data)
    deployed = qdiff.convert(qmodel, name)
    with torch.no_grad():
        out = deployed(data.x[:2], data.t[:2], **{k: v[:2] for k, v in data.cond.items()}).sample
        ref = qdiff.convert(qmodel, "fake")(data.x[:2], data.t[:2]).sample
    assert layer_report(deployed) and torch.isfinite(out).all()
    sqnr = 10 * math.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp(min=1e-20))
    assert sqnr >= 25, f"{name} is {sqnr:.1f} dB from the simulated model"


# --- transforms -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS) or ["smooth"])
def test_transform_keeps_the_fp_function_and_round_trips(kind, tiny_unet):
    """Applied to a prepared model with quantization off, a transform changes nothing (it moves
    difficulty between weights and inputs, or splits a weight), and its config serialises."""
    cls = transform_class(kind)
    transform = cls()
    assert issubclass(cls, Transform) and dataclasses.is_dataclass(cls)
    cfg = qdiff.QConfig(
        weight=qdiff.QuantSpec(8, True, "channel"), act=qdiff.QuantSpec(8), transforms=(transform,)
    )
    assert qdiff.QConfig.from_yaml(cfg.to_yaml()) == cfg
    data = calib_for(tiny_unet, 8)
    q = qdiff.prepare(tiny_unet, cfg)
    changed = transform.apply(q, data, batch_size=8)
    assert changed, f"{kind} applied to no layer of a UNet"
    layers = [q.get_submodule(n) for n in changed]
    assert all(isinstance(t, LayerTransform) for layer in layers for t in layer.transforms)
    qdiff.set_quant_state(q, weight=False, act=False)
    with torch.no_grad():
        out, fp = q(data.x, data.t).sample, tiny_unet(data.x, data.t).sample
    assert (out - fp).abs().max() <= 1e-3 * fp.abs().max()


def test_a_method_missing_a_member_fails_the_contract():
    class Incomplete:
        name, description, checkpointable, backend = "x", "x", True, None

        def quantize(self, *a):
            return nn.Identity(), None

    assert not isinstance(Incomplete(), Method)
