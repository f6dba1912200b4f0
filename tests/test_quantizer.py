import pytest
import torch

from qdiff import AdaRoundQuantizer, QuantSpec, UniformAffineQuantizer
from qdiff.quantizer import fake_quant, grid, scale_zero_point, search_range

BITS = range(2, 9)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_matches_torch_fake_quant(bits, symmetric):
    x = torch.randn(16, 3, 5, 5) * 3 + 0.5
    q = UniformAffineQuantizer(QuantSpec(bits, symmetric=symmetric))
    q.init_from(x)
    expected = torch.fake_quantize_per_tensor_affine(
        x, q.scale.item(), int(q.zero_point.item()), q.qmin, q.qmax
    )
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (12, 7)])
def test_per_channel_matches_torch_fake_quant(bits, symmetric, shape):
    w = torch.randn(shape) * torch.linspace(0.1, 4, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    q = UniformAffineQuantizer(QuantSpec(bits, symmetric, "channel"), channel_dim=0, ndim=len(shape))
    q.init_from(w)
    expected = torch.fake_quantize_per_channel_affine(
        w, q.scale.flatten(), q.zero_point.flatten().int(), 0, q.qmin, q.qmax
    )
    torch.testing.assert_close(q(w), expected, rtol=0, atol=1e-6)


def test_inference_path_equals_training_path():
    x = torch.randn(4, 8, 5, 5) * 3
    scale, zp = scale_zero_point(torch.tensor(-4.0), torch.tensor(5.0), 4, False)
    with torch.no_grad():
        fast = fake_quant(x, scale, zp, 0, 15)
    slow = fake_quant(x.clone().requires_grad_(True), scale, zp, 0, 15)
    assert torch.equal(fast, slow.detach())


def test_straight_through_gradient_matches_torch():
    x = (torch.randn(1000) * 2).requires_grad_(True)
    scale, zp = scale_zero_point(torch.tensor(-1.5), torch.tensor(2.0), 4, False)
    fake_quant(x, scale, zp, 0, 15).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp.item()), 0, 15).sum().backward()
    assert torch.equal(ours, x.grad)
    assert 0 < ours.sum() < len(x)  # clipped values get no gradient, the rest get 1


def test_learned_step_size_gets_lsq_gradient():
    q = UniformAffineQuantizer(QuantSpec(4))
    x = torch.randn(4096)
    q.init_from(x)
    q.scale.requires_grad_(True)
    (q(x) - x).pow(2).mean().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_range_contains_zero_and_grid_bounds():
    for symmetric in (False, True):
        lo, hi = grid(8, symmetric)
        assert hi - lo == 255
        scale, zp = scale_zero_point(torch.tensor(0.5), torch.tensor(3.0), 8, symmetric)
        zero = fake_quant(torch.zeros(1), scale, zp, lo, hi)
        assert zero.item() == 0.0


def test_mse_search_beats_minmax_on_heavy_tails():
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    errs = {}
    for search in ("minmax", "mse"):
        q = UniformAffineQuantizer(QuantSpec(4, scale_search=search))
        q.init_from(x)
        errs[search] = (q(x) - x).abs().pow(2.4).mean().item()
    assert errs["mse"] < 0.5 * errs["minmax"]


def test_mse_search_is_per_channel():
    w = torch.randn(4, 1000)
    w[0, 0] = 100.0  # one outlier in channel 0 must not change the other channels' ranges
    lo, hi = search_range(w, QuantSpec(4, True, "channel", "mse"), channel_dim=0)
    lo_ref, hi_ref = search_range(w[1:], QuantSpec(4, True, "channel", "mse"), channel_dim=0)
    torch.testing.assert_close(hi[1:], hi_ref)
    torch.testing.assert_close(lo[1:], lo_ref)


def test_uninitialised_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="calibrate"):
        UniformAffineQuantizer(QuantSpec(8))(torch.randn(3))


def test_adaround_starts_at_fp_and_hardens_onto_the_grid():
    w = torch.randn(8, 4, 3, 3)
    base = UniformAffineQuantizer(QuantSpec(4, True, "channel"), channel_dim=0)
    base.init_from(w)
    rounder = AdaRoundQuantizer(base, w)
    # Soft rounding starts at the residual of nearest rounding, i.e. (almost) at the FP weight
    # wherever the weight is inside the grid.
    inside = (w / base.scale).abs() < base.qmax - 1
    torch.testing.assert_close(rounder(w)[inside], w[inside], atol=1e-3 * base.scale.max().item(), rtol=0)
    rounder.harden()
    hard = rounder(w)
    steps = hard / base.scale
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    # Hard rounding is floor or ceil: never more than one step from the FP weight.
    assert ((hard - w).abs() <= base.scale + 1e-6).all()


def test_adaround_regulariser_is_zero_only_at_binary_rounding():
    w = torch.randn(64, 16)
    base = UniformAffineQuantizer(QuantSpec(4, True, "channel"), channel_dim=0, ndim=2)
    base.init_from(w)
    rounder = AdaRoundQuantizer(base, w)
    assert rounder.regularizer(2.0) > 0
    with torch.no_grad():
        rounder.alpha.copy_(torch.sign(rounder.alpha) * 50)
    assert rounder.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)
