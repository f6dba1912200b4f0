"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017, Eq. 6).

    d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)

The cross term uses the symmetric form: Tr((Σ₁Σ₂)^½) = Tr((Σ₁^½ Σ₂ Σ₁^½)^½), whose argument is
symmetric positive semi-definite, so both square roots are eigendecompositions of symmetric
matrices (``eigh``) with tiny negative eigenvalues from round-off clipped to zero. Unlike
``scipy.linalg.sqrtm`` on the non-symmetric product, this never returns complex parts or
needs an ε on the diagonal for singular covariances (n < d).
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of an (n, d) feature array, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need an (n >= 2, d) feature array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def sqrt_psd(m: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (round-off negatives: 0)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, root2: np.ndarray | None = None
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``root2``: :func:`sqrt_psd` of ``sigma2``, when a fixed reference is compared with many
    sets (a bootstrap's resamples): computed once by the caller instead of a root per call. The
    cross term is symmetric in the two covariances (Σ₁Σ₂ and Σ₂Σ₁ share their eigenvalues), so
    either root gives it.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    if root2 is None:
        root, other = sqrt_psd(sigma1), sigma2
    else:
        root, other = np.asarray(root2, np.float64), sigma1
    cross = np.linalg.eigvalsh(root @ other @ root)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_cross)
    return max(distance, 0.0)  # round-off makes identical sets' distance slightly negative
