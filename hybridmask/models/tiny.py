"""``tiny_test``: a few-thousand-parameter CNN with the same interface as the real backbones, so
every pipeline test runs on a CPU in milliseconds. Not meant to recognise anyone.

Stem (pixel: 3x3 conv; freq: 1x1 conv, no stride) -> four 3x3 conv-BN-PReLU stages (8, 8, 16, 16
channels) with the usual stride rule -> global average pooling -> linear -> BN1d. Because of the
pooling it also accepts any input size >= 8 (pixel) or any grid >= 4 (freq), which is handy for
tests with small images.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .base import FREQ_GRIDS, NUM_STAGES, FRBackbone, freq_stem, register_model, stage_strides

WIDTHS = (8, 8, 16, 16)


def _cbp(i, o, s):
    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.PReLU(o))


class TinyNet(FRBackbone):
    def __init__(self, stem: str = "pixel", in_chans: int = 3, grid: int = 112, embedding_size: int = 512,
                 dropout: float = 0.0, downsample: str = "late", input_norm: bool = False):
        super().__init__(stem, in_chans, grid, embedding_size)
        if stem == "pixel":
            if grid < 8:
                raise ValueError(f"tiny_test with the pixel stem needs images of at least 8x8, got grid={grid}")
            self.stem = _cbp(in_chans, WIDTHS[0], 2)
            size = (grid + 1) // 2
            n_down = min(NUM_STAGES, max(0, int(math.floor(math.log2(max(size, 1) / 7)))))
            strides = [2] * n_down + [1] * (NUM_STAGES - n_down)
        else:
            if grid < 4:
                raise ValueError(f"tiny_test with the freq stem needs a grid of at least 4, got grid={grid}")
            self.stem = freq_stem(in_chans, WIDTHS[0], input_norm)
            if grid in FREQ_GRIDS:
                strides = stage_strides(stem, grid, downsample)
            else:
                n_down = min(NUM_STAGES, max(0, int(math.floor(math.log2(grid / 7)))))
                strides = [1] * (NUM_STAGES - n_down) + [2] * n_down
        chans = (WIDTHS[0],) + WIDTHS
        self.stages = nn.ModuleList([_cbp(chans[i], chans[i + 1], strides[i]) for i in range(NUM_STAGES)])
        self.neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(WIDTHS[-1], embedding_size, bias=False),
                                  nn.BatchNorm1d(embedding_size))


@register_model
def tiny_test(**kw) -> TinyNet:
    return TinyNet(**kw)
