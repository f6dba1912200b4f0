"""Calibration data from the FP sampler's trajectory, and activation range calibration.

The sampler belongs to the caller (qdiff knows no pipelines): it calls a
:class:`TrajectoryRecorder` with ``(step_index, x_t, t, cond)`` at every denoising step, and the
recorder keeps the steps that the calibration strategy selects.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import nn

from qdiff.config import CalibConfig
from qdiff.hooks import installed
from qdiff.prepare import quant_modules, set_quant_state
from qdiff.quantizer import UniformAffineQuantizer

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class CalibData:
    """Denoiser inputs: ``model(x[i], t[i], **{k: v[i] for k, v in cond.items()})``."""

    x: torch.Tensor
    t: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.t) != n or any(len(v) != n for v in self.cond.values()):
            raise ValueError("CalibData: x, t and every cond tensor need the same length")

    def __len__(self) -> int:
        return len(self.x)

    def select(self, index: torch.Tensor) -> Batch:
        return self.x[index], self.t[index], {k: v[index] for k, v in self.cond.items()}

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            yield self.select(torch.arange(start, min(start + batch_size, len(self))))

    def to(self, device: torch.device | str) -> CalibData:
        return CalibData(
            self.x.to(device), self.t.to(device), {k: v.to(device) for k, v in self.cond.items()}
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "t": self.t, **{f"cond.{k}": v for k, v in self.cond.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor]) -> CalibData:
        cond = {k.removeprefix("cond."): v for k, v in data.items() if k.startswith("cond.")}
        return cls(data["x"], data["t"], cond)


def select_steps(config: CalibConfig, num_steps: int) -> list[int]:
    """Indices (0 = first, noisiest step) of the sampler steps to record.

    ``uniform`` spreads K steps evenly over the whole trajectory (Q-Diffusion); ``final`` takes
    the last K; ``normal`` places K steps at evenly spaced quantiles of
    N(``normal_mean``, ``normal_std``) over denoising progress (PTQ4DM), so they crowd where the
    density is high. Duplicate indices collapse, so ``normal`` may return fewer than K.
    """
    k = config.num_timesteps
    if k > num_steps:
        raise ValueError(
            f"calibration wants {k} timesteps but the sampler runs only {num_steps} steps; "
            "lower CalibConfig.num_timesteps or raise the step count"
        )
    if config.strategy == "uniform":
        steps = [round(i * (num_steps - 1) / max(1, k - 1)) for i in range(k)]
    elif config.strategy == "final":
        steps = list(range(num_steps - k, num_steps))
    else:
        dist = NormalDist(config.normal_mean, config.normal_std)
        progress = [dist.inv_cdf((i + 0.5) / k) for i in range(k)]
        steps = [min(num_steps - 1, max(0, round(p * (num_steps - 1)))) for p in progress]
    return sorted(set(steps))


class TrajectoryRecorder:
    """Collects denoiser inputs at selected sampler steps; pass it to the sampler as a callback."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self._x: list[torch.Tensor] = []
        self._t: list[torch.Tensor] = []
        self._cond: list[dict[str, torch.Tensor]] = []

    def __call__(self, step: int, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]):
        if step not in self.steps:
            return
        n = len(x)
        self._x.append(x.detach().clone())
        self._t.append(t.detach().reshape(-1).expand(n).clone() if t.numel() == 1 else t.detach().clone())
        self._cond.append({k: v.detach().clone() for k, v in cond.items()})

    def data(self) -> CalibData:
        if not self._x:
            raise RuntimeError("no calibration inputs were recorded; did the sampler call the recorder?")
        keys = self._cond[0].keys()
        cond = {k: torch.cat([c[k] for c in self._cond]) for k in keys}
        return CalibData(torch.cat(self._x), torch.cat(self._t), cond)


def run_model(model: nn.Module, batch: Batch):
    x, t, cond = batch
    return model(x, t, **cond)


class _RangeObserver:
    """Exact running min/max plus a uniform random sample of values for the ``mse`` search."""

    def __init__(self, quantizer: UniformAffineQuantizer, per_batch: int, generator: torch.Generator):
        self.quantizer = quantizer
        self.per_batch = per_batch
        self.generator = generator
        self.lo = math.inf
        self.hi = -math.inf
        self.samples: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())
        if self.quantizer.spec.scale_search == "mse":
            idx = torch.randint(0, x.numel(), (min(self.per_batch, x.numel()),), generator=self.generator)
            self.samples.append(x[idx.to(x.device)].cpu())

    def finish(self) -> None:
        q = self.quantizer
        if q.spec.scale_search == "minmax":
            q.set_range(torch.tensor([self.lo]), torch.tensor([self.hi]))
            return
        # The exact extremes anchor the search's range; the sample scores the candidates.
        sample = torch.cat([torch.tensor([self.lo, self.hi]), *self.samples])
        q.init_from(sample.to(q.scale.device))


@torch.no_grad()
def calibrate(
    model: nn.Module, data: CalibData, batch_size: int = 64, max_samples: int = 1 << 18, seed: int = 0
) -> nn.Module:
    """Set every activation grid from the inputs it sees on the calibration data.

    The model runs with weights quantized (if they are) and activations in FP, so each grid
    matches what its layer receives from the quantized-weight network. ``minmax`` grids use the
    exact observed range; ``mse`` grids search clipping ratios on a uniform random sample of up
    to ``max_samples`` values per quantizer. Afterwards weight and activation quantization are
    both on.
    """
    generator = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(len(data) / batch_size)
    quantizers = [q for _, m in quant_modules(model) for q in m.act_quantizers()]
    observers = [_RangeObserver(q, max(1, max_samples // n_batches), generator) for q in quantizers]
    set_quant_state(model, weight=True, act=True)
    with installed(q.observe(obs) for q, obs in zip(quantizers, observers, strict=True)):
        for batch in data.batches(batch_size):
            run_model(model, batch)
    for obs in observers:
        obs.finish()
    return model
