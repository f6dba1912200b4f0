"""Quality of key cells on the embedded model, tracked over commits (``track_*``).

A small budget, so that it runs in the quick suite: 8 × 8 calibration inputs, 10 AdaRound and
3 LSQ iterations per unit, 64 samples of 10 DDIM steps, seed 0. Values are the Fréchet distance
in the embedded classifier's features minus the FP model's on the same seeds (lower is better):
deterministic for a given commit and machine, so a jump is a change of the code, not noise. The
full-budget numbers are the committed results (``results/default``).
"""

from __future__ import annotations

from benchmarks.common import THREADS  # noqa: F401  (sets the thread count)

SAMPLES, STEPS = 64, 10


def _fd_deltas(cells: list[tuple[str, str]]) -> dict[str, float]:
    """``{"method bits": FD(quantized) − FD(FP)}``, the FP samples drawn once."""
    from bench.registry import METHODS
    from bench.spec import Bits, Budget
    from benchmarks.common import adapter

    a = adapter("embedded", batch_size=SAMPLES, steps=STEPS)
    fp = a.denoiser().eval().requires_grad_(False)
    fp_fd = a.frechet(a.sample(fp, SAMPLES, 0))
    budget = Budget(calib_timesteps=8, calib_samples=8, weight_iters=10, act_iters=3, weight_lr=0.01)
    out = {}
    for name, bits in cells:
        method = METHODS.get(name)
        qmodel, _ = method.quantize(
            fp, method.configure(Bits.parse(bits), budget), lambda c: a.calibration_data(fp, c)
        )
        out[f"{name} {bits}"] = a.frechet(a.sample(method.deploy(qmodel, "fake"), SAMPLES, 0)) - fp_fd
    return out


class KeyCells:
    timeout = 600

    def setup_cache(self):
        return _fd_deltas([("qdiff", "W4A8"), ("linear", "W8A8")])

    def track_qdiff_w4a8_fd_delta(self, cache):
        return cache["qdiff W4A8"]

    track_qdiff_w4a8_fd_delta.unit = "FD vs FP"

    def track_linear_w8a8_fd_delta(self, cache):
        return cache["linear W8A8"]

    track_linear_w8a8_fd_delta.unit = "FD vs FP"
