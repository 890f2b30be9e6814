"""Context features for the strategy (policy) network.

:func:`context_features` turns a batch of *masked* frequency tensors ``(B, C, h, w)`` plus two
training scalars into a fixed-size, per-sample context vector ``(B, CONTEXT_DIM)``.

Design rules
------------
* **Per sample.** Every feature of row ``i`` depends only on sample ``i`` (and the two broadcast
  scalars); nothing is pooled over the batch, so the policy's input does not depend on which
  other samples share the batch.
* **Permutation invariant over channels.** PPFR-FD's fast masking shuffles the kept channels
  with a per-sample *secret* permutation before the policy sees them. Features indexed by channel
  (e.g. "energy of band 5") would be noise after the shuffle and could leak the permutation, so
  channel energies enter only through their sorted quantiles. The feature vector therefore has
  the same meaning for any channel count ``C`` (189 for ``drop="dc"``, 192, ...) and any grid.
* **Scale stable.** Energies enter as logarithms; the channel-energy quantiles and the kurtosis
  are computed on the sample divided by its own max ``|x|``, so multiplying the input by a constant only
  shifts ``log_energy`` and leaves every other feature unchanged. All features are clamped to
  ``[-FEATURE_CLIP, FEATURE_CLIP]``.
* **Cheap.** One pass of squares/fourth powers and a quantile over ``C`` numbers per sample,
  in chunks of at most 2**22 elements (bounded extra memory at u=8); computed under
  ``torch.no_grad()`` (the policy never back-propagates into the masking).

Features (``FEATURE_NAMES``, ``CONTEXT_DIM = 12``)
--------------------------------------------------
0. ``log_energy``: ``log(mean(x**2))`` over all channels and positions.
1-7. ``q0 .. q100``: quantiles (0, 10, 25, 50, 75, 90, 100 %) over channels of the per-channel
   log energy ``log(mean_{h,w} x_c**2)`` minus ``log_energy`` (the shape of the energy spectrum).
8. ``log_spatial_cv``: log of the coefficient of variation over the ``h*w`` positions of the
   channel-averaged energy map (how unevenly energy is spread in space; MixUp smooths it).
9. ``log_kurtosis``: ``log(mean(z**4))`` with ``z = x / rms(x)`` (3 -> log 3 for Gaussian
   coefficients; sums of several images are more Gaussian, so this tracks the mixing degree).
10. ``running_loss``: ``sign(L) * log1p(|L|)`` of the running FR loss (broadcast).
11. ``progress``: training progress in ``[0, 1]`` (broadcast).
"""
from __future__ import annotations

import math
import numbers

import torch

from ..utils import HybridMaskInputError, check_freq

FEATURE_NAMES = (
    "log_energy",
    "q0", "q10", "q25", "q50", "q75", "q90", "q100",
    "log_spatial_cv",
    "log_kurtosis",
    "running_loss",
    "progress",
)
CONTEXT_DIM = len(FEATURE_NAMES)
FEATURE_CLIP = 50.0
_QUANTILES = (0.0, 0.10, 0.25, 0.50, 0.75, 0.90, 1.0)
_EPS = 1e-12
_TINY = 1e-30
_CHUNK_ELEMS = 1 << 22  # elements per chunk: bounds the temporary memory at u=8


def context_dim(channels: int | None = None) -> int:
    """Length of the context vector. It does not depend on the channel count (see module doc);
    ``channels`` is accepted so callers can write ``context_dim(hm.out_channels)``."""
    if channels is not None and (not isinstance(channels, numbers.Integral) or isinstance(channels, bool)
                                 or channels < 1):
        raise HybridMaskInputError(f"channels must be a positive int, got {channels!r}")
    return CONTEXT_DIM


def _check_scalar(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise HybridMaskInputError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HybridMaskInputError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise HybridMaskInputError(f"{name} must be finite, got {value}")
    return value


def context_features(masked_freq: torch.Tensor, running_loss: float = 0.0, progress: float = 0.0) -> torch.Tensor:
    """Per-sample context ``(B, CONTEXT_DIM)`` of a masked frequency batch ``(B, C, h, w)``.

    For the policy's decision pass each sample's masked tensor *before* mixing
    (``HybridMask.encode(x)``, the k=1 masking); the features are also defined on mixed tensors.

    ``running_loss`` is the trainer's running FR loss (finite), ``progress`` the fraction of
    training done, in ``[0, 1]``. The result has the dtype and device of ``masked_freq`` and
    carries no gradient.
    """
    check_freq(masked_freq, name="masked_freq")
    loss = _check_scalar(running_loss, "running_loss")
    prog = _check_scalar(progress, "progress")
    if not 0.0 <= prog <= 1.0:
        raise HybridMaskInputError(f"progress must be in [0, 1], got {prog}")
    x = masked_freq.detach()
    B = x.shape[0]
    per_sample = max(1, x[0].numel())
    chunk = max(1, _CHUNK_ELEMS // per_sample)
    rows = []
    with torch.no_grad():
        for xc in x.split(chunk, dim=0):
            # divide each sample by its max |x| first: powers cannot overflow, features are scale free
            amax = xc.abs().amax(dim=(1, 2, 3)).clamp_min(_TINY)            # (b,)
            z2 = (xc / amax.view(-1, 1, 1, 1)).square()                     # (b, C, h, w), in [0, 1]
            ch_energy = z2.mean(dim=(2, 3))                                  # (b, C)
            energy = ch_energy.mean(dim=1)                                   # (b,)
            log_e = torch.log(energy + _EPS) + 2.0 * torch.log(amax)
            # shape of the energy spectrum: per-channel log energy relative to the sample's energy
            rel = torch.log(ch_energy / (energy[:, None] + _EPS) + _EPS)
            q = torch.quantile(rel, rel.new_tensor(_QUANTILES), dim=1).T    # (b, 7)
            # spatial heterogeneity of the channel-averaged energy map
            emap = z2.mean(dim=1).flatten(1)                                 # (b, h*w)
            cv = emap.std(dim=1, unbiased=False) / (emap.mean(dim=1) + _EPS)
            log_cv = torch.log(cv + 1e-6)
            # kurtosis mean(x^4) / mean(x^2)^2
            kurt = z2.square().mean(dim=(1, 2, 3)) / (energy.square() + _EPS)
            log_k = torch.log(kurt + 1e-6)
            rows.append(torch.cat([log_e[:, None], q, log_cv[:, None], log_k[:, None]], dim=1))
        scal = x.new_tensor([math.copysign(math.log1p(abs(loss)), loss), prog]).expand(B, 2)
        out = torch.cat([torch.cat(rows, dim=0), scal], dim=1)
        out = torch.nan_to_num(out, nan=0.0).clamp(-FEATURE_CLIP, FEATURE_CLIP)
    return out.contiguous()
