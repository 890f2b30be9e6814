"""Frequency-domain MixUp of k images (InstaHide-style), with per-sample k.

For each anchor ``b`` the mixer draws ``k_b - 1`` distinct partners (from the batch, never the
anchor itself, or from a public pool) and weights on the simplex, and returns
``sum_j w_bj * x[idx_bj]``.

**Linearity.** The block DCT is linear, so with one scalar weight per image
(``granularity="image"``) frequency MixUp is *exactly* pixel MixUp. The frequency domain only
changes the result through channel dropping, per-sample shuffling before mixing (order
``mask_mix`` in :class:`~hybridmask.freq.HybridMask`), or weights that differ across
frequency bands (``"band"``: one simplex draw per frequency, shared by the three colours) or
channels (``"channel"``). ``tests/test_freq.py`` pins this fact.

Weight samplers: ``"instahide"`` - ``|N(0, 1)|`` normalised, resampled until the largest
weight is at most ``max_weight`` (InstaHide's rule); ``"dirichlet"`` - ``Dirichlet(alpha)``.
"""
from __future__ import annotations


from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.rng import SeedLike, make_generator
from ..utils.validate import HybridMaskInputError, check_freq

WEIGHT_SAMPLERS = ("instahide", "dirichlet")
GRANULARITIES = ("image", "band", "channel")

KLike = Union[int, torch.Tensor, Sequence[int], Callable[[torch.Tensor], Union[int, torch.Tensor]]]


@dataclass
class MixRecord:
    """What was mixed. ``K = max(k)``; column 0 is the anchor itself.

    indices:       (B, K) long - partner indices (into the batch, or into the pool for
                   columns >= 1 when ``source == "pool"``); padding columns repeat the anchor.
    weights:       (B, K) for image granularity, (B, K, G) per band/channel otherwise.
    label_weights: (B, K) - weight of each source's label (mean weight over channels), rows sum to 1.
    k:             (B,) long - number of images mixed per sample.
    """
    indices: torch.Tensor
    weights: torch.Tensor
    label_weights: torch.Tensor
    k: torch.Tensor
    source: str = "batch"
    granularity: str = "image"

    def mixed_labels(self, labels: torch.Tensor, pool_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, K) labels of every mixed source. Pool partners without ``pool_labels`` get -1."""
        if labels.dim() != 1 or labels.shape[0] != self.indices.shape[0]:
            raise HybridMaskInputError(f"labels must have shape ({self.indices.shape[0]},), got {tuple(labels.shape)}")
        idx = self.indices.to(labels.device)
        if self.source == "batch":
            return labels[idx]
        out = torch.full_like(idx, -1)
        out[:, 0] = labels
        if pool_labels is not None:
            out[:, 1:] = pool_labels.to(labels.device)[idx[:, 1:]]
        return out

    def soft_labels(self, labels: torch.Tensor, num_classes: int,
                    pool_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, num_classes) soft targets; unlabeled pool partners are left out and rows renormalised."""
        ml = self.mixed_labels(labels, pool_labels)
        w = self.label_weights.to(labels.device).clone()
        w[ml < 0] = 0
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        out = torch.zeros(ml.shape[0], num_classes, dtype=w.dtype, device=w.device)
        out.scatter_add_(1, ml.clamp_min(0), w)
        return out


@dataclass
class Draw:
    """The secret randomness of one release of a batch, drawn apart from applying it (torchvision v2's
    ``_get_params`` / ``_transform`` split): a value the trainer and the attacks can hold, replay or
    replace. Every field is optional; a defense fills the ones it uses.

    perm:      (B, C) channel permutation of each face (PPFR-FD's shuffle; with a client key every row
               is the key).
    mix:       the partners and weights of a MixUp (:class:`MixRecord`); None: each face alone.
    pool_perm: (B, K-1, C) permutations of partners drawn from a public pool.
    noise:     defense-specific noise in the release's shape (DCTDP's Laplace draws, InstaHide's signs).
    subset:    (B, C) bool: the kept channels (in kept order, before the shuffle) each face keeps
               (PPFR-FD's ``subset=m``; None: all).
    pool_subset: (B, K-1, C) bool subsets of partners drawn from a public pool.
    """
    perm: Optional[torch.Tensor] = None
    mix: Optional[MixRecord] = None
    pool_perm: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    subset: Optional[torch.Tensor] = None
    pool_subset: Optional[torch.Tensor] = None


