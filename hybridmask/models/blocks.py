"""Image-network pieces shared by the attacks (:mod:`hybridmask.attacks.nets`) and ARL
(:mod:`hybridmask.models.arl_nets`): a conv-BN-activation block, the PatchGAN discriminator and the
resize every small-face network uses."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): area averaging down, bilinear up, no-op at ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **kw)


class ConvBNAct(nn.Sequential):
    """``k`` x ``k`` conv (stride ``s``, no bias) -> BatchNorm -> ReLU (``act="lrelu"``: LeakyReLU 0.2)."""

    def __init__(self, i: int, o: int, k: int = 3, s: int = 1, act: str = "relu"):
        layers = [nn.Conv2d(i, o, k, s, k // 2 if s == 1 else 1, bias=False), nn.BatchNorm2d(o)]
        layers.append(nn.LeakyReLU(0.2, inplace=True) if act == "lrelu" else nn.ReLU(inplace=True))
        super().__init__(*layers)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): ``in_ch`` channels -> a map of real/fake logits, one per patch.

    ``n_layers`` stride-2 4x4 convs (the first without BN, widths doubling up to ``8 * width``);
    ``flat=True`` adds a stride-1 3x3 conv-BN-LeakyReLU before the 3x3 logit conv (the attacks'
    version); ``flat=False`` is ARL's smaller one ((B, 3, S, S) -> (B, 1, S/8, S/8) for 3 layers).
    """

    def __init__(self, in_ch: int = 3, width: int = 32, n_layers: int = 3, flat: bool = True):
        super().__init__()
        w = int(width)
        layers = [nn.Conv2d(in_ch, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = w
        for _ in range(1, n_layers):
            o = min(c * 2, w * 8)
            layers += [nn.Conv2d(c, o, 4, 2, 1, bias=False), nn.BatchNorm2d(o), nn.LeakyReLU(0.2, inplace=True)]
            c = o
        if flat:
            layers += [nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


__all__ = ["resize", "ConvBNAct", "PatchDiscriminator"]
