"""OpenVINO as a backend (the suite's grids as FakeQuantize, run by OpenVINO's int8 kernels), as
a compile mode (FP32 on OpenVINO) and NNCF's PTQ as a baseline on the same runtime."""

import dataclasses
import json

import pytest
import torch
from helpers import calib_for, sqnr_db, tiny_matrix

import qdiff
from qdiff.backends import layer_report

pytest.importorskip(
    "openvino", reason="the openvino extra is not installed (pip install 'qdiff-bench[openvino]')"
)
pytest.importorskip(
    "nncf", reason="the openvino extra is not installed (pip install 'qdiff-bench[openvino]')"
)

from qdiff.backends.openvino import (
    FakeQuantizeLayer,
    OpenVINOModule,
    attention_precision,
    fake_quantize_form,
    fused_attention,
)
from qdiff.modules import QuantAttnProcessor

W8A8 = qdiff.QConfig(
    weight=qdiff.QuantSpec(8, True, "channel"), act=qdiff.QuantSpec(8), recon=qdiff.ReconConfig(method="none")
)


@pytest.fixture(scope="module")
def quantized():
    from tiny_pipelines import unet2d

    torch.manual_seed(0)
    unet = unet2d(in_channels=1, sample_size=8).eval()
    data = calib_for(unet, 16)
    qmodel, _ = qdiff.quantize(unet, W8A8, data)
    return unet, qmodel, data


def test_the_fake_quantize_form_is_the_simulated_model(quantized):
    # torch's own fake-quant ops on the calibrated grids compute exactly what qdiff simulates.
    _, qmodel, data = quantized
    x, t = data.x[:4], data.t[:4]
    with torch.no_grad():
        fake = qdiff.convert(qmodel, "fake")(x, t).sample
        fq = fake_quantize_form(qmodel)
        assert torch.allclose(fq(x, t).sample, fake, rtol=1e-5, atol=1e-5)
    layers = [m for m in fq.modules() if isinstance(m, FakeQuantizeLayer)]
    assert layers
    # It holds each quantized weight as its integers (a float copy of a real-size model's
    # weights beside the FP model's would not fit), one byte per weight.
    assert {getattr(m, f"weight{i}").dtype for m in layers for i in range(m.parts)} == {torch.int8}


def test_openvino_runs_the_calibrated_grids_on_int8_kernels(quantized):
    unet, qmodel, data = quantized
    x, t = data.x[:4], data.t[:4]
    deployed = qdiff.convert(qmodel, "openvino")
    with torch.no_grad():
        fake = qdiff.convert(qmodel, "fake")(x, t).sample
        out = deployed(x, t).sample  # compiles on the first call
        fp = unet(x, t).sample
    # The deployment is the simulated model (not the FP one) up to int8 accumulation order.
    assert sqnr_db(fake, out) >= 35 and sqnr_db(fake, out) > sqnr_db(fake, fp) + 5
    kernels = layer_report(deployed)
    n_layers = sum(isinstance(m, FakeQuantizeLayer) for m in fake_quantize_form(qmodel).modules())
    int8 = sum(n for k, n in kernels.items() if k in ("openvino-u8", "openvino-i8"))
    assert int8 >= n_layers  # every quantized conv/linear runs an int8 kernel (matmuls may too)
    # Weights are counted as stored (int8 + scales), and what OpenVINO holds is resident.
    stored = qdiff.storage_bytes(deployed)
    assert stored["quantized_weights"] > 0 and stored["total"] < qdiff.storage_bytes(unet)["total"] / 3
    assert qdiff.resident_bytes(deployed) == deployed.opaque_bytes() > 0
    # Other batch sizes reuse the compiled model (dynamic shapes).
    assert deployed(data.x[:7], data.t[:7]).sample.shape == (7, 1, 8, 8)


@pytest.mark.parametrize("attn_act, precision", [(qdiff.QuantSpec(8, symmetric=True), "i8"), (None, "f32")])
def test_openvino_fuses_each_attention_into_one_kernel_int8_with_symmetric_grids(
    quantized, attn_act, precision
):
    """The runtime graph OpenVINO's CPU plugin executes: every attention layer one fused
    subgraph (both matmuls and the softmax), none sliced or left as separate matmuls. With
    symmetric Q/K/V grids its inputs arrive as int8 straight from their FakeQuantize (no
    Subtract or Convert beside it); the paper's asymmetric grids (a zero point) leave it f32."""
    unet, _, data = quantized
    qmodel, _ = qdiff.quantize(unet, dataclasses.replace(W8A8, attn_act=attn_act), data)
    n_attention = sum(isinstance(m, QuantAttnProcessor) for m in qmodel.modules())
    assert n_attention == 4
    deployed = qdiff.convert(qmodel, "openvino")
    x, t = data.x[:4], data.t[:4]
    with torch.no_grad():
        fake = qdiff.convert(qmodel, "fake")(x, t).sample
        assert sqnr_db(fake, deployed(x, t).sample) >= 35
    ops = deployed.runtime_ops()
    attention = [op for op in ops if fused_attention(op)]
    assert len(attention) == n_attention
    assert not [op for op in ops if op.get_rt_info()["layerType"].astype(str) == "MatMul"]
    assert {attention_precision(op) for op in attention} == {precision}
    if precision == "i8":
        for op in attention:
            for i in range(op.get_input_size()):
                source = op.input(i).get_source_output().get_node()
                assert source.get_rt_info()["layerType"].astype(str) in (
                    "FakeQuantize",
                    "Transpose",
                    "Reshape",
                )
    assert deployed.runtime_kernels()[f"openvino-mha-{precision}"] == n_attention


