"""Deployable backends against the fake-quant models they come from, and their kernels against
plain-torch integer references. Triton kernels run under TRITON_INTERPRET=1 here (conftest)."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import GemmAndConvs, calib_for, sqnr_db

import qdiff
from qdiff.backends import BACKENDS, BackendError, KernelLayer, layer_report
from qdiff.backends.choice import ChoosingLayer, choose_kernels
from qdiff.backends.fake import FrozenFakeQuantLayer
from qdiff.backends.triton_kernels import CONFIGS, implicit_gemm, pack_int4, unpack_int4
from qdiff.backends.x86 import quantize_uint8
from qdiff.quantizer import fake_quant, grid

NO_RECON = qdiff.ReconConfig(method="none")
W8A8 = qdiff.QConfig(
    weight=qdiff.QuantSpec(8, True, "channel", "mse"),
    act=qdiff.QuantSpec(8, scale_search="mse"),
    recon=NO_RECON,
)
W4A32_CFG = qdiff.QConfig(weight=qdiff.QuantSpec(4, True, "channel"), act=None, recon=NO_RECON)


def _embedded():
    from bench.embedded.model import load_unet

    return load_unet().eval().requires_grad_(False)


def _layer_io(model: torch.nn.Module, x, t) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every simulated layer of a ``fake`` deployable on one call."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n, m in model.named_modules()
        if isinstance(m, FrozenFakeQuantLayer)
    ]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return seen


def _per_layer_sqnr(fake, deployed, x, t) -> dict[str, float]:
    out = {}
    for name, (inp, ref) in _layer_io(fake, x, t).items():
        layer = deployed.get_submodule(name)
        if isinstance(layer, KernelLayer):
            with torch.no_grad():
                out[name] = sqnr_db(ref, layer(inp))
    return out


def _assert_matches_fake(fake, deployed, x, t) -> None:
    """The issue's bar: every kernel layer ≥ 35 dB, the whole denoiser ≥ 25 dB against fake."""
    per_layer = _per_layer_sqnr(fake, deployed, x, t)
    assert per_layer and min(per_layer.values()) >= 35
    with torch.no_grad():
        assert sqnr_db(fake(x, t).sample, deployed(x, t).sample) >= 25


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False)])
def test_quantize_uint8_matches_fake_quant_grid(bits, symmetric):
    q = qdiff.UniformAffineQuantizer(qdiff.QuantSpec(bits, symmetric))
    x = torch.randn(4, 3, 5, 5) * 2
    q.init_from(x)
    qmin, qmax = grid(bits, symmetric)
    scale, zp = float(q.scale), int(q.zero_point)
    u8 = quantize_uint8(x, scale, zp - qmin, 0, qmax - qmin)
    assert u8.dtype == torch.uint8
    dequant = (u8.float() - (zp - qmin)) * scale
    torch.testing.assert_close(dequant, fake_quant(x, q.scale, q.zero_point, qmin, qmax), rtol=0, atol=1e-6)


def test_x86_matches_fake_quant_per_layer_and_whole_denoiser():
    unet = _embedded()
    data = calib_for(unet, 32)
    qmodel, _ = qdiff.quantize(unet, W8A8, data)
    fake, x86 = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, "x86")
    plain = {n: b.clone() for n, b in x86.named_buffers() if ".weight" in n}
    stored = qdiff.storage_bytes(x86)
    x, t = data.x[:16], data.t[:16]
    per_layer = _per_layer_sqnr(fake, x86, x, t)
    assert len(per_layer) == 65  # every Conv2d and Linear runs oneDNN's int8 kernel
    assert any(layer.split for layer in x86.modules() if isinstance(layer, KernelLayer))
    worst = min(per_layer, key=per_layer.get)
    assert per_layer[worst] >= 35, f"{worst}: {per_layer[worst]:.1f} dB"
    with torch.no_grad():
        assert sqnr_db(fake(x, t).sample, x86(x, t).sample) >= 25
    assert layer_report(x86) == {"onednn-int8": 65, "simulated-matmul": 8}
    fp_bytes = qdiff.storage_bytes(unet)["total"]
    assert qdiff.storage_bytes(x86) == stored and stored["total"] <= 0.27 * fp_bytes
    # Weights once: eager calls replaced the int8 buffers with oneDNN's prepacked copies, and
    # compiling gets exactly those integers back.
    assert not any(".weight" in n for n, _ in x86.named_buffers())
    assert qdiff.resident_bytes(x86) < stored["total"] + stored["quantized_weights"] / 2
    qdiff.backends.for_compile(x86)
    assert all(torch.equal(plain[n], b) for n, b in x86.named_buffers() if ".weight" in n)
    assert plain.keys() == {n for n, _ in x86.named_buffers() if ".weight" in n}


