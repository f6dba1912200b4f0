"""Confidence intervals (bench.stats) against scipy, and the paired, multi-run and rank rules."""

import numpy as np
import pytest
from scipy import stats as sps

from bench import stats
from bench.metrics.quality import with_intervals


def test_bootstrap_standard_error_and_interval_match_scipy():
    data = np.random.default_rng(0).gamma(2.0, 3.0, size=300)  # skewed, like a distance
    ours = stats.bootstrap(lambda idx: data[idx].mean(), len(data), n_resamples=4000)
    ref = sps.bootstrap((data,), np.mean, n_resamples=4000, method="basic", random_state=1)
    assert ours.estimate == pytest.approx(data.mean())
    # The same standard error up to Monte Carlo noise (~2 % at 4,000 resamples).
    assert np.std(ours.replicates, ddof=1) == pytest.approx(ref.standard_error, rel=0.05)
    z = sps.norm.ppf(0.975)
    assert (ours.low, ours.high) == pytest.approx(
        (data.mean() - z * np.std(ours.replicates, ddof=1), data.mean() + z * np.std(ours.replicates, ddof=1))
    )
    # For a mean the normal interval and scipy's basic interval nearly coincide.
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.05 * (ours.high - ours.low))
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.05 * (ours.high - ours.low))


def test_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        data = rng.normal(5.0, 2.0, size=60)
        ci = stats.bootstrap(
            lambda idx, d=data: d[idx].mean(), len(data), n_resamples=400, seed=int(rng.integers(1e9))
        )
        hits += ci.contains(5.0)
    assert 0.88 <= hits / 200 <= 0.99  # 95 % nominal; Monte Carlo and small-n slack


def test_paired_difference_removes_the_shared_noise():
    rng = np.random.default_rng(2)
    fp = rng.normal(0.0, 10.0, size=500)  # large sample-to-sample spread...
    quant = fp + 1.0 + rng.normal(0.0, 0.1, size=500)  # ...that the quantized run shares

    def mean(idx, fp_idx):
        return quant[idx].mean() if idx is not None else fp[fp_idx].mean()

    m = with_intervals(mean, 500, paired=True)
    assert m.extra["delta"] == pytest.approx(1.0, abs=0.02)
    paired_width = m.extra["delta_ci_high"] - m.extra["delta_ci_low"]
    unpaired_width = m.extra["ci_high"] - m.extra["ci_low"]
    assert paired_width < unpaired_width / 50
    assert len(m.extra["boot"]) == len(m.extra["delta_boot"]) == stats.N_RESAMPLES


def test_combining_runs_adds_run_to_run_spread():
    rng = np.random.default_rng(3)
    one = stats.combine([10.0], [list(10.0 + rng.normal(0, 1, 1000))])
    assert one.estimate == 10.0 and one.half_width == pytest.approx(1.96, rel=0.1)
    alike = stats.combine([10.0, 10.0], [list(10.0 + rng.normal(0, 1, 1000)) for _ in range(2)])
    apart = stats.combine([5.0, 15.0], [list(v + rng.normal(0, 1, 1000)) for v in (5.0, 15.0)])
    assert alike.half_width < one.half_width  # two runs' sampling noise averages down
    assert apart.estimate == 10.0 and apart.half_width > 3 * one.half_width  # luck shows
    with pytest.raises(ValueError, match="one replicate list per estimate"):
        stats.combine([1.0, 2.0], [[1.0]])


def test_a_cell_of_few_runs_reads_their_spread_with_students_t():
    """Three calibration seeds whose results differ far more than their sampling noise: the
    interval is the t interval of their mean on 2 degrees of freedom (a bootstrap over the runs
    would be about a third as wide), and the replicates carry that width."""
    from scipy.stats import t

    rng = np.random.default_rng(4)
    points = [0.0160, 0.0166, 0.0172]
    ci = stats.combine(points, [list(v + rng.normal(0, 1e-6, 1000)) for v in points])
    expected = t.ppf(0.975, 2) * np.std(points, ddof=1) / np.sqrt(3)
    assert ci.half_width == pytest.approx(expected, rel=0.01)
    assert np.std(ci.replicates, ddof=1) * 1.96 == pytest.approx(expected, rel=0.01)
    # Sampling noise that dwarfs the runs' spread: the normal interval of the mean's noise.
    noisy = stats.combine(points, [list(v + rng.normal(0, 0.01, 1000)) for v in points])
    assert noisy.half_width == pytest.approx(1.96 * 0.01 / np.sqrt(3), rel=0.1)


def test_tie_ranks_where_intervals_overlap():
    # (estimate, low, high); lower is better
    cells = [(1.0, 0.0, 2.0), (1.5, 0.5, 2.5), (10.0, 9.0, 11.0), (3.0, 2.2, 3.8)]
    assert stats.tie_ranks(cells, higher_is_better=False) == [1, 1, 4, 2]
    assert stats.tie_ranks(cells, higher_is_better=True) == [3, 2, 1, 2]
