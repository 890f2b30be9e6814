"""Margin heads (ArcFace, CosFace) and the mixed-label margin loss.

A head holds a ``(num_classes, embedding_size)`` weight matrix whose rows are L2-normalised before
use, so ``cosine(emb)[i, j] = cos(theta_ij)`` between embedding i and class centre j.

* ArcFace (Deng et al. 2019): the target logit becomes ``s * cos(theta + m)``. As in insightface's
  ``arcface_torch``, where ``theta + m`` would pass pi (``cos(theta) <= cos(pi - m)``) the monotone
  fallback ``cos(theta) - m * sin(m)`` is used instead, or with ``easy_margin=True`` the margin is
  only applied where ``cos(theta) > 0``. ``sin(theta)`` is computed as ``sqrt(clamp(1 - cos^2, eps))``
  (no ``arccos``), so gradients stay finite at ``cos = +-1``.
* CosFace (Wang et al. 2018): the target logit becomes ``s * (cos(theta) - m)``.

``head(emb, labels)`` returns the scaled margin logits to feed ``F.cross_entropy(logits, labels)``;
``head.cosine(emb)`` returns the plain (unscaled, margin-free) cosines for identification;
``head.logits(emb)`` the scaled plain logits ``s * cosine``.

:class:`MixedMarginLoss` implements ``sum_m w_m * CE(margin_logits(emb, y_m), y_m)`` for MixUp of
k images (one label and one weight per mixed image).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridmask.utils import HybridMaskInputError, Registry

HEADS = Registry("head")

_EPS = 1e-7


def register_head(fn=None, *, name: Optional[str] = None):
    """Register a head class / builder: ``@register_head`` or ``@register_head(name="x")``."""
    if isinstance(fn, str):
        return HEADS.register(fn)
    if fn is None:
        return HEADS.register(name)
    return HEADS.register(name)(fn)


def list_heads() -> List[str]:
    return HEADS.names()


def create_head(name: str, embedding_size: int, num_classes: int, s: float = 64.0, m: Optional[float] = None,
                **kw) -> "MarginHead":
    """Build a registered margin head: ``create_head("arcface", 512, n_ids)`` (m defaults: ArcFace 0.5,
    CosFace 0.35)."""
    cls = HEADS.get(name)
    head = cls(embedding_size, num_classes, s=s, **({} if m is None else {"m": m}), **kw)
    return head


class MarginHead(nn.Module):
    """Base class: normalised class-centre matrix and label checks; subclasses define the margin."""

    name = "margin"

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.0):
        super().__init__()
        for arg, val in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{arg} must be a positive int, got {val!r}")
        if not (float(s) > 0 and math.isfinite(float(s))):
            raise ValueError(f"scale s must be a positive number, got {s!r}")
        if not (0.0 <= float(m) < math.pi / 2):
            raise ValueError(f"margin m must be in [0, pi/2), got {m!r}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.s = float(s)
        self.m = float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def config(self) -> Dict:
        return dict(name=self.name, embedding_size=self.embedding_size, num_classes=self.num_classes,
                    s=self.s, m=self.m)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "name")

    # -- checks --------------------------------------------------------------------------------
    def _check_emb(self, emb) -> None:
        if not isinstance(emb, torch.Tensor) or not torch.is_floating_point(emb):
            raise HybridMaskInputError(f"embeddings must be a floating-point tensor, got "
                                       f"{type(emb).__name__ if not isinstance(emb, torch.Tensor) else emb.dtype}")
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise HybridMaskInputError(f"embeddings must have shape (B, {self.embedding_size}), got {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise HybridMaskInputError("embeddings contain NaN or infinite values")

    def check_labels(self, labels, batch: int, allow_negative: bool = False) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                          torch.uint8, torch.int8):
            raise HybridMaskInputError(f"labels must be an integer tensor, got "
                                       f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise HybridMaskInputError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if hi >= self.num_classes or (lo < 0 and not allow_negative):
                raise HybridMaskInputError(f"labels must be in [0, {self.num_classes}), got values in [{lo}, {hi}]")

    # -- logits --------------------------------------------------------------------------------
    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Plain cosine similarities (B, num_classes) in [-1, 1]; no margin, no scale."""
        self._check_emb(emb)
        return self._cosine(emb)

    def _cosine(self, emb: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        return F.linear(F.normalize(emb, dim=1), w.to(emb.dtype)).clamp(-1.0, 1.0)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Scaled plain logits ``s * cosine(emb)`` (softmax-ready, no margin)."""
        return self.s * self.cosine(emb)

    def target_margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Margin-modified target cosine; subclasses override."""
        raise NotImplementedError

    def margin_logits_from_cosine(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied at ``labels`` (labels < 0: no margin for that row)."""
        rows = torch.arange(cos.shape[0], device=cos.device)
        valid = labels >= 0
        idx = labels.clamp(min=0).long()
        cos_t = cos[rows, idx]
        new_t = torch.where(valid, self.target_margin(cos_t), cos_t)
        onehot = F.one_hot(idx, cos.shape[1]).to(cos.dtype) * valid.unsqueeze(1).to(cos.dtype)
        return self.s * (cos + onehot * (new_t - cos_t).unsqueeze(1))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled margin logits (B, num_classes) for ``F.cross_entropy(logits, labels)``."""
        self._check_emb(emb)
        self.check_labels(labels, emb.shape[0])
        return self.margin_logits_from_cosine(self._cosine(emb), labels)


@register_head(name="arcface")
class ArcFace(MarginHead):
    """Additive angular margin: target logit ``s * cos(theta + m)`` (default s=64, m=0.5)."""

    name = "arcface"

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False):
        super().__init__(embedding_size, num_classes, s, m)
        self.easy_margin = bool(easy_margin)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.th = math.cos(math.pi - self.m)      # beyond this, theta + m > pi
        self.mm = math.sin(math.pi - self.m) * self.m

    @property
    def config(self) -> Dict:
        return dict(super().config, easy_margin=self.easy_margin)

    def target_margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp(min=_EPS))
        phi = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cos_t > 0, phi, cos_t)
        return torch.where(cos_t > self.th, phi, cos_t - self.mm)


