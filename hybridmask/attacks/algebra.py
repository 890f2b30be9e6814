"""The exact algebra a white-box attacker undoes before any learning (DESIGN section 3, item 5).

* :func:`unmix_neighbour` - PPFR-FD's public neighbour mix ``y_i = (z_i + z_{i+1}) / sqrt(2)`` is the
  circulant ``(I + S) / sqrt(2)``; for an odd number of channels every eigenvalue
  ``(1 + w^j) / sqrt(2)`` is non-zero, so it is inverted exactly, whatever the secret permutation
  before it (one FFT along the channels).
* :func:`recover_block_means` - dropping each 8x8 block's DC removes the block's mean, not the face:
  neighbouring blocks must continue each other across their shared edges. With the jump across
  every edge predicted from the blocks' own gradients, the block means solve a Poisson problem on
  the block grid (Neumann boundary), diagonalised by the DCT-II, so one solve costs two small matrix
  products per colour. The free constant per colour is set to the attacker's prior (the mean block
  means of its own faces).
* :func:`inverse_release` - zero-filled channels back in place, recovered means as the DC, inverse
  BDCT and colour transform: the picture.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..freq.channels import NUM_CHANNELS, NUM_FREQ
from ..freq.dct import block_idct, dct_matrix, zero_fill

DC_CHANNELS = (0, NUM_FREQ, 2 * NUM_FREQ)


def neighbour_mix(z: torch.Tensor) -> torch.Tensor:
    """``(z + roll(z, -1, dim=1)) / sqrt(2)``: PPFR-FD's public mix (for tests and the attacker's own use)."""
    return (z + torch.roll(z, shifts=-1, dims=1)) / math.sqrt(2.0)


def unmix_neighbour(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`neighbour_mix` along dim 1, in float64 inside: exact for an odd channel count. For an
    even count the mix is singular - it erases the alternating component ``sum_c (-1)^c z_c`` (one of C
    dimensions) - and this returns the minimum-norm solution: everything else exactly, that component as 0."""
    c = y.shape[1]
    w = torch.exp(2j * math.pi * torch.arange(c, dtype=torch.float64) / c)
    eig = (1 + w) / math.sqrt(2.0)
    inv = torch.where(eig.abs() > 1e-9, 1.0 / torch.where(eig.abs() > 1e-9, eig, torch.ones_like(eig)),
                      torch.zeros_like(eig))          # pseudo-inverse: the zero eigenvalue (c even) maps to 0
    shape = (1, c) + (1,) * (y.dim() - 2)
    z = torch.fft.ifft(torch.fft.fft(y.double(), dim=1) * inv.view(shape), dim=1).real
    return z.to(y.dtype)


def solve_neumann_poisson(div: torch.Tensor, prior: Optional[torch.Tensor] = None, weight: float = 0.0) -> torch.Tensor:
    """``m`` minimising ``m'Lm - 2 div'm + weight * |m - prior|^2`` for the grid-graph Laplacian ``L`` of an
    (h, w) grid with free edges (``div``: (..., h, w)), via the DCT-II that diagonalises ``L``. With
    ``weight=0`` the solution has the mean of ``prior`` (zero without one): the Laplacian leaves the
    constant free."""
    h, w = div.shape[-2:]
    dh, dw = dct_matrix(h).to(div.device), dct_matrix(w).to(div.device)
    k1 = 2.0 - 2.0 * torch.cos(math.pi * torch.arange(h, dtype=torch.float64, device=div.device) / h)
    k2 = 2.0 - 2.0 * torch.cos(math.pi * torch.arange(w, dtype=torch.float64, device=div.device) / w)
    lam = k1.view(h, 1) + k2.view(1, w) + float(weight)
    spec = dh @ div.double() @ dw.T
    p_spec = None if prior is None else dh @ prior.double().expand_as(div) @ dw.T
    if weight > 0 and p_spec is not None:
        spec = (spec + weight * p_spec) / lam
    else:
        lam[0, 0] = 1.0
        spec = spec / lam
        spec[..., 0, 0] = 0.0 if p_spec is None else p_spec[..., 0, 0]
    return (dh.T @ spec @ dw).to(div.dtype)


