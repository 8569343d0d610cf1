import numpy as np
import pytest
import scipy.linalg

from common.metrics.fd import (feature_stats, frechet_distance, mode_coverage, precision_recall,
                               sliced_wasserstein)


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_matches_the_textbook_formula_on_full_rank_stats():
    rng = np.random.RandomState(0)
    a, b = rng.randn(500, 16), rng.randn(400, 16) @ rng.randn(16, 16) * 0.3 + 0.5
    fd = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert fd == pytest.approx(_scipy_fd(*feature_stats(a), *feature_stats(b)), rel=1e-8)
    assert frechet_distance(*feature_stats(a), *feature_stats(a)) == pytest.approx(0, abs=1e-9)
    assert fd == pytest.approx(frechet_distance(*feature_stats(b), *feature_stats(a)), rel=1e-8)


def test_fd_gaussians_closed_form():
    # N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2)
    d, m = 8, np.full(8, 0.5)
    assert frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(d * 0.25 + d, rel=1e-12)


def test_fd_is_stable_with_dead_units():
    """Constant (dead) features give zero rows/columns; the FD must equal the FD without them."""
    rng = np.random.RandomState(1)
    a, b = np.abs(rng.randn(300, 20)), np.abs(rng.randn(300, 20)) * 1.2
    a[:, :5] = 0.0  # dead ReLU units in both sets
    b[:, :5] = 0.0
    a[:, 5] = 3.0  # a constant unit
    b[:, 5] = 3.0
    full = frechet_distance(*feature_stats(a), *feature_stats(b))
    live = frechet_distance(*feature_stats(a[:, 6:]), *feature_stats(b[:, 6:]))
    assert np.isfinite(full) and full == pytest.approx(live, rel=1e-9, abs=1e-9)
    # and rank-deficient sets (fewer samples than dims) stay finite and non-negative
    small = frechet_distance(*feature_stats(a[:10]), *feature_stats(b[:10]))
    assert np.isfinite(small) and small >= 0


def test_fd_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_precision_recall_extremes():
    rng = np.random.RandomState(2)
    r = rng.randn(300, 4)
    p, rc = precision_recall(r, r.copy())
    assert p == 1.0 and rc == 1.0
    p, rc = precision_recall(r, r + 100.0)
    assert p == 0.0 and rc == 0.0
    # a fake set collapsed onto one mode of two: high precision, low recall
    two = np.concatenate([rng.randn(200, 2) * 0.1, rng.randn(200, 2) * 0.1 + 5])
    one = rng.randn(200, 2) * 0.1
    p, rc = precision_recall(two, one)
    assert p > 0.9 and rc < 0.6


def test_sliced_wasserstein_and_mode_coverage():
    rng = np.random.RandomState(3)
    a = rng.randn(2000, 2)
    assert sliced_wasserstein(a, rng.randn(2000, 2)) < 0.1
    assert sliced_wasserstein(a, a + [1.0, 0.0]) == pytest.approx(np.sqrt(0.5), rel=0.1)  # E|cos| shift
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    pts = np.concatenate([rng.randn(100, 2) * 0.05, rng.randn(100, 2) * 0.05 + [5, 0], rng.randn(5, 2) * 0.05 + [0, 5],
                          np.full((10, 2), 2.5)])
    cov = mode_coverage(pts, centres, radius=0.3, min_share=0.05)
    assert cov["modes_covered"] == 2 and cov["num_modes"] == 3
    assert cov["share_on_modes"] == pytest.approx(205 / 215)
