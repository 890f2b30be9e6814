"""Block DCT (BDCT) as used by JPEG, TFace/DCTDP and PPFR-FD.

``BlockDCT(u)``: RGB in [-1, 1] ``(B, 3, H, W)`` -> YCbCr -> optional bilinear upsampling by
``u`` -> orthonormal 8x8 DCT of every non-overlapping block -> coefficients of the same
frequency regrouped into channels: ``(B, 192, H*u/8, W*u/8)``, channel ``c*64 + i`` (see
:mod:`hybridmask.freq.channels`).

The 2-D DCT of a block ``X`` is ``D @ X @ D.T`` with the orthonormal DCT-II basis ``D``; with
row-major vectorisation this is one product with the fixed 64x64 basis ``kron(D, D)``, which
is how it is computed here (one GEMM for all blocks of the batch). Because the basis is
orthonormal, the inverse is the product with its transpose, exact to float rounding.

For ``u > 1`` the upsampled image is never built. Bilinear upsampling (``align_corners=False``),
the colour matrix and the block DCT are linear and local: with ``s = 8 / u`` the 8x8 block at grid
position ``(i, j)`` depends only on the ``(s + 2) x (s + 2)`` input pixels starting at
``(s*i - 1, s*j - 1)`` of the image padded by one replicated pixel (the clamping that bilinear
interpolation does at the borders), so the whole transform is one fixed strided convolution
``conv2d(pad(x, 1, "replicate"), W, stride=s)`` with ``W`` of shape ``(192, 3, s+2, s+2)``
(:meth:`BlockDCT.conv_weight`): 3x3 windows with stride 1 at u=8, 4x4 / stride 2 at u=4, 6x6 /
stride 4 at u=2. The weight factorises, ``W[c*64 + 8p + q, r, m, n] = M[c, r] F[p, m] F[q, n]``
with ``M`` the colour matrix and ``F = D @ A`` (``A``: the ``8 x (s+2)`` 1-D interpolation weights
of one block, read off ``F.interpolate`` itself), so it is evaluated separably as two small GEMMs
(rows with the colour matrix fused in, then columns) that write the output once. At u=8 on one
thread this is 10-20x faster than upsampling (``scripts/bench_masking.py``; at large batches
both are bounded by first-touching the 9.6 MB per face of output), and it is closer to the
float64 result than the float32 reference (~2e-6 vs ~8e-6 on faces; the two differ by < 1e-5).
``BlockDCT(u, method="reference")`` keeps the step-by-step path (upsample, colour, block DCT).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.validate import HybridMaskInputError, check_freq, check_images
from .channels import NUM_CHANNELS, NUM_FREQ
from .color import RGB2YCBCR, ycbcr_to_rgb

UPSAMPLE_FACTORS = (1, 2, 4, 8)
BDCT_METHODS = ("conv", "reference")


def dct_matrix(n: int = 8, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix: ``D[k, i] = a_k cos(pi (2i+1) k / 2n)``."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def block_basis(n: int = 8, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 2-D basis ``kron(D, D)``: ``vec(D X D^T) = B @ vec(X)`` for row-major ``vec``."""
    d = dct_matrix(n, torch.float64)
    return torch.kron(d, d).to(dtype)


def block_dct(x: torch.Tensor, basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C*64, H/8, W/8)`` orthonormal 8x8 block DCT (no colour transform)."""
    b, c, h, w = x.shape
    if h % 8 or w % 8:
        raise HybridMaskInputError(f"block DCT needs height and width divisible by 8, got {h}x{w}")
    if basis is None:
        basis = block_basis(8, x.dtype)
    basis = basis.to(device=x.device, dtype=x.dtype)
    hb, wb = h // 8, w // 8
    blocks = x.reshape(b, c, hb, 8, wb, 8).permute(0, 1, 3, 5, 2, 4).reshape(b, c, 64, hb * wb)
    coeffs = torch.matmul(basis, blocks)
    return coeffs.reshape(b, c * 64, hb, wb)


def block_idct(coeffs: torch.Tensor, basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact inverse of :func:`block_dct`: ``(B, C*64, h, w)`` -> ``(B, C, 8h, 8w)``."""
    b, ch, hb, wb = coeffs.shape
    if ch % 64:
        raise HybridMaskInputError(f"inverse block DCT needs a multiple of 64 channels, got {ch}")
    if basis is None:
        basis = block_basis(8, coeffs.dtype)
    basis = basis.to(device=coeffs.device, dtype=coeffs.dtype)
    c = ch // 64
    blocks = torch.matmul(basis.transpose(0, 1), coeffs.reshape(b, c, 64, hb * wb))
    return blocks.reshape(b, c, 8, 8, hb, wb).permute(0, 1, 4, 2, 5, 3).reshape(b, c, hb * 8, wb * 8)