def test_x86_runs_smoothed_and_low_rank_layers(tiny_unet):
    cfg = qdiff.QConfig(
        weight=qdiff.QuantSpec(8, True, "channel"), act=qdiff.QuantSpec(8),
        recon=NO_RECON, transforms=(qdiff.Smooth(0.5), qdiff.LowRank(4)),
    )  # fmt: skip
    data = calib_for(tiny_unet, 16)
    qmodel, _ = qdiff.quantize(tiny_unet, cfg, data)
    fake, x86 = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, "x86")
    layers = [m for m in x86.modules() if isinstance(m, KernelLayer)]
    kinds = {type(t).__name__ for m in layers for t in m.transforms}
    assert kinds == {"SmoothScale", "LowRankBranch"}
    per_layer = _per_layer_sqnr(fake, x86, data.x, data.t)
    assert min(per_layer.values()) >= 35


def test_x86_leaves_weight_only_layers_simulated_and_counts_them(tiny_unet):
    cfg = qdiff.QConfig(
        weight=qdiff.QuantSpec(8, True, "channel"), act=None, recon=qdiff.ReconConfig(method="none")
    )
    qmodel, _ = qdiff.quantize(tiny_unet, cfg, calib_for(tiny_unet, 8))
    report = layer_report(qdiff.convert(qmodel, "x86"))
    assert "onednn-int8" not in report and report["simulated"] > 0


def test_unknown_backend_names_the_valid_ones(tiny_unet):
    valid = "valid: fake, fp8, int8, openvino, w4a16, x86"
    with pytest.raises(ValueError, match=rf"unknown backend 'int3' \(did you mean 'int8'\?\); {valid}"):
        qdiff.convert(tiny_unet, "int3")


@pytest.mark.parametrize(
    "backend,w,a,device,problem",
    [
        ("x86", 4, None, "cpu", "needs quantized activations"),
        ("x86", 8, 8, "cuda", "runs on the CPU"),
        ("x86", 16, 8, "cpu", "at most 8 bits"),
        ("int8", 8, 8, "cpu", "runs on a CUDA GPU"),
        ("w4a16", 4, 8, "cuda", "weight-only"),
        ("w4a16", 8, None, "cuda", "at most 4 bits"),
        ("fp8", 8, 8, "cuda", None),
        ("fake", 4, 4, "cpu", None),
    ],
)
def test_backend_problems(backend, w, a, device, problem):
    found = BACKENDS[backend].problem(w, a, device)
    assert found == problem if problem is None else problem in found


def test_triton_backends_refuse_cpu_models_outside_the_interpreter(tiny_unet, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, calib_for(tiny_unet, 8))
    with pytest.raises(BackendError, match=r"runs Triton kernels on a CUDA GPU.*use backend x86"):
        qdiff.convert(qmodel, "int8")


# --- Triton kernels (interpreted on CPU) against integer references -------------------------


def _nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_int8_implicit_gemm_conv_is_exact(stride, padding, dilation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6, generator=g)
    w = torch.randint(-128, 128, (20, 5, 3, 3), generator=g).to(torch.int8)
    w_scale, bias = torch.rand(20, generator=g) * 0.01, torch.randn(20, generator=g)
    scale, zp = 0.02, 117
    wk = w.permute(0, 2, 3, 1).reshape(20, -1).contiguous()
    y = implicit_gemm(
        _nhwc(x), wk, w_scale, bias, (3, 3), (stride,) * 2, (padding,) * 2, (dilation,) * 2,
        act_grid=(scale, zp, 0, 255), w_sum=wk.int().sum(1).int(),
    )  # fmt: skip
    q = (torch.round(x / scale) + zp).clamp(0, 255) - zp  # integers, as the kernel sees them
    ints = F.conv2d(q.double(), w.double(), None, stride, padding, dilation)
    ref = ints * (scale * w_scale.double())[:, None, None] + bias.double()[:, None, None]
    torch.testing.assert_close(y.permute(0, 3, 1, 2).double(), ref, rtol=1e-6, atol=1e-5)