@register_head(name="cosface")
class CosFace(MarginHead):
    """Additive cosine margin: target logit ``s * (cos(theta) - m)`` (default s=64, m=0.35)."""

    name = "cosface"

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35):
        super().__init__(embedding_size, num_classes, s, m)

    def target_margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m


class MixedMarginLoss(nn.Module):
    """Mixed-label margin loss for MixUp of k images.

    ``loss(emb, labels, weights) = mean_b sum_m weights[b, m] * CE(margin_logits(emb_b, labels[b, m]), labels[b, m])``

    ``labels``: (B, K) integer (or (B,) for K = 1); ``weights``: (B, K) float, non-negative, each row
    summing to 1 (default: uniform ``1/K``), e.g. ``record.mixed_labels(y)`` and
    ``record.label_weights`` of a :class:`hybridmask.freq.MixRecord`. A zero weight marks padding
    (rows with fewer than K mixed images); its label may be anything, including -1.

    A label of -1 with a non-zero weight is a partner of unknown identity (a public-pool face):
    with ``unknown_labels="ignore"`` (default) its term is dropped and the other weights are *not*
    renormalised (InstaHide's convention: the target is ``lambda_0 * onehot(y_0)``); with
    ``"error"`` it is refused. The cosine matrix is computed once. With ``reduction="none"`` the
    per-sample losses (B,) are returned.
    """

    def __init__(self, head: MarginHead, reduction: str = "mean", unknown_labels: str = "ignore",
                 atol: float = 1e-4):
        super().__init__()
        if not isinstance(head, MarginHead):
            raise TypeError(f"MixedMarginLoss needs a MarginHead (see create_head), got {type(head).__name__}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if unknown_labels not in ("ignore", "error"):
            raise ValueError(f"unknown_labels must be 'ignore' or 'error', got {unknown_labels!r}")
        self.head = head
        self.reduction = reduction
        self.unknown_labels = unknown_labels
        self.atol = atol

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        head = self.head
        head._check_emb(emb)
        B = emb.shape[0]
        if not isinstance(labels, torch.Tensor):
            raise HybridMaskInputError(f"labels must be an integer tensor, got {type(labels).__name__}")
        if labels.dim() == 1:
            labels = labels.unsqueeze(1)
            if weights is not None and weights.dim() == 1:
                weights = weights.unsqueeze(1)
        if labels.dim() != 2 or labels.shape[0] != B:
            raise HybridMaskInputError(f"labels must have shape ({B},) or ({B}, K), got {tuple(labels.shape)}")
        K = labels.shape[1]
        if K == 0:
            raise HybridMaskInputError("labels must have at least one column (K >= 1)")
        if weights is None:
            weights = torch.full((B, K), 1.0 / K, dtype=emb.dtype, device=emb.device)
        if not isinstance(weights, torch.Tensor) or not torch.is_floating_point(weights):
            raise HybridMaskInputError("weights must be a floating-point tensor of shape (B, K)")
        if weights.shape != labels.shape:
            raise HybridMaskInputError(f"weights must have the shape of labels {tuple(labels.shape)}, "
                                       f"got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise HybridMaskInputError("weights must be finite and non-negative")
        row_sums = weights.sum(1)
        if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=self.atol):
            bad = int((row_sums - 1).abs().argmax())
            raise HybridMaskInputError(f"each row of weights must sum to 1 (row {bad} sums to {float(row_sums[bad]):.6f})")
        for m in range(K):
            head.check_labels(labels[:, m], B, allow_negative=True)
        if (labels < -1).any():
            raise HybridMaskInputError("labels must be >= 0, or -1 for padding / unknown identities")
        if self.unknown_labels == "error" and (labels[weights > 0] < 0).any():
            raise HybridMaskInputError("a label is -1 where its weight is non-zero (unknown_labels='error')")
        active = (weights > 0) & (labels >= 0)
        cos = head._cosine(emb)
        loss = emb.new_zeros(B)
        for m in range(K):
            y = labels[:, m].long()
            logits = head.margin_logits_from_cosine(cos, y)
            ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
            loss = loss + weights[:, m].to(emb.dtype) * torch.where(active[:, m], ce, torch.zeros_like(ce))
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
