"""Small networks used by the attacks: a U-Net-like generator for any (C, g, g) input, a PatchGAN
discriminator (shared with ARL: :mod:`hybridmask.models.blocks`), a DCGAN pair and an embedding ->
face decoder. All are written for CPU budgets (width is a knob) and work at an internal face size
``size`` (64 by default; reconstructions are bilinearly up-sampled to 112)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.blocks import ConvBNAct, PatchDiscriminator  # noqa: F401  (PatchDiscriminator: cgan's)


def _norm(ch: int) -> nn.Module:
    return nn.BatchNorm2d(ch)


class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1, bias=False), _norm(ch), nn.ReLU(inplace=True),
                                  nn.Conv2d(ch, ch, 3, 1, 1, bias=False), _norm(ch))

    def forward(self, x):
        return F.relu(x + self.body(x))


class SetStem(nn.Module):
    """Permutation-invariant stem for releases whose channel order is a per-sample secret.

    Every channel (a g x g map) goes through the same small conv net on its own; the results are
    pooled over channels (mean and max), so any permutation of the channels gives the same output.
    """

    def __init__(self, width: int, features: int = 8, layers: int = 1):
        super().__init__()
        f = int(features)
        mods = [nn.Conv2d(1, f, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(layers - 1):
            mods += [nn.Conv2d(f, f, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)]
        self.per_channel = nn.Sequential(*mods)
        self.out = nn.Sequential(nn.Conv2d(2 * f, width, 1), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x):
        b, c, h, w = x.shape
        f = self.per_channel(x.reshape(b * c, 1, h, w)).view(b, c, -1, h, w)
        return self.out(torch.cat([f.mean(1), f.amax(1)], dim=1))


class UNetGenerator(nn.Module):
    """Released representation ``(B, in_ch, grid, grid)`` -> face ``(B, 3, size, size)`` in [-1, 1].

    * Inputs larger than ``size`` (pixel releases, u=8 grids) are first area-resampled to ``size``.
    * A stem (1x1 conv for frequency inputs with many channels, 3x3 otherwise) maps the input
      to ``width`` channels; encoder stages halve the resolution while it stays even and >= 4
      (at most ``depth`` times), a few residual blocks run at the bottleneck, and decoder stages
      come back up with skip connections at every matching resolution.
    * Low-resolution grids (14x14, 28x28) then go through extra up-sampling stages (x2 each,
      no skips - there is nothing to skip from) until the next doubling would pass ``size``;
      a final bilinear resize lands exactly on ``size``.
    * ``stem="set"`` replaces the first conv by :class:`SetStem` (invariant to the channel order).
    """

    def __init__(self, in_ch: int, grid: int, size: int = 64, width: int = 32, depth: int = 4,
                 max_mult: int = 8, n_res: int = 2, stem: str = "conv"):
        super().__init__()
        self.in_ch, self.grid, self.size = int(in_ch), int(grid), int(size)
        g = min(self.grid, self.size)
        self.work_grid = g
        if stem == "set":
            self.stem = SetStem(width)
        elif stem == "conv":
            stem_k = 1 if in_ch > 16 else 3
            self.stem = nn.Sequential(nn.Conv2d(in_ch, width, stem_k, 1, stem_k // 2), nn.LeakyReLU(0.2, inplace=True))
        else:
            raise ValueError(f"stem must be 'conv' or 'set', got {stem!r}")
        chans = [width]
        downs: List[nn.Module] = []
        cur = g
        while len(downs) < depth and cur % 2 == 0 and cur // 2 >= 4:
            o = min(chans[-1] * 2, width * max_mult)
            downs.append(ConvBNAct(chans[-1], o, 4, 2, act="lrelu"))
            chans.append(o)
            cur //= 2
        self.downs = nn.ModuleList(downs)
        self.bottleneck = nn.Sequential(*[_Res(chans[-1]) for _ in range(n_res)])
        ups: List[nn.Module] = []
        merges: List[nn.Module] = []
        c = chans[-1]
        for skip_c in reversed(chans[:-1]):
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), ConvBNAct(c, skip_c)))
            merges.append(ConvBNAct(2 * skip_c, skip_c))
            c = skip_c
            cur *= 2
        self.ups = nn.ModuleList(ups)
        self.merges = nn.ModuleList(merges)
        extra: List[nn.Module] = []
        while cur * 2 <= self.size:
            o = max(c // 2, 16) if c > 16 else c
            extra.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                       ConvBNAct(c, o), ConvBNAct(o, o)))
            c = o
            cur *= 2
        self.extra = nn.Sequential(*extra)
        self.out_grid = cur
        self.head = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.work_grid:
            x = F.interpolate(x, size=(self.work_grid, self.work_grid), mode="area")
        h = self.stem(x)
        skips = [h]
        for d in self.downs:
            h = d(h)
            skips.append(h)
        h = self.bottleneck(h)
        for up, merge, skip in zip(self.ups, self.merges, reversed(skips[:-1])):
            h = merge(torch.cat([up(h), skip], dim=1))
        h = self.extra(h)
        out = torch.tanh(self.head(h))
        if out.shape[-1] != self.size:
            out = F.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return out


class DCGANGenerator(nn.Module):
    """z (B, nz) -> (B, 3, 64, 64) in [-1, 1] (Radford et al. 2016, narrow)."""

    def __init__(self, nz: int = 64, width: int = 32):
        super().__init__()
        self.nz = nz
        w = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, w * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(w * 8), nn.ReLU(True),
            nn.ConvTranspose2d(w * 8, w * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 4), nn.ReLU(True),
            nn.ConvTranspose2d(w * 4, w * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 2), nn.ReLU(True),
            nn.ConvTranspose2d(w * 2, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


class DCGANDiscriminator(nn.Module):
    """(B, 3, 64, 64) -> (B,) real/fake logit."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(w, w * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(w * 2, w * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 4), nn.LeakyReLU(0.2, True),
            nn.Conv2d(w * 4, w * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(w * 8), nn.LeakyReLU(0.2, True),
            nn.Conv2d(w * 8, 1, 4, 1, 0))

    def forward(self, x):
        return self.net(x).view(-1)


class EmbeddingDecoder(nn.Module):
    """Embedding (B, D) -> face (B, 3, size, size): linear to a 4x4 map, then x2 up-sampling stages."""

    def __init__(self, dim: int, size: int = 64, width: int = 32):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"decoder size must be a power of two >= 8, got {size}")
        self.dim, self.size = dim, size
        c = width * 8
        self.fc = nn.Sequential(nn.Linear(dim, c * 16), nn.ReLU(True))
        self.c0 = c
        layers: List[nn.Module] = []
        cur = 4
        while cur < size:
            o = max(c // 2, width)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), ConvBNAct(c, o), ConvBNAct(o, o)]
            c = o
            cur *= 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, e):
        e = F.normalize(e.flatten(1), dim=1) * (self.dim ** 0.5)
        h = self.fc(e).view(e.shape[0], self.c0, 4, 4)
        return torch.tanh(self.head(self.body(h)))
