"""Baseline PTQ methods: each one's distinguishing mechanism, and every registered baseline
through the harness on the tiny embedded matrix."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys

import pytest
import torch
from helpers import TINY_SETTINGS, baseline_names, sqnr_db, tiny_matrix
from torch import nn

import qdiff
from bench.errors import MatrixError
from bench.matrix import load_matrix
from bench.methods import QDIFFUSION
from bench.registry import METHODS
from bench.runner import run_matrix
from bench.spec import Bits


def test_ptq4dm_calibrates_on_its_normal_timestep_distribution():
    method = METHODS.get("ptq4dm")
    qconfig = method.qconfig(Bits(4, 8))
    calib = qconfig.calib
    assert calib.strategy == "normal" and not qconfig.split_shortcut and qconfig.recon.method == "brecq"
    # The sampler follows its configured normal (a case whose tails stay inside [0, 1]).
    steps = 1000
    picked = qdiff.select_steps(qdiff.CalibConfig("normal", 100, 1, 0.5, 0.1), steps)
    progress = [s / (steps - 1) for s in picked]
    assert len(picked) == 100 and statistics.mean(progress) == pytest.approx(0.5, abs=0.002)
    assert statistics.stdev(progress) == pytest.approx(0.1, rel=0.05)
    # At the harness's 25 steps, PTQ4DM's inputs sit late in denoising; Q-Diffusion's span it.
    few = qdiff.select_steps(qdiff.CalibConfig("normal", 10, 1, calib.normal_mean, calib.normal_std), 25)
    assert min(few) >= 12 and len(few) >= 6
    assert qdiff.select_steps(QDIFFUSION.qconfig(Bits(4, 8)).calib, 25)[0] == 0


# PTQD runs through the harness in its own tests below (its bases' checkpoints reused).
@pytest.mark.parametrize("name", [n for n in baseline_names() if n != "ptqd"])
def test_every_baseline_runs_through_the_harness(name, tmp_path):
    method = METHODS.get(name)
    # One width, with quantized activations where the method has them: the harness path is the
    # same at every width, and each width costs a calibration and a reconstruction (weight-only
    # widths run through the harness in test_runner's and PTQD's matrices).
    widths = ("W4A8", "W8A8", "W4A4", "W4A32", "W8A32")
    bits = [b for b in widths if method.unsupported(Bits.parse(b)) is None][:1]
    matrix = load_matrix(tiny_matrix(tmp_path, methods=f"[{name}]", bits=f"[{', '.join(bits)}]"))
    rows = run_matrix(matrix, tmp_path / "results", progress=False, log=lambda _: None)
    quantized = [r for r in rows if r["method"] == name]
    assert {r["bits"] for r in quantized} == set(bits)
    expected = {"ok"}
    if getattr(method, "cuda_only", "") and not torch.cuda.is_available():
        # The preset cannot run here: its rows say so, and the FP reference still runs.
        assert all("needs CUDA" in r["error"] for r in quantized)
        expected = {"skipped"}
    assert {r["status"] for r in quantized} == expected, [r["error"] for r in quantized]
    assert {r["status"] for r in rows if r["method"] == "fp"} == {"ok"}
    if name == "ptqd-mp":  # refines both of Q-Diffusion's checkpoints, built for it
        (q,) = [r for r in quantized if r["metric"] == "quantize_time"]
        assert q["weights_from"] == "qdiff W4A8 + qdiff W4A4"


def outlier_model_and_data(seed: int = 0):
    """Two Linear layers whose input has a few outlier channels (as transformer activations do)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(256, 16, generator=g)
    x[:, :2] *= 50  # outlier channels
    return model.eval(), x


