"""ARL's data: CelebA's attribute file, faces of an identity folder as uint8 tensors, and the
private / public / test-victim splits of :func:`prepare_data` (the ``data`` section of an ARL config).

* ``task: attributes`` - the identities with attributes are split by identity into private (Enc and
  f train on them) and test victims (``private_fraction``); every other identity is public (the
  decoders and the attacker train on it). Labels are the 40 binary attributes.
* ``task: identity`` - ``num_public_identities`` identities are public; the others are private, each
  with ``test_fraction`` of its images (at least one) held out as test victims of the same identities.
  Labels are the private identity indices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from .folder import FaceFolder
from .image import FACE_SIZE, load_image, tensor_to_uint8

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
    """``file name -> (identity, path)`` for ``root/<identity>/<file>`` (the images of :class:`FaceFolder`)."""
    folder = FaceFolder(root)
    return {p.name: (folder.classes[y], p) for p, y in folder.samples}


def load_uint8(paths: Sequence[Path], desc: str = "loading", progress: bool = True) -> torch.Tensor:
    """Read aligned 112x112 faces into a (N, 3, 112, 112) uint8 tensor."""
    out = torch.empty(len(paths), 3, FACE_SIZE, FACE_SIZE, dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, leave=False, disable=not progress)):
        out[i] = torch.from_numpy(tensor_to_uint8(load_image(p, size=FACE_SIZE))).permute(2, 0, 1)
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
        raise ValueError(f"data.task must be 'attributes' or 'identity', got {task!r}")
    info.update(num_private=len(priv), num_public=len(pub), num_test=len(test),
                private_identities=len(set(priv.identities.tolist())),
                public_identities=len(set(pub.identities.tolist())), test_identities=len(set(test.identities.tolist())))
    return priv, pub, test, info


__all__ = ["read_celeba_attributes", "index_identity_folder", "load_uint8", "to_float", "Split", "prepare_data"]
