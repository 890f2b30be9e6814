"""Privacy metrics of the attack harness, in a registry (``compute_metric(name, ...)``).

Images are (B, 3, H, W) float tensors in [-1, 1] (the hybridmask convention), so SSIM and PSNR
use ``data_range=2``. Every per-image function returns a float64 numpy array of length B; every
value is checked against the metric's declared range before it is returned.

* ``ssim`` - structural similarity (scikit-image, 11x11 Gaussian window of sigma 1.5 as in Wang et
  al. 2004, over the RGB channels with ``channel_axis``), in [-1, 1]. With ``psnr`` and
  ``identity_similarity`` it is the one image / face metric set of the whole library (ARL too).
* ``psnr`` - peak signal-to-noise ratio in dB (scikit-image); ``inf`` for identical images.
* ``identity_similarity`` - cosine similarity of an *independent* embedder's embeddings of the
  reconstruction and the original, in [-1, 1].
* ``reidentification`` - rank-1 / rank-5 re-identification: a reconstruction is re-identified at
  rank r when its victim's identity is among the r gallery identities nearest to it (cosine to
  the identity's mean normalised embedding).
* The paper's framework: ``S1 = 1 - SSIM(as_image(release), x)``, ``S2 = 1 - idsim(as_image(release), x)``,
  ``S3 = 1 - SSIM(attack(x), x)``, ``S4 = 1 - idsim(attack(x), x)``,
  ``Score_pp = 0.4 * (S1 + S2) / 2 + 0.6 * (S3 + S4) / 2`` and ``Score_cls`` = verification accuracy.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import HybridMaskInputError, Registry, check_images, run_in_batches

METRICS = Registry("metric")


def register_metric(name: str, range: Tuple[float, float], higher_is_private: bool, doc: str = ""):
    """Register ``fn`` under ``name``; ``range``, ``higher_is_private`` and ``doc`` declare the metric
    where it is defined (each metric checks its own range with :func:`check_range`)."""
    def deco(fn):
        METRICS.register(name)(fn)
        return fn
    return deco


def list_metrics():
    return METRICS.names()


def compute_metric(name: str, *args, **kwargs):
    """Run a registered metric by name (its range is checked inside)."""
    return METRICS.get(name)(*args, **kwargs)


def check_range(name: str, values, lo: float, hi: float, tol: float = 1e-6):
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if np.isnan(arr).any():
        raise ValueError(f"metric {name} produced NaN")
    if finite.size and (finite.min() < lo - tol or finite.max() > hi + tol):
        raise ValueError(f"metric {name} out of its range [{lo}, {hi}]: got [{finite.min()}, {finite.max()}]")
    return arr


def _pair(a: torch.Tensor, b: torch.Tensor, what: str) -> Tuple[np.ndarray, np.ndarray]:
    check_images(a, f"{what}: reconstructions")
    check_images(b, f"{what}: originals")
    if a.shape != b.shape:
        raise HybridMaskInputError(f"{what}: image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    for t, n in ((a, "reconstructions"), (b, "originals")):
        lo, hi = float(t.min()), float(t.max())
        if lo < -1 - 1e-4 or hi > 1 + 1e-4:
            raise HybridMaskInputError(f"{what}: {n} must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
    conv = lambda t: t.detach().to("cpu", torch.float64).clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    return conv(a), conv(b)


# ---- image metrics --------------------------------------------------------------------------------
@register_metric("ssim", (-1.0, 1.0), higher_is_private=False, doc="structural similarity, per image")
def ssim(recon: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """SSIM of each image pair: the library's one SSIM (attacks, ARL, benchmark).

    scikit-image ``structural_similarity`` with an 11x11 Gaussian window of sigma 1.5 (Wang et al.
    2004: ``gaussian_weights=True``, ``sigma=1.5``, truncated at 3.5 sigma, population covariance),
    ``data_range=2`` on the images as given in [-1, 1], averaged over the RGB channels."""
    from skimage.metrics import structural_similarity
    a, b = _pair(recon, original, "ssim")
    vals = [structural_similarity(x, y, data_range=2.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for x, y in zip(a, b)]
    return check_range("ssim", vals, -1.0, 1.0)


@register_metric("psnr", (0.0, math.inf), higher_is_private=False, doc="peak signal-to-noise ratio in dB, per image")
def psnr(recon: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """PSNR in dB of each image pair (``data_range=2`` on [-1, 1]; ``inf`` for identical images):
    the library's one PSNR."""
    from skimage.metrics import peak_signal_noise_ratio
    a, b = _pair(recon, original, "psnr")
    vals = []
    for x, y in zip(a, b):
        if np.array_equal(x, y):
            vals.append(math.inf)
        else:
            vals.append(peak_signal_noise_ratio(y, x, data_range=2.0))
    return check_range("psnr", vals, 0.0, math.inf)