class _Wrap(nn.Module):
    """Adapts a plain module to qdiff's (x, t, **cond) calling convention."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return self.inner(x)


def _calib(x):
    return qdiff.CalibData(x, torch.zeros(len(x), dtype=torch.long), {})


def test_smoothquant_keeps_the_fp_function_and_flattens_activation_ranges():
    model, x = outlier_model_and_data()
    qconfig = METHODS.get("smoothquant").qconfig(Bits(8, 8))
    qconfig = dataclasses.replace(qconfig, first_last_bits=None)
    q = qdiff.prepare(copy.deepcopy(_Wrap(model)), qconfig)
    (transform,) = qconfig.transforms
    smoothed = transform.apply(q, _calib(x), batch_size=64)
    assert smoothed == ["inner.0", "inner.2"]
    qdiff.set_quant_state(q, weight=False, act=False)
    with torch.no_grad():
        assert torch.allclose(q(x, None), model(x), rtol=1e-5, atol=1e-5)  # the same FP function
        layer = q.inner[0]
        (scale,) = layer.transforms
        before, after = x.abs().amax(0), scale.input(x).abs().amax(0)
    # alpha = 0.5 takes the square root of the spread across channels (79x -> 9x here)
    assert after.max() / after.min() < (before.max() / before.min()) / 5


def test_smoothquant_lowers_w8a8_error_on_outlier_activations():
    model, x = outlier_model_and_data()
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for alpha in (None, 0.5):
        qconfig = dataclasses.replace(
            METHODS.get("smoothquant").qconfig(Bits(8, 8)),
            first_last_bits=None,
            transforms=() if alpha is None else (qdiff.Smooth(alpha),),
        )
        qmodel, _ = qdiff.quantize(_Wrap(model), qconfig, _calib(x))
        with torch.no_grad():
            errors[alpha] = sqnr_db(reference, qmodel(x, None))
    assert errors[0.5] > errors[None] + 6  # at least 4x lower error power


def test_smoothquant_needs_quantized_activations(tmp_path):
    with pytest.raises(MatrixError, match="smoothquant works on quantized activations; use W4A8, or exclude"):
        load_matrix(tiny_matrix(tmp_path, methods="[smoothquant]", bits="[W4A32]"))


def wide_outlier_model_and_data(seed: int = 0):
    """A 64-wide Linear pair with outlier input channels and a few dominant weight directions."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with torch.no_grad():
        for layer in (model[0], model[2]):  # a strong low-rank component, as trained weights have
            layer.weight += 0.5 * torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)
    x = torch.randn(512, 64, generator=g)
    x[:, :3] *= 30
    return model.eval(), x


def _svdquant_config(rank: int):
    qconfig = METHODS.get("svdquant").qconfig(Bits(4, 4))
    branch = (qdiff.LowRank(rank),) if rank else ()
    return dataclasses.replace(qconfig, first_last_bits=None, transforms=(qdiff.Smooth(0.5), *branch))


def test_svdquant_branch_keeps_the_fp_function_and_is_stored_in_16_bits():
    model, x = wide_outlier_model_and_data()
    q = qdiff.prepare(copy.deepcopy(_Wrap(model)), _svdquant_config(8))
    qdiff.smooth(q, _calib(x), 0.5)
    without = qdiff.storage_bytes(q)["other"]
    assert qdiff.add_low_rank(q, 8) == ["inner.0", "inner.2"]
    layer = q.inner[0]
    _, branch = layer.transforms
    assert branch.u.shape == (64, 8) and branch.v.dtype == torch.float16
    qdiff.set_quant_state(q, weight=False, act=False)
    with torch.no_grad():
        out, fp = q(x, None), model(x)
    assert (out - fp).abs().max() <= 1e-5 * fp.abs().max()  # W·s = UV + R: float32 round-off only
    assert qdiff.storage_bytes(q)["other"] - without == 2 * (64 + 64) * 8 * 2  # two layers, fp16


def test_svdquant_low_rank_branch_lowers_w4a4_error():
    model, x = wide_outlier_model_and_data()
    with torch.no_grad():
        reference = model(x)
    sqnr = {}
    for rank in (0, 16):
        qmodel, _ = qdiff.quantize(_Wrap(model), _svdquant_config(rank), _calib(x))
        with torch.no_grad():
            sqnr[rank] = sqnr_db(reference, qmodel(x, None))
    assert sqnr[16] > sqnr[0] + 2, sqnr


