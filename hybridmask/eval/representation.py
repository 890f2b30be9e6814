"""Metrics of representation-learning defenses (ARL, Xiao et al. AAAI 2020) besides the image and
face metrics (SSIM, PSNR and face similarity are the library's one set, in :mod:`hybridmask.attacks.metrics`).

Utility
    * :func:`mcc_per_attribute` / :func:`mean_mcc` - Matthews correlation coefficient of each binary
      attribute, averaged over attributes. An attribute whose confusion matrix has an empty row or
      column (constant prediction or constant ground truth) has an undefined MCC; it counts as 0
      (scikit-learn's convention), or is left out of the mean with ``constant="skip"``.

Privacy of the released features ``z``
    * :func:`lda_score` - between-class / within-class scatter of ``z`` over identities (trace ratio,
      exact formula in the docstring).
    * :func:`feature_similarity` - the score of the feature-level attack: mean cosine between the
      attacker's prediction ``M(z)`` and the perceptual features ``g(x)`` of the victims.
    * :func:`tsne` / :func:`plot_tsne` - a small exact t-SNE (numpy, O(N^2), meant for a few hundred
      points; scikit-learn is not a dependency) and a two-panel plot coloured by two attributes.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import HybridMaskInputError, atomic_write

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _np(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object:
        raise HybridMaskInputError(f"{name} must be numeric, got objects")
    return a


# ---- Matthews correlation --------------------------------------------------------------------
def _binary(a: np.ndarray, name: str) -> np.ndarray:
    """{0,1}, {-1,1} or bool -> bool."""
    if a.dtype == bool:
        return a
    if not np.all(np.isfinite(a)):
        raise HybridMaskInputError(f"{name} contains NaN or infinite values")
    vals = np.unique(a)
    if not (set(vals.tolist()) <= {0, 1} or set(vals.tolist()) <= {-1, 1}):
        raise HybridMaskInputError(f"{name} must be binary (0/1, -1/1 or bool), got values {vals[:6].tolist()}")
    return a > 0


def mcc_per_attribute(pred: ArrayLike, target: ArrayLike) -> np.ndarray:
    """Matthews correlation of every column: ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.

    ``pred`` and ``target``: (N, A) (or (N,) for one attribute) binary arrays (0/1, -1/1 or bool).
    Columns with a zero denominator (constant prediction or constant truth) get NaN here; see
    :func:`mean_mcc` for how they are averaged.
    """
    p, t = _np(pred, "pred"), _np(target, "target")
    if p.shape != t.shape:
        raise HybridMaskInputError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.ndim == 1:
        p, t = p[:, None], t[:, None]
    if p.ndim != 2 or p.shape[0] == 0:
        raise HybridMaskInputError(f"pred/target must have shape (N, A) with N > 0, got {p.shape}")
    p, t = _binary(p, "pred"), _binary(t, "target")
    tp = np.sum(p & t, 0).astype(np.float64)
    tn = np.sum(~p & ~t, 0).astype(np.float64)
    fp = np.sum(p & ~t, 0).astype(np.float64)
    fn = np.sum(~p & t, 0).astype(np.float64)
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0), np.nan)
    return mcc


def mean_mcc(pred: ArrayLike, target: ArrayLike, constant: str = "zero") -> float:
    """Mean MCC over attributes.

    ``constant="zero"`` (default, scikit-learn's convention): an undefined MCC counts as 0.
    ``constant="skip"``: undefined columns are left out of the mean (NaN if all are undefined).
    """
    m = mcc_per_attribute(pred, target)
    if constant == "zero":
        return float(np.nan_to_num(m, nan=0.0).mean())
    if constant == "skip":
        ok = ~np.isnan(m)
        return float(m[ok].mean()) if ok.any() else float("nan")
    raise ValueError(f"constant must be 'zero' or 'skip', got {constant!r}")


# ---- LDA score -------------------------------------------------------------------------------
def lda_score(z: ArrayLike, labels: ArrayLike, min_per_class: int = 2, dof: bool = False) -> float:
    """Between-class / within-class scatter of features over identities (trace ratio).

    With ``z_i`` flattened to vectors, classes ``c`` having ``n_c >= min_per_class`` samples (others
    are dropped), ``N = sum_c n_c``, class means ``m_c`` and overall mean ``m`` (of the kept samples)::

        S_B = sum_c n_c * ||m_c - m||^2          (= N * trace of the between-class covariance)
        S_W = sum_c sum_{i in c} ||z_i - m_c||^2 (= N * trace of the within-class covariance)
        score = S_B / S_W

    With ``dof=True`` the ANOVA-style degrees of freedom are used instead:
    ``(S_B / (C - 1)) / (S_W / (N - C))``. High = identities are linearly separable in z.
    """
    x = _np(z, "z").astype(np.float64)
    y = _np(labels, "labels")
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise HybridMaskInputError(f"z must be (N, ...) with N = len(labels), got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise HybridMaskInputError("z contains NaN or infinite values")
    x = x.reshape(x.shape[0], -1)
    classes, counts = np.unique(y, return_counts=True)
    keep_classes = classes[counts >= int(min_per_class)]
    if len(keep_classes) < 2:
        raise HybridMaskInputError(
            f"LDA score needs at least 2 classes with >= {min_per_class} samples, got {len(keep_classes)}")
    mask = np.isin(y, keep_classes)
    x, y = x[mask], y[mask]
    m = x.mean(0)
    sb = sw = 0.0
    for c in keep_classes:
        xc = x[y == c]
        mc = xc.mean(0)
        sb += len(xc) * float(np.sum((mc - m) ** 2))
        sw += float(np.sum((xc - mc) ** 2))
    if dof:
        n, k = len(x), len(keep_classes)
        sb, sw = sb / (k - 1), sw / (n - k)
    if sw <= 0:
        return float("inf")
    return float(sb / sw)


# ---- feature-level attack --------------------------------------------------------------------
def feature_similarity(pred: torch.Tensor, target: torch.Tensor, reduce: bool = True):
    """Mean cosine between predicted and true features, each sample flattened."""
    if pred.shape[0] != target.shape[0]:
        raise HybridMaskInputError(f"pred and target batch sizes differ: {pred.shape[0]} vs {target.shape[0]}")
    cos = F.cosine_similarity(pred.reshape(len(pred), -1).float(), target.reshape(len(target), -1).float(), dim=1)
    return float(cos.mean()) if reduce else cos


# ---- t-SNE (exact, small N) ------------------------------------------------------------------
def _conditional_p(d2: np.ndarray, perplexity: float, tol: float = 1e-5, max_iter: int = 100) -> np.ndarray:
    """Row-wise Gaussian affinities whose entropy matches ``log(perplexity)`` (binary search on beta)."""
    n = d2.shape[0]
    target = math.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d2[i], i)
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(max_iter):
            w = np.exp(-(di - di.min()) * beta)
            sw = w.sum()
            h = math.log(sw) + beta * float(np.sum((di - di.min()) * w)) / sw
            if abs(h - target) < tol:
                break
            if h > target:  # too flat -> sharpen
                lo = beta
                beta = beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi = beta
                beta = (beta + lo) / 2
        p[i, np.arange(n) != i] = w / sw
    return p


def tsne(x: ArrayLike, dim: int = 2, perplexity: float = 30.0, iterations: int = 1000,
         learning_rate: Optional[float] = None,
         early_exaggeration: float = 12.0, pca_dim: int = 50, seed: int = 0) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton 2008) in numpy: (N, D) -> (N, dim).

    Inputs are centred and reduced to ``pca_dim`` dimensions by PCA first; affinities use a binary
    search for each point's bandwidth; the optimiser is gradient descent with momentum (0.5, then
    0.8 after 250 iterations), delta-bar-delta gains and early exaggeration for the first 250
    iterations. ``learning_rate=None`` uses ``max(N / early_exaggeration / 4, 50)`` (Belkina et al.
    2019, sklearn's "auto"): the classic fixed 200 overshoots for small N and can tear clusters apart.
    Cost O(N^2) per iteration: fine for a few hundred to ~2,000 points.
    """
    a = _np(x, "x").astype(np.float64)
    a = a.reshape(a.shape[0], -1)
    n = a.shape[0]
    if n < 5:
        raise HybridMaskInputError(f"t-SNE needs at least 5 points, got {n}")
    if not np.all(np.isfinite(a)):
        raise HybridMaskInputError("t-SNE input contains NaN or infinite values")
    perplexity = float(min(perplexity, (n - 1) / 3.0))
    if learning_rate is None:
        learning_rate = max(n / early_exaggeration / 4.0, 50.0)
    a = a - a.mean(0)
    if a.shape[1] > pca_dim:
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        a = u[:, :pca_dim] * s[:pca_dim]
    scale = np.abs(a).max()
    if scale > 0:
        a = a / scale
    sq = np.sum(a * a, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * a @ a.T, 0.0)
    p = _conditional_p(d2, perplexity)
    p = (p + p.T) / (2.0 * n)
    p = np.maximum(p, 1e-12)
    rng = np.random.default_rng(seed)
    y = rng.normal(0, 1e-4, (n, dim))
    vel = np.zeros_like(y)
    gains = np.ones_like(y)
    exag = early_exaggeration
    for it in range(int(iterations)):
        if it == 250:
            exag = 1.0
        mom = 0.5 if it < 250 else 0.8
        sy = np.sum(y * y, 1)
        num = 1.0 / (1.0 + np.maximum(sy[:, None] + sy[None, :] - 2 * y @ y.T, 0.0))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        pq = (exag * p - q) * num
        grad = 4.0 * (np.diag(pq.sum(1)) - pq) @ y
        gains = np.where(np.sign(grad) != np.sign(vel), gains + 0.2, gains * 0.8)
        gains = np.maximum(gains, 0.01)
        vel = mom * vel - learning_rate * gains * grad
        y = y + vel
        y = y - y.mean(0)
    return y


def plot_tsne(z: ArrayLike, attributes: ArrayLike, names: Sequence[str], path: Union[str, os.PathLike],
              title: str = "t-SNE of z", seed: int = 0, perplexity: float = 30.0,
              embedding: Optional[np.ndarray] = None) -> np.ndarray:
    """t-SNE of ``z`` (N, ...) in one panel per attribute column (``attributes``: (N, len(names))
    binary), written atomically as PNG. Returns the 2-D embedding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attr = _binary(_np(attributes, "attributes"), "attributes")
    if attr.ndim == 1:
        attr = attr[:, None]
    if attr.shape[1] != len(names):
        raise HybridMaskInputError(f"{attr.shape[1]} attribute columns but {len(names)} names")
    y = embedding if embedding is not None else tsne(z, perplexity=perplexity, seed=seed)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0, j]
        for val, col, lab in ((False, "tab:blue", f"not {name}"), (True, "tab:orange", name)):
            sel = attr[:, j] == val
            ax.scatter(y[sel, 0], y[sel, 1], s=8, c=col, label=f"{lab} ({int(sel.sum())})", alpha=0.8)
        ax.set_xticks([]), ax.set_yticks([])
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"coloured by {name}", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return y


def knn_label_agreement(y: np.ndarray, labels: ArrayLike, k: int = 5) -> float:
    """Fraction of each point's k nearest neighbours (in ``y``) that share its label (a t-SNE check)."""
    lab = _np(labels, "labels")
    d = np.sum((y[:, None] - y[None]) ** 2, -1)
    np.fill_diagonal(d, np.inf)
    nn_idx = np.argsort(d, 1)[:, :k]
    return float(np.mean(lab[nn_idx] == lab[:, None]))


__all__ = ["mcc_per_attribute", "mean_mcc", "lda_score", "feature_similarity", "tsne", "plot_tsne",
           "knn_label_agreement"]