def test_int8_implicit_gemm_linear_and_narrow_grid_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 24, generator=g)
    w = torch.randint(-8, 8, (10, 24), generator=g).to(torch.int8)  # a 4-bit weight grid in int8
    w_scale = torch.rand(10, generator=g)
    y = implicit_gemm(x.reshape(37, 1, 1, 24), w, w_scale, None, (1, 1), act_grid=(0.1, 3, 0, 15),
                      w_sum=w.int().sum(1).int())  # fmt: skip
    q = (torch.round(x / 0.1) + 3).clamp(0, 15) - 3
    ref = (q.double() @ w.double().t()) * (0.1 * w_scale.double())
    torch.testing.assert_close(y.reshape(37, 10).double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("k", [27, 64, 7])
def test_pack_int4_round_trips(k):
    q = torch.randint(-8, 8, (6, k))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q.to(torch.int8))


def test_pack_int4_rejects_values_outside_4_bits():
    with pytest.raises(ValueError, match="signed 4-bit values"):
        pack_int4(torch.tensor([[8, 0]]))


@pytest.mark.parametrize("c", [3, 64, 70])
def test_w4a16_implicit_gemm_dequantizes_in_the_kernel(c):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, c, 5, 5, generator=g)
    k = 9 * c
    q = torch.randint(-8, 8, (12, k), generator=g)
    scales = torch.rand(12, generator=g)
    bias = torch.randn(12, generator=g)
    y = implicit_gemm(_nhwc(x), pack_int4(q), scales, bias, (3, 3), (1, 1), (1, 1))
    w = (q.float() * scales[:, None]).reshape(12, 3, 3, c).permute(0, 3, 1, 2)
    ref = F.conv2d(x, w, bias, 1, 1)
    assert sqnr_db(ref, y.permute(0, 3, 1, 2)) > 100


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_launch_configuration_computes_the_same_conv(config):
    # Channel blocks that do not divide C (70 = 64 + 6) and tiles larger than the problem.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 70, 9, 7, generator=g)
    w = torch.randint(-128, 128, (40, 70, 3, 3), generator=g).to(torch.int8)
    wk = w.permute(0, 2, 3, 1).reshape(40, -1).contiguous()
    w_scale = torch.rand(40, generator=g) * 0.01
    y = implicit_gemm(
        _nhwc(x), wk, w_scale, None, (3, 3), (1, 1), (1, 1), act_grid=(0.02, 117, 0, 255),
        w_sum=wk.int().sum(1).int(), config=config,
    )  # fmt: skip
    q = (torch.round(x / 0.02) + 117).clamp(0, 255) - 117
    ref = F.conv2d(q.double(), w.double(), None, 1, 1) * (0.02 * w_scale.double())[:, None, None]
    torch.testing.assert_close(y.permute(0, 3, 1, 2).double(), ref, rtol=1e-6, atol=1e-5)


# --- GPU backends' conversions, run here through the interpreter / torch's CPU fp8 --------------


def _set_choices(model, pick) -> None:
    for m in model.modules():
        if isinstance(m, ChoosingLayer):
            m.choice = pick(m)


def test_int8_backend_matches_fake_quant_through_every_kernel(tiny_unet):
    """Each kernel a layer can be given (cuBLASLt's int8 GEMM, every Triton configuration, the
    float kernel on the grids) computes the simulated model's numbers."""
    data = calib_for(tiny_unet, 8)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, data)
    fake, int8 = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, "int8")
    x, t = data.x[:2], data.t[:2]
    # Before any choice: int-mm for GEMM-shaped layers, Triton for k×k convs.
    assert set(layer_report(int8)) == {"int-mm", "triton-int8", "simulated-matmul"}
    _assert_matches_fake(fake, int8, x, t)
    for config in CONFIGS[:1]:  # the interpreter's time: every configuration ran in the kernel test
        _set_choices(int8, lambda m, c=config: m.choice if m.gemm else f"triton-int8/{c.name}")
        _assert_matches_fake(fake, int8, x, t)
    _set_choices(int8, lambda m: "float-grid")
    assert set(layer_report(int8)) == {"float-grid", "simulated-matmul"}
    _assert_matches_fake(fake, int8, x, t)