@dataclasses.dataclass
class _Out:
    sample: torch.Tensor


class _ToyDenoiser(nn.Module):
    """ε(x, t) = A x; the 'quantized' twin adds a known correlated part (1 + k_t), a per-channel
    bias and noise."""

    def __init__(self, k: dict[int, float] | None = None, noise: float = 0.0, bias: float = 0.0):
        super().__init__()
        self.a = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
        self.k, self.noise, self.bias = k, noise, bias * torch.linspace(-1, 1, 8)

    def forward(self, x, t):
        eps = x @ self.a.T
        if self.k is None:
            return _Out(eps)
        g = torch.Generator().manual_seed(int(t.sum()))
        scale = torch.tensor([1 + self.k[int(v)] for v in t])[:, None]
        return _Out(scale * eps + self.bias + self.noise * torch.randn(eps.shape, generator=g))


def test_ptqd_fits_and_removes_the_correlated_quantization_noise_and_its_bias():
    from baselines.ptqd import fit_correction

    true_k = {100: 0.2, 500: -0.1, 900: 0.05}
    fp, quant = _ToyDenoiser(), _ToyDenoiser(true_k, noise=0.3, bias=0.5)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([100, 500, 900]).repeat_interleave(200)
    data = qdiff.CalibData(torch.randn(600, 8, generator=g), t, {})
    corrected = fit_correction(fp, quant, data)
    assert corrected.k.tolist() == pytest.approx([0.2, -0.1, 0.05], abs=0.02)
    assert corrected.bias[0].tolist() == pytest.approx((0.5 * torch.linspace(-1, 1, 8)).tolist(), abs=0.1)
    assert corrected.residual_var.tolist() == pytest.approx([0.09] * 3, rel=0.15)
    x = torch.randn(300, 8, generator=g)
    tt = torch.tensor([100, 500, 900]).repeat_interleave(100)
    # Timesteps the calibration did not see take the nearest calibrated one's correction.
    assert corrected.nearest(torch.tensor([480, 130])).tolist() == [1, 0]
    eps = fp(x, tt).sample
    before = quant(x, tt).sample - eps
    after = corrected(x, tt).sample - eps
    bias = lambda d: ((d * eps).sum() / (eps * eps).sum()).abs()  # noqa: E731  correlated part
    assert bias(after) < bias(before) / 5
    assert after.mean(0).abs().max() < before.mean(0).abs().max() / 5  # the per-channel bias is gone
    assert after.pow(2).mean() < before.pow(2).mean()


def test_ptqd_folds_the_residual_variance_into_the_ddim_noise():
    from diffusers import DDIMScheduler

    from baselines.ptqd import NoiseCorrected

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(25)
    t = scheduler.timesteps[10]
    eps = torch.zeros(4, 3, 8, 8)
    prev = int(t) - 1000 // 25
    sigma2 = scheduler._get_variance(t, prev).item()  # eta = 1: the schedule's own variance
    a_t, a_prev = scheduler.alphas_cumprod[t].item(), scheduler.alphas_cumprod[prev].item()
    c = (1 - a_prev - sigma2) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5

    def model(residual_var, k=0.25):
        timesteps = torch.tensor([float(t)])
        return NoiseCorrected(
            nn.Identity(), timesteps, torch.tensor([k]), torch.zeros(1, 3), torch.tensor([residual_var])
        )

    # No residual: exactly the noise the scheduler itself draws from the same generator (pairing).
    drawn = model(0.0).variance_noise(scheduler, t, eps, 1.0, torch.Generator().manual_seed(7))
    own = torch.randn(eps.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, own)
    # A residual of variance v/(1+k)^2 reaches x_{t-1} times c: the added noise makes up the rest.
    v = 0.5 * sigma2 / c**2 * 1.25**2
    folded = model(v).variance_noise(scheduler, t, eps, 1.0, torch.Generator().manual_seed(7))
    assert folded.div(own).mean().item() ** 2 * sigma2 + c**2 * v / 1.25**2 == pytest.approx(sigma2, rel=1e-5)
    # More residual than the schedule's noise: nothing is added.
    assert model(10 * v).variance_noise(scheduler, t, eps, 1.0, torch.Generator()).abs().max() == 0


