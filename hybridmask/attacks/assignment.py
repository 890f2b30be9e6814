"""Recovering which (colour, frequency) channel each released plane is, under secret permutations.

Every BDCT plane has a signature that survives the shuffle: its energy relative to the whole face, the
spatial layout of that energy (where the eyes, nose and mouth put it), its signed pattern, and how it
correlates with its own neighbours on the grid. The attacker learns the signatures for free from its
own faces (the planes of its own BDCT, labelled by channel), scores every released plane against every
channel with a small classifier, and solves the assignment: per sample (a fresh permutation per face),
or once per client key by summing the evidence of many queries of that client (Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

POOL = 7
#: float64 values per chunk of faces in :func:`plane_features` (its temporaries are a few copies of the
#: chunk): a u=8 release is 189 planes of 112x112, 19 MB per face in float64, so whole sets do not fit
FEATURE_CHUNK_VALUES = 1 << 22


def plane_features(planes: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) planes of B faces -> (B, C, F) features invariant to the order of the C planes (computed
    a few faces at a time: the features are small, the float64 temporaries of a whole set are not)."""
    b, c, h, w = planes.shape
    step = max(1, FEATURE_CHUNK_VALUES // max(1, c * h * w))
    if b > step:
        return torch.cat([_plane_features(planes[i:i + step]) for i in range(0, b, step)])
    return _plane_features(planes)


def _plane_features(planes: torch.Tensor) -> torch.Tensor:
    x = planes.double()
    b, c, h, w = x.shape
    energy = x.pow(2).mean(dim=(2, 3))                                       # (B, C)
    total = energy.mean(dim=1, keepdim=True).clamp_min(1e-20)
    rel = torch.log(energy / total + 1e-12).unsqueeze(2)                       # relative log energy
    rms = energy.sqrt().clamp_min(1e-12).view(b, c, 1, 1)
    size = min(POOL, h, w)
    mag = F.adaptive_avg_pool2d((x.abs() / rms).reshape(b * c, 1, h, w), size).reshape(b, c, -1)
    sig = F.adaptive_avg_pool2d((x / rms).reshape(b * c, 1, h, w), size).reshape(b, c, -1)
    xn = x / rms
    ch = (xn[..., :, 1:] * xn[..., :, :-1]).mean(dim=(2, 3)).unsqueeze(2)       # horizontal autocorrelation
    cv = (xn[..., 1:, :] * xn[..., :-1, :]).mean(dim=(2, 3)).unsqueeze(2)       # vertical autocorrelation
    kurt = (xn.pow(4).mean(dim=(2, 3)) + 1e-12).log().unsqueeze(2)
    sym = (xn * xn.flip(-1)).mean(dim=(2, 3)).unsqueeze(2)                     # left-right (anti)symmetry
    return torch.cat([rel, mag, sig, ch, cv, kurt, sym], dim=2).float()


class PlaneClassifier(nn.Module):
    """Plane features -> log-probabilities over the C channels (an MLP, trained on the attacker's faces)."""

    def __init__(self, n_features: int, n_channels: int, hidden: int = 256):
        super().__init__()
        self.register_buffer("mu", torch.zeros(n_features))
        self.register_buffer("sd", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_channels))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net((feats - self.mu) / self.sd), dim=-1)


def fit_plane_classifier(planes: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None, epochs: int = 30,
                         batch_size: int = 4096, lr: float = 3e-3, hidden: int = 256,
                         generator: Optional[torch.Generator] = None,
                         features: Optional[torch.Tensor] = None) -> PlaneClassifier:
    """Train on the attacker's own (B, C, h, w) planes, or on their :func:`plane_features` (B, C, F) computed
    beforehand (``features``, with ``planes=None``: sets too big to hold as planes). ``labels`` (B, C): the
    channel each plane is (None: the planes are in their true order, plane i is channel i)."""
    if (planes is None) == (features is None):
        raise ValueError("fit_plane_classifier needs planes or features (exactly one)")
    feats = plane_features(planes) if features is None else features         # (B, C, F)
    b, c, nf = feats.shape
    xs = feats.reshape(b * c, nf)
    ys = torch.arange(c).repeat(b) if labels is None else labels.reshape(-1).long()
    model = PlaneClassifier(nf, c, hidden)
    model.mu.copy_(xs.mean(0))
    model.sd.copy_(xs.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = max(1, epochs * ((b * c + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(b * c, generator=g)
        for i in range(0, b * c, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.nll_loss(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def slot_log_probs(model: PlaneClassifier, planes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(B, C, h, w) shuffled planes -> (B, C slots, C channels) log-probabilities."""
    return torch.cat([model(plane_features(planes[i:i + batch_size])) for i in range(0, planes.shape[0], batch_size)])


def assign(log_probs: torch.Tensor) -> torch.Tensor:
    """(B, C, C) or (C, C) slot-by-channel log-probabilities -> (B, C) or (C,) channel of each slot that
    maximises the summed log-probability under the one-to-one constraint (Hungarian)."""
    from scipy.optimize import linear_sum_assignment
    single = log_probs.dim() == 2
    lp = log_probs.unsqueeze(0) if single else log_probs
    out = torch.empty(lp.shape[:2], dtype=torch.long)
    for i, m in enumerate(lp.double().cpu().numpy()):
        rows, cols = linear_sum_assignment(-m)
        out[i, torch.as_tensor(rows)] = torch.as_tensor(cols.astype(np.int64))
    return out[0] if single else out


def unshuffle(planes: torch.Tensor, channel_of_slot: torch.Tensor) -> torch.Tensor:
    """Put each slot's plane back at its channel: ``out[:, channel_of_slot[:, i]] = planes[:, i]``."""
    b = planes.shape[0]
    cos = channel_of_slot.expand(b, -1) if channel_of_slot.dim() == 1 else channel_of_slot
    out = torch.empty_like(planes)
    rows = torch.arange(b).unsqueeze(1).expand_as(cos)
    out[rows, cos.to(planes.device)] = planes
    return out


__all__ = ["plane_features", "PlaneClassifier", "fit_plane_classifier", "slot_log_probs", "assign", "unshuffle"]