def recover_block_means(pixels: torch.Tensor, prior: Optional[torch.Tensor] = None,
                        prior_weight: float = 0.0) -> torch.Tensor:
    """Block means of ``pixels`` (B, C, 8h, 8w) whose 8x8 blocks have lost their means (each block has
    zero mean): the (B, C, h, w) means that make neighbouring blocks continue each other across their
    shared edges (least squares, the jump across an edge predicted from the two blocks' gradients next
    to it). ``prior`` (C, h, w) or (B, C, h, w): what the attacker expects the means to be (its own
    faces' average); with ``prior_weight=0`` only its average per colour is used, to set each colour's
    free constant, otherwise the means are also pulled towards it with that weight (None: zero)."""
    b, c, hh, ww = pixels.shape
    h, w = hh // 8, ww // 8
    x = pixels.double().reshape(b, c, h, 8, w, 8)
    # horizontal neighbours: block (i, j) | (i, j+1)
    left_last, left_prev = x[:, :, :, :, :-1, 7], x[:, :, :, :, :-1, 6]
    right_first, right_next = x[:, :, :, :, 1:, 0], x[:, :, :, :, 1:, 1]
    pred = 0.5 * ((left_last - left_prev) + (right_next - right_first))
    # m_right - m_left should be t_h
    t_h = (left_last + pred - right_first).mean(dim=3)                     # (B, C, h, w-1)
    up_last, up_prev = x[:, :, :-1, 7, :, :], x[:, :, :-1, 6, :, :]
    down_first, down_next = x[:, :, 1:, 0, :, :], x[:, :, 1:, 1, :, :]
    pred_v = 0.5 * ((up_last - up_prev) + (down_next - down_first))
    t_v = (up_last + pred_v - down_first).mean(dim=4)                      # (B, C, h-1, w)
    # normal equations of sum (m_r - m_l - t)^2: L m = div, div = sum of incoming t minus outgoing t
    div = torch.zeros(b, c, h, w, dtype=torch.float64, device=pixels.device)
    div[..., :, 1:] += t_h
    div[..., :, :-1] -= t_h
    div[..., 1:, :] += t_v
    div[..., :-1, :] -= t_v
    p = None if prior is None else prior.to(div.device, torch.float64).expand(b, c, h, w)
    return solve_neumann_poisson(div, p, prior_weight).to(pixels.dtype)


def release_planes(coeffs_kept: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """(B, len(kept), h, w) coefficients at the kept channels -> the full (B, 192, h, w) tensor with
    zeros elsewhere."""
    return zero_fill(coeffs_kept, kept)


def fill_dc(full: torch.Tensor, prior_dc: Optional[torch.Tensor] = None, prior_weight: float = 0.0) -> torch.Tensor:
    """``full`` (B, 192, h, w) BDCT coefficients with zero DC channels -> the same with every DC
    recovered from the AC coefficients (:func:`recover_block_means`; DC = 8 x block mean).
    ``prior_dc`` (3, h, w): the attacker's mean DC per colour (sets each colour's constant)."""
    b, _, h, w = full.shape
    ac = full.clone()
    ac[:, list(DC_CHANNELS)] = 0
    pix = block_idct(ac.reshape(b, NUM_CHANNELS, h, w))                   # (B, 3, 8h, 8w), YCbCr
    prior = None if prior_dc is None else prior_dc / 8.0
    means = recover_block_means(pix, prior, prior_weight)
    out = full.clone()
    out[:, list(DC_CHANNELS)] = (8.0 * means).to(full.dtype)
    return out


def to_face(full: torch.Tensor, bdct, size: int = 112) -> torch.Tensor:
    """(B, 192, h, w) full BDCT -> (B, 3, size, size) RGB in [-1, 1] (area-downsampled for u > 1)."""
    return bdct.inverse(full, size=(size, size)).clamp(-1, 1)


__all__ = ["neighbour_mix", "unmix_neighbour", "solve_neumann_poisson", "recover_block_means", "release_planes",
           "fill_dc", "to_face", "DC_CHANNELS"]
