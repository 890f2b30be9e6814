"""IResNet (improved ResNet of ArcFace / insightface ``arcface_torch``), reimplemented.

Pixel stem: 3x3 conv (stride 1) -> BN -> PReLU at 112x112, then four stages of
"pre-BN" basic blocks (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut; no
activation after the sum) with 64/128/256/512 channels, each down-sampling by 2 (112 -> 7).
Neck: BN2d -> dropout -> flatten -> FC(512*7*7 -> embedding) -> BN1d (scale fixed to 1).
Depths: iresnet18 = (2,2,2,2), iresnet34 = (3,4,6,3), iresnet50 = (3,4,14,3).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .base import FRBackbone, check_pixel_grid, freq_stem, register_model, stage_strides

WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


class IBasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch, eps=BN_EPS))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.shortcut is None else self.shortcut(x))


class EmbeddingNeck(nn.Module):
    """BN2d -> dropout -> flatten -> FC -> BN1d with the BN1d scale frozen at 1 (arcface_torch)."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)

    def forward(self, x):
        x = self.dropout(self.bn(x)).flatten(1)
        return self.features(self.fc(x))


class IResNet(FRBackbone):
    def __init__(self, layers: Sequence[int], stem: str = "pixel", in_chans: int = 3, grid: int = 112,
                 embedding_size: int = 512, dropout: float = 0.0, downsample: str = "late",
                 input_norm: bool = True, zero_init_residual: bool = False):
        super().__init__(stem, in_chans, grid, embedding_size)
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {layers}")
        if stem == "pixel":
            check_pixel_grid(grid, "IResNet")
            self.stem = nn.Sequential(nn.Conv2d(in_chans, WIDTHS[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(WIDTHS[0], eps=BN_EPS), nn.PReLU(WIDTHS[0]))
        else:
            self.stem = freq_stem(in_chans, WIDTHS[0], input_norm)
        strides = stage_strides(stem, grid, downsample)
        stages, ch, size = [], WIDTHS[0], grid
        for depth, width, stride in zip(layers, WIDTHS, strides):
            blocks = [IBasicBlock(ch, width, stride)] + [IBasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            ch, size = width, (size + stride - 1) // stride
        self.stages = nn.ModuleList(stages)
        self.final_size = size
        self.neck = EmbeddingNeck(ch, size, embedding_size, dropout)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d,)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)


def _iresnet(layers, **kw) -> IResNet:
    return IResNet(layers, **kw)


@register_model
def iresnet18(**kw) -> IResNet:
    return _iresnet((2, 2, 2, 2), **kw)


@register_model
def iresnet34(**kw) -> IResNet:
    return _iresnet((3, 4, 6, 3), **kw)


@register_model
def iresnet50(**kw) -> IResNet:
    return _iresnet((3, 4, 14, 3), **kw)