def test_choose_kernels_keeps_the_fastest_per_shape_and_caches_it(tiny_unet):
    data = calib_for(tiny_unet, 8)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, data)
    int8 = qdiff.convert(qmodel, "int8")
    x, t = data.x[:2], data.t[:2]

    def timer(layer, call):  # a device where the float kernel wins k×k convs with K < 100
        float_wins = not layer.gemm and layer.weight0.shape[1] < 100
        return 1.0 if (layer.choice == "float-grid") == float_wins else 2.0

    cache = {}
    report = choose_kernels(int8, x, t, cache=cache, timer=timer)
    layers = [m for m in int8.modules() if isinstance(m, ChoosingLayer)]
    assert report.measured == len(report.shapes) == len(cache) > 0 and len(set(cache)) == len(cache)
    for shape in report.shapes:  # cuBLASLt where it takes the shape; k×k convs by their K
        candidates, k = set(shape["times_ms"]), shape["weights"][0][1]
        if "int-mm" in candidates:
            expected = "int-mm"
        elif candidates == {"float-grid"}:
            expected = "float-grid"
        else:
            expected = "float-grid" if k < 100 else "triton-int8"
        assert shape["choice"].partition("/")[0] == expected, shape
    assert {m.kernel for m in layers} == {"int-mm", "triton-int8", "float-grid"}
    # Shapes cuBLASLt cannot take (the time embedding: 2 rows) have the float kernel only.
    emb = int8.time_embedding.linear_1
    assert emb.candidates(torch.zeros(2, emb.weight0.shape[1])) == ("float-grid",)
    assert emb.choice == "float-grid"
    # The MACs of one call, by kernel: what the report's quantized share is computed from.
    assert report.macs.keys() == {"int-mm", "triton-int8", "float-grid", "simulated-matmul"}
    assert 0 < report.quantized_share() < 1
    # A second model on the same device measures nothing: every choice comes from the cache.
    again = qdiff.convert(qmodel, "int8")
    second = choose_kernels(again, x, t, cache=dict(cache), timer=lambda *_: pytest.fail("timed"))
    assert second.measured == 0 and second.macs == report.macs
    assert [m.choice for m in again.modules() if isinstance(m, ChoosingLayer)] == [m.choice for m in layers]
    # An entry naming no candidate of its shape (a file edited by hand, an older kernel) is remeasured.
    stale = {k: "triton-int8/nonsense" for k in cache}
    assert choose_kernels(qdiff.convert(qmodel, "int8"), x, t, cache=stale, timer=lambda *_: 1.0).measured > 0


def test_choose_kernels_counts_macs_exactly():
    lin = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 25, 4)
    )
    report = choose_kernels(lin, torch.randn(2, 3, 5, 5))
    assert report.macs == {"float": 2 * 25 * 8 * 27 + 2 * 200 * 4} and report.quantized_share() == 0
    assert report.measured == 0 and report.shapes == []


def test_w4a16_backend_matches_fake_quant_and_packs_weights(tiny_unet):
    cfg = qdiff.QConfig(
        weight=qdiff.QuantSpec(4, True, "channel"), act=None, recon=qdiff.ReconConfig(method="none")
    )
    data = calib_for(tiny_unet, 4)
    qmodel, _ = qdiff.quantize(tiny_unet, cfg, data)
    fake, w4 = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, "w4a16")
    _assert_matches_fake(fake, w4, data.x[:2], data.t[:2])
    fp_weights = sum(
        m.weight.numel() * 4 for m in tiny_unet.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    )
    packed = sum(m.weight_bytes() for m in w4.modules() if isinstance(m, KernelLayer))
    assert packed <= fp_weights / 8 * 1.02  # half a byte per weight (+ odd-K padding)


