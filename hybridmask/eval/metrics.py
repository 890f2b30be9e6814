"""1:1 verification metrics: k-fold accuracy, TAR@FAR, ROC / AUC.

Scores are similarities (higher = more likely the same person; cosine for hybridmask). A pair
is predicted "same" when ``score > threshold``.
"""
from __future__ import annotations

import io
import math
import os
from typing import Dict, Mapping, Sequence, Union

import numpy as np

from hybridmask.utils import atomic_write

FAR_TARGETS = (1e-3, 1e-2)


def _as_arrays(scores, issame):
    s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64).reshape(-1)
    y = np.asarray(issame.detach().cpu().numpy() if hasattr(issame, "detach") else issame).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and issame differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("no scores given")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("issame must be booleans (or 0/1)")
        y = y.astype(bool)
    return s, y


def best_threshold(scores, issame) -> tuple:
    """Exact search of the accuracy-maximising threshold -> ``(threshold, accuracy)``.

    Every cut between two distinct sorted scores is tried (a superset of insightface's fixed
    threshold grid); the threshold is the midpoint between the neighbouring scores, and among
    equally good cuts the middle one is taken.
    """
    s, y = _as_arrays(scores, issame)
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    n = len(ss)
    n_neg = int((~yy).sum())
    tp = np.concatenate([[0], np.cumsum(yy)])               # predicted positives = top m, m = 0..n
    fp = np.arange(n + 1) - tp
    correct = tp + (n_neg - fp)
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = ss[:-1] > ss[1:]                            # only cuts between distinct scores
    cand = np.flatnonzero(valid)
    best = cand[correct[cand] == correct[cand].max()]
    m = int(best[len(best) // 2])
    if m == 0:
        thr = ss[0] + 1e-6 * max(1.0, abs(ss[0]))
    elif m == n:
        thr = ss[-1] - 1e-6 * max(1.0, abs(ss[-1]))
    else:
        thr = 0.5 * (ss[m - 1] + ss[m])
    return float(thr), float(correct[m] / n)


def roc_curve(scores, issame):
    """``(fpr, tpr, thresholds)`` over all distinct score thresholds, from (0, 0) to (1, 1)."""
    s, y = _as_arrays(scores, issame)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both same and different pairs (got {n_pos} same, {n_neg} different)")
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    last = np.r_[np.flatnonzero(ss[:-1] > ss[1:]), len(ss) - 1]   # last index of each tie group
    tp = np.cumsum(yy)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thr = np.r_[np.inf, ss[last]]
    return fpr, tpr, thr


def _area(fpr, tpr) -> float:
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def roc_auc(scores, issame) -> float:
    """Area under the ROC curve of :func:`roc_curve` (needs both same and different pairs)."""
    fpr, tpr, _ = roc_curve(scores, issame)
    return _area(fpr, tpr)


def tar_at_far(scores, issame, far: float) -> Dict[str, float]:
    """True accept rate at a false accept rate of at most ``far`` (no interpolation).

    With ``n_neg`` different-identity pairs only FAR values k / n_neg exist; the operating point
    allows ``k = floor(far * n_neg)`` false accepts (LFW: 3,000 negatives -> FAR 1e-3 is 3
    false accepts; with fewer than 1 / far negatives it is the TAR at zero false accepts). The
    threshold is the (k+1)-th highest negative score and a pair is accepted when its score is
    strictly above it, so the achieved FAR never exceeds the target.
    """
    s, y = _as_arrays(scores, issame)
    if not 0 < far <= 1:
        raise ValueError(f"far must be in (0, 1], got {far}")
    neg = np.sort(s[~y])[::-1]
    pos = s[y]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("TAR@FAR needs both same and different pairs")
    k = int(math.floor(far * len(neg) + 1e-9))
    thr = float(neg[k]) if k < len(neg) else -math.inf
    return {
        "far_target": float(far),
        "tar": float((pos > thr).mean()),
        "far": float((neg > thr).mean()),
        "threshold": thr,
        "false_accepts_allowed": k,
        "negatives": int(len(neg)),
    }


def fold_ids(n: int, folds: Union[int, Sequence[int], np.ndarray]) -> np.ndarray:
    """Fold label per pair: a given assignment, or ``folds`` contiguous folds (insightface's
    unshuffled KFold: the first ``n % folds`` folds get one extra pair)."""
    if isinstance(folds, (int, np.integer)):
        k = int(folds)
        if k < 2:
            raise ValueError(f"need at least 2 folds, got {k}")
        if n < k:
            raise ValueError(f"{n} pairs cannot be split into {k} folds")
        sizes = np.full(k, n // k)
        sizes[: n % k] += 1
        return np.repeat(np.arange(k), sizes)
    f = np.asarray(folds).reshape(-1)
    if len(f) != n:
        raise ValueError(f"fold assignment has {len(f)} entries for {n} pairs")
    if len(np.unique(f)) < 2:
        raise ValueError("fold assignment must contain at least 2 folds")
    return f.astype(np.int64)


def verification_metrics(scores, issame, folds: Union[int, Sequence[int], np.ndarray] = 10,
                         far_targets: Sequence[float] = FAR_TARGETS) -> Dict:
    """k-fold verification accuracy (threshold chosen on the other folds), TAR@FAR, ROC, AUC.

    Returns a dict with ``accuracy`` / ``accuracy_std`` (mean and population std over the
    folds, as insightface reports), ``fold_accuracies``, ``fold_thresholds``, ``threshold``
    (their mean), ``best_accuracy`` (single threshold fitted on all pairs: optimistic),
    ``tar_at_far`` (``{"1e-03": {...}, ...}`` see :func:`tar_at_far`), ``auc`` and ``roc``
    (``{"fpr": [...], "tpr": [...]}``).
    """
    s, y = _as_arrays(scores, issame)
    f = fold_ids(len(s), folds)
    accs, thrs = [], []
    for k in np.unique(f):
        test = f == k
        thr, _ = best_threshold(s[~test], y[~test])
        accs.append(float(((s[test] > thr) == y[test]).mean()))
        thrs.append(thr)
    _, best_acc = best_threshold(s, y)
    out = {
        "pairs": int(len(s)),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "folds": int(len(accs)),
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracies": accs,
        "fold_thresholds": thrs,
        "threshold": float(np.mean(thrs)),
        "best_accuracy": best_acc,
    }
    if y.all() or (~y).all():
        out.update(tar_at_far={}, auc=None, roc=None)
        return out
    fpr, tpr, _ = roc_curve(s, y)
    out["auc"] = _area(fpr, tpr)
    out["tar_at_far"] = {f"{far:.0e}": tar_at_far(s, y, far) for far in far_targets}
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def plot_roc(results: Mapping, path: Union[str, os.PathLike], title: str = "ROC") -> None:
    """Write a ROC plot (TAR vs FAR, log FAR axis) of one or several results to a PNG, atomically.

    ``results``: a metrics dict (with ``"roc"``) or ``{name: metrics dict}``.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if "roc" in results:
        results = {results.get("target", "result"): results}
    curves = {k: v["roc"] for k, v in results.items() if isinstance(v, Mapping) and v.get("roc")}
    if not curves:
        raise ValueError("plot_roc: no ROC curves in the given results")
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    try:
        lo = 1.0
        for roc in curves.values():
            fpr = np.asarray(roc["fpr"])
            if (fpr > 0).any():
                lo = min(lo, fpr[fpr > 0].min())
        xmin = max(lo / 2, 1e-6)
        for name, roc in curves.items():
            fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
            # log axis: the zero-FAR part of the curve starts at the left edge with its best TAR
            zero = fpr <= 0
            x = np.r_[xmin, fpr[~zero]]
            y = np.r_[tpr[zero].max() if zero.any() else 0.0, tpr[~zero]]
            auc = results[name].get("auc")
            label = f"{name} (AUC {auc:.4f})" if auc is not None else str(name)
            ax.step(x, y, where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlim(xmin, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
