"""BRECQ-style reconstruction (Li et al., ICLR 2021), as Q-Diffusion applies it (paper Sec. 4, Alg. 1).

The model is cut into units — ResNet blocks, attention/transformer blocks and up/down samplers,
with every layer outside them on its own — and the units are reconstructed in model order.
For each unit the inputs come from the *quantized* model (so earlier units' errors are seen and
compensated) and the targets are the FP model's outputs of that unit; the loss is the output
squared error summed over channels (BRECQ's ``lp_loss(p=2)``).

Phase 1, weights: AdaRound logits of every weight in the unit, activations in FP, with the
annealed rounding regulariser (BRECQ Eq. 9 / AdaRound Eq. 25); the rounding is then hardened.
Phase 2, activations: activation grids are re-calibrated on the reconstructed weights, then the
LSQ step sizes of every activation quantizer in the unit are learned, with weights at their
hardened rounding and all quantizers on.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qdiff.calibration import CalibData, calibrate, run_model
from qdiff.config import ReconConfig
from qdiff.modules import QuantLayer, QuantModule
from qdiff.prepare import set_quant_state

log = logging.getLogger(__name__)

# diffusers building blocks reconstructed as a whole.
DEFAULT_BLOCK_TYPES = (
    "ResnetBlock2D",
    "Attention",
    "BasicTransformerBlock",
    "Downsample2D",
    "Upsample2D",
)


@dataclass(frozen=True)
class UnitReport:
    """Output error of one unit on a fixed evaluation batch, before and after optimisation."""

    unit: str
    phase: str
    loss_before: float
    loss_after: float


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


class _Stop(Exception):
    """Raised by a capture hook once the unit has run: the rest of the forward is not needed."""


class _Captured:
    """A unit's call arguments over all calibration batches, indexable along the batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.batch_sizes: list[int] = []

    def add(self, args: tuple, kwargs: dict, batch_size: int) -> None:
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.calls.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))
        self.batch_sizes.append(batch_size)

    def merge(self) -> None:
        """Concatenate batched tensors; anything else must be the same in every batch."""

        def merge_one(values: list):
            first = values[0]
            batched = all(
                isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n
                for v, n in zip(values, self.batch_sizes, strict=True)
            )
            if batched:
                return ("batched", torch.cat(values))
            return ("static", first)

        args0, kwargs0 = self.calls[0]
        self.args = [merge_one([c[0][i] for c in self.calls]) for i in range(len(args0))]
        self.kwargs = {k: merge_one([c[1][k] for c in self.calls]) for k in kwargs0}
        self.calls = []

    def get(self, index: torch.Tensor) -> tuple[list, dict]:
        pick = lambda kv: kv[1][index] if kv[0] == "batched" else kv[1]  # noqa: E731
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


@torch.no_grad()
def _capture(model: nn.Module, unit: nn.Module, data: CalibData, batch_size: int, what: str):
    """Run the model on the calibration data and keep the unit's inputs or outputs."""
    store = _Captured()
    outputs: list[torch.Tensor] = []
    current = {"n": 0}

    def pre_hook(_mod, args, kwargs):
        store.add(args, kwargs, current["n"])
        raise _Stop

    def hook(_mod, _args, _kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        outputs.append(out.detach())
        raise _Stop

    handle = (
        unit.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if what == "inputs"
        else unit.register_forward_hook(hook, with_kwargs=True)
    )
    try:
        for batch in data.batches(batch_size):
            current["n"] = len(batch[0])
            with contextlib.suppress(_Stop):
                run_model(model, batch)
    finally:
        handle.remove()
    if what == "inputs":
        store.merge()
        return store
    return torch.cat(outputs)


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).sum(1).mean()


def _beta(cfg: ReconConfig, it: int) -> float:
    """AdaRound's exponent, annealed linearly from beta_start to beta_end after warm-up."""
    start = cfg.warmup * cfg.weight_iters
    progress = max(0.0, (it - start) / max(1.0, cfg.weight_iters - start))
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress)


def _eval(unit: nn.Module, inputs: _Captured, target: torch.Tensor, cfg: ReconConfig) -> float:
    """Output error on a fixed evaluation batch (the first 4 minibatches' worth of inputs)."""
    idx = torch.arange(min(len(target), 4 * cfg.batch_size), device=target.device)
    with torch.no_grad():
        args, kwargs = inputs.get(idx)
        return _rec_loss(_as_tensor(unit(*args, **kwargs)), target[idx]).item()