def test_fp8_backend_equals_an_e4m3_simulation(tiny_unet):
    from qdiff.backends.fp8 import E4M3_MAX, Fp8Layer, to_e4m3

    data = calib_for(tiny_unet, 8)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, data)
    fake, fp8 = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, "fp8")
    x, t = data.x[:4], data.t[:4]
    checked = 0
    for name, (inp, _) in _layer_io(fake, x, t).items():
        layer = fp8.get_submodule(name)
        if not isinstance(layer, Fp8Layer) or layer.split is not None or len(layer.transforms):
            continue
        source = qmodel.get_submodule(name)
        w = source.effective_weight().float()
        w_scale = w.flatten(1).abs().amax(1) / E4M3_MAX
        w_scale = w_scale.view(-1, *[1] * (w.ndim - 1))
        w_sim = to_e4m3(w, w_scale).float() * w_scale
        a_scale = layer.a_scale0
        x_sim = to_e4m3(inp, a_scale).float() * a_scale
        ref = source.op(x_sim, w_sim)
        with torch.no_grad():
            assert sqnr_db(ref, layer(inp)) >= 60, name
        checked += 1
    assert checked > 10
    # FP8 is another number format, not a replay of the int8 grid: e4m3's 3 mantissa bits give
    # ≈ 28–30 dB per layer against the int8 model here, ≈ 19 dB over this random UNet.
    with torch.no_grad():
        assert sqnr_db(tiny_unet(x, t).sample, fp8(x, t).sample) >= 15


def test_a_deployed_model_cast_to_float16_keeps_its_weight_format_and_scales(tiny_unet):
    # The GPU matrices cast the deployed model to float16: stored weights (fp8's e4m3 included,
    # which is floating point) and float32 scales keep their dtype. Before, e4m3 weights became
    # float16 and every fp8 layer failed on the H200.
    data = calib_for(tiny_unet, 8)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, data)

    def stored(model):
        return {
            f"{name}.{k}": v.dtype
            for name, m in model.named_modules()
            if isinstance(m, KernelLayer)
            for k, v in m.named_buffers(recurse=False)
            if k.startswith(("weight", "w_scale", "a_scale"))
        }

    for backend, weight_dtype in (("fp8", torch.float8_e4m3fn), ("int8", torch.int8)):
        deployed = qdiff.convert(qmodel, backend)
        before = stored(deployed)
        assert weight_dtype in set(before.values()) and torch.float32 in set(before.values())
        half = deployed.to(torch.float16)
        assert stored(half) == before, backend
        assert half.conv_in.bias.dtype == torch.float16  # everything else is cast


def test_kernels_take_float16_activations_as_the_gpu_matrices_run():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 6, 6, generator=g).half()
    w = torch.randint(-128, 128, (24, 16, 3, 3), generator=g).to(torch.int8)
    wk = w.permute(0, 2, 3, 1).reshape(24, -1).contiguous()
    w_scale, bias = torch.rand(24, generator=g) * 0.01, torch.randn(24, generator=g)
    y = implicit_gemm(
        _nhwc(x), wk, w_scale, bias, (3, 3), (1, 1), (1, 1), act_grid=(0.02, 120, 0, 255),
        w_sum=wk.int().sum(1).int(), out_dtype=torch.float16,
    )  # fmt: skip
    q = (torch.round(x.float() / 0.02) + 120).clamp(0, 255) - 120
    ref = F.conv2d(q.double(), w.double(), None, 1, 1) * (0.02 * w_scale.double())[:, None, None]
    ref = ref + bias.double()[:, None, None]
    assert y.dtype == torch.float16 and sqnr_db(ref, y.permute(0, 3, 1, 2).double()) > 60
    q4 = torch.randint(-8, 8, (24, 144), generator=g)
    scales = torch.rand(24, generator=g)
    y4 = implicit_gemm(_nhwc(x), pack_int4(q4), scales, bias.half(), (3, 3), (1, 1), (1, 1),
                       out_dtype=torch.float16)  # fmt: skip
    ref4 = F.conv2d(
        x.float(), (q4.float() * scales[:, None]).reshape(24, 3, 3, 16).permute(0, 3, 1, 2), bias, 1, 1
    )
    assert y4.dtype == torch.float16 and sqnr_db(ref4, y4.permute(0, 3, 1, 2).float()) > 50


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile (inductor) on CPU needs a C++")
def test_x86_under_torch_compile_lowers_to_int8_kernels_and_computes_the_eager_model(tiny_unet):
    """Compiled, the x86 model's quantize → dequantize → float-op form becomes oneDNN's int8 ops
    with the eager model's output. (A graph break at the quantizers' calibration check once made
    inductor's frozen graph 15 dB off here; the cost metrics' guard refuses such a model.)

    A UNet with the same ``forward`` compiles first, as a worker times a matrix's models one
    after another: plain ``torch.compile`` then recompiled the second with dynamic shapes, where
    inductor's int8 conv lowering failed a stride assertion (the embedded UNet's x86 rows after
    the CIFAR UNet's). ``compile_static`` compiles each as the process's first."""
    from tiny_pipelines import unet2d
    from torch._inductor.utils import run_and_get_code

    from bench.metrics.cost import compile_static, compiled_problem
    from qdiff.backends.x86 import compile_setup

    compile_setup()
    torch.manual_seed(0)
    first = unet2d(in_channels=3, sample_size=16).eval()
    data = calib_for(first, 8)
    x86 = qdiff.convert(qdiff.quantize(first, W8A8, data)[0], "x86")
    with torch.no_grad():
        # Not bit-exact: fused into its producer, an input's quantization can round the other
        # way (41.8 dB here); the stride assertion was the failure.
        assert (
            sqnr_db(x86(data.x, data.t).sample, compile_static(x86, "inductor")(data.x, data.t).sample) > 30
        )

    data = calib_for(tiny_unet, 16)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, data)
    x86 = qdiff.convert(qmodel, "x86")
    x, t = data.x[:4], data.t[:4]
    with torch.no_grad():
        eager = x86(x, t).sample
        compiled, code = run_and_get_code(compile_static(x86, "inductor"), x, t)
    kernels = set(re.findall(r"torch\.ops\.onednn\.(\w+)", "\n".join(code)))
    assert {"qconv_pointwise", "qlinear_pointwise"} <= kernels
    assert sqnr_db(eager, compiled.sample) > 60 and compiled_problem(eager, compiled.sample) is None
    problem = compiled_problem(eager, eager + 0.2 * eager.std() * torch.randn_like(eager))  # ~14 dB off
    assert problem is not None and "dB from the eager model's" in problem and "compile: off" in problem


