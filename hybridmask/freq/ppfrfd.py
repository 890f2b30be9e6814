"""PPFR-FD masking (Wang et al., AAAI 2022): channel dropping + keyed shuffle-and-mix.

1. Drop channels (default: the DC channel of each colour, which carries most of the energy
   and most of what a human sees).
2. "Fast masking" of the kept channels with secrets drawn from a generator that is *not* the
   training seed:
   * ``shuffle="sample"`` - a fresh secret permutation per sample (the DESIGN default);
     ``"key"`` - one secret permutation per masking object (a client key), the same for every
     sample; ``"none"``.
   * ``mix="neighbour"`` - ``c'_i = (c_P(i) + c_P(i+1 mod C)) / sqrt(2)``; ``"none"`` - no mixing.
     (The circulant ``(I + S)/sqrt(2)`` is invertible iff the number of kept channels is odd,
     e.g. 189 for ``drop="dc"``.)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..utils.rng import SeedLike, make_generator
from ..utils.validate import check_freq
from .channels import NUM_CHANNELS, ChannelSpec, split_channels

SHUFFLE_MODES = ("sample", "key", "none")
MIX_MODES = ("neighbour", "none")


class PPFRFD(nn.Module):
    """``(B, 192, h, w)`` BDCT coefficients -> ``(B, C_kept, h, w)`` masked coefficients."""

    def __init__(self, drop: ChannelSpec = "dc", shuffle: str = "sample", mix: str = "neighbour",
                 seed: SeedLike = None):
        super().__init__()
        if shuffle not in SHUFFLE_MODES:
            raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
        self.dropped, self.kept = split_channels(drop)
        self.drop_spec = drop
        self.shuffle = shuffle
        self.mix = mix
        self.generator = make_generator(seed)
        self.register_buffer("kept_index", torch.tensor(self.kept, dtype=torch.long), persistent=False)
        # the client key for shuffle="key": drawn once from the secret generator
        self._key_perm = torch.randperm(len(self.kept), generator=self.generator) if shuffle == "key" else None

    @property
    def out_channels(self) -> int:
        return len(self.kept)

    def extra_repr(self) -> str:
        return f"kept={len(self.kept)}, shuffle={self.shuffle!r}, mix={self.mix!r}"

    def select(self, freq: torch.Tensor) -> torch.Tensor:
        """Channel dropping only."""
        check_freq(freq, NUM_CHANNELS, "BDCT coefficients")
        return freq.index_select(1, self.kept_index.to(freq.device))

    def permutations(self, batch: int) -> Optional[torch.Tensor]:
        """Draw the (B, C_kept) permutations for one batch (None for ``shuffle="none"``)."""
        c = len(self.kept)
        if self.shuffle == "none":
            return None
        if self.shuffle == "key":
            return self._key_perm.unsqueeze(0).expand(batch, c)
        return torch.rand(batch, c, generator=self.generator).argsort(dim=1)

    def scramble(self, kept: torch.Tensor) -> torch.Tensor:
        """Shuffle and mix already-selected channels ``(B, C_kept, h, w)``."""
        perm = self.permutations(kept.shape[0])
        if perm is not None:
            rows = torch.arange(kept.shape[0], device=kept.device).unsqueeze(1)
            kept = kept[rows, perm.to(kept.device)]  # per-sample channel permutation (copies h*w planes)
        if self.mix == "neighbour":
            kept = torch.add(kept, torch.roll(kept, shifts=-1, dims=1)).mul_(1.0 / math.sqrt(2.0))
        return kept

    def scramble_rows(self, matrix: torch.Tensor, batch: int) -> torch.Tensor:
        """Apply this batch's secret shuffle-and-mix to the rows of a ``(C_kept, N)`` linear map, giving
        the ``(B or 1, C_kept, N)`` per-sample maps. Draws exactly what :meth:`scramble` would draw, so
        ``scramble_rows(W) @ v == scramble(W @ v)``."""
        perm = self.permutations(batch)
        m = matrix.unsqueeze(0) if perm is None else matrix[perm.to(matrix.device)]
        if self.mix == "neighbour":
            m = (m + torch.roll(m, shifts=-1, dims=1)) / math.sqrt(2.0)
        return m

    def forward(self, freq: torch.Tensor, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Select, shuffle and mix in one pass: each output channel is gathered straight from
        ``freq`` (row ``b*192 + kept[perm_b[i]]`` of the flattened tensor), and the neighbour mix
        adds a second gather in place. Same result and draws as ``scramble(select(freq))``.
        ``perm``: the (B, C_kept) permutations to apply (from :meth:`permutations`); None draws them."""
        check_freq(freq, NUM_CHANNELS, "BDCT coefficients")
        b, _, h, w = freq.shape
        kept = self.kept_index.to(freq.device)
        if perm is None:
            perm = self.permutations(b)
        elif self.shuffle == "none":
            raise ValueError("this PPFR-FD does not shuffle (shuffle='none'); pass perm=None")
        elif tuple(perm.shape) != (b, len(self.kept)):
            raise ValueError(f"perm must have shape ({b}, {len(self.kept)}), got {tuple(perm.shape)}")
        src = kept.expand(b, -1) if perm is None else kept[perm.to(freq.device)]         # (B, C_kept)
        src = src + NUM_CHANNELS * torch.arange(b, device=freq.device).unsqueeze(1)
        rows = freq.reshape(b * NUM_CHANNELS, h * w)
        out = rows.index_select(0, src.reshape(-1))
        if self.mix == "neighbour":
            out = out.add_(rows.index_select(0, src.roll(-1, dims=1).reshape(-1))).mul_(1.0 / math.sqrt(2.0))
        return out.view(b, len(self.kept), h, w)
