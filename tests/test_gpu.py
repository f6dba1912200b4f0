"""qdiff is device-agnostic: the same recipe on CUDA matches the CPU result."""

import pytest
import torch
from helpers import calib_for, sqnr_db

import qdiff

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