def test_the_compile_guard_accepts_a_quantized_model_as_faithful_as_its_eager_deployment():
    # Rounding flips put a compiled int8 model 29.2 dB from its eager twin on the random CIFAR
    # UNet while both were 29.1 dB from the simulated model: the same deployment, not another.
    from bench.metrics.cost import compiled_problem

    g = torch.Generator().manual_seed(0)
    simulated = torch.randn(4, 3, 8, 8, generator=g)
    flips = lambda: simulated + 0.035 * torch.randn(simulated.shape, generator=g)  # noqa: E731  ~29 dB
    eager, compiled = flips(), flips()
    assert sqnr_db(eager, compiled) < 30
    assert compiled_problem(eager, compiled) is not None  # a float model would be refused
    assert compiled_problem(eager, compiled, simulated) is None
    wrong = simulated + 0.2 * torch.randn(simulated.shape, generator=g)  # 14 dB: another computation
    problem = compiled_problem(eager, wrong, simulated)
    assert problem is not None and "from the simulated model, the eager deployment" in problem


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile (inductor) on CPU needs a C++")
@pytest.mark.parametrize("backend,cfg", [("int8", W8A8), ("fp8", W8A8), ("w4a16", W4A32_CFG)])
def test_every_gpu_backend_compiles_with_inductor_to_its_eager_numbers(backend, cfg):
    """``compile: inductor`` for the GPU backends, traced here as on the GPU (the Triton launch
    is a custom op the compiler calls; cuBLASLt's and _scaled_mm's CPU twins run): the compiled
    model computes what the eager one does."""
    from bench.metrics.cost import compile_static
    from qdiff.backends.x86 import compile_setup

    torch.manual_seed(0)
    model = GemmAndConvs().eval()
    data = qdiff.CalibData(torch.randn(8, 8, 6, 6), torch.zeros(8))
    qmodel, _ = qdiff.quantize(model, replace(cfg, first_last_bits=None), data)
    deployed = qdiff.convert(qmodel, backend)
    if backend == "int8":
        assert set(layer_report(deployed)) == {"int-mm", "triton-int8"}
    compile_setup()
    x, t = data.x[:4], data.t[:4]
    with torch.no_grad():
        eager = deployed(x, t)
        compiled = compile_static(deployed, "inductor")(x, t)
    assert sqnr_db(eager, compiled) >= 60
