"""Adversarial reconstruction learning (ARL; Xiao et al., AAAI 2020), DESIGN section 1.2.

Networks (all built from one config by :func:`build_arl_net`):

* **Encoder** ``Enc``: the front of a ResNet (``resnet18`` / ``resnet34`` with basic blocks,
  ``resnet50`` with bottlenecks; base ``width`` 64 is the standard network, smaller widths for CPU
  work) cut at ``feature_layer`` in ``conv1`` (alias ``stem``), ``layer1`` .. ``layer4``,
  ``avgpool``, ``fc``. Faces (B, 3, 112, 112) in [-1, 1] are resized to ``input_size`` first
  (64 is fine on a CPU). The released representation is ``z = Enc(x)``.
* **Utility head** ``f``: the rest of the same ResNet (the layers after the cut, the pooling and the
  ``fc`` embedding) followed by a linear layer for the 40 CelebA attributes (BCE) or by a margin head
  (ArcFace / CosFace from :mod:`hybridmask.models`) for identities.
* **Decoder** ``Dec``: the mirror of the encoder: from the cut back to the image, one up-sampling
  block (bilinear resize to the spatial size of the encoder stage below + two 3x3 conv-BN-ReLU)
  per encoder stage, a linear "un-pooling" for ``avgpool``/``fc``, then a last up-sampling block
  (one conv) and conv -> tanh at
  ``input_size``, bilinearly resized to 112x112 (``native=True`` keeps ``input_size``).
* **Discriminator** ``D``: a small PatchGAN on images at ``input_size``.
* **Perceptual network** ``g`` (frozen, :func:`build_perceptual`): VGG-16 conv1..conv5 features
  from a weights file the user gives; or the stem/stage features of a hybridmask pixel recognizer
  checkpoint; or - when nothing is given - a *fixed, randomly initialised* conv net (a known
  weak-but-usable perceptual prior; this is logged as a warning).

Training (:class:`ARLTrainer`, exactly DESIGN 1.2), alternating:

(a) ``Dec`` (+ ``D``) minimise ``L_a = ||Dec(z)-x||^2 + mu1 * L_GAN + mu2 * ||g(Dec(z))-g(x)||^2`` on
    *public* faces, ``Enc`` frozen (eval mode, no gradient);
(b) ``Enc``, ``f`` minimise ``L_u - lambda1 * ||Dec(z)-x||^2 - lambda2 * ||g(Dec(z))-g(x)||^2`` on
    *private* faces, ``Dec`` frozen (eval mode, no parameter update).

``||.||^2`` is the mean squared error over elements (pixels, resp. feature entries averaged over
``g``'s taps), computed at ``input_size``; ``L_GAN`` is the non-saturating BCE generator loss.

:func:`train_arl` runs the whole experiment from a config dict (``configs/arl_base.yaml`` documents
every key): data splits, warm-up, alternating training, atomic checkpoints, then a *fresh* attacker
decoder trained on public data against the frozen encoder, and the metrics of
:mod:`hybridmask.defenses.metrics`.

The ``arl`` defense (:class:`ARLDefense`) exposes a trained encoder behind the Defense interface
(``release`` = ``z``, vectors as (B, D, 1, 1); ``as_image`` = the defense's own decoder output, or a
blank grey image with ``as_image="blank"``) so the attack harness can attack it.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..utils import HybridMaskInputError, atomic_write, atomic_save, check_images, safe_torch_load
from ..utils.rng import SeedLike
from .base import Defense, register_defense

log = logging.getLogger("hybridmask.arl")

OUT_SIZE = 112
FEATURE_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
SPATIAL_LAYERS = FEATURE_LAYERS[:5]
LAYER_ALIASES = {"stem": "conv1"}
ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
         "resnet50": ("bottleneck", (3, 4, 6, 3))}
TASKS = ("attributes", "identity")
CKPT_FORMAT = "hybridmask.arl"
CKPT_VERSION = 1


def resolve_layer(name: str) -> str:
    key = str(name).lower()
    key = LAYER_ALIASES.get(key, key)
    if key not in FEATURE_LAYERS:
        raise KeyError(f"unknown feature layer {name!r}; choose one of {', '.join(FEATURE_LAYERS)} (or 'stem')")
    return key


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **kw)


# ---------------------------------------------------------------------------------------------
# ResNet trunk
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(h)) + self.short(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        h = F.relu(self.bn2(self.conv2(h)), inplace=True)
        return F.relu(self.bn3(self.conv3(h)) + self.short(x), inplace=True)


def resnet_parts(arch: str, width: int, fc_dim: int) -> "OrderedDict[str, nn.Module]":
    """The seven named parts of a ResNet, in order (one per feature layer)."""
    if arch not in ARCHS:
        raise KeyError(f"unknown ARL encoder arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if not isinstance(width, int) or width < 4:
        raise ValueError(f"width must be an int >= 4, got {width!r}")
    kind, depths = ARCHS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    parts: "OrderedDict[str, nn.Module]" = OrderedDict()
    parts["conv1"] = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
    cin = width
    for i, n in enumerate(depths):
        planes = width * 2 ** i
        blocks: List[nn.Module] = [nn.MaxPool2d(3, 2, 1)] if i == 0 else []
        for j in range(n):
            blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
            cin = planes * block.expansion
        parts[f"layer{i + 1}"] = nn.Sequential(*blocks)
    parts["avgpool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    parts["fc"] = nn.Sequential(nn.Linear(cin, fc_dim), nn.BatchNorm1d(fc_dim))
    for p in parts.values():
        for m in p.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return parts


class ARLEncoder(nn.Module):
    """Faces (B, 3, H, W) in [-1, 1] -> z at the chosen feature layer (resizes to ``input_size``)."""

    def __init__(self, parts: Sequence[Tuple[str, nn.Module]], input_size: int, feature_layer: str):
        super().__init__()
        self.parts = nn.Sequential(OrderedDict(parts))
        self.input_size = int(input_size)
        self.feature_layer = feature_layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.parts(resize(images, self.input_size))


class UtilityNet(nn.Module):
    """``f``: the ResNet layers after the cut, then the task output (attribute logits / margin head)."""

    def __init__(self, parts: Sequence[Tuple[str, nn.Module]], task: str, fc_dim: int, num_outputs: int,
                 head: str = "arcface", head_s: float = 32.0, head_m: Optional[float] = None):
        super().__init__()
        self.rest = nn.Sequential(OrderedDict(parts))
        self.task = task
        if task == "attributes":
            self.out = nn.Linear(fc_dim, num_outputs)
        else:
            from ..models import create_head
            self.out = create_head(head, fc_dim, num_outputs, s=head_s, m=head_m)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4 and not len(self.rest) and z.shape[-1] == 1:
            z = z.flatten(1)
        return self.rest(z)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(utility loss, plain scores): BCE + attribute logits, or margin CE + class cosines."""
        e = self.embed(z)
        if self.task == "attributes":
            logits = self.out(e)
            return F.binary_cross_entropy_with_logits(logits, y.float()), logits
        logits = self.out(e, y)
        return F.cross_entropy(logits, y), self.out.cosine(e).detach()

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Attribute logits (B, 40) or class cosines (B, num_classes)."""
        e = self.embed(z)
        return self.out(e) if self.task == "attributes" else self.out.cosine(e)


def _cbr(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class UpBlock(nn.Module):
    """Bilinear resize to ``size`` then ``convs`` 3x3 conv-BN-ReLU (the mirror of one encoder stage)."""

    def __init__(self, cin: int, cout: int, size: Tuple[int, int], convs: int = 2):
        super().__init__()
        self.size = tuple(size)
        layers = _cbr(cin, cout)
        for _ in range(convs - 1):
            layers += _cbr(cout, cout)
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(F.interpolate(x, size=self.size, mode="bilinear", align_corners=False))


class ARLDecoder(nn.Module):
    """Mirror of the encoder: z -> image (B, 3, 112, 112) in [-1, 1] (``native=True``: ``input_size``).

    ``shapes``: output shape (without batch) of every encoder part, as probed by
    :func:`probe_shapes`; one up-sampling block per spatial stage between the cut and the image.
    """

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], feature_layer: str, input_size: int,
                 out_size: int = OUT_SIZE):
        super().__init__()
        self.feature_layer = feature_layer
        self.input_size, self.out_size = int(input_size), int(out_size)
        self.z_shape = tuple(shapes[feature_layer])
        c4, h4, w4 = shapes["layer4"]
        if feature_layer in ("avgpool", "fc"):
            d = shapes[feature_layer][0]
            self.unpool = nn.Sequential(nn.Linear(d, c4 * h4 * w4), nn.ReLU(True))
            self.unpool_shape = (c4, h4, w4)
            start = "layer4"
        else:
            self.unpool = None
            start = feature_layer
        blocks: List[nn.Module] = []
        for j in range(SPATIAL_LAYERS.index(start), 0, -1):
            cin = shapes[SPATIAL_LAYERS[j]][0]
            cout, h, w = shapes[SPATIAL_LAYERS[j - 1]]
            blocks.append(UpBlock(cin, cout, (h, w)))
        self.ups = nn.Sequential(*blocks)
        c1 = shapes["conv1"][0]
        self.to_image = nn.Sequential(UpBlock(c1, c1, (self.input_size, self.input_size), convs=1),
                                      nn.Conv2d(c1, 3, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, native: bool = False) -> torch.Tensor:
        if self.unpool is not None:
            z = self.unpool(z.flatten(1)).view(len(z), *self.unpool_shape)
        x = self.to_image(self.ups(z))
        if not native and self.out_size != self.input_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return x


class PatchDiscriminator(nn.Module):
    """Small PatchGAN: (B, 3, S, S) -> (B, 1, S/8, S/8) real/fake logits (three stride-2 4x4 convs)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = int(width)
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * w, 1, 3, 1, 1))

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def probe_shapes(parts: "OrderedDict[str, nn.Module]", input_size: int) -> Dict[str, Tuple[int, ...]]:
    x = torch.zeros(2, 3, input_size, input_size)
    shapes = {}
    modes = {n: p.training for n, p in parts.items()}
    for n, p in parts.items():
        p.eval()
        x = p(x)
        shapes[n] = tuple(x.shape[1:])
    for n, p in parts.items():
        p.train(modes[n])
    return shapes