def test_torchao_int8_dynamic_quantizes_the_linear_layers_and_stays_close_to_fp():
    from bench.models.embedded import EmbeddedDigits
    from bench.spec import Budget

    method = METHODS.get("torchao-int8dq")
    fp = EmbeddedDigits(_cpu_sampling()).denoiser().eval()
    config = method.configure(Bits(8, 8), Budget())
    assert "Int8DynamicActivationInt8WeightConfig" in config.config and config.torchao_version
    q, report = method.quantize(fp, config, calibration=_no_calibration)
    assert report is None
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in q.modules() if isinstance(m, nn.Conv2d)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    assert all(type(m.weight) is nn.Parameter for m in convs)  # torchao's default filter: Linear only
    assert all(type(m.weight) is nn.Parameter for m in fp.modules() if isinstance(m, nn.Linear))  # untouched
    x, t = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((8,), 500)
    with torch.no_grad():
        assert sqnr_db(fp(x, t).sample, q(x, t).sample) > 30
    # Stored as torchao holds it: one int8 per Linear weight, plus per-row scales.
    fp_bytes, q_bytes = qdiff.storage_bytes(fp), qdiff.storage_bytes(q)
    linear_weights = sum(m.weight.numel() for m in linears)
    assert q_bytes["quantized_weights"] == linear_weights
    assert q_bytes["total"] == fp_bytes["total"] - 4 * linear_weights + linear_weights + q_bytes["grids"]


def _cpu_sampling():
    from bench.spec import Sampling

    return Sampling(device="cpu", steps=4)


def _no_calibration(calib):
    raise AssertionError("torchao presets are calibration-free")


def test_torchao_presets_accept_their_one_bit_width(tmp_path):
    with pytest.raises(MatrixError, match="torchao-int8dq is torchao's W8A8 preset; use bits W8A8"):
        load_matrix(tiny_matrix(tmp_path, methods="[torchao-int8dq]", bits="[W4A8]"))


def test_a_missing_torchao_skips_its_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    matrix = load_matrix(tiny_matrix(tmp_path, methods="[torchao-int8wo]", bits="[W8A32]"))
    rows = run_matrix(matrix, tmp_path / "results", progress=False, log=lambda _: None)
    skipped = [r for r in rows if r["method"] == "torchao-int8wo"]
    assert skipped and {r["status"] for r in skipped} == {"skipped"}
    assert "pip install torchao" in skipped[0]["error"]


@pytest.mark.slow
def test_ptqd_refines_qdiffs_checkpoint_instead_of_reconstructing_again(tmp_path):
    # With a stochastic sampler (η = 1), into whose noise PTQD folds the residual's variance.
    settings = TINY_SETTINGS.replace("steps: 4", "steps: 4, eta: 1.0")
    path = tiny_matrix(tmp_path, methods="[qdiff, ptqd]", bits="[W4A8, W4A32]", settings=settings)
    rows = run_matrix(load_matrix(path), tmp_path / "results", progress=False, log=lambda _: None)
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows]
    assert {r["sampling"]["eta"] for r in rows} == {1.0}
    q = {(r["method"], r["bits"]): r for r in rows if r["metric"] == "quantize_time"}
    assert q[("ptqd", "W4A8")]["weights_from"] == "qdiff W4A8"
    assert q[("ptqd", "W4A32")]["weights_from"] == "qdiff W4A32"
    # Its time is qdiff's reconstruction plus the fit; the same configuration is recorded.
    assert q[("ptqd", "W4A8")]["value"] >= q[("qdiff", "W4A8")]["value"]
    assert q[("ptqd", "W4A8")]["qconfig"] == q[("qdiff", "W4A8")]["qconfig"]
    psnr = {(r["method"], r["bits"]): r["value"] for r in rows if r["metric"] == "psnr_vs_fp"}
    assert psnr[("ptqd", "W4A8")] != psnr[("qdiff", "W4A8")]  # the correction changes the samples


