"""The networks of adversarial reconstruction learning (ARL; Xiao et al., AAAI 2020), DESIGN 1.2.

* **Encoder** ``Enc``: the front of a ResNet (``resnet18`` / ``resnet34`` with basic blocks,
  ``resnet50`` with bottlenecks; base ``width`` 64 is the standard network, smaller widths for CPU
  work) cut at ``feature_layer`` in ``conv1`` (alias ``stem``), ``layer1`` .. ``layer4``,
  ``avgpool``, ``fc``. Faces (B, 3, 112, 112) in [-1, 1] are resized to ``input_size`` first
  (64 is fine on a CPU). The released representation is ``z = Enc(x)``.
* **Utility head** ``f``: the rest of the same ResNet (the layers after the cut, the pooling and the
  ``fc`` embedding) followed by a linear layer for the 40 CelebA attributes (BCE) or by a margin head
  (ArcFace / CosFace from :mod:`hybridmask.models.heads`) for identities.
* **Decoder** ``Dec``: the mirror of the encoder: from the cut back to the image, one up-sampling
  block (bilinear resize to the spatial size of the encoder stage below + two 3x3 conv-BN-ReLU)
  per encoder stage, a linear "un-pooling" for ``avgpool``/``fc``, then a last up-sampling block
  (one conv) and conv -> tanh at ``input_size``, bilinearly resized to 112x112 (``native=True``
  keeps ``input_size``).
* **Discriminator** ``D``: the PatchGAN of :mod:`hybridmask.models.blocks` (three stride-2 convs,
  no flat layer) on images at ``input_size``.
* :class:`FeatureAttacker` ``M``: released features -> perceptual features (the feature-level attack).

The perceptual networks ``g`` are in :mod:`hybridmask.models.perceptual`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import check_images
from .blocks import ConvBNAct, PatchDiscriminator, resize
from .heads import create_head

OUT_SIZE = 112
FEATURE_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
SPATIAL_LAYERS = FEATURE_LAYERS[:5]
LAYER_ALIASES = {"stem": "conv1"}
ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
         "resnet50": ("bottleneck", (3, 4, 6, 3))}
TASKS = ("attributes", "identity")
#: the arguments that fix the encoder and decoder (the ``arl`` defense's architecture)
ENCODER_KEYS = ("arch", "width", "fc_dim", "input_size", "feature_layer")
MODEL_DEFAULTS: Dict[str, Any] = dict(arch="resnet18", width=16, fc_dim=128, input_size=64, feature_layer="layer2",
                                      task="attributes", num_outputs=40, head="arcface", head_s=32.0, head_m=None,
                                      disc_width=16)


def resolve_layer(name: str) -> str:
    key = str(name).lower()
    key = LAYER_ALIASES.get(key, key)
    if key not in FEATURE_LAYERS:
        raise KeyError(f"unknown feature layer {name!r}; choose one of {', '.join(FEATURE_LAYERS)} (or 'stem')")
    return key


# ---- ResNet trunk --------------------------------------------------------------------------------
def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = _shortcut(cin, cout, stride)

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
        self.short = _shortcut(cin, cout, stride)

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


@torch.no_grad()
def probe_shapes(parts: "OrderedDict[str, nn.Module]", input_size: int) -> Dict[str, Tuple[int, ...]]:
    """Output shape (without batch) of every part for an ``input_size`` face (BN statistics untouched)."""
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


class UpBlock(nn.Module):
    """Bilinear resize to ``size`` then ``convs`` 3x3 conv-BN-ReLU (the mirror of one encoder stage)."""

    def __init__(self, cin: int, cout: int, size: Tuple[int, int], convs: int = 2):
        super().__init__()
        self.size = tuple(size)
        self.body = nn.Sequential(ConvBNAct(cin, cout), *[ConvBNAct(cout, cout) for _ in range(convs - 1)])

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


def arl_discriminator(width: int) -> PatchDiscriminator:
    return PatchDiscriminator(3, width, n_layers=3, flat=False)


def check_input_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"input_size must be an int >= 32, got {size!r}")
    return size


def encoder_decoder(arch: str = "resnet18", width: int = 16, fc_dim: int = 128, input_size: int = 64,
                    feature_layer: str = "layer2") -> Tuple[ARLEncoder, ARLDecoder]:
    """Just the encoder and decoder of an ARL model (what the ``arl`` defense holds)."""
    layer = resolve_layer(feature_layer)
    parts = resnet_parts(arch, width, fc_dim)
    shapes = probe_shapes(parts, check_input_size(input_size))
    cut = FEATURE_LAYERS.index(layer) + 1
    return ARLEncoder(list(parts.items())[:cut], input_size, layer), ARLDecoder(shapes, layer, input_size)


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
        size = check_input_size(cfg["input_size"])
        self.config = cfg
        parts = resnet_parts(cfg["arch"], cfg["width"], cfg["fc_dim"])
        self.shapes = probe_shapes(parts, size)
        cut = FEATURE_LAYERS.index(cfg["feature_layer"]) + 1
        items = list(parts.items())
        self.encoder = ARLEncoder(items[:cut], size, cfg["feature_layer"])
        self.utility = UtilityNet(items[cut:], cfg["task"], cfg["fc_dim"], cfg["num_outputs"], cfg["head"],
                                  cfg["head_s"], cfg["head_m"])
        self.decoder = ARLDecoder(self.shapes, cfg["feature_layer"], size)
        self.discriminator = arl_discriminator(cfg["disc_width"])

    @property
    def z_shape(self) -> Tuple[int, ...]:
        return self.shapes[self.config["feature_layer"]]

    def new_attacker(self, seed: int = 0) -> Tuple[ARLDecoder, PatchDiscriminator]:
        """A freshly initialised decoder + discriminator of the same architecture (the attacker's)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dec = ARLDecoder(self.shapes, self.config["feature_layer"], self.config["input_size"])
            disc = arl_discriminator(self.config["disc_width"])
        dev = next(self.parameters()).device
        return dec.to(dev), disc.to(dev)


class FeatureAttacker(nn.Module):
    """``M``: released features -> perceptual features of the image.

    Spatial ``z`` (B, C, h, w): two 3x3 conv-BN-ReLU layers, resized to the target grid, 1x1 conv to
    the target channels. Vector ``z`` (B, D) or (B, D, 1, 1) with a vector target: a two-layer MLP;
    with a spatial target, a linear map to a small map that is then treated as above.
    """

    def __init__(self, z_shape: Tuple[int, ...], target_shape: Tuple[int, ...], width: int = 64):
        super().__init__()
        self.z_shape, self.target_shape = tuple(z_shape), tuple(target_shape)
        zc = z_shape[0]
        self.spatial_z = len(z_shape) == 3 and (z_shape[1] > 1 or z_shape[2] > 1)
        if len(target_shape) == 1:
            zin = int(np.prod(z_shape))
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(zin, width * 4), nn.ReLU(inplace=True),
                                     nn.Linear(width * 4, target_shape[0]))
            self.kind = "mlp"
            return
        tc, th, tw = target_shape
        self.kind = "conv"
        if not self.spatial_z:
            self.lift = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(z_shape)), width * 4 * 4), nn.ReLU(True))
            zc = width
        else:
            self.lift = None
        self.body = nn.Sequential(ConvBNAct(zc, width), ConvBNAct(width, width))
        self.out = nn.Conv2d(width, tc, 1)
        self.size = (th, tw)
        self.width = width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.net(z)
        if self.lift is not None:
            z = self.lift(z).view(len(z), self.width, 4, 4)
        h = self.body(z)
        h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        return self.out(h)


__all__ = ["FEATURE_LAYERS", "ENCODER_KEYS", "MODEL_DEFAULTS", "OUT_SIZE", "TASKS", "ARLNet", "ARLEncoder",
           "ARLDecoder", "UtilityNet", "FeatureAttacker", "encoder_decoder", "resolve_layer", "resnet_parts"]
