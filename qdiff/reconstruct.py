"""BRECQ-style reconstruction (Li et al., ICLR 2021), as Q-Diffusion applies it (paper Sec. 4, Alg. 1).

The model is cut into units — ResNet blocks, attention/transformer blocks and up/down samplers,
with every layer outside them on its own — and the units are reconstructed in model order.
For each unit the inputs come from the *quantized* model (so earlier units' errors are seen and
compensated) and the targets are the FP model's outputs of that unit; the loss is the output
squared error summed over channels (BRECQ's ``lp_loss(p=2)``).

Phase 1, weights: AdaRound logits of every weight in the unit, activations in FP, with the
annealed rounding regulariser (BRECQ Eq. 9 / AdaRound Eq. 25), Adam at a constant lr; the
rounding is then hardened. Phase 2, activations: activation grids are re-calibrated on the
reconstructed weights, then the LSQ step sizes of every activation quantizer in the unit are
learned (in log space), with weights at their hardened rounding and all quantizers on.

Two choices differ from the reference code, each a :class:`ReconConfig` switch:

- ``balance``: each input's squared error is weighted by 1 / (its timestep's mean starting
  error), so every calibrated timestep counts equally. Pooled, the round-to-nearest error of
  the low-noise steps is ~50× that of the noisy ones, and a short budget buys late-step
  accuracy with early-step error and a bias in ε that shifts the whole sampler trajectory.
- ``holdout``: a stratified share of each timestep's inputs is kept out of optimisation. A
  unit keeps its learned rounding (or step sizes) only if its balanced loss *on those inputs,
  with the hardened rounding* improves; otherwise it reverts to where it started. The model's
  per-timestep ε error on the held-out inputs is measured before and after.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qdiff.calibration import CalibData, calibrate, run_model
from qdiff.capture import Captured, as_tensor, capture
from qdiff.config import ReconConfig
from qdiff.hooks import installed
from qdiff.modules import QuantLayer, QuantModule
from qdiff.prepare import quant_modules, set_quant_state

log = logging.getLogger(__name__)

# diffusers building blocks reconstructed as a whole.
DEFAULT_BLOCK_TYPES = (
    "ResnetBlock2D",
    "Attention",
    "BasicTransformerBlock",
    "JointTransformerBlock",  # SD3
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "Downsample2D",
    "Upsample2D",
)


@dataclass(frozen=True)
class UnitReport:
    """One unit and phase: its balanced output error on the held-out inputs (all calibrated
    timesteps) where it started and after optimisation (hardened), whether it reverted, and,
    for weights, the share of roundings AdaRound had not decided when it hardened them."""

    unit: str
    phase: str
    loss_before: float
    loss_after: float
    reverted: bool = False
    undecided: float | None = None


@dataclass(frozen=True)
class ReconResult:
    """What reconstruction did: per-unit reports, and the model's ε error (mean squared error
    of the noise prediction against the FP model's) per calibrated timestep on the held-out
    inputs, at the start (round-to-nearest weights, calibrated activation ranges) and at the
    end."""

    units: tuple[UnitReport, ...] = ()
    timesteps: tuple[int, ...] = ()
    eps_before: tuple[float, ...] = ()
    eps_after: tuple[float, ...] = ()

    @property
    def reverted(self) -> int:
        return sum(u.reverted for u in self.units)

    @property
    def undecided(self) -> float | None:
        """The largest undecided share of any unit (None without a weight phase)."""
        shares = [u.undecided for u in self.units if u.undecided is not None]
        return max(shares) if shares else None

    def summary(self) -> dict:
        """A JSON-able summary for results rows."""
        return {
            "units": len(self.units),
            "reverted": self.reverted,
            "reverted_units": [f"{u.phase} {u.unit}" for u in self.units if u.reverted],
            "undecided_max": self.undecided,
            "timesteps": list(self.timesteps),
            "eps_before": [round(v, 6) for v in self.eps_before],
            "eps_after": [round(v, 6) for v in self.eps_after],
        }


TARGET_CACHE_BYTES = 1 << 30
UNDECIDED_WARNING = 0.05  # warn when more than this share of a unit's roundings is undecided


def find_units(
    model: nn.Module, granularity: str = "block", block_types: tuple[str, ...] = DEFAULT_BLOCK_TYPES
) -> list[tuple[str, nn.Module]]:
    """The reconstruction units of a prepared model, in module order."""
    units: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        is_block = granularity == "block" and type(module).__name__ in block_types
        if (is_block and any(isinstance(m, QuantModule) for m in module.modules())) or isinstance(
            module, QuantLayer
        ):
            units.append((prefix, module))
        else:
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return units


def _per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's ``lp_loss(p=2)`` per input: squared error summed over channels (dim 1),
    averaged over the rest."""
    err = (out - target).pow(2).sum(1)
    return err.reshape(len(err), -1).mean(1)


