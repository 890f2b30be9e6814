"""RGB <-> YCbCr (JPEG / BT.601 full range), on images scaled to [-1, 1].

The JPEG transform on 0..255 values is ``Y = 0.299R + 0.587G + 0.114B`` and
``Cb/Cr = 128 + ...``. hybridmask works on images in [-1, 1] (``p = (x + 1) * 127.5``) and
keeps the chroma centred, i.e. it returns ``(YCbCr_jpeg - 128) / 127.5``. With that scaling
the transform is a plain 3x3 matrix with no offset, so it is exactly linear (MixUp commutes
with it) and its inverse is the exact matrix inverse.
"""
from __future__ import annotations

import torch

# rows: Y, Cb, Cr ; columns: R, G, B
_RGB2YCBCR = torch.tensor([
    [0.299, 0.587, 0.114],
    [-0.168735891647856, -0.331264108352144, 0.5],
    [0.5, -0.418687589158345, -0.081312410841655],
], dtype=torch.float64)
_YCBCR2RGB = torch.linalg.inv(_RGB2YCBCR)
RGB2YCBCR = _RGB2YCBCR  # public: the matrix itself, for code that fuses it with other linear maps


def _apply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected a tensor with 3 colour channels at dim -3, got shape {tuple(x.shape)}")
    m = m.to(device=x.device, dtype=x.dtype)
    return torch.einsum("ij,...jhw->...ihw", m, x)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [-1, 1] -> YCbCr with Y in [-1, 1] and centred chroma in [-1, 1]."""
    return _apply(_RGB2YCBCR, x)


def ycbcr_to_rgb(y: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rgb_to_ycbcr`."""
    return _apply(_YCBCR2RGB, y)
