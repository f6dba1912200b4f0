import pytest
import torch
from helpers import calib_for

import qdiff
from qdiff import CalibConfig, QConfig, QuantSpec, TrajectoryRecorder, select_steps


def test_uniform_spans_the_whole_trajectory():
    steps = select_steps(CalibConfig("uniform", num_timesteps=5), 25)
    assert steps == [0, 6, 12, 18, 24]


def test_final_takes_only_the_last_steps():
    assert select_steps(CalibConfig("final", num_timesteps=3), 25) == [22, 23, 24]


def test_normal_concentrates_near_the_end_of_denoising():
    steps = select_steps(CalibConfig("normal", num_timesteps=10), 100)
    assert len(steps) == 10
    assert 60 < sum(steps) / len(steps) < 90  # mean progress 0.75
    assert min(steps) > 40  # nothing from the noisy half's start


def test_more_timesteps_than_steps_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lower CalibConfig\.num_timesteps"):
        select_steps(CalibConfig(num_timesteps=30), 25)


def test_recorder_keeps_selected_steps_only():
    rec = TrajectoryRecorder([1, 3])
    for step in range(5):
        rec(step, torch.full((4, 1, 2, 2), float(step)), torch.tensor(100 - step), {"c": torch.zeros(4, 3)})
    data = rec.data()
    assert len(data) == 8
    assert set(data.x[:, 0, 0, 0].tolist()) == {1.0, 3.0}
    assert data.t.tolist() == [99] * 4 + [97] * 4
    assert data.cond["c"].shape == (8, 3)
    assert qdiff.CalibData.from_dict(data.to_dict()).cond["c"].shape == (8, 3)


def test_calibrate_initialises_every_activation_grid(tiny_unet):
    data = calib_for(tiny_unet, 16)
    qmodel = qdiff.prepare(tiny_unet, QConfig(act=QuantSpec(8, scale_search="mse")))
    qdiff.calibrate(qmodel, data, batch_size=5)
    grids = [q for m in qmodel.modules() if hasattr(m, "act_quantizers") for q in m.act_quantizers()]
    assert grids and all(bool(q.initialized) and q.observer is None for q in grids)


def test_minmax_calibration_covers_the_observed_range(tiny_unet):
    data = calib_for(tiny_unet, 16)
    qmodel = qdiff.prepare(tiny_unet, QConfig(weight=None, act=QuantSpec(8)))
    seen = []
    h = qmodel.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    qdiff.calibrate(qmodel, data, batch_size=4)
    h.remove()
    x = torch.cat(seen)
    q = qmodel.conv_in.act_quantizer[0]
    lo = (q.qmin - q.zero_point) * q.scale
    hi = (q.qmax - q.zero_point) * q.scale
    assert lo <= x.min() + q.scale and hi >= x.max() - q.scale