def interpolation_matrix(u: int) -> torch.Tensor:
    """``(8, 8/u + 2)`` float64: the weights with which bilinear upsampling by ``u``
    (``align_corners=False``) makes the 8 samples of one block from the ``8/u + 2`` input samples
    starting one before the block's first source sample (interior blocks; at the borders the same
    weights apply to the replicate-padded signal). Read off ``F.interpolate`` by upsampling unit
    impulses, so it follows whatever convention torch uses; the identity for u=1 is not needed."""
    if u not in UPSAMPLE_FACTORS or u == 1:
        raise ValueError(f"interpolation_matrix needs u in {UPSAMPLE_FACTORS[1:]}, got {u!r}")
    s = 8 // u
    k = s + 2
    n = 4 * s                                      # block 1 (outputs 8..15) lies well inside
    impulses = torch.eye(n, dtype=torch.float64).view(n, 1, 1, n)
    up = F.interpolate(impulses, scale_factor=(1, u), mode="bilinear", align_corners=False)[:, 0, 0]  # (in, out)
    a = up[s - 1:s - 1 + k, 8:16].t().contiguous()
    if (up[:, 8:16].abs().sum() - a.abs().sum()).abs() > 1e-12:  # pragma: no cover - torch convention changed
        raise RuntimeError(f"bilinear upsampling by {u} is not local to {k} samples per block")
    return a