MODEL_DEFAULTS: Dict[str, Any] = dict(arch="resnet18", width=16, fc_dim=128, input_size=64, feature_layer="layer2",
                                      task="attributes", num_outputs=40, head="arcface", head_s=32.0, head_m=None,
                                      disc_width=16)


class ARLNet(nn.Module):
    """Encoder + utility head + decoder + discriminator of one ARL model (``config``: :data:`MODEL_DEFAULTS`)."""

    def __init__(self, **config):
        super().__init__()
        unknown = set(config) - set(MODEL_DEFAULTS)
        if unknown:
            raise KeyError(f"unknown ARL model keys {sorted(unknown)}; known: {sorted(MODEL_DEFAULTS)}")
        cfg = {**MODEL_DEFAULTS, **config}
        cfg["feature_layer"] = resolve_layer(cfg["feature_layer"])
        if cfg["task"] not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {cfg['task']!r}")
        size = cfg["input_size"]
        if not isinstance(size, int) or size < 32:
            raise ValueError(f"input_size must be an int >= 32, got {size!r}")
        self.config = cfg
        parts = resnet_parts(cfg["arch"], cfg["width"], cfg["fc_dim"])
        self.shapes = probe_shapes(parts, size)
        cut = FEATURE_LAYERS.index(cfg["feature_layer"]) + 1
        items = list(parts.items())
        self.encoder = ARLEncoder(items[:cut], size, cfg["feature_layer"])
        self.utility = UtilityNet(items[cut:], cfg["task"], cfg["fc_dim"], cfg["num_outputs"], cfg["head"],
                                  cfg["head_s"], cfg["head_m"])
        self.decoder = ARLDecoder(self.shapes, cfg["feature_layer"], size)
        self.discriminator = PatchDiscriminator(cfg["disc_width"])

    @property
    def z_shape(self) -> Tuple[int, ...]:
        return self.shapes[self.config["feature_layer"]]

    def new_attacker(self, seed: int = 0) -> Tuple[ARLDecoder, PatchDiscriminator]:
        """A freshly initialised decoder + discriminator of the same architecture (the attacker's)."""
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        dec = ARLDecoder(self.shapes, self.config["feature_layer"], self.config["input_size"])
        disc = PatchDiscriminator(self.config["disc_width"])
        torch.random.set_rng_state(state)
        dev = next(self.parameters()).device
        return dec.to(dev), disc.to(dev)


