"""MobileFaceNet (Chen et al., 2018), reimplemented.

Pixel: conv3x3/2 (3 -> 64) -> depthwise conv3x3 (64) -> inverted-residual bottlenecks
(expansion t, 1x1 expand + PReLU, depthwise 3x3 + PReLU, linear 1x1 project, identity shortcut when
the shape is kept): (t=2, c=64, n=5, s=2), (t=4, c=128, n=1, s=2), (t=2, c=128, n=6, s=1),
(t=4, c=128, n=1, s=2), (t=2, c=128, n=2, s=1) -> 1x1 conv 128 -> 512 -> GDC (linear global
depthwise 7x7 conv + BN) -> dropout -> linear 512 -> embedding -> BN1d.

Stages (for the frequency stem's stride rule): stage1 = the depthwise conv, stage2 = the 64-channel
bottlenecks, stage3 = 64 -> 128 and the six 128 blocks, stage4 = the last down-sampling and two blocks.
"""
from __future__ import annotations

import torch.nn as nn

from .base import FRBackbone, check_pixel_grid, freq_stem, register_model, stage_strides


def conv_bn(in_ch, out_ch, k=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise 3x3 (stride) -> linear 1x1 project (+ shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(in_ch, hidden, 1),
                                  conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, out_ch, 1, act=False))
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def _stage(in_ch, out_ch, hidden_first, hidden_rest, n_rest, stride):
    blocks = [Bottleneck(in_ch, out_ch, hidden_first, stride)]
    blocks += [Bottleneck(out_ch, out_ch, hidden_rest) for _ in range(n_rest)]
    return nn.Sequential(*blocks)


class GDCNeck(nn.Module):
    """1x1 conv -> global depthwise conv (linear, kernel = final map) -> dropout -> FC -> BN1d."""

    def __init__(self, in_ch: int, spatial: int, embedding_size: int, dropout: float, width: int = 512):
        super().__init__()
        self.conv = conv_bn(in_ch, width, 1)
        self.gdc = conv_bn(width, width, spatial, groups=width, act=False)
        self.gdc[0].padding = (0, 0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        x = self.gdc(self.conv(x)).flatten(1)
        return self.features(self.fc(self.dropout(x)))


class MobileFaceNet(FRBackbone):
    def __init__(self, stem: str = "pixel", in_chans: int = 3, grid: int = 112, embedding_size: int = 512,
                 dropout: float = 0.0, downsample: str = "late", input_norm: bool = True):
        super().__init__(stem, in_chans, grid, embedding_size)
        if stem == "pixel":
            check_pixel_grid(grid, "MobileFaceNet")
            self.stem = conv_bn(in_chans, 64, 3, 2)
            size = grid // 2
            strides = stage_strides(stem, grid, downsample, pixel=(1, 2, 2, 2))
        else:
            self.stem = freq_stem(in_chans, 64, input_norm)
            size = grid
            strides = stage_strides(stem, grid, downsample)
        self.stages = nn.ModuleList([
            conv_bn(64, 64, 3, strides[0], groups=64),
            _stage(64, 64, 128, 128, 4, strides[1]),
            _stage(64, 128, 256, 256, 6, strides[2]),
            _stage(128, 128, 512, 256, 2, strides[3]),
        ])
        for s in strides:
            size = (size + s - 1) // s
        self.final_size = size
        self.neck = GDCNeck(128, size, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)


@register_model
def mobilefacenet(**kw) -> MobileFaceNet:
    return MobileFaceNet(**kw)
