"""Contracts every registered method, model, metric, backend and transform passes (as diffusers'
tester mixins): a new one is added in its own file, registered, and must pass these unchanged.

Each test is parametrised over the registry, so adding ``baselines/my_method.py`` (which
registers itself) makes ``pytest tests/test_contracts.py -k my_method`` the check to run; the
method, model and metric checks are :mod:`bench.contracts`'s, which ``qdiff-bench check NAME``
runs on a plugin outside the repository.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import calib_for
from torch import nn

import qdiff
from bench import contracts
from bench.methods import Method
from bench.metrics.quality import Metric, Work
from bench.registry import METHODS, METRICS, MODELS
from bench.spec import FP_METHOD
from qdiff.backends import BACKENDS, layer_report
from qdiff.transforms.base import KINDS, LayerTransform, Transform, transform_class

QUANT_METHODS = [name for name in METHODS.names() if name != FP_METHOD]


# The checks live in bench.contracts, so that `qdiff-bench check NAME` runs them on a plugin.


@pytest.mark.parametrize("name", QUANT_METHODS)
def test_method_declares_the_contract(name):
    contracts.method_declares_the_contract(name)


@pytest.mark.parametrize("architecture", contracts.ARCHITECTURES)
@pytest.mark.parametrize("name", QUANT_METHODS)
def test_method_quantizes_and_deploys_a_denoiser(name, architecture):
    try:
        contracts.method_quantizes_and_deploys(name, architecture)
    except contracts.Skip as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", MODELS.names())
def test_model_declares_what_its_metrics_need(name):
    contracts.model_declares_what_its_metrics_need(name)


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_declares_its_row_and_needs(name):
    contracts.metric_declares_its_row_and_needs(name)


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
    bits = next(b for b in contracts.BITS if backend.problem(b.w, b.a, "cpu") is None)
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