def build_arl_net(**config) -> ARLNet:
    return ARLNet(**config)


# ---------------------------------------------------------------------------------------------
# Perceptual network g
# ---------------------------------------------------------------------------------------------
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
        from ..models import load_model

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


# ---------------------------------------------------------------------------------------------
# Alternating training
# ---------------------------------------------------------------------------------------------
def _set_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def make_optimizer(params, kind: str, lr: float, weight_decay: float = 0.0, betas=(0.5, 0.999)):
    params = [p for p in params if p.requires_grad]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")


class ReconstructionGame:
    """Losses and one-step updates of the decoder side (a) for a given encoder + decoder + D.

    Used both for ARL's own decoder and for the fresh attacker after training.
    """

    def __init__(self, encoder: ARLEncoder, decoder: ARLDecoder, disc: PatchDiscriminator,
                 perceptual: Optional[PerceptualNet], mu1: float, mu2: float, lr: float = 2e-4,
                 lr_disc: float = 2e-4, optimizer: str = "adam"):
        self.encoder, self.decoder, self.disc, self.g = encoder, decoder, disc, perceptual
        self.mu1, self.mu2 = float(mu1), float(mu2)
        if self.mu2 > 0 and perceptual is None:
            raise ValueError("mu2 > 0 needs a perceptual network")
        self.opt_dec = make_optimizer(decoder.parameters(), optimizer, lr)
        self.opt_disc = make_optimizer(disc.parameters(), optimizer, lr_disc)

    def step(self, x: torch.Tensor) -> Dict[str, float]:
        """(a): one update of Dec (+ D) on public faces ``x`` (B, 3, 112, 112), Enc frozen."""
        self.encoder.eval()
        self.decoder.train()
        _set_grad(self.decoder, True)
        with torch.no_grad():
            z = self.encoder(x)
        xs = resize(x, self.decoder.input_size)
        rec = self.decoder(z, native=True)
        out: Dict[str, float] = {}
        if self.mu1 > 0:
            self.disc.train()
            _set_grad(self.disc, True)
            loss_d = 0.5 * (_bce(self.disc(xs), True) + _bce(self.disc(rec.detach()), False))
            self.opt_disc.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_disc.step()
            out["loss_disc"] = float(loss_d.detach())
            _set_grad(self.disc, False)
        l_rec = F.mse_loss(rec, xs)
        loss = l_rec
        if self.mu1 > 0:
            l_gan = _bce(self.disc(rec), True)
            loss = loss + self.mu1 * l_gan
            out["loss_gan"] = float(l_gan.detach())
        if self.mu2 > 0:
            l_per = self.g.loss(rec, xs)
            loss = loss + self.mu2 * l_per
            out["loss_perc"] = float(l_per.detach())
        self.opt_dec.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_dec.step()
        out["loss_rec"] = float(l_rec.detach())
        out["loss_a"] = float(loss.detach())
        return out