# ---- identity metrics -----------------------------------------------------------------------------
def embed(embedder: Callable, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised embeddings (B, D) of ``images`` under ``embedder`` (batches of <= 128)."""
    check_images(images, "images to embed")
    if images.shape[0] == 0:
        raise HybridMaskInputError("no images to embed")
    def one(x: torch.Tensor) -> torch.Tensor:
        e = embedder(x.clamp(-1, 1))
        if not isinstance(e, torch.Tensor):
            e = torch.as_tensor(np.asarray(e))
        if e.dim() != 2 or e.shape[0] != x.shape[0]:
            raise ValueError(f"embedder must return a (B, D) tensor, got shape {tuple(e.shape)}")
        return e.detach().float()

    e = run_in_batches(one, images, batch_size)
    if not torch.isfinite(e).all():
        raise ValueError("embedder returned NaN or infinite embeddings")
    return F.normalize(e, dim=1)


def _as_embeddings(x, embedder, what):
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        return F.normalize(x.detach().to("cpu", torch.float32), dim=1)
    if embedder is None:
        raise ValueError(f"{what}: pass an embedder or precomputed (B, D) embeddings")
    return embed(embedder, x)


@register_metric("identity_similarity", (-1.0, 1.0), higher_is_private=False,
                 doc="cosine of the independent embedder between reconstruction and original")
def identity_similarity(recon, original, embedder: Optional[Callable] = None) -> np.ndarray:
    """Per-pair cosine similarity; ``recon``/``original`` are images (needs ``embedder``) or (B, D) embeddings."""
    a = _as_embeddings(recon, embedder, "identity_similarity")
    b = _as_embeddings(original, embedder, "identity_similarity")
    if a.shape != b.shape:
        raise HybridMaskInputError(f"identity_similarity: {tuple(a.shape)} vs {tuple(b.shape)} embeddings")
    return check_range("identity_similarity", (a * b).sum(1).double().clamp(-1, 1).numpy(), -1.0, 1.0)


def identity_templates(gallery_emb: torch.Tensor, gallery_labels: Sequence) -> Tuple[torch.Tensor, list]:
    """One normalised mean embedding per gallery identity -> (templates (I, D), identity names)."""
    labels = list(gallery_labels)
    if len(labels) != gallery_emb.shape[0]:
        raise HybridMaskInputError(f"{len(labels)} gallery labels for {gallery_emb.shape[0]} gallery embeddings")
    names = sorted(set(labels), key=str)
    lab = np.array([names.index(l) for l in labels])
    t = torch.stack([gallery_emb[torch.as_tensor(lab == i)].mean(0) for i in range(len(names))])
    return F.normalize(t, dim=1), names


@register_metric("reidentification", (0.0, 1.0), higher_is_private=False,
                 doc="fraction of reconstructions whose victim identity is within the top-r gallery identities")
def reidentification(recon, victim_labels: Sequence, gallery, gallery_labels: Sequence,
                     embedder: Optional[Callable] = None, ranks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``{"rank1": ..., "rank5": ..., "ranks": per-victim rank (1-based)}``; chance level is r / #identities."""
    q = _as_embeddings(recon, embedder, "reidentification")
    g = _as_embeddings(gallery, embedder, "reidentification")
    victim_labels = list(victim_labels)
    if len(victim_labels) != q.shape[0]:
        raise HybridMaskInputError(f"{len(victim_labels)} victim labels for {q.shape[0]} reconstructions")
    templates, names = identity_templates(g, gallery_labels)
    missing = sorted({str(v) for v in victim_labels} - {str(n) for n in names})
    if missing:
        raise HybridMaskInputError(f"victim identities absent from the gallery: {', '.join(missing[:5])}")
    sims = q @ templates.T                                           # (B, I)
    target = torch.tensor([[str(n) for n in names].index(str(v)) for v in victim_labels])
    tsim = sims.gather(1, target.view(-1, 1))
    rank = (sims > tsim).sum(1) + 1                                  # 1-based rank of the true identity
    out = {f"rank{r}": float((rank <= r).double().mean()) for r in ranks}
    for r in ranks:
        check_range(f"rank{r}", out[f"rank{r}"], 0.0, 1.0)
    out["ranks"] = rank.tolist()
    out["n_identities"] = len(names)
    out["chance"] = {f"rank{r}": min(1.0, r / len(names)) for r in ranks}
    return out


# ---- the paper's framework -------------------------------------------------------------------------
def _unit(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not (lo - 1e-6 <= v <= hi + 1e-6):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return min(max(v, lo), hi)


@register_metric("s_scores", (0.0, 2.0), higher_is_private=True,
                 doc="S1..S4 of the paper from mean SSIM and identity similarity")
def s_scores(ssim_masked: float, idsim_masked: float, ssim_attack: float, idsim_attack: float) -> Dict[str, float]:
    """S1 = 1 - SSIM(as_image(release), x), S2 = 1 - idsim(as_image(release), x),
    S3 = 1 - SSIM(attack(x), x), S4 = 1 - idsim(attack(x), x); each in [0, 2]."""
    vals = {"S1": 1 - _unit("ssim_masked", ssim_masked, -1, 1), "S2": 1 - _unit("idsim_masked", idsim_masked, -1, 1),
            "S3": 1 - _unit("ssim_attack", ssim_attack, -1, 1), "S4": 1 - _unit("idsim_attack", idsim_attack, -1, 1)}
    for k, v in vals.items():
        check_range(k, v, 0.0, 2.0)
    return vals


@register_metric("score_pp", (0.0, 2.0), higher_is_private=True,
                 doc="privacy score 0.4*(S1+S2)/2 + 0.6*(S3+S4)/2")
def score_pp(s1: float, s2: float, s3: float, s4: float, alpha: float = 0.4, beta: float = 0.6) -> float:
    for n, v in (("S1", s1), ("S2", s2), ("S3", s3), ("S4", s4)):
        _unit(n, v, 0, 2)
    _unit("alpha", alpha, 0, 1), _unit("beta", beta, 0, 1)
    if abs(alpha + beta - 1) > 1e-9:
        raise ValueError(f"alpha + beta must be 1, got {alpha} + {beta}")
    v = alpha * (s1 + s2) / 2 + beta * (s3 + s4) / 2
    return float(check_range("score_pp", v, 0.0, 2.0))


@register_metric("score_cls", (0.0, 1.0), higher_is_private=False, doc="utility: verification accuracy in [0, 1]")
def score_cls(verification_accuracy: float) -> float:
    v = _unit("verification_accuracy", verification_accuracy, 0, 100)
    if v > 1:
        raise ValueError(f"verification_accuracy must be a fraction in [0, 1] (got {v}; divide percentages by 100)")
    return v


def summarize(values) -> Dict[str, float]:
    """Mean, std and count of finite values (inf PSNRs are counted separately)."""
    arr = np.asarray(values, dtype=np.float64)
    fin = arr[np.isfinite(arr)]
    return {"mean": float(fin.mean()) if fin.size else (math.inf if arr.size else math.nan),
            "std": float(fin.std()) if fin.size else 0.0, "n": int(arr.size), "n_inf": int(np.isinf(arr).sum())}