def _beta(cfg: ReconConfig, it: int) -> float:
    """AdaRound's exponent, annealed linearly from beta_start to beta_end after warm-up."""
    start = cfg.warmup * cfg.weight_iters
    progress = max(0.0, (it - start) / max(1.0, cfg.weight_iters - start))
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress)


@dataclass
class _Split:
    """Training and held-out input indices, stratified over timesteps, and each input's
    timestep group."""

    train: torch.Tensor
    held: torch.Tensor
    group: torch.Tensor  # index into ``timesteps`` of every input
    timesteps: list[int]


def _split(data: CalibData, holdout: float, generator: torch.Generator) -> _Split:
    # Rows, so that a unit calibrated on other per-sample conditioning (e.g. a block's time
    # embedding) splits by it too.
    t = data.t.cpu()
    values, group = torch.unique(t.reshape(len(t), -1), dim=0, return_inverse=True)
    timesteps = values[:, 0] if t.ndim == 1 else torch.arange(len(values))
    train, held = [], []
    for g in range(len(timesteps)):
        idx = (group == g).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = round(holdout * len(idx)) if holdout > 0 else 0
        k = min(max(k, 1 if holdout > 0 else 0), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return _Split(torch.cat(train).sort().values, torch.cat(held).sort().values, group,
                  [int(t) for t in timesteps])  # fmt: skip


def _group_means(values: torch.Tensor, groups: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` per group (0 where a group is empty) and each group's count."""
    sums = torch.zeros(n, device=values.device, dtype=values.dtype).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=n)
    return sums / counts.clamp(min=1), counts


class _Objective:
    """A unit's loss: per-input squared error, weighted per timestep (see ``balance``)."""

    def __init__(self, unit, inputs: Captured, target: torch.Tensor, split: _Split, cfg: ReconConfig):
        self.unit, self.inputs, self.target, self.split, self.cfg = unit, inputs, target, split, cfg
        device = target.device
        self.group = split.group.to(device)
        start = self.losses(split.train)
        n = len(split.timesteps)
        per_t, _ = _group_means(start, self.group[split.train.to(device)], n)
        per_t = per_t.clamp(min=torch.finfo(torch.float32).tiny)
        pooled = start.mean()
        # Weights keep the pooled loss's scale at the start (so the AdaRound regulariser's λ
        # weighs as in the reference), but give every timestep the same share.
        self.weight_t = pooled / per_t if cfg.balance else torch.ones(n, device=device)
        self.eval_idx = split.held if len(split.held) else split.train

    def losses(self, index: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for part in index.split(chunk):
                part = part.to(self.target.device)
                args, kwargs = self.inputs.get(part)
                out.append(_per_sample_loss(as_tensor(self.unit(*args, **kwargs)), self.target[part]))
        return torch.cat(out)

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.inputs.get(idx)
        per = _per_sample_loss(as_tensor(self.unit(*args, **kwargs)), self.target[idx])
        return (per * self.weight_t[self.group[idx]]).mean()

    def evaluate(self) -> float:
        """Balanced loss on the held-out inputs: the timesteps' weighted mean losses, averaged
        with equal weight per timestep (pooled when ``balance`` is off)."""
        idx = self.eval_idx.to(self.target.device)
        per = self.losses(idx) * self.weight_t[self.group[idx]]
        if not self.cfg.balance:
            return per.mean().item()
        means, counts = _group_means(per, self.group[idx], len(self.split.timesteps))
        return means[counts > 0].mean().item()


def _optimise(
    objective: _Objective,
    params: list[nn.Parameter],
    iters: int,
    lr: float,
    cosine: bool,
    generator: torch.Generator,
    extra_loss: Callable[[int], torch.Tensor | float] = lambda it: 0.0,
) -> None:
    train = objective.split.train
    batch = min(objective.cfg.batch_size, len(train))
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters)) if cosine else None
    picks = torch.randint(0, len(train), (iters, batch), generator=generator)
    for it in range(iters):
        idx = train[picks[it]].to(objective.target.device)
        loss = objective.batch_loss(idx) + extra_loss(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    for p in params:
        p.requires_grad_(False)


def reconstruct(
    model: nn.Module,
    data: CalibData,
    config: ReconConfig,
    batch_size: int = 64,
    block_types: tuple[str, ...] = DEFAULT_BLOCK_TYPES,
    progress: Callable[[int, int], None] | None = None,
) -> ReconResult:
    """Reconstruct a prepared, calibrated model unit by unit (see module docstring).

    Args:
        model: output of :func:`qdiff.prepare` followed by :func:`qdiff.calibrate`.
        data: calibration inputs (the same ones used to calibrate).
        config: iterations, learning rates, batch size, regulariser, balance and hold-out.
        batch_size: batch size of the full-model passes that capture unit inputs/outputs.
        block_types: class names reconstructed as one block.
        progress: called with ``(units done, units in all)`` after each unit and phase.

    Returns:
        Per-unit reports and the model's per-timestep ε error before and after.
    """
    if config.method == "none":
        return ReconResult()
    generator = torch.Generator().manual_seed(config.seed)
    split = _split(data, config.holdout, generator)
    grad_state = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    units = _in_execution_order(model, find_units(model, config.granularity, block_types), data)
    reports: list[UnitReport] = []
    has_weight = any(m.has_weight_quant for _, m in quant_modules(model))
    has_act = any(m.has_act_quant for _, m in quant_modules(model))
    phases = [("weight", has_weight and config.weight_iters > 0), ("act", has_act and config.act_iters > 0)]
    check_idx = split.held if len(split.held) else split.train
    check = CalibData(*data.select(check_idx))
    # The FP targets of a unit are the same in both phases: keep them for the second phase
    # while they fit in TARGET_CACHE_BYTES (one capture pass per unit saved).
    targets: dict[str, torch.Tensor] = {}
    eps_before = _eps_error(model, check, split.group[check_idx], len(split.timesteps), batch_size)
    done, total = 0, len(units) * sum(enabled for _, enabled in phases)
    try:
        for phase, enabled in phases:
            if not enabled:
                continue
            if phase == "act" and has_weight and config.weight_iters > 0:
                # The official code sets activation ranges only after weight reconstruction, on
                # the inputs the reconstructed weights produce; redo ours the same way.
                calibrate(model, data, batch_size=batch_size, seed=config.seed)
            for name, unit in units:
                report = _reconstruct_unit(
                    model, name, unit, data, split, config, phase, batch_size, generator, targets
                )
                done += 1
                if progress is not None:
                    progress(done, total)
                if report is None:
                    continue
                reports.append(report)
                log.info("%s %s: %.4g -> %.4g%s", phase, name, report.loss_before, report.loss_after,
                         " (reverted)" if report.reverted else "")  # fmt: skip
    finally:
        for p, flag in grad_state.items():
            p.requires_grad_(flag)
        set_quant_state(model, weight=True, act=True)
    undecided = [r for r in reports if r.undecided is not None and r.undecided > UNDECIDED_WARNING]
    if undecided:  # one line per model, not one per unit: the rows keep each unit's share
        worst = max(undecided, key=lambda r: r.undecided)
        log.warning(
            "%d of %d units hardened with more than %.0f%% of their roundings undecided (worst: %s, "
            "%.0f%%); raise weight_iters or weight_lr (weight_lr × weight_iters × (1 − warmup) should "
            "be well above 2.4)",
            len(undecided), sum(r.phase == "weight" for r in reports), 100 * UNDECIDED_WARNING,
            worst.unit, 100 * worst.undecided,
        )  # fmt: skip
    eps_after = _eps_error(model, check, split.group[check_idx], len(split.timesteps), batch_size)
    return ReconResult(tuple(reports), tuple(split.timesteps), tuple(eps_before), tuple(eps_after))


@torch.no_grad()
def _eps_error(
    model: nn.Module, data: CalibData, group: torch.Tensor, groups: int, batch_size: int
) -> list[float]:
    """Mean squared error of the quantized model's output against the FP model's (the same
    model with quantization off), per timestep group (``group`` of each input of ``data``)."""
    errors = []
    for batch in data.batches(batch_size):
        set_quant_state(model, weight=False, act=False)
        ref = as_tensor(run_model(model, batch))
        set_quant_state(model, weight=True, act=True)
        errors.append((as_tensor(run_model(model, batch)) - ref).pow(2).flatten(1).mean(1))
    means, _ = _group_means(torch.cat(errors).cpu(), group, groups)
    return means.tolist()


@torch.no_grad()
def _in_execution_order(model, units, data: CalibData):
    """Units sorted by when they first run (module order can differ, e.g. ``mid_block`` is
    registered after ``up_blocks``), so each unit sees inputs from already-finished units."""
    first_call: dict[str, int] = {}

    def seen(name: str):
        def hook(*_):  # a pre-hook that returns something would replace the unit's inputs
            first_call.setdefault(name, len(first_call))

        return hook

    with installed(unit.register_forward_pre_hook(seen(name)) for name, unit in units):
        run_model(model, data.select(torch.arange(1)))
    return sorted(units, key=lambda nu: first_call.get(nu[0], len(units)))


def _reconstruct_unit(model, name, unit, data, split, config, phase, batch_size, generator, targets):
    inner = [m for _, m in quant_modules(unit)]
    if phase == "weight":
        layers = [m for m in inner if isinstance(m, QuantLayer) and m.has_weight_quant]
        if not layers:
            return None
        set_quant_state(model, weight=True, act=False)
    else:
        quantizers = [q for m in inner for q in m.act_quantizers()]
        if not quantizers:
            return None
        set_quant_state(model, weight=True, act=True)
    inputs = capture(model, unit, data, batch_size, "inputs")
    target = targets.get(name)
    if target is None:
        set_quant_state(model, weight=False, act=False)
        target = capture(model, unit, data, batch_size, "outputs")
        held = sum(t.numel() * t.element_size() for t in targets.values())
        if held + target.numel() * target.element_size() <= TARGET_CACHE_BYTES:
            targets[name] = target

    undecided = None
    if phase == "weight":
        set_quant_state(model, weight=True, act=False)
        rounders = [r for layer in layers for r in layer.enable_adaround()]
        for r in rounders:
            r.reset()  # start, and judge the start, at round-to-nearest
        objective = _Objective(unit, inputs, target, split, config)
        before = objective.evaluate()
        for r in rounders:
            r.soften()
        warm = config.warmup * config.weight_iters

        def regulariser(it: int):
            if it < warm or config.round_weight == 0:
                return 0.0
            beta = _beta(config, it)
            return config.round_weight * sum(r.regularizer(beta) for r in rounders)

        params = [r.alpha for r in rounders]
        _optimise(objective, params, config.weight_iters, config.weight_lr, False, generator, regulariser)
        counts = [r.undecided() for r in rounders]
        undecided = sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts))
        for r in rounders:
            r.harden()
        after = objective.evaluate()
        revert = lambda: [r.reset() for r in rounders]  # noqa: E731
    else:
        set_quant_state(model, weight=True, act=True)
        objective = _Objective(unit, inputs, target, split, config)
        before = objective.evaluate()
        start = [q.scale.detach().clone() for q in quantizers]
        params = [q.learn_log_scale() for q in quantizers]
        _optimise(objective, params, config.act_iters, config.act_lr, True, generator)
        for q in quantizers:
            q.freeze_scale()
        after = objective.evaluate()
        revert = lambda: [q.freeze_scale(s) for q, s in zip(quantizers, start, strict=True)]  # noqa: E731
    if not math.isfinite(after):
        raise FloatingPointError(f"reconstruction of {name} ({phase}) diverged; lower the lr")
    # The guard: keep the result only if it does better on inputs it was not fitted to.
    reverted = config.holdout > 0 and after >= before
    if reverted:
        revert()
    return UnitReport(name, phase, before, after, reverted, undecided)
