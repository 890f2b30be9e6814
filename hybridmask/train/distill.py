"""Distillation from a teacher inside :class:`~hybridmask.train.trainer.AlternatingTrainer` (issue 13 item 1).

    from hybridmask.models.teacher import TeacherCache, Projection
    from hybridmask.train.distill import Distillation
    cache = TeacherCache("sface", cache_dir); cache.embeddings(train_set.images, train_set.labels)
    trainer = AlternatingTrainer(..., train_set, defense, distill=Distillation(cache, weight=1.0, margin=True,
                                 projection=Projection(128, 128) or None))

Per sample the recognizer's loss is ``(margin loss if margin) + weight * (1 - cos(proj(model(release)), target))``
with ``target = mixed_target(teacher embeddings of the batch's clean faces, MixRecord)``: the teacher's
embedding of the face as the trainer saw it (its flip when the trainer flipped it), for a k-face mix the
label-weighted sum of the k sources' embeddings, renormalised. The trainer learns which training faces a batch
holds from :class:`IndexedDataset` (it wraps the dataset itself when distillation is on: what other callers of
the dataset see does not change), and which were flipped from its own flip draws (unchanged draws).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..models.teacher import mixed_target


class IndexedDataset(Dataset):
    """``dataset[i] + (i,)``: the wrapped map-style dataset's items with their index appended."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return (*item, int(i)) if isinstance(item, (tuple, list)) else (item, int(i))

    def __getattr__(self, name: str) -> Any:     # classes, targets, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class Distillation:
    """What the trainer distils from.

    cache: the teacher's embeddings of the training faces, anything with ``lookup(indices, flipped) -> (B, D)``
    (a :class:`~hybridmask.models.teacher.TeacherCache` after ``embeddings(...)``), indexed like the trainer's
    dataset. weight: lambda of the cosine term. margin: keep the mixed-label margin loss. projection: maps the
    student's embeddings to the teacher's size (required when they differ; its parameters must be in the
    optimizer; it is saved in the trainer's checkpoint). pool_emb: teacher embeddings of a public pool, for a
    defense that mixes partners from one. centres: (classes, D) the teacher's class centres (L2-normalised
    mean embedding of each training identity, :func:`teacher_centres`), set when ``margin`` is off: the head
    then gets no gradient, so the utility U is measured against these instead of the untrained head's."""
    cache: Any
    weight: float = 1.0
    margin: bool = True
    projection: Optional[nn.Module] = None
    pool_emb: Optional[torch.Tensor] = None
    centres: Optional[torch.Tensor] = None

    def __post_init__(self):
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"distillation weight must be a non-negative number, got {w!r}")
        if not callable(getattr(self.cache, "lookup", None)):
            raise TypeError("Distillation.cache needs lookup(indices, flipped) (a TeacherCache after embeddings())")
        if not self.margin and self.weight == 0:
            raise ValueError("margin=False and weight=0 leave no loss to train")
        self.weight, self.margin = float(w), bool(self.margin)

    def target(self, indices: torch.Tensor, flipped: Optional[torch.Tensor], record=None) -> torch.Tensor:
        """(B, D) L2-normalised targets of the batch's releases."""
        t = self.cache.lookup(indices.cpu(), None if flipped is None else flipped.cpu())
        return mixed_target(t.float(), record, pool_emb=self.pool_emb)


def teacher_centres(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D): the L2-normalised mean of each class's L2-normalised teacher embeddings (a class
    without faces gets a zero row, which no query matches best)."""
    e = torch.nn.functional.normalize(emb.float(), dim=1)
    lab = torch.as_tensor(labels).long().cpu()
    sums = torch.zeros(int(num_classes), e.shape[1]).index_add_(0, lab, e)
    return torch.nn.functional.normalize(sums, dim=1)


__all__ = ["Distillation", "IndexedDataset", "teacher_centres"]