def test_fp32_on_openvino_computes_the_torch_model(quantized):
    unet, _, data = quantized
    x, t = data.x[:4], data.t[:4]
    model = OpenVINOModule(unet)
    with torch.no_grad():
        assert sqnr_db(unet(x, t).sample, model(x, t).sample) >= 60
    # Every layer runs in float; whether the CPU plugin fuses FP32 attention into one subgraph
    # (openvino-mha-f32) or leaves its matmuls apart depends on the CPU (it does on AMX Xeons).
    kernels = layer_report(model)
    assert "openvino-f32" in kernels and set(kernels) <= {"openvino-f32", "openvino-mha-f32"}


def test_nncf_quantizes_on_the_same_runtime(quantized):
    from baselines.nncf_ptq import METHOD
    from bench.spec import Bits, Budget

    unet, _, data = quantized
    config = METHOD.configure(Bits(8, 8), Budget(calib_timesteps=2, calib_samples=4))
    assert config.calib.strategy == "uniform" and json.dumps(config.to_dict())
    assert METHOD.unsupported(Bits(4, 8)) == "nncf-ptq quantizes to int8 only; use bits W8A8"
    model, _ = METHOD.quantize(unet, config, lambda calib: data)
    x, t = data.x[:4], data.t[:4]
    with torch.no_grad():
        assert sqnr_db(unet(x, t).sample, model(x, t).sample) >= 15  # 19.8 dB here (random weights)
    kernels = METHOD.kernels(model)
    assert "openvino-u8" in kernels or "openvino-i8" in kernels
    # NNCF quantizes Q and K only: each of the 4 attention layers one fused subgraph, V in f32.
    assert kernels["openvino-mha-mixed"] == 4


@pytest.mark.slow
def test_a_matrix_compares_nncf_and_the_suites_grids_on_openvino(tmp_path):
    from bench.matrix import load_matrix
    from bench.runner import run_matrix

    path = tiny_matrix(
        tmp_path, methods="[linear, nncf-ptq]", bits="[W8A8]", backends="[openvino]",
        compile="[off, openvino]", metrics="[psnr_vs_fp, latency_step, weight_bytes, deploy_sqnr]",
    )  # fmt: skip
    rows = run_matrix(load_matrix(path), tmp_path, progress=False, log=lambda *a, **k: None)
    gap = {r["method"]: r for r in rows if r["metric"] == "deploy_sqnr"}
    # The suite's grids on OpenVINO against their own simulation; NNCF has none to compare
    # with, so the matrix does not ask (a skipped row would be retried by every resume).
    assert gap["linear"]["status"] == "ok" and gap["linear"]["value"] >= 30
    assert "nncf-ptq" not in gap and any(r["method"] == "nncf-ptq" for r in rows)
    rows = [r for r in rows if r["metric"] != "deploy_sqnr"]
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["status"] != "ok"]
    timed = {
        (r["method"], r["evaluation"].get("compile", "off")): r for r in rows if r["metric"] == "latency_step"
    }
    assert {("fp", "openvino"), ("linear", "off"), ("nncf-ptq", "off")} <= set(timed)
    for method in ("linear", "nncf-ptq"):  # both run OpenVINO's int8 kernels, and say so
        layers = timed[(method, "off")]["backend_layers"]
        assert any(k in ("openvino-u8", "openvino-i8") for k in layers), (method, layers)
    psnr = {r["method"]: r["value"] for r in rows if r["metric"] == "psnr_vs_fp"}
    assert psnr["linear"] > 15 and psnr["nncf-ptq"] > 15  # sampled through OpenVINO, near FP


def test_a_converted_model_takes_its_conditions_by_name_in_any_order():
    """NNCF's model is converted from calibration data, whose conditions may come in another
    order than a sampler passes them (PixArt-Σ's text states and mask failed on shapes)."""
    from types import SimpleNamespace

    from qdiff.backends.openvino import OpenVINOModule, convert

    class Cond(torch.nn.Module):
        def forward(self, x, t, states, mask):
            return SimpleNamespace(sample=x * t + (states * mask[..., None]).sum(1, keepdim=True))

    x, t = torch.randn(2, 1, 4), torch.ones(2, 1, 1)
    states, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    ov_model = convert(Cond(), ("states", "mask"), (x, t, states, mask))
    model = OpenVINOModule(ov_model=ov_model, names=("states", "mask"))
    out = model(x, t, mask=mask, states=states).sample  # the other order
    torch.testing.assert_close(out, Cond()(x, t, states, mask).sample, rtol=1e-5, atol=1e-5)
