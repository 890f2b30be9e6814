"""Two ways to use the masking in your own pipeline.

* :class:`BatchMask` - a batch transform applied after the DataLoader (like torchvision v2
  MixUp): ``masked, labels_k, label_weights, record = BatchMask(hm)(images, labels)``.
* :class:`MaskTransform` / :class:`MaskedDataset` - per-image: k=1 (PPFR-FD only, what a query
  gets) or k>1 with partners from the ``pool`` given to the :class:`HybridMask`.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..utils.validate import HybridMaskInputError
from .hybrid import HybridMask


class BatchMask:
    """Apply a :class:`HybridMask` to a collated batch ``(images, labels)``."""

    def __init__(self, mask: HybridMask):
        self.mask = mask

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, k=None):
        masked, record = self.mask(images, k=k)
        return masked, record.mixed_labels(labels), record.label_weights.to(masked.device), record


class MaskTransform:
    """Single image ``(3, H, W)`` -> masked ``(C_kept, h, w)``. With ``k > 1`` partners come from the
    mask's public pool (a single image has no batch to draw partners from)."""

    def __init__(self, mask: HybridMask, k: int = 1):
        if k > 1 and mask.pool is None:
            raise HybridMaskInputError("a per-image transform with k > 1 needs a HybridMask with a public pool")
        self.mask = mask
        self.k = k

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise HybridMaskInputError(f"expected one image tensor (3, H, W), got {getattr(image, 'shape', type(image))}")
        with torch.no_grad():
            if self.k == 1:
                return self.mask.encode(image.unsqueeze(0))[0]
            return self.mask(image.unsqueeze(0), k=self.k)[0][0]


class MaskedDataset(Dataset):
    """Wrap a dataset of ``(image, label)`` so every image comes out masked."""

    def __init__(self, dataset: Dataset, mask: HybridMask, k: int = 1):
        self.dataset = dataset
        self.transform = MaskTransform(mask, k)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            return (self.transform(item[0]), *item[1:])
        return self.transform(item)
