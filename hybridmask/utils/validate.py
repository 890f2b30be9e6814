"""Input validation with one clear message per problem."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

#: Image batches must lie in [-1, 1] (``pixel / 127.5 - 1``) up to this absolute tolerance: well
#: above float32 round-off of decode / colour / DCT round trips (~1e-6), well below one 8-bit grey
#: level (2 / 255 ~ 7.8e-3), so any other encoding ([0, 255], [0, 1] shifted, ...) is caught.
IMAGE_RANGE = (-1.0, 1.0)
RANGE_TOLERANCE = 1e-3


class HybridMaskInputError(ValueError):
    """Raised for bad user input (shape, dtype, NaN, sizes)."""


def _check_type(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise HybridMaskInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise HybridMaskInputError(f"{name} must be a floating-point tensor (float32/float64), got dtype {x.dtype}")


def _check_tensor(x, name: str) -> None:
    _check_type(x, name)
    # one reduction instead of an elementwise mask: the sum is finite iff every entry is, unless
    # huge finite entries overflow it, which the exact (slower) check below then rules out
    if x.numel() and not bool(torch.isfinite(x.detach().sum())) and not bool(torch.isfinite(x).all()):
        raise HybridMaskInputError(f"{name} contains NaN or infinite values")


def _range_hint(lo: float, hi: float) -> str:
    if lo >= -RANGE_TOLERANCE and 2.0 < hi <= 255.0 + RANGE_TOLERANCE:
        return "; these look like 0..255 pixel values: convert them with x / 127.5 - 1"
    return "; convert 0..255 pixels with x / 127.5 - 1 and [0, 1] images with x * 2 - 1"


def check_images(x, name: str = "images", channels: int = 3, multiple: Optional[int] = None,
                 value_range: Optional[Tuple[float, float]] = IMAGE_RANGE) -> None:
    """Check a (B, C, H, W) float image batch: finite, values in ``value_range`` ([-1, 1], i.e.
    ``pixel / 127.5 - 1``, up to :data:`RANGE_TOLERANCE`; None: any finite values); optionally that H
    and W are multiples of ``multiple``.

    Finiteness and range come from one fused ``torch.aminmax`` pass (NaN propagates into it, inf
    lands on an end), so the check costs one read of the batch. Images in [0, 1] lie inside [-1, 1]
    and cannot be told apart from a bright face by range; they pass (convert them with ``x * 2 - 1``).
    """
    _check_type(x, name)
    if x.dim() != 4:
        raise HybridMaskInputError(f"{name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise HybridMaskInputError(f"{name} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if multiple is not None and (x.shape[-1] % multiple or x.shape[-2] % multiple):
        raise HybridMaskInputError(
            f"{name} height and width must be divisible by {multiple}, got {x.shape[-2]}x{x.shape[-1]}")
    if not x.numel():
        return
    lo_t, hi_t = torch.aminmax(x.detach())
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise HybridMaskInputError(f"{name} contains NaN or infinite values")
    if value_range is not None:
        a, b = value_range
        if lo < a - RANGE_TOLERANCE or hi > b + RANGE_TOLERANCE:
            raise HybridMaskInputError(
                f"{name} must lie in [{a:g}, {b:g}] (pixel / 127.5 - 1), got values in [{lo:.4g}, {hi:.4g}]"
                + (_range_hint(lo, hi) if (a, b) == IMAGE_RANGE else ""))


def check_freq(x, channels: Optional[int] = None, name: str = "frequency tensor") -> None:
    """Check a (B, C, h, w) frequency tensor, optionally its channel count."""
    _check_tensor(x, name)
    if x.dim() != 4:
        raise HybridMaskInputError(f"{name} must have shape (B, C, h, w), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise HybridMaskInputError(f"{name} must have {channels} channels, got {x.shape[1]}")
