"""Frechet distance, precision / recall (k-NN manifolds), and the 2-D toy metrics."""
from __future__ import annotations

import numpy as np
import torch


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2``.

    Computed from eigenvalues of symmetric PSD matrices in float64 (negative round-off clipped),
    so constant features (dead units: zero rows and columns in a covariance) cannot make the
    matrix square root unstable or complex, unlike ``scipy.linalg.sqrtm(S1 @ S2)``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _kth_nn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: precision = share of fakes inside the real k-NN manifold,
    recall = share of reals inside the fake k-NN manifold."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    rr, rf = _kth_nn_radius(r, k), _kth_nn_radius(f, k)
    d = torch.cdist(f, r)  # (F, R)
    precision = (d <= rr[None]).any(1).double().mean().item()
    recall = (d.T <= rf[None]).any(1).double().mean().item()
    return precision, recall


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: mean over random directions of W2 between 1-D projections
    (quantiles matched on a common grid, so the two sets may differ in size)."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    q = torch.linspace(0, 1, min(len(x), len(y)), dtype=torch.float64)
    px = torch.quantile((x @ theta), q, dim=0)
    py = torch.quantile((y @ theta), q, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mode_coverage(points: np.ndarray, centres: np.ndarray, radius: float, min_share: float = 0.01,
                  chebyshev: bool = False) -> dict:
    """Modes hit by at least ``min_share`` of the points, and the share of points near any mode."""
    p = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    c = torch.as_tensor(np.asarray(centres), dtype=torch.float64)
    d = (p[:, None] - c[None]).abs().amax(-1) if chebyshev else torch.cdist(p, c)
    near, idx = d.min(1)
    ok = near <= radius
    counts = torch.bincount(idx[ok], minlength=len(c)).double()
    return {"modes_covered": int((counts >= min_share * len(p)).sum()), "num_modes": len(c),
            "share_on_modes": float(ok.double().mean())}
