"""1:1 verification of a recognizer on LFW, CFP-FP, CFP-FF, any insightface ``.bin`` file, or
the built-in synthetic pairs."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from hybridmask.data.binfile import BinPairs
from hybridmask.data.pairs import VerificationSet, pairs_from_paths
from hybridmask.data.protocols import protocol_pairs

from .embed import MAX_BATCH, embed
from .metrics import FAR_TARGETS, verification_metrics

PathLike = Union[str, os.PathLike]
TARGETS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "synthetic")


def load_verification_set(target: Union[str, PathLike, VerificationSet],
                          data_root: Optional[PathLike] = None) -> VerificationSet:
    """Resolve a target name or .bin path to a :class:`VerificationSet`.

    * a ``.bin`` path (absolute, relative, or relative to ``data_root``): insightface format,
      contiguous folds;
    * ``lfw`` / ``cfp_fp`` / ``cfp_ff`` / ``agedb_30`` / ...: ``data_root/<name>.bin`` if it exists,
      else the folders with the official protocol (``data_root/lfw_112`` + ``pairs.txt``,
      ``data_root/cfp_112`` + ``Protocol/``), with the protocol's folds;
    * ``synthetic``: the built-in synthetic pairs (no data needed).
    """
    if isinstance(target, VerificationSet):
        return target
    t = str(target)
    root = Path(data_root) if data_root is not None else None
    if t.lower().endswith(".bin") or os.path.isfile(t):
        cands = [Path(t)] + ([root / t] if root is not None and not Path(t).is_absolute() else [])
        for c in cands:
            if c.is_file():
                return BinPairs(c).verification_set()
        raise FileNotFoundError(f".bin file not found: {t}" + (f" (also looked in {root})" if root else ""))
    name = t.lower()
    if name == "synthetic":
        from hybridmask.data.synthetic import synthetic_pairs
        return synthetic_pairs()
    if name not in TARGETS:
        raise KeyError(f"unknown verification target {t!r}; use one of {', '.join(TARGETS)} or a .bin path")
    if root is None:
        raise ValueError(f"target {name!r} needs a data folder (--data DIR)")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    bin_path = root / f"{name}.bin"
    if bin_path.is_file():
        return BinPairs(bin_path).verification_set()
    if name in ("lfw", "cfp_fp", "cfp_ff"):
        return pairs_from_paths(name, protocol_pairs(name, root))
    raise FileNotFoundError(f"{name}: only the .bin format is supported and {bin_path} does not exist")


def _subset(vs: VerificationSet, max_pairs: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    idx = np.arange(len(vs))
    if max_pairs is not None and 0 < int(max_pairs) < len(vs):
        # evenly spaced over the protocol order: keeps every fold and both pair kinds
        idx = np.unique(np.round(np.linspace(0, len(vs) - 1, int(max_pairs))).astype(np.int64))
    pairs, same = vs.pairs[idx], vs.issame[idx]
    folds = vs.folds[idx] if vs.folds is not None else None
    return idx, pairs, same, folds


def evaluate(model: Union[torch.nn.Module, Callable], target: Union[str, PathLike, VerificationSet],
             data_root: Optional[PathLike] = None, batch_size: int = MAX_BATCH, flip: bool = True,
             transform: Optional[Callable] = None, folds: Optional[int] = None,
             max_pairs: Optional[int] = None, far_targets=FAR_TARGETS, progress: bool = True,
             return_scores: bool = False) -> Dict:
    """Verification accuracy of ``model`` on ``target`` -> dict of metrics.

    Every distinct image used by the pairs is embedded once (image + horizontal flip, then the
    optional ``transform``, e.g. ``HybridMask.query``), pairs are scored by cosine similarity and
    :func:`verification_metrics` is applied with the protocol folds (LFW, CFP) or 10 contiguous
    folds (.bin files). ``folds`` forces that many contiguous folds; ``max_pairs`` evaluates an
    evenly spaced subset (quick checks). The dict also holds the timing (``seconds``,
    ``embed_seconds``, ``images_per_second``) and the ROC curve under ``"roc"``.
    """
    t0 = time.perf_counter()
    vs = load_verification_set(target, data_root)
    _, pairs, same, pfolds = _subset(vs, max_pairs)
    used = np.unique(pairs)
    remap = np.full(vs.num_images, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    t1 = time.perf_counter()
    emb = embed(model, (vs.image(int(k)) for k in used), batch_size=batch_size, flip=flip,
                transform=transform, progress=progress, total=len(used), desc=f"embed {vs.name}")
    t2 = time.perf_counter()
    a, b = emb[remap[pairs[:, 0]]], emb[remap[pairs[:, 1]]]
    scores = (a * b).sum(1).double().numpy()
    fold_spec = int(folds) if folds is not None else (pfolds if pfolds is not None else 10)
    res = verification_metrics(scores, same, folds=fold_spec, far_targets=far_targets)
    res.update({
        "target": vs.name,
        "images": int(len(used)),
        "fold_source": "protocol" if (folds is None and pfolds is not None) else "contiguous",
        "flip": bool(flip),
        "masked_query": transform is not None,
        "seconds": time.perf_counter() - t0,
        "load_seconds": t1 - t0,
        "embed_seconds": t2 - t1,
        "images_per_second": len(used) / max(t2 - t1, 1e-9),
    })
    if return_scores:
        res["scores"] = scores.tolist()
        res["issame"] = same.tolist()
    return res