def _separable_factors(u: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(F, G)`` in float64: ``F = D @ A`` (8 x K), the 1-D "upsample then DCT" operator of one
    block, and ``G = kron(M, F)`` (24 x 3K), the colour matrix fused with the vertical pass."""
    f = dct_matrix(8, torch.float64) @ interpolation_matrix(u)
    return f, torch.kron(RGB2YCBCR.to(torch.float64), f)


class BlockDCT(nn.Module):
    """RGB image -> YCbCr -> (upsample by ``u``) -> 8x8 block DCT, regrouped by frequency.

    Args:
        u: bilinear upsampling factor in {1, 2, 4, 8}. The grid is ``H*u/8``: 14x14 for u=1
           (cheapest), 28x28 for u=2, 112x112 for u=8 (the TFace/DCTDP setting).
        method: for u > 1, ``"conv"`` (default) evaluates the transform as the fixed strided
           convolution of the module docstring, never building the upsampled image;
           ``"reference"`` upsamples with ``F.interpolate`` and transforms the blocks (the
           definition; 10-20x slower at u=8). Both agree to float rounding. u=1 has one path.

    ``forward(x)`` takes ``(B, 3, H, W)`` float RGB in [-1, 1] with ``H, W`` divisible by ``8/u``
    and returns ``(B, 192, H*u/8, W*u/8)``. ``inverse(coeffs, kept=None, size=None)`` maps
    back to RGB; with ``kept`` (the channel indices the coefficients correspond to) the missing
    channels are zero-filled. For u=1 the round trip is exact; for u>1 the inverse returns the
    upsampled image, or, with ``size``, an area-downsampled one (resampling is not invertible).
    """

    def __init__(self, u: int = 1, method: str = "conv"):
        super().__init__()
        if u not in UPSAMPLE_FACTORS:
            raise ValueError(f"upsample factor u must be one of {UPSAMPLE_FACTORS}, got {u!r}")
        if method not in BDCT_METHODS:
            raise ValueError(f"method must be one of {BDCT_METHODS}, got {method!r}")
        self.u = int(u)
        self.method = method
        self.register_buffer("basis", block_basis(8, torch.float32), persistent=False)
        if self.u > 1:
            f, g = _separable_factors(self.u)
            # float64 masters (derived once); cast per call (a few hundred numbers) to the input's dtype
            self.register_buffer("row_factor", f, persistent=False)       # (8, K): F = D @ A
            self.register_buffer("col_factor", g, persistent=False)       # (24, 3K): kron(M, F)

    def extra_repr(self) -> str:
        return f"u={self.u}" + (f", method={self.method!r}" if self.method != "conv" else "")

    def grid(self, size: int) -> int:
        """Side of the coefficient grid for an input of side ``size``."""
        return size * self.u // 8

    def _basis(self, x: torch.Tensor) -> torch.Tensor:
        b = self.basis
        if b.dtype != x.dtype or b.device != x.device:
            b = block_basis(8, x.dtype).to(x.device) if x.dtype == torch.float64 else b.to(x.device, x.dtype)
        return b

    def _factors(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f, g = self.row_factor, self.col_factor
        if x.dtype == torch.float64 and f.dtype != torch.float64:  # module cast to a lower precision
            f, g = _separable_factors(self.u)
        return f.to(device=x.device, dtype=x.dtype), g.to(device=x.device, dtype=x.dtype)

    def conv_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The ``(192, 3, 8/u + 2, 8/u + 2)`` weight ``W`` with which, for u > 1,
        ``forward(x) == conv2d(pad(x, (1, 1, 1, 1), "replicate"), W, stride=8 // u)``."""
        if self.u == 1:
            raise ValueError("conv_weight is defined for u > 1 (u=1 is the plain 8x8 block DCT)")
        f, _ = _separable_factors(self.u)
        w = torch.einsum("cr,pm,qn->cpqrmn", RGB2YCBCR.to(torch.float64), f, f)
        return w.reshape(NUM_CHANNELS, 3, f.shape[1], f.shape[1]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "images", channels=3, multiple=8 // self.u)
        if self.u > 1 and self.method == "conv":
            return self._conv(x)
        return self._reference(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """The strided convolution, evaluated separably: with ``K = s + 2`` input rows per block
        row, ``T = kron(M, F) @ rows`` (colour + vertical pass, (B, 3*8, h/s, W+2)), then each
        horizontal K-window of ``T`` times ``F`` gives the 64 coefficients of a block, written
        straight into the ``(B, 3, 8, 8, h/s * w/s)`` = ``(B, 192, h/s, w/s)`` output layout.

        Without autograd the batch goes through in chunks of ~4 MB of intermediates, each chunk
        writing its slice of one preallocated output: fresh pages cost more than the arithmetic
        here (the output alone is 9.6 MB per face at u=8), so the temporaries are kept small
        enough to be reused by the allocator."""
        s = 8 // self.u
        k = s + 2
        f, g = self._factors(x)
        b, _, h, w = x.shape
        hb, wb = h // s, w // s

        def windows(xc: torch.Tensor) -> torch.Tensor:
            n = xc.shape[0]
            xp = F.pad(xc, (1, 1, 1, 1), mode="replicate")
            # (n, 3, hb, W+2, K) windows of rows -> (n, 3*K, hb*(W+2)); index r*K + m matches kron(M, F)
            rows = xp.unfold(2, k, s).permute(0, 1, 4, 2, 3).reshape(n, 3 * k, hb * (w + 2))
            t = torch.matmul(g, rows).view(n, 3, 8, hb, w + 2)
            return t.unfold(4, k, s).permute(0, 1, 2, 5, 3, 4).reshape(n, 3, 8, k, hb * wb)

        if torch.is_grad_enabled() and x.requires_grad:
            return torch.matmul(f, windows(x)).view(b, NUM_CHANNELS, hb, wb)
        chunk = max(1, (1 << 20) // max(1, 24 * k * (hb * wb + hb * (w + 2))))
        if chunk >= b:
            return torch.matmul(f, windows(x)).view(b, NUM_CHANNELS, hb, wb)
        out = x.new_empty(b, 3, 8, 8, hb * wb)
        for i in range(0, b, chunk):
            torch.matmul(f, windows(x[i:i + chunk]), out=out[i:i + chunk])
        return out.view(b, NUM_CHANNELS, hb, wb)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: upsample (u > 1), colour matrix, 8x8 block DCT (``x`` already checked)."""
        if self.u > 1:
            # bilinear resampling acts on each colour plane alike, so it commutes with the colour matrix
            x = F.interpolate(x, scale_factor=self.u, mode="bilinear", align_corners=False)
        # one copy into block layout (also makes channels-last / permuted inputs contiguous), then the
        # 3x3 colour matrix and the 64x64 DCT basis as two GEMMs: half the time and memory traffic of
        # converting the colour of the image first and regrouping the blocks afterwards
        b, _, h, w = x.shape
        hb, wb = h // 8, w // 8
        blocks = x.reshape(b, 3, hb, 8, wb, 8).permute(0, 1, 3, 5, 2, 4).reshape(b, 3, 64 * hb * wb)
        ycc = torch.matmul(RGB2YCBCR.to(device=x.device, dtype=x.dtype), blocks).view(b, 3, 64, hb * wb)
        return torch.matmul(self._basis(x), ycc).view(b, NUM_CHANNELS, hb, wb)

    def inverse(self, coeffs: torch.Tensor, kept: Optional[Sequence[int]] = None,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        check_freq(coeffs, name="coefficients")
        if kept is not None:
            coeffs = zero_fill(coeffs, kept)
        elif coeffs.shape[1] != NUM_CHANNELS:
            raise HybridMaskInputError(
                f"inverse needs {NUM_CHANNELS} channels or the list of kept channels, got {coeffs.shape[1]} channels")
        y = block_idct(coeffs, self._basis(coeffs))
        if size is not None and tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="area")
        return ycbcr_to_rgb(y)


def zero_fill(coeffs: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Place ``(B, len(kept), h, w)`` coefficients at channels ``kept`` of a zero ``(B, 192, h, w)`` tensor."""
    kept = list(kept)
    if coeffs.shape[1] != len(kept):
        raise HybridMaskInputError(f"got {coeffs.shape[1]} channels but {len(kept)} kept channel indices")
    out = coeffs.new_zeros(coeffs.shape[0], NUM_CHANNELS, *coeffs.shape[-2:])
    out[:, kept] = coeffs
    return out


__all__ = ["BlockDCT", "block_dct", "block_idct", "dct_matrix", "block_basis", "zero_fill", "NUM_FREQ"]