def test_ptqd_mixed_precision_uses_low_bits_where_the_input_is_mostly_noise():
    from diffusers import DDIMScheduler

    from baselines.ptqd import choose_steps, fit_correction

    fp = _ToyDenoiser()
    k = {100: 0.0, 500: 0.0, 900: 0.0}
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([100, 500, 900]).repeat_interleave(64)
    data = qdiff.CalibData(torch.randn(192, 8, generator=g), t, {})
    high = fit_correction(fp, _ToyDenoiser(k, noise=0.01), data)
    low = fit_correction(fp, _ToyDenoiser(k, noise=3.0), data)  # quantization SNR near 1
    alphas = DDIMScheduler(num_train_timesteps=1000).alphas_cumprod  # SNR 7.4, 0.09, 4e-5
    mixed = choose_steps(fp, high, low, data, alphas)
    assert mixed.use_low.tolist() == [False, True, True]
    assert (mixed.snr_quant < 2).all() and mixed.snr_diffusion[0] > 5 > 0.1 > mixed.snr_diffusion[1]
    # Each sample goes through the model of its timestep, in uniform and in mixed batches.
    x = torch.randn(6, 8, generator=g)
    tt = torch.tensor([100, 100, 900, 900, 500, 100])
    with torch.no_grad():
        out = mixed(x, tt).sample
        late = tt == 100  # the toy's noise depends on the batch, so compare the same sub-batches
        assert torch.equal(out[late], high(x[late], tt[late]).sample)
        assert torch.equal(out[~late], low(x[~late], tt[~late]).sample)
        assert torch.equal(mixed(x[:2], tt[:2]).sample, high(x[:2], tt[:2]).sample)


def test_ptqd_mixed_precision_needs_more_activation_bits_than_its_low_model(tmp_path):
    # Its run through the harness: test_every_baseline_runs_through_the_harness[ptqd-mp].
    with pytest.raises(MatrixError, match="ptqd-mp mixes A4 with more activation bits per step; use W4A8"):
        load_matrix(tiny_matrix(tmp_path, methods="[ptqd-mp]", bits="[W4A4]"))


def test_mixed_precision_models_store_their_shared_weights_once():
    from baselines.ptqd import share_equal_tensors
    from qdiff.modules import QuantLayer

    model, x = outlier_model_and_data()
    qconfigs = [
        dataclasses.replace(METHODS.get("linear").qconfig(Bits(4, a)), first_last_bits=None) for a in (8, 4)
    ]
    high, low = (qdiff.quantize(_Wrap(model), q, _calib(x))[0] for q in qconfigs)
    single = qdiff.storage_bytes(high)
    pair = nn.ModuleList([high, low])
    assert qdiff.storage_bytes(pair)["quantized_weights"] == 2 * single["quantized_weights"]
    assert share_equal_tensors(high, low) >= 4  # both layers' weights and biases, at least
    both = qdiff.storage_bytes(pair)
    assert both["quantized_weights"] == single["quantized_weights"]
    # What remains twice: the activation grids (each model has its own).
    assert both["total"] - single["total"] == sum(
        4 + 1 for m in low.modules() if isinstance(m, QuantLayer) for _ in m.act_quantizers()
    )
    with torch.no_grad():
        assert torch.equal(low(x, None), qdiff.quantize(_Wrap(model), qconfigs[1], _calib(x))[0](x, None))
