"""Confidence intervals: the bootstrap over samples, and over runs (seeds) on top of it.

One run's metric is a statistic of its n images (Fréchet distance, PSNR). Its sampling noise
is estimated by the nonparametric bootstrap (Efron & Tibshirani 1993): the images are drawn n
at a time with replacement ``N_RESAMPLES`` times and the statistic recomputed. A quantized run
and its FP reference come from the same noise, image for image, so their difference is
bootstrapped *paired*: each resample takes the same image indices from both.

Intervals are the **standard (normal) bootstrap interval** (Efron & Tibshirani, ch. 13),
``θ̂ ± z(1−α/2) · se``, with ``se`` the replicates' standard deviation — the
``standard_error`` that ``scipy.stats.bootstrap`` reports (checked in the tests). Percentile
intervals are not used on purpose: a resample repeats images, which biases a Fréchet
distance's replicates upwards (at 1,000 images by about as much as their spread), so a
percentile interval would sit beside the estimate rather than around it, while the
replicates' *spread* is what varies between reruns with other noise.

A cell of the leaderboard averages several runs (sampling seeds × calibration seeds). Its
standard error adds the runs' spread and their sampling noise: ``se² = s²/k + mean(se_i²)/k``
for ``k`` runs with sample standard deviation ``s`` and bootstrap standard errors ``se_i``.
The run-to-run part is estimated from only ``k`` values (a reconstruction that lands on other
roundings with another calibration draw, or with another machine's float rounding), so the
interval is Student's t with Welch–Satterthwaite's degrees of freedom,
``(k − 1) · (se² / (s²/k))²``: ``t(k − 1)`` where the runs' spread dominates, the normal
interval where sampling noise does. A bootstrap over two or three runs would instead shrink
their spread by ``(k − 1)/k`` and read it with z, and a clean rerun on another CPU would fall
outside. The cell's replicates (a two-level bootstrap: runs drawn with replacement, then one
of each drawn run's replicates, from a fixed seed so that two cells of the same runs pair)
are scaled to that standard error, so intervals and ratios taken from them carry it. With
one run it is that run's interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.stats import t as student_t

N_RESAMPLES = 1000
LEVEL = 0.95
METHOD = "normal bootstrap"


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval and the bootstrap replicates behind it."""

    estimate: float
    low: float
    high: float
    replicates: np.ndarray

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def row(self, prefix: str = "") -> dict:
        """Row columns: ``<prefix>ci_low``, ``<prefix>ci_high`` and the replicates (rounded)."""
        return {
            f"{prefix}ci_low": float(self.low),
            f"{prefix}ci_high": float(self.high),
            f"{prefix}boot": [float(f"{v:.6g}") for v in self.replicates],
        }


def normal_interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """``estimate ± z · sd(replicates)``: the standard bootstrap interval."""
    se = float(np.std(np.asarray(replicates, dtype=np.float64), ddof=1))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return estimate - z * se, estimate + z * se


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n)`` indices drawn with replacement, from a fixed seed (so a run's
    interval is reproducible, and paired statistics share their draws)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Bootstrap ``statistic(indices)`` over ``n`` items: the estimate uses all items once."""
    reps = [statistic(idx) for idx in resample_indices(n, n_resamples, seed)]
    return from_replicates(statistic(np.arange(n)), reps, level)


def from_replicates(estimate: float, replicates, level: float = LEVEL) -> Interval:
    """The interval of ``estimate`` given its bootstrap replicates."""
    reps = np.asarray(replicates, dtype=np.float64)
    return Interval(float(estimate), *normal_interval(float(estimate), reps, level), reps)


def combine(
    estimates: Sequence[float],
    replicates: Sequence[Sequence[float]],
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """The mean of several runs' estimates, with the t interval of the module docstring and
    replicates scaled to it. ``replicates[i]`` are run i's bootstrap replicates."""
    if not estimates or len(estimates) != len(replicates):
        raise ValueError("combine() needs one replicate list per estimate")
    points = np.asarray(estimates, dtype=np.float64)
    # Each run's replicates as deviations from its estimate: the second level adds a run's own
    # sampling noise to the run drawn at the first level.
    deviations = [np.asarray(r, dtype=np.float64) - p for r, p in zip(replicates, points, strict=True)]
    estimate = float(points.mean())
    k = len(points)
    if k == 1:
        return from_replicates(estimate, points[0] + deviations[0], level)
    rng = np.random.default_rng(seed)
    b = min(len(d) for d in deviations)
    runs = rng.integers(0, k, size=(b, k))
    picks = rng.integers(0, b, size=(b, k))
    table = np.stack([d[:b] for d in deviations])  # (k, b); replicate i takes k (run, pick) pairs
    reps = (points[runs] + table[runs, picks]).mean(axis=1)
    between = float(np.var(points, ddof=1)) / k
    within = float(np.mean([np.var(d, ddof=1) for d in deviations])) / k
    se = math.sqrt(between + within)
    spread = float(np.std(reps, ddof=1))
    if se == 0 or spread == 0:
        return from_replicates(estimate, reps, level)
    df = math.inf if between == 0 else (k - 1) * ((between + within) / between) ** 2
    half = float(student_t.ppf(0.5 + level / 2, df)) * se
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return from_replicates(estimate, estimate + (reps - reps.mean()) * (half / z / spread), level)


def tie_ranks(intervals: Sequence[tuple[float, float, float]], higher_is_better: bool) -> list[int]:
    """Ranks that tie where confidence intervals overlap: an entry's rank is 1 + the number of
    entries whose interval lies entirely on the better side of its own.

    Args:
        intervals: ``(estimate, low, high)`` per entry.
    """
    ranks = []
    for _, low, high in intervals:
        if higher_is_better:
            better = sum(o_low > high for _, o_low, _ in intervals)
        else:
            better = sum(o_high < low for _, _, o_high in intervals)
        ranks.append(1 + better)
    return ranks


def holm(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure (Holm 1979): which hypotheses to reject so that the chance of
    rejecting any true one is at most ``alpha`` whatever their dependence. The i-th smallest p
    (from 0) is rejected while it is <= ``alpha / (m - i)``; the first that is not stops it."""
    m = len(p_values)
    rejected = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda k: p_values[k])):
        if p_values[i] > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected
