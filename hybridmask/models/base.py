"""Backbone registry, ``create_model`` and the common recognizer base class.

Every backbone is built from four stages between a *stem* and an embedding *neck*:

* ``stem="pixel"``: RGB faces (B, 3, 112, 112); the network is the usual one (final 7x7 map).
* ``stem="freq"``: block-DCT tensors (B, in_chans, grid, grid), e.g. 189 kept channels on a 14x14
  (u=1), 28x28 (u=2), 56x56 (u=4) or 112x112 (u=8) grid. The stem has no stride (a 1x1 conv maps
  the frequency channels to the stem width) and only ``log2(grid / 7)`` of the four stages
  down-sample, so the final map is 7x7 and a 14x14 grid stays cheap. By default the *last* stages
  down-sample (``downsample="late"``: the early, narrow stages run at the grid resolution);
  ``downsample="early"`` puts the strides first, which is cheaper still and coarser.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from hybridmask.utils import HybridMaskInputError, Registry, check_freq, check_images

MODELS = Registry("model")

STEMS = ("pixel", "freq")
FREQ_GRIDS = (14, 28, 56, 112)
DEFAULT_FREQ_CHANNELS = 189  # 3 colours x 63 AC channels (PPFR-FD with drop="dc")
PIXEL_SIZE = 112
NUM_STAGES = 4


def register_model(fn: Optional[Callable] = None, *, name: Optional[str] = None):
    """Register a backbone builder (timm style): ``@register_model`` or ``@register_model(name="x")``.

    The builder is called as ``fn(stem=..., in_chans=..., grid=..., embedding_size=..., dropout=..., **kw)``
    and must return a :class:`FRBackbone`.
    """
    if isinstance(fn, str):  # @register_model("name")
        return MODELS.register(fn)
    if fn is None:
        return MODELS.register(name)
    return MODELS.register(name)(fn)


def list_models() -> List[str]:
    """Names of all registered backbones, sorted."""
    return MODELS.names()


def create_model(name: str, stem: str = "pixel", in_chans: Optional[int] = None, grid: Optional[int] = None,
                 embedding_size: int = 512, dropout: float = 0.0, **kw) -> "FRBackbone":
    """Build a registered backbone by name.

    Args:
        name: one of :func:`list_models` (``iresnet18/34/50``, ``mobilefacenet``, ``tiny_test``).
        stem: ``"pixel"`` (RGB images) or ``"freq"`` (block-DCT channels on a grid).
        in_chans: input channels; default 3 for pixel, 189 for freq (DC dropped).
        grid: input height = width; default 112 for pixel (the only size the full backbones take),
            14 for freq (one of 14, 28, 56, 112).
        embedding_size: output embedding dimension (512 or 128 are usual).
        dropout: dropout before the embedding layer.
        **kw: backbone-specific options (e.g. ``downsample="late"|"early"`` for the freq stem).

    The returned model has ``.config`` (the arguments, enough to rebuild it with
    ``create_model(**config)``) and ``.embedding_size``.
    """
    builder = MODELS.get(name)  # KeyError listing the names
    stem = str(stem).lower()
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if in_chans is None:
        in_chans = 3 if stem == "pixel" else DEFAULT_FREQ_CHANNELS
    if grid is None:
        grid = PIXEL_SIZE if stem == "pixel" else FREQ_GRIDS[0]
    for arg, val in (("in_chans", in_chans), ("grid", grid), ("embedding_size", embedding_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    model = builder(stem=stem, in_chans=in_chans, grid=grid, embedding_size=embedding_size,
                    dropout=float(dropout), **kw)
    model.config = dict(name=str(name).lower(), stem=stem, in_chans=in_chans, grid=grid,
                        embedding_size=embedding_size, dropout=float(dropout), **kw)
    return model


def stage_strides(stem: str, grid: int, downsample: str = "late", pixel=(2, 2, 2, 2)) -> List[int]:
    """Strides of the four stages. Pixel: ``pixel``; freq: ``log2(grid/7)`` strides of 2."""
    if stem == "pixel":
        return list(pixel)
    n_down = num_freq_downsamples(grid)
    if downsample == "late":
        return [1] * (NUM_STAGES - n_down) + [2] * n_down
    if downsample == "early":
        return [2] * n_down + [1] * (NUM_STAGES - n_down)
    raise ValueError(f"downsample must be 'late' or 'early', got {downsample!r}")


def num_freq_downsamples(grid: int) -> int:
    if grid not in FREQ_GRIDS:
        raise ValueError(f"frequency grid must be one of {FREQ_GRIDS} (112*u/8 for u in 1, 2, 4, 8), got {grid}")
    return int(round(math.log2(grid / 7)))


def check_pixel_grid(grid: int, name: str) -> None:
    if grid != PIXEL_SIZE:
        raise ValueError(f"{name} with the pixel stem takes {PIXEL_SIZE}x{PIXEL_SIZE} images, got grid={grid}")


class FRBackbone(nn.Module):
    """Common face-recognition backbone: ``stem -> stages[0..3] -> neck -> embedding``.

    Subclasses set ``self.stem``, ``self.stages`` (an ``nn.ModuleList`` of 4) and ``self.neck``.
    ``forward`` validates its input (type, dtype, shape, channels, spatial size, NaN/Inf) and
    raises :class:`HybridMaskInputError` (a ``ValueError``) naming the problem.
    """

    stem: nn.Module
    stages: nn.ModuleList
    neck: nn.Module

    def __init__(self, stem_kind: str, in_chans: int, grid: int, embedding_size: int):
        super().__init__()
        self.stem_kind = stem_kind
        self.in_chans = in_chans
        self.input_size = grid
        self.embedding_size = embedding_size
        self.check_inputs = True
        self.config: Dict = {}

    # -- input checks -------------------------------------------------------------------------
    def _validate(self, x: torch.Tensor) -> None:
        if not self.check_inputs or torch.jit.is_tracing() or torch.jit.is_scripting():
            return
        if torch.compiler.is_compiling():
            return
        name = type(self).__name__
        if self.stem_kind == "pixel":
            check_images(x, name=f"{name} input images", channels=self.in_chans)
        else:
            check_freq(x, channels=self.in_chans, name=f"{name} frequency input")
        h, w = x.shape[-2:]
        if h != self.input_size or w != self.input_size:
            what = "images" if self.stem_kind == "pixel" else "frequency grid"
            raise HybridMaskInputError(
                f"{name} ({self.stem_kind} stem) expects {what} of {self.input_size}x{self.input_size}, "
                f"got {h}x{w} (input shape {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise HybridMaskInputError(f"{name} input batch is empty")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._validate(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.neck(x)

    def features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Intermediate maps: ``stem``, ``stage1`` .. ``stage4`` and ``embedding`` (for perceptual
        losses and attacks)."""
        self._validate(x)
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        x = self.stem(x)
        out["stem"] = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"stage{i + 1}"] = x
        out["embedding"] = self.neck(x)
        return out

    def pretrained_parameters(self) -> List[nn.Parameter]:
        """The parameters that came pretrained (``optim.pretrained_lr_scale`` scales their learning rate);
        none for a backbone built from fresh weights."""
        return []

    def extra_repr(self) -> str:
        return f"stem={self.stem_kind}, in_chans={self.in_chans}, input_size={self.input_size}, " \
               f"embedding_size={self.embedding_size}"


def freq_stem(in_chans: int, width: int, input_norm: bool = True) -> nn.Sequential:
    """Frequency stem: [BN over the input channels] -> 1x1 conv (in_chans -> width) -> BN -> PReLU.

    The input BN puts the low- and high-frequency channels (whose scales differ by orders of
    magnitude) on a common scale before they are mixed; there is no stride.
    """
    layers = []
    if input_norm:
        layers.append(nn.BatchNorm2d(in_chans))
    layers += [nn.Conv2d(in_chans, width, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)]
    return nn.Sequential(*layers)


def model_macs(name: str, **kw) -> int:
    """Multiply-adds of one forward pass for one input of ``create_model(name, **kw)``, counting
    convolutions and linear layers. The model is built on the meta device, so nothing is computed
    and no memory is used."""
    with torch.device("meta"):
        model = create_model(name, **kw).eval()
    model.check_inputs = False  # meta tensors hold no values to check
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        total[0] += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model(torch.empty(1, model.in_chans, model.input_size, model.input_size, device="meta"))
    return int(total[0])