class ARLTrainer:
    """The alternating game of DESIGN 1.2 on one :class:`ARLNet`.

    ``decoder_step(x_public)`` is (a); ``encoder_step(x_private, y)`` is (b). ``adversarial=False``
    in (b) trains the utility alone (warm-up).
    """

    def __init__(self, net: ARLNet, perceptual: Optional[PerceptualNet], lambda1: float = 1.0, lambda2: float = 0.0,
                 mu1: float = 0.0, mu2: float = 0.0, lr_enc: float = 1e-3, lr_dec: float = 2e-4,
                 lr_disc: float = 2e-4, weight_decay: float = 5e-4, optimizer: str = "adam"):
        for name, v in (("lambda1", lambda1), ("lambda2", lambda2), ("mu1", mu1), ("mu2", mu2)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if (lambda2 > 0 or mu2 > 0) and perceptual is None:
            raise ValueError("lambda2 > 0 or mu2 > 0 needs a perceptual network g")
        self.net, self.g = net, perceptual
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.game = ReconstructionGame(net.encoder, net.decoder, net.discriminator, perceptual, mu1, mu2,
                                       lr_dec, lr_disc, optimizer)
        params = list(net.encoder.parameters()) + list(net.utility.parameters())
        self.opt_enc = make_optimizer(params, optimizer, lr_enc, weight_decay, betas=(0.9, 0.999))

    def decoder_step(self, x_public: torch.Tensor) -> Dict[str, float]:
        return self.game.step(x_public)

    def encoder_objective(self, x: torch.Tensor, y: torch.Tensor, adversarial: bool = True
                          ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``L_u - lambda1 * ||Dec(z)-x||^2 - lambda2 * ||g(Dec(z))-g(x)||^2`` (Dec frozen, eval mode)."""
        net = self.net
        net.encoder.train()
        net.utility.train()
        net.decoder.eval()
        _set_grad(net.decoder, False)
        z = net.encoder(x)
        l_u, _ = net.utility.loss(z, y)
        loss = l_u
        out = {"loss_u": float(l_u.detach())}
        if adversarial and (self.lambda1 > 0 or self.lambda2 > 0):
            xs = resize(x, net.decoder.input_size)
            rec = net.decoder(z, native=True)
            l_rec = F.mse_loss(rec, xs)
            loss = loss - self.lambda1 * l_rec
            out["loss_rec"] = float(l_rec.detach())
            if self.lambda2 > 0:
                l_per = self.g.loss(rec, xs)
                loss = loss - self.lambda2 * l_per
                out["loss_perc"] = float(l_per.detach())
        out["loss_b"] = float(loss.detach())
        return loss, out

    def encoder_step(self, x: torch.Tensor, y: torch.Tensor, adversarial: bool = True) -> Dict[str, float]:
        """(b): one update of Enc and f on private faces ``x`` with labels ``y``."""
        loss, out = self.encoder_objective(x, y, adversarial)
        self.opt_enc.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_enc.step()
        _set_grad(self.net.decoder, True)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"opt_enc": self.opt_enc.state_dict(), "opt_dec": self.game.opt_dec.state_dict(),
                "opt_disc": self.game.opt_disc.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.opt_enc.load_state_dict(state["opt_enc"])
        self.game.opt_dec.load_state_dict(state["opt_dec"])
        self.game.opt_disc.load_state_dict(state["opt_disc"])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _plain(obj):
    """JSON-able copy (checkpoints must load with weights_only=True)."""
    return json.loads(json.dumps(obj, default=str))


def save_arl(path: Union[str, os.PathLike], net: ARLNet, extra: Optional[Dict[str, Any]] = None) -> None:
    """Atomically write an ARL checkpoint (plain dict of tensors and plain data)."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    ckpt = {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "hybridmask_version": __version__,
            "model_config": _plain(net.config), "state": state}
    if extra:
        ckpt.update(extra)
    atomic_save(ckpt, path)


def load_arl(path: Union[str, os.PathLike], map_location="cpu") -> Tuple[ARLNet, Dict[str, Any]]:
    """Rebuild an :class:`ARLNet` from :func:`save_arl` output (``weights_only=True``)."""
    ckpt = safe_torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a hybridmask ARL checkpoint (no format={CKPT_FORMAT!r})")
    if not isinstance(ckpt.get("format_version"), int) or ckpt["format_version"] > CKPT_VERSION:
        raise ValueError(f"{path}: unsupported ARL checkpoint version {ckpt.get('format_version')!r}")
    net = ARLNet(**ckpt["model_config"])
    try:
        net.load_state_dict(ckpt["state"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model config: {str(e).splitlines()[0]}") from e
    return net.to(map_location), ckpt


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------
@register_defense("arl")
class ARLDefense(Defense):
    """A (trained) ARL encoder as a defense: the client releases ``z = Enc(x)``.

    ``checkpoint``: an ARL checkpoint from :func:`train_arl` (``output_dir/arl.pt``); without one, an
    untrained encoder of the given architecture (tests, smoke runs). ``release``/``query`` return z
    as (B, C, h, w) (vectors as (B, D, 1, 1)); ``in_channels``/``grid`` are C and h.
    ``as_image="decoder"`` shows ``Dec(z)`` through the defense's own decoder (the adversary ARL
    trained against; for an untrained model that is noise); ``"blank"`` returns a grey image
    (zeros), i.e. "z is not a picture".
    ``input_kind`` is ``"feature"``: z is neither pixels nor BDCT coefficients. ``seed`` is accepted
    for interface uniformity and unused (the release is deterministic; ARL draws no secrets).
    """
    name = "arl"
    input_kind = "feature"

    def __init__(self, checkpoint: Optional[str] = None, arch: str = "resnet18", width: int = 16, fc_dim: int = 128,
                 input_size: int = 64, feature_layer: str = "layer2", as_image: str = "decoder",
                 seed: SeedLike = None):
        if as_image not in ("decoder", "blank"):
            raise ValueError(f"as_image must be 'decoder' or 'blank', got {as_image!r}")
        if checkpoint is not None:
            net, _ = load_arl(checkpoint)
            cfg = net.config
            own = dict(checkpoint=str(checkpoint), arch=cfg["arch"], width=cfg["width"], fc_dim=cfg["fc_dim"],
                       input_size=cfg["input_size"], feature_layer=cfg["feature_layer"], as_image=as_image)
        else:
            net = ARLNet(arch=arch, width=width, fc_dim=fc_dim, input_size=input_size, feature_layer=feature_layer)
            own = dict(checkpoint=None, arch=arch, width=width, fc_dim=fc_dim, input_size=input_size,
                       feature_layer=net.config["feature_layer"], as_image=as_image)
        super().__init__(**own)
        self.encoder = net.encoder.eval()
        self.decoder = net.decoder.eval()
        _set_grad(self.encoder, False)
        _set_grad(self.decoder, False)
        self.z_shape = net.z_shape
        self.as_image_mode = as_image

    def train(self, mode: bool = True):  # a released encoder is a fixed function
        return super().train(False)

    @property
    def in_channels(self) -> int:
        return int(self.z_shape[0])

    @property
    def grid(self) -> int:
        return int(self.z_shape[1]) if len(self.z_shape) == 3 else 1

    def query(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        z = self.encoder(images)
        return z.view(len(z), -1, 1, 1) if z.dim() == 2 else z

    def release(self, images: torch.Tensor, k=None):
        if k not in (None, 1):
            raise ValueError(f"arl releases one face at a time (k=1), got k={k!r}")
        return self.query(images), None

    def as_image(self, released: torch.Tensor) -> torch.Tensor:
        exp = (self.in_channels, self.grid, self.grid)
        if released.dim() != 4 or tuple(released.shape[1:]) != exp:
            raise HybridMaskInputError(f"expected released features of shape (B, {exp[0]}, {exp[1]}, {exp[2]}), "
                                       f"got {tuple(released.shape)}")
        if self.as_image_mode == "blank":
            return released.new_zeros(released.shape[0], 3, OUT_SIZE, OUT_SIZE)
        z = released.flatten(1) if len(self.z_shape) == 1 else released
        with torch.no_grad():
            return self.decoder(z).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Data for train_arl
# ---------------------------------------------------------------------------------------------
def read_celeba_attributes(path: Union[str, os.PathLike]) -> Tuple[List[str], List[str], np.ndarray]:
    """Parse CelebA's ``list_attr_celeba.txt`` format: line 1 = number of images, line 2 = the 40
    attribute names, then ``<file> v1 .. v40`` with values 1 / -1. Returns (names, files, (N, 40) int8)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CelebA attribute file not found: {path}")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) < 3:
        raise ValueError(f"{path}: too short for a CelebA attribute file")
    try:
        count = int(lines[0].split()[0])
    except ValueError:
        raise ValueError(f"{path}: first line must be the number of images, got {lines[0][:40]!r}") from None
    names = lines[1].split()
    files, rows = [], []
    for i, ln in enumerate(lines[2:], start=3):
        parts = ln.split()
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}:{i}: expected a file name and {len(names)} values, got {len(parts)} fields")
        try:
            vals = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{path}:{i}: attribute values must be 1 or -1") from None
        if any(v not in (1, -1) for v in vals):
            raise ValueError(f"{path}:{i}: attribute values must be 1 or -1")
        files.append(parts[0])
        rows.append(vals)
    if len(files) != count:
        raise ValueError(f"{path}: header says {count} images, found {len(files)}")
    return names, files, np.asarray(rows, dtype=np.int8)


def index_identity_folder(root: Union[str, os.PathLike]) -> Dict[str, Tuple[str, Path]]:
    """``file name -> (identity, path)`` for ``root/<identity>/<file>``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    idx: Dict[str, Tuple[str, Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                idx[f.name] = (d.name, f)
    return idx


def load_uint8(paths: Sequence[Path], desc: str = "loading", progress: bool = True) -> torch.Tensor:
    """Read aligned 112x112 faces into a (N, 3, 112, 112) uint8 tensor."""
    from ..data.image import load_image
    from tqdm import tqdm

    out = torch.empty(len(paths), 3, OUT_SIZE, OUT_SIZE, dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, leave=False, disable=not progress)):
        out[i] = ((load_image(p, size=OUT_SIZE) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out


def to_float(u8: torch.Tensor, device=None) -> torch.Tensor:
    x = u8.to(device) if device is not None else u8
    return x.float() / 127.5 - 1.0


class Split:
    """Images (uint8), labels for the utility task, identity ids (for LDA) and optional attributes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, identities: torch.Tensor,
                 attributes: Optional[torch.Tensor] = None):
        self.images, self.labels, self.identities, self.attributes = images, labels, identities, attributes

    def __len__(self):
        return len(self.images)


def _split_ids(ids: List[str], frac: float, rng: np.random.Generator) -> Tuple[List[str], List[str]]:
    ids = sorted(ids)
    perm = rng.permutation(len(ids))
    n = int(round(frac * len(ids)))
    return sorted(ids[i] for i in perm[:n]), sorted(ids[i] for i in perm[n:])


def prepare_data(cfg: Dict[str, Any], seed: int, progress: bool = True
                 ) -> Tuple[Split, Split, Split, Dict[str, Any]]:
    """(private train, public, test victims, info) following ``cfg`` (the ``data`` section)."""
    root = cfg["root"] if cfg["root"] is not None else os.environ.get("HYBRIDMASK_DATA", "../shared/data/faces")
    root = Path(os.path.expanduser(str(root)))
    images_dir = root / cfg["images_dir"]
    index = index_identity_folder(images_dir)
    rng = np.random.default_rng(seed)
    by_id: Dict[str, List[str]] = {}
    for f, (ident, _) in index.items():
        by_id.setdefault(ident, []).append(f)
    task = cfg["task"]
    info: Dict[str, Any] = {"task": task, "images_dir": str(images_dir)}

    def cap(files: List[str], n: Optional[int]) -> List[str]:
        files = sorted(files)
        if n is not None and len(files) > n:
            files = sorted(files[i] for i in rng.permutation(len(files))[:n])
        return files

    if task == "attributes":
        names, files, attrs = read_celeba_attributes(root / cfg["attributes_file"])
        missing = [f for f in files if f not in index]
        if missing:
            raise FileNotFoundError(f"{len(missing)} attributed images not found under {images_dir}: "
                                    f"{', '.join(missing[:5])}")
        attr_of = {f: attrs[i] for i, f in enumerate(files)}
        attr_ids = sorted({index[f][0] for f in files})
        priv_ids, test_ids = _split_ids(attr_ids, float(cfg["private_fraction"]), rng)
        pub_ids = sorted(set(by_id) - set(attr_ids))
        priv_files = sorted(f for f in files if index[f][0] in set(priv_ids))
        test_files = cap([f for f in files if index[f][0] in set(test_ids)], cfg.get("max_test_images"))
        pub_files = cap([f for i in pub_ids for f in by_id[i]], cfg.get("max_public_images"))
        id_num = {i: n for n, i in enumerate(sorted(by_id))}

        def make(fs, what):
            a = torch.from_numpy(np.stack([attr_of[f] for f in fs])) if fs and fs[0] in attr_of else None
            y = (a > 0).long() if a is not None else torch.zeros(len(fs), dtype=torch.long)
            return Split(load_uint8([index[f][1] for f in fs], f"loading {what}", progress), y,
                         torch.tensor([id_num[index[f][0]] for f in fs]), a)

        priv, test, pub = make(priv_files, "private"), make(test_files, "test"), make(pub_files, "public")
        info.update(attribute_names=names, num_outputs=len(names))
    elif task == "identity":
        ids = sorted(by_id)
        n_pub = int(cfg["num_public_identities"])
        if not 0 < n_pub < len(ids) - 1:
            raise ValueError(f"num_public_identities must be in 1..{len(ids) - 2}, got {n_pub}")
        perm = rng.permutation(len(ids))
        pub_ids = sorted(ids[i] for i in perm[:n_pub])
        priv_ids = sorted(ids[i] for i in perm[n_pub:])
        cls = {i: n for n, i in enumerate(priv_ids)}
        tf = float(cfg["test_fraction"])
        priv_files, test_files = [], []
        for i in priv_ids:
            fs = sorted(by_id[i])
            fs = [fs[j] for j in rng.permutation(len(fs))]
            n_test = int(round(tf * len(fs))) if len(fs) >= 2 else 0
            n_test = max(1, n_test) if len(fs) >= 2 else 0
            test_files += fs[:n_test]
            priv_files += fs[n_test:]
        test_files = cap(test_files, cfg.get("max_test_images"))
        pub_files = cap([f for i in pub_ids for f in by_id[i]], cfg.get("max_public_images"))
        pub_cls = {i: n for n, i in enumerate(pub_ids)}

        def make(fs, what, table):
            y = torch.tensor([table[index[f][0]] for f in fs])
            return Split(load_uint8([index[f][1] for f in fs], f"loading {what}", progress), y, y.clone())

        priv, test, pub = make(priv_files, "private", cls), make(test_files, "test", cls), make(pub_files, "public",
                                                                                                 pub_cls)
        info.update(num_outputs=len(priv_ids))
    else:
        raise ValueError(f"data.task must be one of {TASKS}, got {task!r}")
    info.update(num_private=len(priv), num_public=len(pub), num_test=len(test),
                private_identities=len(set(priv.identities.tolist())),
                public_identities=len(set(pub.identities.tolist())), test_identities=len(set(test.identities.tolist())))
    return priv, pub, test, info


# ---------------------------------------------------------------------------------------------
# train_arl
# ---------------------------------------------------------------------------------------------
DEFAULTS: Dict[str, Any] = {
    "method": "arl",
    "name": "arl",
    "seed": 0,
    "device": "cpu",
    "threads": 2,
    "progress": True,
    "output_dir": "runs/arl",
    "data": {"root": None, "images_dir": "celeba_112", "task": "attributes",
             "attributes_file": "celeba_attributes.txt", "private_fraction": 0.7, "num_public_identities": 50,
             "test_fraction": 0.2, "max_public_images": 1500, "max_test_images": None},
    "model": {k: v for k, v in MODEL_DEFAULTS.items() if k not in ("task", "num_outputs")},
    "perceptual": {"kind": "auto", "vgg_weights": None, "recognizer": None, "seed": 0},
    "loss": {"lambda1": 1.0, "lambda2": 0.0, "mu1": 0.01, "mu2": 1.0},
    "train": {"batch_size": 32, "warmup_epochs": 2, "epochs": 4, "decoder_warmup_steps": 100, "n_dec": 1,
              "n_enc": 1, "optimizer": "adam", "lr_enc": 1e-3, "lr_dec": 2e-4, "lr_disc": 2e-4,
              "weight_decay": 5e-4, "init_checkpoint": None, "resume": False},
    "attack": {"steps": 600, "batch_size": 32, "mu1": 0.01, "mu2": 1.0, "lr": 2e-4, "seed": 1,
               "feature_attack_steps": 300},
    "eval": {"enabled": True, "sface": True, "sface_all": False, "tsne": False,
             "tsne_attributes": ["Male", "Smiling"], "batch_size": 64, "save_examples": True},
}


def merge_config(user: Dict[str, Any], defaults: Dict[str, Any] = DEFAULTS, where: str = "") -> Dict[str, Any]:
    """Deep-merge ``user`` onto ``defaults``; unknown keys raise KeyError naming them."""
    if not isinstance(user, dict):
        raise ValueError(f"config{where or ''} must be a mapping, got {type(user).__name__}")
    out = copy.deepcopy(defaults)
    for k, v in user.items():
        if k not in defaults:
            raise KeyError(f"unknown ARL config key {where + '.' if where else ''}{k!r}; known: "
                           f"{', '.join(sorted(defaults))}")
        if isinstance(defaults[k], dict):
            out[k] = merge_config(v or {}, defaults[k], f"{where + '.' if where else ''}{k}")
        else:
            out[k] = v
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(n: int, bs: int, gen: torch.Generator, drop_last: bool = True):
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % bs if drop_last and n >= bs else 0)
    for i in range(0, stop, bs):
        yield perm[i:i + bs]


@torch.no_grad()
def _encode(encoder: nn.Module, images_u8: torch.Tensor, device, bs: int) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(to_float(images_u8[i:i + bs], device)).cpu() for i in range(0, len(images_u8), bs)])


@torch.no_grad()
def _decode(decoder: ARLDecoder, z: torch.Tensor, device, bs: int) -> torch.Tensor:
    decoder.eval()
    return torch.cat([decoder(z[i:i + bs].to(device)).clamp(-1, 1).cpu() for i in range(0, len(z), bs)])


def evaluate_utility(net: ARLNet, test: Split, device, bs: int, attribute_names=None) -> Dict[str, Any]:
    from .metrics import mcc_per_attribute, mean_mcc

    z = _encode(net.encoder, test.images, device, bs)
    net.utility.eval()
    scores = torch.cat([net.utility.predict(z[i:i + bs].to(device)).cpu() for i in range(0, len(z), bs)])
    if net.config["task"] == "attributes":
        pred = (scores > 0).long().numpy()
        tgt = test.labels.numpy()
        per = mcc_per_attribute(pred, tgt)
        out = {"mcc": mean_mcc(pred, tgt), "mcc_skip_constant": mean_mcc(pred, tgt, constant="skip"),
               "attribute_accuracy": float((pred == tgt).mean()),
               "majority_accuracy": float(np.maximum(tgt.mean(0), 1 - tgt.mean(0)).mean())}
        if attribute_names:
            out["mcc_per_attribute"] = {n: (None if np.isnan(v) else round(float(v), 4))
                                        for n, v in zip(attribute_names, per)}
        return out
    acc = float((scores.argmax(1) == test.labels).float().mean())
    return {"identity_accuracy": acc, "chance": 1.0 / net.config["num_outputs"]}


def _save_examples(path: Path, originals: torch.Tensor, rows: Dict[str, torch.Tensor], n: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(originals))
    allrows = {"original": originals, **rows}
    fig, axes = plt.subplots(len(allrows), n, figsize=(1.3 * n, 1.4 * len(allrows)), squeeze=False)
    for r, (name, imgs) in enumerate(allrows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(((imgs[c].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def train_fresh_attacker(net: ARLNet, perceptual: Optional[PerceptualNet], public: Split, device,
                         steps: int, batch_size: int, mu1: float, mu2: float, lr: float, seed: int,
                         progress: bool = True) -> ARLDecoder:
    """A new decoder (+ D) trained with ``L_a`` on public faces against the frozen encoder."""
    from tqdm import tqdm

    dec, disc = net.new_attacker(seed)
    game = ReconstructionGame(net.encoder, dec, disc, perceptual if mu2 > 0 else None, mu1, mu2, lr, lr)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(public))
    it = iter(())
    for _ in tqdm(range(int(steps)), desc="attacker decoder", leave=False, disable=not progress):
        idx = next(it, None)
        if idx is None:
            it = _batches(len(public), bs, gen)
            idx = next(it)
        game.step(to_float(public.images[idx], device))
    return dec.eval()


def evaluate_privacy(net: ARLNet, decoder: ARLDecoder, test: Split, device, bs: int, sface=None,
                     sface_orig: Optional[torch.Tensor] = None) -> Tuple[Dict[str, float], torch.Tensor]:
    """SSIM / PSNR / face similarity of ``decoder``'s reconstructions of the test faces (and the
    reconstructions, (N, 3, 112, 112))."""
    from .metrics import face_similarity, ssim_psnr

    z = _encode(net.encoder, test.images, device, bs)
    rec = _decode(decoder, z, device, bs)
    orig = to_float(test.images)
    s, p = ssim_psnr(rec, orig)
    out = {"ssim": s, "psnr": p}
    if sface is not None:
        out["face_sim"] = face_similarity(rec, orig, evaluator=sface, original_emb=sface_orig)
    return out, rec


def train_arl(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run one ARL experiment from a config dict (see ``configs/arl_base.yaml``) and return its results.

    Steps: data splits (private / public / test victims) -> warm-up of Enc+f on the utility alone
    (``train.warmup_epochs``) -> decoder warm-up (``train.decoder_warmup_steps`` of (a)) -> alternating
    (a)/(b) for ``train.epochs`` epochs over the private data (``n_dec`` public batches of (a) before
    every ``n_enc`` private batches of (b)) -> checkpoint ``output_dir/arl.pt`` (atomic, after every
    epoch; ``train.resume`` continues from it) -> evaluation: utility on the test faces, LDA score of z
    over identities, a FRESH attacker decoder trained on public data against the frozen encoder
    (SSIM, PSNR, SFace face similarity), the ARL's own decoder, the feature-level attack ``M``, the
    resolution ceiling, an optional t-SNE plot. Results go to ``output_dir/results.json``.
    ``train.resume`` restores weights, optimizers and the private batch order; public batches are
    drawn afresh.
    """
    from tqdm import tqdm

    from .metrics import (embed_batched, feature_similarity, lda_score, plot_tsne, ssim_psnr,
                          train_feature_attacker)

    t0 = time.time()
    cfg = merge_config({k: v for k, v in config.items()})
    if cfg["method"] != "arl":
        raise ValueError(f"train_arl needs method: arl, got {cfg['method']!r}")
    torch.set_num_threads(int(cfg["threads"]))
    device = _device(str(cfg["device"]))
    seed = int(cfg["seed"])
    progress = bool(cfg["progress"])
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tr, lo, at, ev = cfg["train"], cfg["loss"], cfg["attack"], cfg["eval"]

    priv, pub, test, info = prepare_data(cfg["data"], seed, progress)
    log.info("ARL data: %s", {k: v for k, v in info.items() if k != "attribute_names"})
    if len(priv) < 2 or len(pub) < 2 or len(test) < 2:
        raise ValueError(f"too few images: private {len(priv)}, public {len(pub)}, test {len(test)}")

    torch.manual_seed(seed)
    model_cfg = dict(cfg["model"], task=cfg["data"]["task"], num_outputs=info["num_outputs"])
    net = ARLNet(**model_cfg).to(device)
    need_g = lo["lambda2"] > 0 or lo["mu2"] > 0 or at["mu2"] > 0 or at["feature_attack_steps"] > 0
    g = None
    if need_g:
        pc = cfg["perceptual"]
        g = build_perceptual(pc["kind"], pc["vgg_weights"], pc["recognizer"], int(pc["seed"])).to(device)
        log.info("perceptual network g: %s", g.description)
    trainer = ARLTrainer(net, g, lo["lambda1"], lo["lambda2"], lo["mu1"], lo["mu2"], tr["lr_enc"], tr["lr_dec"],
                         tr["lr_disc"], tr["weight_decay"], tr["optimizer"])

    ckpt_path = out_dir / "arl.pt"
    start_epoch, history = 0, []
    gen = torch.Generator().manual_seed(seed + 1)
    if tr["resume"] and ckpt_path.is_file():
        loaded, ck = load_arl(ckpt_path, map_location=device)
        net.load_state_dict(loaded.state_dict())
        trainer.load_state_dict(ck["optimizers"])
        start_epoch, history = int(ck["epoch"]), list(ck.get("history", []))
        gen.set_state(ck["data_generator"].to(torch.uint8))
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif tr["init_checkpoint"]:
        loaded, _ = load_arl(tr["init_checkpoint"], map_location=device)
        if loaded.config != net.config:
            raise ValueError(f"init_checkpoint {tr['init_checkpoint']} has model config {loaded.config}, "
                             f"this run needs {net.config}")
        net.load_state_dict(loaded.state_dict())
        log.info("initialised Enc/f/Dec/D from %s", tr["init_checkpoint"])

    bs = int(tr["batch_size"])
    pub_gen = torch.Generator().manual_seed(seed + 2)
    pub_iter = iter(())

    def next_public():
        nonlocal pub_iter
        idx = next(pub_iter, None)
        if idx is None:
            pub_iter = _batches(len(pub), min(bs, len(pub)), pub_gen)
            idx = next(pub_iter)
        return to_float(pub.images[idx], device)

    total_epochs = int(tr["warmup_epochs"]) + int(tr["epochs"])

    def decoder_warmup():
        for _ in tqdm(range(int(tr["decoder_warmup_steps"])), desc="decoder warm-up", leave=False,
                      disable=not progress):
            trainer.decoder_step(next_public())

    def checkpoint(epoch):
        save_arl(ckpt_path, net, {"epoch": epoch, "history": history, "optimizers": trainer.state_dict(),
                                  "data_generator": gen.get_state(), "config": _plain(cfg)})

    for epoch in range(start_epoch, total_epochs):
        warm = epoch < int(tr["warmup_epochs"])
        if epoch == int(tr["warmup_epochs"]):
            decoder_warmup()
        sums: Dict[str, float] = {}
        n = 0
        for idx in tqdm(list(_batches(len(priv), min(bs, len(priv)), gen)),
                        desc=f"epoch {epoch + 1}/{total_epochs} ({'warm-up' if warm else 'adversarial'})",
                        leave=False, disable=not progress):
            if not warm:
                for _ in range(int(tr["n_dec"])):
                    for k, v in trainer.decoder_step(next_public()).items():
                        sums["a/" + k] = sums.get("a/" + k, 0.0) + v / int(tr["n_dec"])
            x, y = to_float(priv.images[idx], device), priv.labels[idx].to(device)
            for _ in range(int(tr["n_enc"])):
                for k, v in trainer.encoder_step(x, y, adversarial=not warm).items():
                    sums["b/" + k] = sums.get("b/" + k, 0.0) + v / int(tr["n_enc"])
            n += 1
        rec = {"epoch": epoch + 1, "phase": "warmup" if warm else "adversarial",
               **{k: round(v / max(n, 1), 5) for k, v in sums.items()}}
        history.append(rec)
        log.info("ARL %s", rec)
        checkpoint(epoch + 1)
    if int(tr["epochs"]) == 0 and start_epoch < total_epochs and int(tr["decoder_warmup_steps"]) > 0:
        decoder_warmup()  # a warm-up-only run (e.g. a shared start for a sweep) ends with a trained decoder
        checkpoint(total_epochs)
    train_time = time.time() - t0

    # ------------------------------------------------------------------ evaluation
    t1 = time.time()
    if not ev["enabled"]:
        results = {"name": cfg["name"], "task": info["task"], "history": history, "checkpoint": str(ckpt_path),
                   "train_time_s": round(train_time, 1), "evaluated": False}
        with atomic_write(out_dir / "results.json", "w") as f:
            json.dump(_plain(results), f, indent=2)
        return results
    ebs = int(ev["batch_size"])
    results: Dict[str, Any] = {"name": cfg["name"], "task": info["task"], "data": {k: v for k, v in info.items()
                                                                                    if k != "attribute_names"},
                               "loss": dict(lo), "model": dict(net.config), "history": history,
                               "perceptual": g.description if g is not None else None}
    results["utility"] = evaluate_utility(net, test, device, ebs, info.get("attribute_names"))
    z_test = _encode(net.encoder, test.images, device, ebs)
    try:
        results["lda"] = lda_score(z_test, test.identities.numpy())
    except HybridMaskInputError as e:
        results["lda"] = None
        log.warning("LDA score skipped: %s", e)
    results["z_shape"] = list(net.z_shape)

    sface = sface_orig = None
    if ev["sface"]:
        from .metrics import default_face_evaluator
        sface = default_face_evaluator()
        sface_orig = embed_batched(sface, to_float(test.images), 128)

    attacker = train_fresh_attacker(net, g, pub, device, int(at["steps"]), int(at["batch_size"]), float(at["mu1"]),
                                    float(at["mu2"]), float(at["lr"]), int(at["seed"]), progress)
    results["attack"], rec_att = evaluate_privacy(net, attacker, test, device, ebs, sface, sface_orig)
    extra_sface = sface if ev["sface_all"] else None
    results["own_decoder"], rec_own = evaluate_privacy(net, net.decoder, test, device, ebs, extra_sface, sface_orig)
    orig = to_float(test.images)
    ceil = resize(resize(orig, net.config["input_size"]), OUT_SIZE).clamp(-1, 1)
    s, p = ssim_psnr(ceil, orig)
    results["resolution_ceiling"] = {"ssim": s, "psnr": p}
    if extra_sface is not None:
        from .metrics import face_similarity
        results["resolution_ceiling"]["face_sim"] = face_similarity(ceil, orig, sface, sface_orig)

    if int(at["feature_attack_steps"]) > 0 and g is not None:
        @torch.no_grad()
        def targets(split):
            return torch.cat([g(resize(to_float(split.images[i:i + ebs], device), net.config["input_size"]))[-1].cpu()
                              for i in range(0, len(split), ebs)])
        z_pub = _encode(net.encoder, pub.images, device, ebs)
        t_pub, t_test = targets(pub), targets(test)
        m = train_feature_attacker(z_pub, t_pub, steps=int(at["feature_attack_steps"]), seed=int(at["seed"]))
        with torch.no_grad():
            pred = torch.cat([m(z_test[i:i + ebs]) for i in range(0, len(z_test), ebs)])
        mean = t_pub.mean(0, keepdim=True)
        results["feature_attack"] = {
            "feature_sim": feature_similarity(pred - mean, t_test - mean),
            "feature_sim_raw": feature_similarity(pred, t_test),
            "raw_baseline_mean_target": feature_similarity(mean.expand_as(t_test), t_test),
            "target": f"deepest tap of g {tuple(t_test.shape[1:])}; feature_sim is centred by the public mean"}

    if ev["save_examples"]:
        _save_examples(out_dir / "examples.png", orig, {"attacker": rec_att, "ARL decoder": rec_own})
    if ev["tsne"] and info["task"] == "attributes":
        names = info["attribute_names"]
        cols = [names.index(a) for a in ev["tsne_attributes"]]
        plot_tsne(z_test.flatten(1).numpy(), test.labels[:, cols].numpy(), list(ev["tsne_attributes"]),
                  out_dir / "tsne.png", title=f"{cfg['name']}: t-SNE of z ({net.config['feature_layer']})", seed=seed)
        results["tsne_plot"] = str(out_dir / "tsne.png")
    results["checkpoint"] = str(ckpt_path)
    results["train_time_s"] = round(train_time, 1)
    results["eval_time_s"] = round(time.time() - t1, 1)
    with atomic_write(out_dir / "results.json", "w") as f:
        json.dump(_plain(results), f, indent=2)
    return results


__all__ = ["FEATURE_LAYERS", "ARLNet", "ARLEncoder", "ARLDecoder", "UtilityNet", "PatchDiscriminator", "ARLTrainer",
           "ReconstructionGame", "PerceptualNet", "RandomConvFeatures", "VGGFeatures", "RecognizerFeatures",
           "build_perceptual", "build_arl_net", "save_arl", "load_arl", "ARLDefense", "train_arl", "merge_config",
           "read_celeba_attributes", "prepare_data", "DEFAULTS"]