def sample_gamma(alpha: float, shape, generator: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) draws from an explicit generator (Marsaglia-Tsang, with the alpha<1 boost)."""
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    boost = alpha < 1
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    n = int(torch.tensor(shape).prod())
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while todo.numel():
        z = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        out = out * u.clamp_min(1e-300) ** (1.0 / alpha)
    return out.reshape(shape)


def sample_weights(k: torch.Tensor, kmax: int, groups: int, method: str, generator: torch.Generator,
                   max_weight: float = 0.65, alpha: float = 1.0) -> torch.Tensor:
    """(B, kmax, groups) float64 weights; sample b has k[b] non-zero weights summing to 1."""
    b = k.shape[0]
    active = torch.arange(kmax).unsqueeze(0) < k.unsqueeze(1)  # (B, K)
    active = active.unsqueeze(2).expand(b, kmax, groups)
    if method == "dirichlet":
        g = sample_gamma(alpha, (b, kmax, groups), generator)
        g = g * active
        return g / g.sum(dim=1, keepdim=True)
    if method != "instahide":
        raise ValueError(f"weights must be one of {WEIGHT_SAMPLERS}, got {method!r}")
    w = torch.zeros(b, kmax, groups, dtype=torch.float64)
    todo = torch.ones(b, groups, dtype=torch.bool)
    # a single image (k=1) always has weight 1; the bound only applies to real mixes
    bound = torch.where(k > 1, torch.full((b,), float(max_weight), dtype=torch.float64),
                        torch.ones(b, dtype=torch.float64)).unsqueeze(1)
    for _ in range(10_000):
        if not todo.any():
            return w
        draw = torch.randn(b, kmax, groups, generator=generator, dtype=torch.float64).abs() * active
        draw = draw / draw.sum(dim=1, keepdim=True).clamp_min(1e-300)
        ok = todo & (draw.max(dim=1).values <= bound + 1e-12)
        w = torch.where(ok.unsqueeze(1), draw, w)
        todo = todo & ~ok
    raise RuntimeError("InstaHide weight sampling did not converge; raise max_weight")


def draw_partners(k: torch.Tensor, kmax: int, batch: int, pool_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(B, kmax) indices; column 0 is the anchor, columns 1..k-1 distinct partners, padding = anchor."""
    anchors = torch.arange(batch)
    if kmax == 1:
        return anchors.unsqueeze(1)
    if pool_size > 0:
        scores = torch.rand(batch, pool_size, generator=generator)
        partners = scores.argsort(dim=1)[:, : kmax - 1]
    else:
        scores = torch.rand(batch, batch, generator=generator)
        scores[anchors, anchors] = 2.0  # never pick the anchor itself
        partners = scores.argsort(dim=1)[:, : kmax - 1]
    idx = torch.cat([anchors.unsqueeze(1), partners], dim=1)
    pad = torch.arange(kmax).unsqueeze(0) >= k.unsqueeze(1)
    pad[:, 0] = False
    if pool_size > 0:
        idx = torch.where(pad, torch.zeros_like(idx), idx)
    else:
        idx = torch.where(pad, anchors.unsqueeze(1).expand_as(idx), idx)
    return idx


