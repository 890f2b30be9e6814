"""Frozen perceptual networks ``g`` (ARL's perceptual losses and its feature-level attack).

:func:`build_perceptual` gives VGG-16 conv1..conv5 features from a weights file the user gives; or
the stem/stage features of a hybridmask pixel recognizer checkpoint; or - when nothing is given - a
*fixed, randomly initialised* conv net (a known weak-but-usable perceptual prior; logged as a warning).
Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import safe_torch_load
from .blocks import resize
from .checkpoint import load_model

log = logging.getLogger("hybridmask.arl")


class PerceptualNet(nn.Module):
    """Frozen feature extractor: images in [-1, 1] -> list of feature maps. Always in eval mode."""

    description = "perceptual"

    def _freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # stays frozen
        return super().train(False)

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x):
        return self.features(x)

    def loss(self, a: torch.Tensor, b: torch.Tensor, b_feats: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """``||g(a) - g(b)||^2``: mean over taps of the mean squared feature difference."""
        fa = self.features(a)
        fb = b_feats if b_feats is not None else [t.detach() for t in self.features(b)]
        return sum(F.mse_loss(x, y) for x, y in zip(fa, fb)) / len(fa)


class RandomConvFeatures(PerceptualNet):
    """Fixed randomly initialised VGG-like conv net (5 blocks, taps after each). A weak but usable
    perceptual prior when no trained network is available."""

    def __init__(self, seed: int = 0, widths=(16, 32, 64, 96, 128)):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        blocks, cin = [], 3
        for i, w in enumerate(widths):
            conv = nn.Conv2d(cin, w, 3, 1, 1)
            with torch.no_grad():
                std = math.sqrt(2.0 / (cin * 9))
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
                conv.bias.zero_()
            blocks.append(nn.Sequential(*([nn.AvgPool2d(2)] if i else []), conv, nn.ReLU()))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.description = f"random conv features (seed {seed}; NOT trained)"
        self._freeze()

    def features(self, x):
        out = []
        for b in self.blocks:
            x = b(x)
            out.append(x)
        return out


VGG16_TAPS = (3, 8, 15, 22, 29)  # ReLU after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3


def vgg16_features() -> nn.Sequential:
    """The (untrained) ``features`` part of torchvision's VGG-16, without building its classifier."""
    try:
        from torchvision.models.vgg import cfgs, make_layers
        return make_layers(cfgs["D"], batch_norm=False)
    except ImportError:  # pragma: no cover - older/newer torchvision layout
        from torchvision.models import vgg16
        return vgg16(weights=None).features


class VGGFeatures(PerceptualNet):
    """torchvision VGG-16 ``features`` (conv1..conv5 ReLU outputs) with weights from a file.

    The file must be a state dict saved with ``torch.save`` (loaded with ``weights_only=True``),
    either of the whole ``torchvision.models.vgg16`` (keys ``features.N.weight``...) or of its
    ``features`` only (keys ``N.weight``...). Inputs are mapped to ImageNet normalisation.
    """

    def __init__(self, weights: Union[str, os.PathLike]):
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"VGG-16 weights file not found: {path} (give a torchvision vgg16 state dict; "
                                    "nothing is downloaded)")
        state = safe_torch_load(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
        fmt = state.get("format")
        if isinstance(fmt, str) and fmt.startswith("hybridmask."):
            raise ValueError(f"{path} is a {fmt} checkpoint, not a VGG-16 state dict (a hybridmask pixel recognizer "
                             f"goes in perceptual.recognizer, with perceptual.kind 'recognizer' or 'auto')")
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or dict(state)
        odd = sorted(str(k) for k in feats if not str(k).split(".")[0].isdigit())
        if odd:
            raise ValueError(f"{path} is not a VGG-16 state dict: unexpected keys {odd[:3]} (expected the "
                             f"torchvision vgg16 keys features.N.weight / features.N.bias, or N.weight / N.bias)")
        net = vgg16_features()[:VGG16_TAPS[-1] + 1]
        try:
            net.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) <= VGG16_TAPS[-1]},
                                strict=True)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path} is not a VGG-16 state dict: {str(e).splitlines()[0]}") from e
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.description = f"VGG-16 conv1..conv5 from {path}"
        self._freeze()

    def features(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out


class RecognizerFeatures(PerceptualNet):
    """Stem and stage features of a hybridmask pixel recognizer checkpoint (``save_model`` format)."""

    def __init__(self, path: Union[str, os.PathLike]):
        super().__init__()
        model, _, meta = load_model(path)
        if getattr(model, "stem_kind", "pixel") != "pixel":
            raise ValueError(f"{path}: the perceptual recognizer must take pixel input (stem='pixel'), "
                             f"got stem={model.stem_kind!r}")
        self.model = model
        self.size = int(model.input_size)
        self.description = f"recognizer features (stem, stage1..4) of {path}"
        self._freeze()

    def features(self, x):
        x = resize(x, self.size) if x.shape[-1] != self.size else x
        f = self.model.features(x)
        return [v for k, v in f.items() if k != "embedding"]


def build_perceptual(kind: str = "auto", vgg_weights: Optional[str] = None, recognizer: Optional[str] = None,
                     seed: int = 0) -> PerceptualNet:
    """``kind``: ``"vgg16"`` (needs ``vgg_weights``), ``"recognizer"`` (needs a checkpoint path),
    ``"random"``, or ``"auto"``: VGG if weights are given, else the recognizer if given, else random
    features (with a warning)."""
    kind = str(kind).lower()
    if kind == "auto":
        kind = "vgg16" if vgg_weights else ("recognizer" if recognizer else "random")
    if kind == "vgg16":
        if not vgg_weights:
            raise ValueError("perceptual kind 'vgg16' needs perceptual.vgg_weights (a path to a vgg16 state dict)")
        return VGGFeatures(vgg_weights)
    if kind == "recognizer":
        if not recognizer:
            raise ValueError("perceptual kind 'recognizer' needs perceptual.recognizer (a recognizer checkpoint)")
        return RecognizerFeatures(recognizer)
    if kind == "random":
        log.warning("perceptual network g: no VGG weights or recognizer checkpoint given -> using a FIXED "
                    "RANDOMLY-INITIALISED conv net (weak but usable perceptual prior)")
        return RandomConvFeatures(seed)
    raise KeyError(f"unknown perceptual kind {kind!r}; choose auto, vgg16, recognizer or random")


__all__ = ["PerceptualNet", "RandomConvFeatures", "VGGFeatures", "RecognizerFeatures", "build_perceptual",
           "vgg16_features", "VGG16_TAPS"]
