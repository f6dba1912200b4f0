"""Transformer denoisers: what qdiff quantizes in them, reconstruction and the backends on the
committed class-conditional DiT, and Q-Diffusion's parts that do not apply."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import sqnr_db

import qdiff
from bench.errors import MatrixError
from bench.matrix import load_matrix
from bench.methods import qdiffusion_recipe
from bench.models.embedded import EmbeddedDiT
from bench.spec import Bits, Sampling
from qdiff.backends import KernelLayer, layer_report
from qdiff.modules import QuantAttnProcessor, QuantLayer

SAMPLING = Sampling(steps=10, batch_size=40, device="cpu")
NO_RECON = qdiff.ReconConfig(method="none")


@pytest.fixture(scope="module")
def dit():
    return EmbeddedDiT(SAMPLING)


@pytest.fixture(scope="module")
def calib(dit):
    """Guided FP trajectories of the DiT: 5 timesteps × 8 samples, doubled by guidance."""
    config = qdiff.CalibConfig("uniform", num_timesteps=5, samples_per_timestep=8)
    return dit.calibration_data(dit.denoiser(), config)


@pytest.fixture(scope="module")
def held_out(dit):
    return dit.calibration_data(
        dit.denoiser(), qdiff.CalibConfig("uniform", num_timesteps=5, samples_per_timestep=8, seed=7)
    )


def _out(model, data):
    with torch.no_grad():
        return model(data.x, data.t, **data.cond).sample


def test_prepare_quantizes_every_projection_mlp_and_adaln_linear_and_both_attention_matmuls(dit):
    model = qdiff.prepare(dit.denoiser(), qdiffusion_recipe(Bits.parse("W4A8")))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    assert linears == [] and len(layers) == 39  # nothing left in FP
    block = "transformer_blocks.0"
    for part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
                 "norm1.linear", "norm1.emb.timestep_embedder.linear_1"):  # fmt: skip
        assert f"{block}.{part}" in layers
    processors = [m.processor for m in model.modules() if hasattr(m, "set_processor")]
    assert len(processors) == 4 and all(isinstance(p, QuantAttnProcessor) for p in processors)
    # softmax probabilities keep their own (wider) grid at 4-bit activations
    w4a4 = qdiff.prepare(dit.denoiser(), qdiffusion_recipe(Bits.parse("W4A4")))
    processor = w4a4.transformer_blocks[0].attn1.processor
    assert processor.pv.quant_a.spec.bits == 8 and processor.qk.quant_a.spec.bits == 4
    # Split shortcut quantization has nothing to split in a transformer.
    assert qdiff.find_skip_concats(model) == {} and qdiff.fp_attention(model) == []
    assert not any(layer.split for layer in layers.values())


def test_attention_matmuls_match_torch_fake_quant_and_fp_when_switched_off(dit, calib):
    model = qdiff.prepare(dit.denoiser(), qdiffusion_recipe(Bits.parse("W8A8")))
    qdiff.calibrate(model, calib)
    fp = _out(dit.denoiser(), calib)
    qdiff.set_quant_state(model, weight=False, act=False)
    assert torch.allclose(_out(model, calib), fp, atol=1e-5)  # the quantized processor is exact
    qdiff.set_quant_state(model, weight=True, act=True)
    # the probabilities' quantizer is torch's per-tensor fake quant on its own grid
    q = model.transformer_blocks[0].attn1.processor.pv.quant_a
    probs = torch.rand(2, 4, 16, 16).softmax(-1)
    scale, zero = q.scale.detach().flatten()[0].item(), int(q.zero_point.detach().flatten()[0].round().item())
    expected = torch.fake_quantize_per_tensor_affine(probs, scale, zero, 0, 2**q.spec.bits - 1)
    assert torch.allclose(q(probs), expected, atol=1e-6)
    assert 25 < sqnr_db(fp, _out(model, calib)) < 80


def test_symmetric_attention_grids_quantize_q_k_v_with_zero_point_zero(dit, calib):
    """``qdiff-symattn``: Q, K and V on signed grids with zero point 0, the probabilities on
    unsigned ones with zero point 0 (what OpenVINO's int8 attention takes); the paper's grids
    keep a zero point on Q, K and V. Everything else is the same recipe."""
    from bench.registry import METHODS

    bits = Bits.parse("W8A8")
    paper = METHODS.get("qdiff").qconfig(bits)
    fused = METHODS.get("qdiff-symattn").qconfig(bits)
    assert replace(fused, attn_act=None) == paper
    models = {}
    for name, config in (("paper", paper), ("symattn", fused)):
        models[name] = qdiff.calibrate(qdiff.prepare(dit.denoiser(), replace(config, recon=NO_RECON)), calib)
    for name, model in models.items():
        processors = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
        assert processors
        for p in processors:
            q, k, v, probs = p.qk.quant_a, p.qk.quant_b, p.pv.quant_b, p.pv.quant_a
            assert probs.qmin == 0 and float(probs.zero_point) == 0
            zero_points = [float(x.zero_point) for x in (q, k, v)]
            if name == "symattn":
                assert {x.qmin for x in (q, k, v)} == {-128} and zero_points == [0, 0, 0]
            else:
                assert {x.qmin for x in (q, k, v)} == {0} and any(z != 0 for z in zero_points)
    # The grids differ, so the outputs do, by about one grid step's worth.
    fp = _out(dit.denoiser(), calib)
    for model in models.values():
        assert sqnr_db(fp, _out(model, calib)) > 25


def test_attention_slicing_changes_no_value_and_no_minmax_grid(dit, calib, monkeypatch):
    """Slices of one batch x head row each (as SD-1.5 at 512² gets) compute what one slice does:
    the same calibrated grids (their extremes) and the same output."""
    recipe = qdiffusion_recipe(Bits.parse("W8A8"))
    minmax = {"act": recipe.act, "attn_probs": recipe.probs_spec}
    recipe = replace(recipe, **{k: replace(spec, scale_search="minmax") for k, spec in minmax.items()})
    whole = qdiff.calibrate(qdiff.prepare(dit.denoiser(), recipe), calib)
    monkeypatch.setattr("qdiff.modules.SLICE_SCORES", 1)
    sliced = qdiff.calibrate(qdiff.prepare(dit.denoiser(), recipe), calib)
    for (name, a), b in zip(whole.state_dict().items(), sliced.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    attn = sliced.transformer_blocks[0].attn1
    calls = []
    attn.processor.qk.register_forward_hook(lambda *_: calls.append(1))
    assert torch.allclose(_out(whole, calib), _out(sliced, calib), atol=1e-5)
    assert len(calls) == len(calib) * attn.heads  # it did slice


def test_reconstruction_lowers_held_out_error_per_timestep_on_the_dit(dit, calib, held_out):
    """BRECQ on the DiT's blocks, judged on trajectories it never saw, timestep by timestep:
    better in total and at most timesteps (a small budget need not win every one)."""
    cfg = qdiffusion_recipe(Bits.parse("W4A8"))
    budget = qdiff.ReconConfig(method="brecq", weight_iters=50, act_iters=5, batch_size=16)
    rounded, _ = qdiff.quantize(dit.denoiser(), replace(cfg, recon=NO_RECON), calib)
    rebuilt, result = qdiff.quantize(dit.denoiser(), replace(cfg, recon=budget), calib)
    units = {r.unit for r in result.units}
    assert {f"transformer_blocks.{i}" for i in range(4)} <= units  # blocks are the units
    fp = _out(dit.denoiser(), held_out)
    per_t = {}
    for t in held_out.t.unique().tolist():
        idx = held_out.t == t
        sub = qdiff.CalibData(held_out.x[idx], held_out.t[idx], {k: v[idx] for k, v in held_out.cond.items()})
        per_t[t] = (sqnr_db(fp[idx], _out(rounded, sub)), sqnr_db(fp[idx], _out(rebuilt, sub)))
    assert sum(after for _, after in per_t.values()) > sum(before for before, _ in per_t.values())
    assert sum(after > before for before, after in per_t.values()) >= 3, per_t
    assert sum(result.eps_after) < sum(result.eps_before)


def test_x86_int8_kernels_match_simulation_on_the_dit(dit, calib):
    cfg = qdiffusion_recipe(Bits.parse("W8A8"))
    qmodel, _ = qdiff.quantize(dit.denoiser(), replace(cfg, recon=NO_RECON), calib)
    fake, x86 = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, "x86")
    assert layer_report(x86) == {"onednn-int8": 39, "simulated-matmul": 8}
    assert sum(isinstance(m, KernelLayer) for m in x86.modules()) == 39
    assert sqnr_db(_out(fake, calib), _out(x86, calib)) >= 25
    assert qdiff.storage_bytes(x86)["total"] <= 0.27 * qdiff.storage_bytes(dit.denoiser())["total"]


def test_ptqd_is_refused_on_a_flow_matching_model_at_validate(tmp_path):
    path = tmp_path / "flux.yaml"
    path.write_text(
        "name: flux\nmodels: [{name: flux, resolution: 16}]\nmethods: [qdiff, ptqd]\nbits: [W8A8]\n"
        "metrics: [psnr_vs_fp]\nsettings: {device: cpu, samples: 2, steps: 2, batch_size: 2}\n"
    )
    with pytest.raises(
        MatrixError, match=r"ptqd does not apply to a flow-matching model: .*DDPM noise schedule"
    ):
        load_matrix(path)


def test_split_shortcut_ablation_is_refused_on_a_transformer_at_validate(tmp_path):
    path = tmp_path / "dit.yaml"
    path.write_text(
        "name: dit\nmodels: [embedded-dit]\nmethods: [qdiff, qdiff-no-split]\nbits: [W4A8]\n"
        "settings: {device: cpu, samples: 8, steps: 2, batch_size: 8}\n"
    )
    refusal = (
        r"qdiff-no-split does not apply to a transformer denoiser: .*skip concatenations; .*"
        r"exclude \{method: qdiff-no-split, model: embedded-dit\}"
    )
    with pytest.raises(MatrixError, match=refusal):
        load_matrix(path)


# w4a16 leaves the first and last layers (8-bit weights) simulated.
@pytest.mark.parametrize(
    "backend,bits,kernels",
    [("int8", "W8A8", {"int-mm": 38, "triton-int8": 1}), ("w4a16", "W4A32", {"triton-w4a16": 37})],
)
def test_triton_kernels_match_simulation_on_the_dit(dit, calib, backend, bits, kernels):
    """The GPU kernels (Triton's interpreter here) on the DiT's layers, against the fake-quant
    model they come from."""
    cfg = replace(qdiffusion_recipe(Bits.parse(bits)), recon=NO_RECON)
    qmodel, _ = qdiff.quantize(dit.denoiser(), cfg, calib)
    fake, deployed = qdiff.convert(qmodel, "fake"), qdiff.convert(qmodel, backend)
    assert kernels.items() <= layer_report(deployed).items()
    few = qdiff.CalibData(calib.x[:4], calib.t[:4], {k: v[:4] for k, v in calib.cond.items()})
    assert sqnr_db(_out(fake, few), _out(deployed, few)) >= 30
