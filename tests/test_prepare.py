import copy

import pytest
import torch
from helpers import calib_for, sqnr_db
from torch import nn

import qdiff
from qdiff import QConfig, QuantAttnProcessor, QuantSpec

# Recipes without reconstruction: these tests are about coverage and plain-rounding error bounds.
NO_RECON = qdiff.ReconConfig(method="none")
W8A8 = QConfig(weight=QuantSpec(8, True, "channel"), act=QuantSpec(8), recon=NO_RECON)


def _check_all_replaced(qmodel):
    leftovers = [n for n, m in qmodel.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert leftovers == []
    attentions = [m for m in qmodel.modules() if hasattr(m, "set_processor")]
    assert attentions and all(isinstance(m.processor, QuantAttnProcessor) for m in attentions)


def test_prepare_unet2d_quant_off_is_exactly_fp(tiny_unet):
    data = calib_for(tiny_unet, 8)
    ref = tiny_unet(data.x, data.t).sample
    qmodel = qdiff.prepare(copy.deepcopy(tiny_unet), W8A8)
    _check_all_replaced(qmodel)
    # Switched off, the quantized modules (and our attention processor) reproduce diffusers.
    torch.testing.assert_close(qmodel(data.x, data.t).sample, ref, rtol=1e-5, atol=1e-5)


def test_w8a8_unet2d_within_bound(tiny_unet):
    data = calib_for(tiny_unet, 32)
    held = calib_for(tiny_unet, 8, seed=1)
    qmodel, _ = qdiff.quantize(tiny_unet, W8A8, data)
    assert sqnr_db(tiny_unet(held.x, held.t).sample, qmodel(held.x, held.t).sample) > 20


def test_w8a8_cross_attention_unet_within_bound(tiny_cond_unet):
    data = calib_for(tiny_cond_unet, 32, cond_dim=16)
    held = calib_for(tiny_cond_unet, 8, cond_dim=16, seed=1)
    ref = tiny_cond_unet(held.x, held.t, **held.cond).sample
    qmodel, _ = qdiff.quantize(tiny_cond_unet, W8A8, data)
    _check_all_replaced(qmodel)
    assert sqnr_db(ref, qmodel(held.x, held.t, **held.cond).sample) > 20
    # 4-bit weights are measurably worse: the bound above is not vacuous.
    w4 = QConfig(weight=QuantSpec(4, True, "channel"), act=QuantSpec(8), recon=NO_RECON)
    q4, _ = qdiff.quantize(tiny_cond_unet, w4, data)
    assert sqnr_db(ref, q4(held.x, held.t, **held.cond).sample) < sqnr_db(
        ref, qmodel(held.x, held.t, **held.cond).sample
    )


def test_embedded_unet_prepared_within_bound():
    from bench.embedded.model import load_unet

    unet = load_unet()
    data = calib_for(unet, 32)
    held = calib_for(unet, 8, seed=1)
    qmodel, _ = qdiff.quantize(unet, W8A8, data)
    _check_all_replaced(qmodel)
    assert sqnr_db(unet(held.x, held.t).sample, qmodel(held.x, held.t).sample) > 20


def test_quantizers_live_on_the_models_device(tiny_unet):
    # A model prepared on a GPU must calibrate there: every grid (weights', inputs', attention
    # matmuls') is made on the layer's device, not torch's default. The meta device stands in
    # for CUDA here; before, the grids stayed on the CPU and the first GPU forward failed.
    qmodel = qdiff.prepare(tiny_unet.to("meta"), W8A8)
    _check_all_replaced(qmodel)
    placed = {t.device.type for t in (*qmodel.parameters(), *qmodel.buffers())}
    assert placed == {"meta"}


def test_filter_fn_keeps_layers_fp(tiny_unet):
    qmodel = qdiff.prepare(tiny_unet, W8A8, filter_fn=lambda name, m: not name.startswith("conv_"))
    assert type(qmodel.conv_in) is nn.Conv2d and type(qmodel.conv_out) is nn.Conv2d
    assert isinstance(qmodel.down_blocks[0].resnets[0].conv1, qdiff.QuantConv2d)


def test_prepare_twice_is_refused(tiny_unet):
    qdiff.prepare(tiny_unet, W8A8)
    with pytest.raises(ValueError, match="already prepared"):
        qdiff.prepare(tiny_unet, W8A8)


def test_convert_fake_equals_quantized_model_and_rejects_unknown_backend(tiny_unet):
    data = calib_for(tiny_unet, 16)
    w4a8 = QConfig(weight=QuantSpec(4, True, "channel"), act=QuantSpec(8), recon=NO_RECON)
    qmodel, _ = qdiff.quantize(tiny_unet, w4a8, data)
    fake = qdiff.convert(qmodel, "fake")
    torch.testing.assert_close(fake(data.x, data.t).sample, qmodel(data.x, data.t).sample)
    with pytest.raises(ValueError, match=r"unknown backend 'int3' .*; valid: fake"):
        qdiff.convert(qmodel, "int3")


def test_quantizing_and_deploying_share_the_fp_weights_and_never_change_them(tiny_unet):
    """Real-size models are not held twice (qdiff.prepare.shared_copy): the quantized and the
    deployed models read the FP model's weight storage, and neither transforms, calibration,
    reconstruction, deployment nor a cast of a copy writes to it."""
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    grad_flags = [p.requires_grad for p in tiny_unet.parameters()]
    data = calib_for(tiny_unet, 16)
    recon = qdiff.ReconConfig(method="brecq", weight_iters=2, act_iters=2, batch_size=8)
    config = QConfig(
        weight=QuantSpec(8, True, "channel"), act=QuantSpec(8), recon=recon,
        transforms=(qdiff.Smooth(0.5), qdiff.LowRank(4)),
    )  # fmt: skip
    qmodel, _ = qdiff.quantize(tiny_unet, config, data)
    fp_storage = {p.data_ptr() for p in tiny_unet.parameters()}
    assert tiny_unet.conv_in.weight.data_ptr() in {p.data_ptr() for p in qmodel.parameters()}
    for backend in ("fake", "x86"):
        deployed = qdiff.convert(qmodel, backend)
        deployed(data.x, data.t)
        assert deployed.conv_norm_out.weight.data_ptr() in fp_storage  # a float layer: shared
    qdiff.convert(qmodel, "fake").to(torch.float16)  # rebinds the copy's parameters only
    for k, v in tiny_unet.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny_unet.parameters()] == grad_flags