class FreqMixUp(nn.Module):
    """Mix each sample with ``k - 1`` partners. See the module docstring.

    Args:
        k: default k - an int, a (B,) tensor / list, or a callable ``f(x) -> int | (B,) tensor``.
        weights: ``"instahide"`` or ``"dirichlet"``.
        max_weight: InstaHide upper bound on the largest weight (must be >= 1/k).
        alpha: Dirichlet concentration.
        granularity: ``"image"``, ``"band"`` or ``"channel"``.
        seed: seed or generator for the secret draws (default: secure OS seed).
    """

    def __init__(self, k: KLike = 2, weights: str = "instahide", max_weight: float = 0.65, alpha: float = 1.0,
                 granularity: str = "image", seed: SeedLike = None):
        super().__init__()
        if weights not in WEIGHT_SAMPLERS:
            raise ValueError(f"weights must be one of {WEIGHT_SAMPLERS}, got {weights!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 0 < max_weight <= 1:
            raise ValueError(f"max_weight must be in (0, 1], got {max_weight}")
        self.k = k
        self.weights = weights
        self.max_weight = float(max_weight)
        self.alpha = float(alpha)
        self.granularity = granularity
        self.generator = make_generator(seed)

    def resolve_k(self, x: torch.Tensor, k: Optional[KLike], capacity: int) -> torch.Tensor:
        b = x.shape[0]
        k = self.k if k is None else k
        if callable(k) and not isinstance(k, torch.Tensor):
            k = k(x)
        if isinstance(k, bool) or (isinstance(k, float) and not float(k).is_integer()):
            raise HybridMaskInputError(f"k must be an integer, got {k!r}")
        kt = torch.as_tensor(k)
        if kt.is_floating_point():
            if not torch.equal(kt, kt.round()):
                raise HybridMaskInputError(f"k must be integers, got {kt.tolist()}")
        kt = kt.to(torch.long).cpu()
        if kt.dim() == 0:
            kt = kt.expand(b).clone()
        if kt.shape != (b,):
            raise HybridMaskInputError(f"k must be an int or have shape ({b},), got shape {tuple(kt.shape)}")
        if (kt < 1).any():
            raise HybridMaskInputError(f"k must be >= 1, got min k = {int(kt.min())}")
        if (kt > capacity).any():
            raise HybridMaskInputError(
                f"k = {int(kt.max())} needs {int(kt.max()) - 1} distinct partners but only {capacity - 1} are available "
                f"(k must be <= batch size {b} when partners come from the batch, or <= pool size + 1)")
        return kt

    @staticmethod
    def _mix_in_batch(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                      groups_of: Optional[torch.Tensor]) -> torch.Tensor:
        """Mixing within the batch is linear: ``out_b = sum_j w_bj x_{idx_bj}``. With one weight per
        image this is exactly a weighted ``embedding_bag`` over the flattened samples: one pass
        that reads each partner row once (B*k row reads, no (B, B) matrix, no per-partner
        temporaries); differentiable in ``x`` and ``w``. Band/channel weights use one (B, B)
        mixing matrix per channel and a batched GEMM."""
        b, c, h, wd = x.shape
        if groups_of is None:
            # padding (k < kmax) repeats the anchor with weight 0
            flat = x.reshape(b, -1)
            return F.embedding_bag(idx, flat, per_sample_weights=w, mode="sum").view(b, c, h, wd)
        rows = torch.arange(b, device=x.device).unsqueeze(1).expand_as(idx)
        m = x.new_zeros(c, b, b)
        chan = torch.arange(c, device=x.device).view(1, 1, c).expand(b, idx.shape[1], c)
        m.index_put_((chan, rows.unsqueeze(2).expand_as(chan), idx.unsqueeze(2).expand_as(chan)), w, accumulate=True)
        xt = x.reshape(b, c, h * wd).transpose(0, 1)                   # (C, B, hw)
        return torch.bmm(m, xt).transpose(0, 1).reshape(b, c, h, wd)

    def group_index(self, channels: int, bands: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Map each channel to its weight group (None for image granularity)."""
        if self.granularity == "image":
            return None
        if self.granularity == "channel":
            return torch.arange(channels)
        if bands is None:
            bands = torch.arange(channels) % 64
        bands = torch.as_tensor(bands, dtype=torch.long)
        if bands.shape != (channels,):
            raise HybridMaskInputError(f"bands must have shape ({channels},), got {tuple(bands.shape)}")
        return bands

    def draw(self, x: torch.Tensor, k: Optional[KLike] = None, pool_size: Optional[int] = None,
             bands: Optional[torch.Tensor] = None) -> MixRecord:
        """Draw the partners and weights for mixing ``x`` (B, C, h, w) - the secret half of
        :meth:`forward` (torchvision v2's ``_get_params``). ``pool_size``: partners come from a pool of
        that many faces (None: from the batch). Returns the :class:`MixRecord` that :meth:`apply`
        replays."""
        check_freq(x)
        b, c = x.shape[:2]
        if pool_size is not None and pool_size <= 0:
            raise HybridMaskInputError("the partner pool is empty")
        kt = self.resolve_k(x, k, capacity=(pool_size + 1) if pool_size is not None else b)
        kmax = int(kt.max())
        if kmax > 1 and self.weights == "instahide" and self.max_weight * int(kt[kt > 1].min()) < 1 - 1e-9:
            raise HybridMaskInputError(f"max_weight {self.max_weight} is infeasible for k={int(kt[kt > 1].min())} "
                                       f"(k * max_weight must be >= 1)")
        groups_of = self.group_index(c, bands)
        ngroups = 1 if groups_of is None else int(groups_of.max()) + 1
        idx = draw_partners(kt, kmax, b, pool_size or 0, self.generator)
        w = sample_weights(kt, kmax, ngroups, self.weights, self.generator, self.max_weight, self.alpha)
        if groups_of is None:
            wc = w[:, :, 0]                                # (B, K)
            label_w = wc
        else:
            wc = w[:, :, groups_of]                        # (B, K, C)
            label_w = wc.mean(dim=2)
        label_w = label_w / label_w.sum(dim=1, keepdim=True)
        return MixRecord(indices=idx, weights=wc.to(x.dtype), label_weights=label_w.to(x.dtype),
                         k=kt, source="pool" if pool_size is not None else "batch", granularity=self.granularity)

    @staticmethod
    def apply(x: torch.Tensor, record: MixRecord, pool=None) -> torch.Tensor:
        """Mix ``x`` with the partners and weights of ``record`` (deterministic; differentiable in
        ``x``). ``pool``: what ``record``'s pool indices point into (a tensor in ``x``'s representation
        or a callable ``pool(indices) -> faces``) when ``record.source == "pool"``."""
        check_freq(x)
        b, c = x.shape[:2]
        if record.indices.shape[0] != b:
            raise HybridMaskInputError(f"the mix record is for {record.indices.shape[0]} samples, got {b}")
        if (record.source == "pool") != (pool is not None):
            raise HybridMaskInputError(f"the mix record draws partners from the {record.source}; "
                                       f"{'pass' if pool is None else 'do not pass'} a pool")
        per_channel = record.weights.dim() == 3
        if per_channel and record.weights.shape[2] != c:
            raise HybridMaskInputError(f"the mix record has weights for {record.weights.shape[2]} channels, got {c}")
        wdev = record.weights.to(device=x.device, dtype=x.dtype)
        idx_dev = record.indices.to(x.device)
        if pool is None:
            groups_of = torch.arange(c) if per_channel else None
            return FreqMixUp._mix_in_batch(x, idx_dev, wdev, groups_of)
        out = x * (wdev[:, 0].view(b, 1, 1, 1) if not per_channel else wdev[:, 0].view(b, c, 1, 1))
        for j in range(1, record.indices.shape[1]):
            if isinstance(pool, torch.Tensor):
                src = pool.index_select(0, idx_dev[:, j].to(pool.device)).to(x.device, x.dtype)
            else:
                src = pool(record.indices[:, j], j).to(x.device, x.dtype)
            wj = wdev[:, j].view(b, 1, 1, 1) if not per_channel else wdev[:, j].view(b, c, 1, 1)
            out = out + wj * src
        return out

    def forward(self, x: torch.Tensor, k: Optional[KLike] = None, pool=None,
                bands: Optional[torch.Tensor] = None):
        """Mix ``x`` (B, C, h, w): :meth:`draw` then :meth:`apply`. ``pool``: a tensor in the same
        representation as ``x`` or an object with ``__len__`` and ``__call__(indices, column) ->
        (len(indices), C, h, w)``. ``bands``: (C,) band index per channel for ``granularity="band"``
        (default ``c % 64``). Returns ``(mixed, MixRecord)``."""
        record = self.draw(x, k, None if pool is None else len(pool), bands)
        return self.apply(x, record, pool), record
