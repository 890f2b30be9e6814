"""Victims, gallery and attacker-public faces for the attack harness.

Folders hold aligned 112x112 faces, one sub-folder per identity (``lfw_112/<Name>/*.jpg``,
``celeba_112/<id>/*.jpg``). Splits are by *identity* and seeded:

* ``victims="lfw"``: victims are LFW identities with at least two images; the victim image is one
  of them, the gallery holds the victims' *other* images plus single images of distractor LFW
  identities. The attacker's public faces are CelebA identities (disjoint by construction).
* ``victims="celeba_heldout"``: CelebA identities are split into attacker-public and held-out;
  victims (and their gallery images, plus held-out distractors) come from the held-out part only.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..utils import HybridMaskInputError

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VICTIM_SETS = ("lfw", "celeba_heldout")


def read_face(path: Union[str, os.PathLike], size: int = 112) -> torch.Tensor:
    """One aligned face file -> (3, size, size) float32 in [-1, 1]; clear errors for missing/corrupt/wrong size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    if img.size != (size, size):
        raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]}, expected an aligned {size}x{size} face")
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def list_identities(root: Union[str, os.PathLike]) -> Dict[str, List[Path]]:
    """identity -> sorted image paths, for ``root/<identity>/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"face folder not found: {root}")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in EXTS)
        if files:
            out[d.name] = files
    if not out:
        raise ValueError(f"no identity folders with images under {root} (expected root/<identity>/<image>.jpg)")
    return out


def load_faces(paths: Sequence[Path], progress: bool = False, desc: str = "loading faces") -> torch.Tensor:
    it = paths
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(paths, desc=desc, leave=False)
    imgs = [read_face(p) for p in it]
    if not imgs:
        raise HybridMaskInputError("no faces to load")
    return torch.stack(imgs)


@dataclass
class AttackData:
    """Everything the harness needs: victims (image + identity), gallery, attacker-public faces."""
    victims: torch.Tensor
    victim_labels: List[str]
    gallery: torch.Tensor
    gallery_labels: List[str]
    public: torch.Tensor
    public_labels: torch.Tensor
    public_identities: List[str]
    info: Dict = field(default_factory=dict)


def _pick_public(ids: Dict[str, List[Path]], names: List[str], n_public: int, rng: random.Random) -> List[Tuple[Path, str]]:
    pairs = [(p, n) for n in names for p in ids[n]]
    rng.shuffle(pairs)
    return sorted(pairs[:n_public], key=lambda t: (t[1], str(t[0])))


def build_attack_data(data_root: Union[str, os.PathLike], victims: str = "lfw", n_victims: int = 32,
                      n_distractors: int = 64, n_public: int = 1500, gallery_per_victim: int = 3,
                      public_fraction: float = 0.8, seed: int = 0, progress: bool = True) -> AttackData:
    """Seeded, identity-disjoint victims / gallery / public split (see the module docstring).

    ``data_root`` holds ``lfw_112/`` and ``celeba_112/``. ``n_public`` caps the attacker's public faces
    (drawn from all images of its identities).
    """
    if victims not in VICTIM_SETS:
        raise ValueError(f"victims must be one of {VICTIM_SETS}, got {victims!r}")
    for name, v, lo in (("n_victims", n_victims, 1), ("n_distractors", n_distractors, 0), ("n_public", n_public, 2),
                        ("gallery_per_victim", gallery_per_victim, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0 < public_fraction < 1:
        raise ValueError(f"public_fraction must be in (0, 1), got {public_fraction}")
    root = Path(data_root)
    rng = random.Random(seed)
    celeba = list_identities(root / "celeba_112")
    c_names = sorted(celeba)
    if victims == "lfw":
        lfw = list_identities(root / "lfw_112")
        multi = [n for n in sorted(lfw) if len(lfw[n]) >= 2]
        single = [n for n in sorted(lfw) if n not in set(multi)]
        if len(multi) < n_victims:
            raise ValueError(f"only {len(multi)} LFW identities have >= 2 images, asked for {n_victims} victims")
        rng.shuffle(multi)
        vic_ids = multi[:n_victims]
        pool = single + multi[n_victims:]
        rng.shuffle(pool)
        dis_ids = pool[:n_distractors]
        src = lfw
        public_names = c_names
    else:
        names = list(c_names)
        rng.shuffle(names)
        n_pub_ids = int(round(public_fraction * len(names)))
        public_names = sorted(names[:n_pub_ids])
        held = [n for n in names[n_pub_ids:] if len(celeba[n]) >= 2]
        if len(held) < n_victims:
            raise ValueError(f"only {len(held)} held-out CelebA identities with >= 2 images, asked for {n_victims}; "
                             f"lower public_fraction or n_victims")
        vic_ids = held[:n_victims]
        dis_ids = [n for n in names[n_pub_ids:] if n not in set(vic_ids)][:n_distractors]
        src = celeba
    victim_paths, victim_labels, gal_paths, gal_labels = [], [], [], []
    for n in vic_ids:
        files = list(src[n])
        rng.shuffle(files)
        victim_paths.append(files[0])
        victim_labels.append(n)
        for f in files[1:1 + gallery_per_victim]:
            gal_paths.append(f)
            gal_labels.append(n)
    for n in dis_ids:
        files = list(src[n])
        rng.shuffle(files)
        for f in files[:gallery_per_victim]:
            gal_paths.append(f)
            gal_labels.append(n)
    pub = _pick_public(celeba, public_names, n_public, rng)
    overlap = set(public_names) & (set(vic_ids) | set(dis_ids)) if victims == "celeba_heldout" else set()
    assert not overlap, overlap
    pub_ids = sorted({n for _, n in pub})
    data = AttackData(
        victims=load_faces(victim_paths, progress, "victims"), victim_labels=victim_labels,
        gallery=load_faces(gal_paths, progress, "gallery"), gallery_labels=gal_labels,
        public=load_faces([p for p, _ in pub], progress, "public faces"),
        public_labels=torch.tensor([pub_ids.index(n) for _, n in pub]), public_identities=pub_ids,
        info=dict(victims=victims, n_victims=len(vic_ids), n_distractor_identities=len(dis_ids),
                  n_gallery_images=len(gal_paths), n_gallery_identities=len(set(gal_labels)),
                  n_public=len(pub), n_public_identities=len(pub_ids), seed=seed,
                  victim_files=[str(p.relative_to(root)) for p in victim_paths]))
    return data
