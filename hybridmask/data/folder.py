"""Identity-per-folder face dataset (``root/<identity>/<image>.jpg``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from .image import FACE_SIZE, is_image_file, load_image


class FaceFolder(Dataset):
    """Aligned faces stored one folder per identity.

    ``dataset[i]`` is ``(image, label)`` with ``image`` a float32 RGB tensor (3, 112, 112) in
    [-1, 1] (``transform``, if given, is applied to that tensor) and ``label`` an int. Classes
    are the sub-folder names, sorted; ``identities`` keeps only the listed ones (in sorted
    order), ``min_images`` drops identities with fewer images. Labels are contiguous 0..C-1
    over the kept identities.
    """

    def __init__(self, root: Union[str, os.PathLike], transform: Optional[Callable] = None,
                 identities: Optional[Iterable[str]] = None, min_images: int = 1,
                 image_size: Optional[int] = FACE_SIZE):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"face folder not found: {self.root}")
        if int(min_images) < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        self.transform = transform
        self.image_size = image_size
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if identities is not None:
            wanted = {str(i) for i in identities}
            missing = sorted(wanted - set(folders))
            if missing:
                raise KeyError(f"identities not found under {self.root}: {', '.join(missing[:5])}"
                               + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
            folders = [f for f in folders if f in wanted]
        per_class: Dict[str, List[Path]] = {}
        for name in folders:
            files = sorted(p for p in (self.root / name).iterdir() if p.is_file() and is_image_file(p.name))
            if len(files) >= int(min_images):
                per_class[name] = files
        if not per_class:
            raise ValueError(
                f"no identity folders with at least {min_images} image(s) under {self.root} "
                f"(expected root/<identity>/<image>.jpg)")
        self.classes: List[str] = list(per_class)
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[Path, int]] = [
            (p, self.class_to_idx[c]) for c, files in per_class.items() for p in files]
        self.targets: List[int] = [y for _, y in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = load_image(path, size=self.image_size)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __repr__(self) -> str:
        return f"FaceFolder(root={str(self.root)!r}, identities={self.num_classes}, images={len(self)})"
