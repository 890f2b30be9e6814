"""Input validation with one clear message per problem."""
from __future__ import annotations

from typing import Optional

import torch


class HybridMaskInputError(ValueError):
    """Raised for bad user input (shape, dtype, NaN, sizes)."""


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise HybridMaskInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise HybridMaskInputError(f"{name} must be a floating-point tensor (float32/float64), got dtype {x.dtype}")
    # one reduction instead of an elementwise mask: the sum is finite iff every entry is, unless
    # huge finite entries overflow it, which the exact (slower) check below then rules out
    if x.numel() and not bool(torch.isfinite(x.detach().sum())) and not bool(torch.isfinite(x).all()):
        raise HybridMaskInputError(f"{name} contains NaN or infinite values")


def check_images(x, name: str = "images", channels: int = 3, multiple: Optional[int] = None) -> None:
    """Check a (B, C, H, W) float image batch; optionally that H and W are multiples of ``multiple``."""
    _check_tensor(x, name)
    if x.dim() != 4:
        raise HybridMaskInputError(f"{name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise HybridMaskInputError(f"{name} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if multiple is not None and (x.shape[-1] % multiple or x.shape[-2] % multiple):
        raise HybridMaskInputError(
            f"{name} height and width must be divisible by {multiple}, got {x.shape[-2]}x{x.shape[-1]}")


def check_freq(x, channels: Optional[int] = None, name: str = "frequency tensor") -> None:
    """Check a (B, C, h, w) frequency tensor, optionally its channel count."""
    _check_tensor(x, name)
    if x.dim() != 4:
        raise HybridMaskInputError(f"{name} must have shape (B, C, h, w), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise HybridMaskInputError(f"{name} must have {channels} channels, got {x.shape[1]}")
