"""A verification set: images + (i, j, issame) pairs + optional fold assignment.

All verification sources (.bin files, LFW/CFP folders with their protocols, synthetic pairs)
become a :class:`VerificationSet`, so evaluation embeds every distinct image once and then
scores the pairs.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .image import FACE_SIZE, load_image


class VerificationSet:
    """``num_images`` images (decoded lazily by ``loader(k)``) and ``N`` scored pairs.

    ``pairs`` is an (N, 2) int array of image indices, ``issame`` an (N,) bool array and
    ``folds`` an (N,) int array of protocol folds (``None``: no protocol folds; evaluation then
    uses contiguous folds, as insightface does for .bin files).
    """

    def __init__(self, name: str, num_images: int, loader: Callable[[int], torch.Tensor],
                 pairs, issame, folds=None, sources: Optional[Sequence[str]] = None):
        self.name = str(name)
        self.num_images = int(num_images)
        self._loader = loader
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.issame = np.asarray(issame, dtype=bool).reshape(-1)
        self.folds = None if folds is None else np.asarray(folds, dtype=np.int64).reshape(-1)
        self.sources = None if sources is None else list(sources)
        n = len(self.pairs)
        if len(self.issame) != n:
            raise ValueError(f"{self.name}: {n} pairs but {len(self.issame)} issame labels")
        if self.folds is not None and len(self.folds) != n:
            raise ValueError(f"{self.name}: {n} pairs but {len(self.folds)} fold labels")
        if n == 0:
            raise ValueError(f"{self.name}: no pairs")
        if self.pairs.min() < 0 or self.pairs.max() >= self.num_images:
            raise ValueError(f"{self.name}: pair indices out of range 0..{self.num_images - 1}")

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, k: int) -> torch.Tensor:
        return self._loader(int(k))

    def images(self) -> Iterator[torch.Tensor]:
        for k in range(self.num_images):
            yield self._loader(k)

    def __repr__(self) -> str:
        return (f"VerificationSet({self.name!r}, pairs={len(self)}, images={self.num_images}, "
                f"positives={int(self.issame.sum())}, folds={'protocol' if self.folds is not None else 'contiguous'})")


def pairs_from_paths(name: str, pairs: Sequence[Tuple[Union[str, os.PathLike], Union[str, os.PathLike], bool, int]],
                     image_size: Optional[int] = FACE_SIZE) -> VerificationSet:
    """Build a set from ``(path1, path2, issame, fold)`` tuples (as the protocol readers return)."""
    index = {}
    paths: List[str] = []
    idx = np.empty((len(pairs), 2), dtype=np.int64)
    issame = np.empty(len(pairs), dtype=bool)
    folds = np.empty(len(pairs), dtype=np.int64)
    for n, (a, b, same, fold) in enumerate(pairs):
        for j, p in enumerate((a, b)):
            p = str(p)
            if p not in index:
                index[p] = len(paths)
                paths.append(p)
            idx[n, j] = index[p]
        issame[n] = bool(same)
        folds[n] = int(fold)

    def loader(k: int) -> torch.Tensor:
        return load_image(paths[k], size=image_size)

    return VerificationSet(name, len(paths), loader, idx, issame, folds, sources=paths)


def interleaved_set(name: str, num_pairs: int, loader: Callable[[int], torch.Tensor], issame,
                    folds=None) -> VerificationSet:
    """Pairs (2i, 2i+1), the insightface .bin layout."""
    idx = np.arange(2 * num_pairs, dtype=np.int64).reshape(-1, 2)
    return VerificationSet(name, 2 * num_pairs, loader, idx, issame, folds)
