import numpy as np
import pytest
from scipy import linalg

from bench.frechet import feature_stats, frechet_distance, sqrt_psd


def scipy_reference(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root."""
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("dim", [2, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_reference(dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(loc=0.3, size=(4 * dim, dim)) @ rng.normal(size=(dim, dim))
    ours = frechet_distance(*feature_stats(a), *feature_stats(b))
    ref = scipy_reference(*feature_stats(a), *feature_stats(b))
    assert ours == pytest.approx(ref, rel=1e-6)
    # The fixed reference's root computed once (a bootstrap's shortcut) gives the same distance,
    # also for a singular set (fewer samples than dimensions).
    assert frechet_distance(*feature_stats(a), *feature_stats(b), root2=sqrt_psd(feature_stats(b)[1])) == (
        pytest.approx(ref, rel=1e-6)
    )
    few = feature_stats(a[: dim // 2 + 2])
    assert frechet_distance(*few, *feature_stats(b), root2=sqrt_psd(feature_stats(b)[1])) == pytest.approx(
        frechet_distance(*few, *feature_stats(b)), rel=1e-6
    )


def test_identical_sets_give_zero_and_shift_gives_squared_norm():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8))
    mu, sigma = feature_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    shift = np.full(8, 0.5)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)


def test_singular_covariance_stays_real_and_non_negative():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))  # n < d: rank-deficient
    d = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(d) and d >= 0


def test_a_set_against_itself_is_zero_never_a_negative_round_off():
    # Large features of a few samples (n < d): the trace terms cancel only up to round-off,
    # which came out negative for every one of these sets before the distance was clamped.
    for seed in range(5):
        f = np.random.default_rng(seed).normal(size=(40, 64)) * 1e3
        assert frechet_distance(*feature_stats(f), *feature_stats(f)) == 0.0


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
