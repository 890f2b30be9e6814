"""Training data for ``hybridmask train``: a face folder or the embedded synthetic faces, decoded
once into a uint8 tensor cache, and a held-out split of training identities for the utility U."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..utils import atomic_save, safe_torch_load


class TensorFaces(Dataset):
    """Faces held in memory as uint8 (N, 3, H, W); ``dataset[i] = (float image in [-1, 1], label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 (N, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.classes = list(classes)
        self.targets = self.labels.tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i].float().div_(127.5).sub_(1.0), int(self.labels[i])

    def subset(self, index: Sequence[int]) -> "TensorFaces":
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return TensorFaces(self.images[idx], self.labels[idx], self.classes)

    def tensors(self, index: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(len(self)) if index is None else torch.as_tensor(list(index), dtype=torch.long)
        return self.images[idx].float().div_(127.5).sub_(1.0), self.labels[idx].clone()


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def materialize(dataset, desc: str = "decode", progress: bool = True) -> TensorFaces:
    """Decode every image of a map-style ``(image, label)`` dataset once into a :class:`TensorFaces`."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the training set is empty")
    first, _ = dataset[0]
    imgs = torch.empty((n,) + tuple(first.shape), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in tqdm(range(n), desc=desc, unit="img", leave=False, mininterval=2.0, disable=not progress):
        x, y = dataset[i]
        imgs[i] = _to_uint8(x)
        labels[i] = int(y)
    classes = getattr(dataset, "classes", [str(i) for i in range(int(labels.max()) + 1)])
    return TensorFaces(imgs, labels, classes)


def load_training_set(data_cfg: Dict, cache_dir: Optional[Path] = None, progress: bool = True) -> TensorFaces:
    """The training faces of a config's ``data`` section (see ``configs/base.yaml``)."""
    root = data_cfg.get("train")
    if root:
        from ..data.folder import FaceFolder
        root = Path(os.path.expanduser(str(root)))
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder not found: {root} (data.train)")
        ds = FaceFolder(root, min_images=int(data_cfg.get("min_images") or 1))
        if data_cfg.get("max_identities"):
            keep = ds.classes[: int(data_cfg["max_identities"])]
            ds = FaceFolder(root, identities=keep, min_images=int(data_cfg.get("min_images") or 1))
        key = {"root": str(root.resolve()), "n": len(ds), "classes": ds.num_classes,
               "max_identities": data_cfg.get("max_identities"), "min_images": data_cfg.get("min_images")}
        desc = f"decode {root.name}"
    else:
        from ..data.synthetic import SyntheticFaces
        syn = data_cfg.get("synthetic") or {}
        ds = SyntheticFaces(int(syn.get("identities", 32)), int(syn.get("images_per_identity", 10)),
                            size=int(syn.get("size", 112)), seed=int(syn.get("seed", 0)))
        key = {"synthetic": dict(syn)}
        desc = "render synthetic faces"
    if cache_dir is not None and data_cfg.get("cache", True):
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"faces_{digest}.pt"
        if path.is_file():
            try:
                blob = safe_torch_load(path)
                return TensorFaces(blob["images"], blob["labels"], blob["classes"])
            except (ValueError, KeyError):
                pass  # a stale or broken cache is rebuilt
        faces = materialize(ds, desc, progress)
        atomic_save({"images": faces.images, "labels": faces.labels, "classes": faces.classes, "key": json.dumps(key)},
                    path)
        return faces
    return materialize(ds, desc, progress)


def holdout_split(labels: Sequence[int], per_identity: int = 1, max_identities: Optional[int] = None,
                  seed: int = 0) -> Tuple[List[int], List[int]]:
    """Split indices into (train, held-out): ``per_identity`` images of up to ``max_identities``
    identities (chosen with ``seed``; only identities with more than ``per_identity`` images, so
    every identity keeps training images) are held out for the utility U."""
    labels = list(int(y) for y in labels)
    by_id: Dict[int, List[int]] = {}
    for i, y in enumerate(labels):
        by_id.setdefault(y, []).append(i)
    if per_identity <= 0:
        return list(range(len(labels))), []
    eligible = sorted(y for y, idx in by_id.items() if len(idx) > per_identity)
    g = torch.Generator()
    g.manual_seed(int(seed) + 0x5EED)
    order = [eligible[i] for i in torch.randperm(len(eligible), generator=g).tolist()]
    if max_identities is not None:
        order = order[: int(max_identities)]
    held = sorted(i for y in order for i in by_id[y][-per_identity:])
    hs = set(held)
    return [i for i in range(len(labels)) if i not in hs], held