def _optimise(
    unit: nn.Module,
    inputs: _Captured,
    target: torch.Tensor,
    params: list[nn.Parameter],
    iters: int,
    lr: float,
    cfg: ReconConfig,
    generator: torch.Generator,
    extra_loss: Callable[[int], torch.Tensor | float] = lambda it: 0.0,
) -> None:
    n = len(target)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters), eta_min=0.0)
    for it in range(iters):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator).to(target.device)
        args, kwargs = inputs.get(idx)
        loss = _rec_loss(_as_tensor(unit(*args, **kwargs)), target[idx]) + extra_loss(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for p in params:
        p.requires_grad_(False)


def _as_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def reconstruct(
    model: nn.Module,
    data: CalibData,
    config: ReconConfig,
    batch_size: int = 64,
    block_types: tuple[str, ...] = DEFAULT_BLOCK_TYPES,
    progress: Callable[[str], None] | None = None,
) -> list[UnitReport]:
    """Reconstruct a prepared, calibrated model unit by unit (see module docstring).

    Args:
        model: output of :func:`qdiff.prepare` followed by :func:`qdiff.calibrate`.
        data: calibration inputs (the same ones used to calibrate).
        config: iterations, learning rates, batch size and regulariser.
        batch_size: batch size of the full-model passes that capture unit inputs/outputs.
        block_types: class names reconstructed as one block.
        progress: called with a short message after each unit.

    Returns:
        One report per unit and phase, with the unit's output error before and after.
    """
    if config.method == "none":
        return []
    generator = torch.Generator().manual_seed(config.seed)
    grad_state = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    units = _in_execution_order(model, find_units(model, config.granularity, block_types), data)
    reports: list[UnitReport] = []
    has_weight = any(m.has_weight_quant for _, m in _quant_in(model))
    has_act = any(m.has_act_quant for _, m in _quant_in(model))
    phases = [("weight", has_weight and config.weight_iters > 0), ("act", has_act and config.act_iters > 0)]
    try:
        for phase, enabled in phases:
            if not enabled:
                continue
            if phase == "act" and has_weight and config.weight_iters > 0:
                # The official code sets activation ranges only after weight reconstruction, on
                # the inputs the reconstructed weights produce; redo ours the same way.
                calibrate(model, data, batch_size=batch_size, seed=config.seed)
            for name, unit in units:
                report = _reconstruct_unit(model, name, unit, data, config, phase, batch_size, generator)
                if report is not None:
                    reports.append(report)
                    log.info("%s %s: %.4g -> %.4g", phase, name, report.loss_before, report.loss_after)
                    if progress is not None:
                        progress(f"{phase} {name}")
    finally:
        for p, flag in grad_state.items():
            p.requires_grad_(flag)
        set_quant_state(model, weight=True, act=True)
    return reports


@torch.no_grad()
def _in_execution_order(model, units, data: CalibData):
    """Units sorted by when they first run (module order can differ, e.g. ``mid_block`` is
    registered after ``up_blocks``), so each unit sees inputs from already-finished units."""
    first_call: dict[str, int] = {}

    def seen(name: str):
        def hook(*_):  # a pre-hook that returns something would replace the unit's inputs
            first_call.setdefault(name, len(first_call))

        return hook

    hooks = [unit.register_forward_pre_hook(seen(name)) for name, unit in units]
    try:
        run_model(model, data.select(torch.arange(1)))
    finally:
        for h in hooks:
            h.remove()
    return sorted(units, key=lambda nu: first_call.get(nu[0], len(units)))


def _quant_in(module: nn.Module) -> list[tuple[str, QuantModule]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantModule)]


def _reconstruct_unit(model, name, unit, data, config, phase, batch_size, generator):
    inner = [m for _, m in _quant_in(unit)]
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
    inputs = _capture(model, unit, data, batch_size, "inputs")
    set_quant_state(model, weight=False, act=False)
    target = _capture(model, unit, data, batch_size, "outputs")

    if phase == "weight":
        set_quant_state(model, weight=True, act=False)
        before = _eval(unit, inputs, target, config)  # round-to-nearest
        rounders = [r for layer in layers for r in layer.enable_adaround()]
        warm = config.warmup * config.weight_iters

        def regulariser(it: int):
            if it < warm or config.round_weight == 0:
                return 0.0
            beta = _beta(config, it)
            return config.round_weight * sum(r.regularizer(beta) for r in rounders)

        _optimise(
            unit,
            inputs,
            target,
            [r.alpha for r in rounders],
            config.weight_iters,
            config.weight_lr,
            config,
            generator,
            regulariser,
        )
        for r in rounders:
            r.harden()
    else:
        set_quant_state(model, weight=True, act=True)
        before = _eval(unit, inputs, target, config)
        _optimise(
            unit,
            inputs,
            target,
            [q.scale for q in quantizers],
            config.act_iters,
            config.act_lr,
            config,
            generator,
        )
        with torch.no_grad():
            for q in quantizers:
                q.scale.abs_().clamp_(min=torch.finfo(torch.float32).tiny * 1e6)
    after = _eval(unit, inputs, target, config)
    if not math.isfinite(after):
        raise FloatingPointError(f"reconstruction of {name} ({phase}) diverged; lower the lr")
    return UnitReport(name, phase, before, after)
