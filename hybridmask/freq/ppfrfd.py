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
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..utils.rng import SeedLike, make_generator
from ..utils.validate import check_freq
from .channels import NUM_CHANNELS, ChannelSpec, split_channels

SHUFFLE_MODES = ("sample", "key", "keys:R", "none")
MIX_MODES = ("neighbour", "none")


def parse_shuffle(shuffle) -> Tuple[str, Optional[int]]:
    """``shuffle`` -> ``(mode, number of key permutations)``: ``("sample", None)``, ``("none", None)``,
    ``("key", 1)`` (also for ``"keys:1"``) or ``("keys:R", R)`` for R >= 2. Raises ``ValueError``."""
    if isinstance(shuffle, str):
        if shuffle in ("sample", "none"):
            return shuffle, None
        if shuffle == "key":
            return "key", 1
        if shuffle.startswith("keys:"):
            r = shuffle[5:].strip()
            if not r.isdigit() or int(r) < 1:
                raise ValueError(f"shuffle='keys:R' needs an integer R >= 1 (the number of secret permutations), "
                                 f"got {shuffle!r}")
            r = int(r)
            return ("key", 1) if r == 1 else (f"keys:{r}", r)
    raise ValueError(f"shuffle must be one of {SHUFFLE_MODES} (e.g. 'keys:3'), got {shuffle!r}")


class PPFRFD(nn.Module):
    """``(B, 192, h, w)`` BDCT coefficients -> ``(B, C_kept, h, w)`` masked coefficients."""

    def __init__(self, drop: ChannelSpec = "dc", shuffle: str = "sample", mix: str = "neighbour",
                 seed: SeedLike = None):
        super().__init__()
        shuffle, num_keys = parse_shuffle(shuffle)
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
        self.dropped, self.kept = split_channels(drop)
        self.drop_spec = drop
        self.shuffle = shuffle
        self.mix = mix
        self.generator = make_generator(seed)
        self.register_buffer("kept_index", torch.tensor(self.kept, dtype=torch.long), persistent=False)
        self.num_keys = num_keys
        # the client key (shuffle="key" / "keys:R"): R permutations drawn once from the secret generator
        self.keys: Optional[torch.Tensor] = None if num_keys is None else torch.stack(
            [torch.randperm(len(self.kept), generator=self.generator) for _ in range(num_keys)])

    def set_keys(self, keys: torch.Tensor) -> None:
        """Install a client key: ``(R, C_kept)`` permutations (a single ``(C_kept,)`` row for R=1)."""
        if self.num_keys is None:
            raise ValueError(f"this PPFR-FD has no client key (shuffle={self.shuffle!r}); a key needs "
                             f"shuffle='key' or 'keys:R'")
        keys = torch.as_tensor(keys)
        if keys.dim() == 1:
            keys = keys.unsqueeze(0)
        c = len(self.kept)
        if tuple(keys.shape) != (self.num_keys, c):
            raise ValueError(f"client key must have shape ({self.num_keys}, {c}) for shuffle={self.shuffle!r} with "
                             f"{c} kept channels, got {tuple(keys.shape)}")
        keys = keys.long()
        if not bool((keys.sort(dim=1).values == torch.arange(c)).all()):
            raise ValueError("client key rows must be permutations of the kept channels")
        self.keys = keys.clone()

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
        if self.num_keys == 1:
            return self.keys[0].unsqueeze(0).expand(batch, c)
        if self.num_keys is not None:   # keys:R: one of the R keys per sample, drawn in secret
            return self.keys[torch.randint(self.num_keys, (batch,), generator=self.generator)]
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
