"""Run PTQ methods × bit widths on the embedded model against its FP reference, paired by seed.

Every quantized model samples from exactly the same initial noise (same seed, same DDIM
sampler) as the FP model, so differences in the metric come from quantization alone.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

import qdiff
from bench.cache import cached_tensors
from bench.images import save_grid
from bench.methods import Bits
from bench.models.embedded import EmbeddedDigits, SamplerConfig
from bench.provenance import config_hash, environment, model_hash
from bench.registry import METHODS

Log = Callable[[str], None]
GRID_SAMPLES = 64  # first images of each run saved as a PNG grid (same seeds across runs)


@dataclass(frozen=True)
class Budget:
    """Calibration size and reconstruction schedule, applied to every method's recipe so that
    methods are compared at equal cost (the paper's 20 × 256 inputs and 20k iterations per
    unit do not fit a CPU minute budget).

    Args:
        calib_timesteps / calib_samples: K timesteps × N trajectories of calibration inputs.
        weight_iters / act_iters: optimisation steps per unit, for methods that reconstruct.
        weight_lr: AdaRound learning rate; 10× the paper's to make up for ~30× fewer steps.
    """

    calib_timesteps: int = 10
    calib_samples: int = 64
    weight_iters: int = 600
    act_iters: int = 100
    weight_lr: float = 1e-2

    def apply(self, qconfig: qdiff.QConfig) -> qdiff.QConfig:
        calib = replace(
            qconfig.calib, num_timesteps=self.calib_timesteps, samples_per_timestep=self.calib_samples
        )
        recon = qconfig.recon
        if recon.method != "none":
            recon = replace(
                recon, weight_iters=self.weight_iters, act_iters=self.act_iters, weight_lr=self.weight_lr
            )
        return replace(qconfig, calib=calib, recon=recon)


@dataclass(frozen=True)
class ExperimentConfig:
    """One matrix on the embedded model.

    Args:
        name: results subfolder and ``matrix`` column.
        methods: registered method names (see ``qdiff-bench ls``).
        bits: labels ``W<w>A<a>``; 32 means full precision for that kind.
        n_samples: images per model for the metric (also the real-floor sample count).
        seed: seed of the evaluation noise, shared by FP and every quantized model.
        sampler: DDIM steps and batch size.
        budget: calibration size and reconstruction schedule for every method.
    """

    name: str = "embedded-default"
    methods: tuple[str, ...] = ("linear", "qdiff")
    bits: tuple[str, ...] = ("W8A8", "W4A8", "W4A32")
    n_samples: int = 500
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    budget: Budget = field(default_factory=Budget)

    def validate(self) -> tuple[list, list[Bits]]:
        """Resolve names now, so a typo fails before minutes of work."""
        methods = [METHODS.get(m) for m in self.methods]
        bits = [Bits.parse(b) for b in self.bits]
        if not 2 <= self.n_samples <= 899:
            raise ValueError(
                f"n_samples={self.n_samples} must be in 2–899 (the real-data floor uses "
                "the 899 held-apart digits)"
            )
        return methods, bits


def _row(base: dict, metric: str, value: float | None, unit: str, higher: bool, **extra) -> dict:
    return {**base, "metric": metric, "value": value, "unit": unit, "higher_is_better": higher, **extra}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append JSON lines in one write, flushed to disk (a killed run leaves whole lines only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def run_experiment(config: ExperimentConfig, results_dir: Path, log: Log = print) -> list[dict]:
    """Run FP and every method × bit width; append rows to ``results_dir/<name>/rows.jsonl``.

    A failing run becomes an ``error`` row with its message, and the others go on.
    """
    methods, bit_list = config.validate()
    device = torch.device("cpu")
    adapter = EmbeddedDigits(config.sampler)
    fp = adapter.denoiser().to(device)
    fp_hash = model_hash(fp)
    env = environment(device)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    common = {
        "run_id": run_id,
        "matrix": config.name,
        "model": adapter.name,
        "seed": config.seed,
        "n_samples": config.n_samples,
        "sampler": f"ddim-{config.sampler.steps}",
        **env,
    }
    out = results_dir / config.name / "rows.jsonl"
    rows: list[dict] = []

    def finish(new: list[dict]) -> None:
        append_rows(out, new)
        rows.extend(new)

    def reference_row(method: str, key: str, started: str, t0: float, value: float, **extra) -> dict:
        """A row for the real-data floor or the FP model (no bit widths, nothing quantized)."""
        fields = {
            "method": method,
            "w_bits": None,
            "a_bits": None,
            "status": "ok",
            "error": None,
            "config_hash": key,
            "started_at": started,
            "duration_s": round(time.time() - t0, 2),
        }
        return _row({**common, **fields}, adapter.metric, value, adapter.metric_unit, False, **extra)

    started, start = datetime.now(UTC).isoformat(), time.time()
    floor, floor_sd = adapter.real_floor(config.n_samples)
    key = config_hash("floor", config.n_samples)
    finish([reference_row("real-data", key, started, start, floor, sd=floor_sd)])
    log(f"real-vs-real floor at n={config.n_samples}: {floor:.2f} ± {floor_sd:.2f}")

    started, start = datetime.now(UTC).isoformat(), time.time()
    key = config_hash("fp-samples", fp_hash, config.sampler, config.n_samples, config.seed)
    fp_images, hit = cached_tensors(
        "samples", key, lambda: {"images": adapter.sample(fp, config.n_samples, config.seed)}
    )
    fp_fd = adapter.frechet(fp_images["images"])
    grids = results_dir / config.name / "samples"
    save_grid(fp_images["images"][:GRID_SAMPLES], grids / "fp.png")
    finish([reference_row("fp", key, started, start, fp_fd, cached=hit)])
    log(f"fp: {adapter.metric}={fp_fd:.2f} ({'cached' if hit else f'{time.time() - start:.0f}s'})")

    calib_cache: dict[str, qdiff.CalibData] = {}
    weight_phase: dict[str, tuple[str, torch.nn.Module]] = {}
    for method in methods:
        for bits in bit_list:
            started, t0 = datetime.now(UTC).isoformat(), time.time()
            base = {
                **common,
                "method": method.name,
                "w_bits": bits.w,
                "a_bits": bits.a,
                "started_at": started,
            }
            try:
                qconfig = config.budget.apply(method.qconfig(bits))
                base["config_hash"] = config_hash(
                    fp_hash, qconfig, config.sampler, config.n_samples, config.seed
                )
                base["qconfig"] = qconfig.to_dict()  # the full recipe, so the row can be rerun
                calib = _calibration(adapter, fp, fp_hash, qconfig.calib, calib_cache)
                t_quant = time.time()
                weights_key = _weight_phase_key(fp_hash, qconfig)
                if qconfig.act is None and weights_key in weight_phase:
                    # Q-Diffusion reconstructs weights with activations in FP, so a WxA32 model
                    # is the WxAy model with activation quantization off: same AdaRound result.
                    source, qmodel = weight_phase[weights_key]
                    qmodel = copy.deepcopy(qmodel)
                    qdiff.set_quant_state(qmodel, weight=True, act=False)
                    base["weights_from"] = source
                else:
                    qmodel = method.quantize(fp, qconfig, calib)
                    if weights_key is not None:
                        weight_phase[weights_key] = (bits.label, qmodel)
                quant_s = time.time() - t_quant
                qmodel = qdiff.convert(qmodel, backend="fake")
                images = adapter.sample(qmodel, config.n_samples, config.seed)
                save_grid(images[:GRID_SAMPLES], grids / f"{method.name}-{bits.label}.png")
                fd = adapter.frechet(images)
                duration = round(time.time() - t0, 2)
                finish(
                    [
                        _row(
                            {**base, "status": "ok", "error": None, "duration_s": duration},
                            adapter.metric,
                            fd,
                            adapter.metric_unit,
                            False,
                            delta_vs_fp=fd - fp_fd,
                        ),
                        _row(
                            {**base, "status": "ok", "error": None, "duration_s": duration},
                            "quantize_time",
                            round(quant_s, 2),
                            "s",
                            False,
                        ),
                    ]
                )
                log(
                    f"{method.name} {bits.label}: {adapter.metric}={fd:.2f} (Δ {fd - fp_fd:+.2f}; "
                    f"quantize {quant_s:.0f}s, total {duration:.0f}s)"
                )
            except Exception as exc:  # one failed cell must not stop the matrix
                message = f"{type(exc).__name__}: {exc}"
                finish(
                    [
                        _row(
                            {
                                **base,
                                "config_hash": base.get("config_hash"),
                                "status": "error",
                                "error": message,
                                "duration_s": round(time.time() - t0, 2),
                            },
                            adapter.metric,
                            None,
                            adapter.metric_unit,
                            False,
                        )
                    ]
                )
                log(f"{method.name} {bits.label}: ERROR {message}")
                log(traceback.format_exc(limit=3))
    return rows


def _weight_phase_key(fp_hash: str, qconfig: qdiff.QConfig) -> str | None:
    """Identifies models whose weight quantization is identical whatever their activations."""
    if qconfig.weight is None:
        return None
    return config_hash("weights", fp_hash, replace(qconfig, act=None, attn_probs=None))


def _calibration(adapter, fp, fp_hash: str, calib: qdiff.CalibConfig, memo: dict) -> qdiff.CalibData:
    key = config_hash("calib", fp_hash, adapter.sampler, calib)
    if key not in memo:
        tensors, _ = cached_tensors("calibration", key, lambda: adapter.calibration_data(fp, calib).to_dict())
        memo[key] = qdiff.CalibData.from_dict(tensors)
    return memo[key]


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per method, one column per bit width, value (Δ vs FP)."""
    metric_rows = [r for r in rows if r["metric"] == "digits_fd"]
    floor = next(r for r in metric_rows if r["method"] == "real-data")
    fp = next(r for r in metric_rows if r["method"] == "fp")
    quant = [r for r in metric_rows if r["method"] not in ("real-data", "fp")]
    labels = list(dict.fromkeys(Bits(r["w_bits"], r["a_bits"]).label for r in quant))
    methods = list(dict.fromkeys(r["method"] for r in quant))
    header = (
        f"Digits Fréchet distance (lower is better) — {fp['n_samples']} samples, seed {fp['seed']}, "
        f"{fp['sampler']}, {fp['device']}\n\n"
    )
    lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines.append(f"| real data (floor) | {floor['value']:.2f} ± {floor['sd']:.2f}" + " |" * len(labels))
    lines.append(f"| fp | {fp['value']:.2f}" + " |" * len(labels))
    for m in methods:
        cells = []
        for label in labels:
            r = next(
                (r for r in quant if r["method"] == m and Bits(r["w_bits"], r["a_bits"]).label == label), None
            )
            if r is None:
                cells.append("—")
            elif r["status"] != "ok":
                cells.append(f"error: {r['error'][:60]}")
            else:
                cells.append(f"{r['value']:.2f} ({r['value'] - fp['value']:+.2f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines)
