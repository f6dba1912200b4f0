"""qdiff is device-agnostic: the same recipe on CUDA matches the CPU result."""

import pytest
import torch
from helpers import GemmAndConvs, calib_for, sqnr_db

import qdiff
from qdiff.backends import layer_report

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible"),
]


def test_quantize_on_cuda_matches_cpu(tiny_unet):
    cfg = qdiff.QConfig(
        weight=qdiff.QuantSpec(4, True, "channel", "mse"),
        act=qdiff.QuantSpec(8, scale_search="mse"),
        recon=qdiff.ReconConfig(weight_iters=5, act_iters=5, batch_size=8),
    )
    data = calib_for(tiny_unet, 16)
    cpu, _ = qdiff.quantize(tiny_unet, cfg, data)
    cuda_data = qdiff.CalibData(data.x.cuda(), data.t.cuda())
    gpu, _ = qdiff.quantize(tiny_unet.cuda(), cfg, cuda_data)
    out_cpu = cpu(data.x, data.t).sample
    out_gpu = gpu(cuda_data.x, cuda_data.t).sample.cpu()
    assert sqnr_db(out_cpu, out_gpu) > 30


W8A8 = qdiff.QConfig(
    weight=qdiff.QuantSpec(8, True, "channel"), act=qdiff.QuantSpec(8), recon=qdiff.ReconConfig(method="none")
)
W4 = qdiff.QConfig(
    weight=qdiff.QuantSpec(4, True, "channel"), act=None, recon=qdiff.ReconConfig(method="none")
)


@pytest.mark.parametrize(
    "backend,cfg,floor_db",
    [("int8", W8A8, 25), ("w4a16", W4, 25), ("fp8", W8A8, 15)],  # fp8: another format
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_backends_on_cuda_match_the_fake_quant_model(tiny_unet, backend, cfg, floor_db, dtype):
    if backend == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs SM >= 8.9")
    data = calib_for(tiny_unet, 16)
    qmodel, _ = qdiff.quantize(tiny_unet.cuda(), cfg, qdiff.CalibData(data.x.cuda(), data.t.cuda()))
    fake = qdiff.convert(qmodel, "fake").to(dtype)
    deployed = qdiff.convert(qmodel, backend).to(dtype)
    x, t = data.x[:8].cuda().to(dtype), data.t[:8].cuda()
    with torch.no_grad():
        reference = (fake if backend != "fp8" else tiny_unet.to(dtype))(x, t).sample.float()
        assert sqnr_db(reference, deployed(x, t).sample.float()) >= floor_db
    assert layer_report(deployed)  # every layer's kernel is counted


@pytest.mark.parametrize("backend", ["int8", "fp8"])
def test_kernel_choice_and_inductor_on_cuda_keep_the_simulated_numbers(backend):
    """On the device: every candidate kernel runs, the fastest is kept per shape, and the
    compiled model (Triton launch, _int_mm / _scaled_mm fused by inductor) computes the eager
    model's numbers."""
    from bench.metrics.cost import compile_static
    from qdiff.backends import choose_kernels
    from qdiff.backends.x86 import compile_setup

    if backend == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs SM >= 8.9")
    torch.manual_seed(0)
    model = GemmAndConvs(64, 64).cuda().eval()
    data = qdiff.CalibData(torch.randn(16, 64, 16, 16, device="cuda"), torch.zeros(16, device="cuda"))
    qmodel, _ = qdiff.quantize(model, W8A8, data)
    fake = qdiff.convert(qmodel, "fake").half()
    deployed = qdiff.convert(qmodel, backend).half()
    x, t = data.x[:8].half(), data.t[:8]
    report = choose_kernels(deployed, x, t)
    assert report.measured == 3 and all(len(s["times_ms"]) >= 2 for s in report.shapes)
    assert report.quantized_share() >= 0  # counted, whichever kernels won
    compile_setup()
    with torch.no_grad():
        eager = deployed(x, t).float()
        compiled = compile_static(deployed, "inductor")(x, t).float()
        assert sqnr_db(fake(x, t).float(), eager) >= (25 if backend == "int8" else 15)
    assert sqnr_db(eager, compiled) >= 30
