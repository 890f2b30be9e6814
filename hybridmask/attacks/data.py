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

import torch

from ..utils import HybridMaskInputError

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VICTIM_SETS = ("lfw", "celeba_heldout")


def read_face(path: Union[str, os.PathLike], size: int = 112) -> torch.Tensor:
    """One aligned face file -> (3, size, size) float32 in [-1, 1]; clear errors for missing/corrupt/wrong
    size/oversized files (decoding and bit depths: :func:`hybridmask.data.image.load_image`)."""
    from ..data.image import load_image
    return load_image(path, size=size)


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


# ---- class inversion (gmi) -----------------------------------------------------------------------------
@dataclass
class ClassData:
    """A target classifier's private identities and the attacker's public faces, for class inversion.

    ``train``/``train_labels``: the private faces the target classifier is trained on (class ``i`` is
    ``class_names[i]``); ``gallery``/``gallery_labels``: *other* faces of the same identities, only for
    the independent judge; ``public``: the attacker's faces of identities disjoint from ``class_names``.
    """
    train: torch.Tensor
    train_labels: torch.Tensor
    class_names: List[str]
    gallery: torch.Tensor
    gallery_labels: List[str]
    public: torch.Tensor
    public_identities: List[str]
    targets: List[int] = field(default_factory=list)
    info: Dict = field(default_factory=dict)


def build_class_data(data_root: Union[str, os.PathLike], victims: str = "celeba_heldout", n_classes: int = 10,
                     min_images: int = 20, gallery_per_class: int = 5, n_public: int = 1500, seed: int = 0,
                     progress: bool = True) -> ClassData:
    """Seeded split for class inversion: ``n_classes`` private identities with at least ``min_images``
    faces each (``gallery_per_class`` of them held out for the judge, the rest to train the target
    classifier) and ``n_public`` attacker faces of other identities.

    ``victims="lfw"``: private identities from ``lfw_112``, public faces from all of ``celeba_112``.
    ``victims="celeba_heldout"``: private identities from ``celeba_112``, public faces from its *other*
    identities.
    """
    if victims not in VICTIM_SETS:
        raise ValueError(f"victims must be one of {VICTIM_SETS}, got {victims!r}")
    for name, v, lo in (("n_classes", n_classes, 2), ("gallery_per_class", gallery_per_class, 1),
                        ("n_public", n_public, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images <= gallery_per_class:
        raise ValueError(f"min_images must be an int > gallery_per_class ({gallery_per_class}): each identity needs "
                         f"gallery faces and training faces; got {min_images!r}")
    root = Path(data_root)
    rng = random.Random(seed)
    celeba = list_identities(root / "celeba_112")
    ids = list_identities(root / "lfw_112") if victims == "lfw" else celeba
    names = sorted(ids)
    rng.shuffle(names)
    eligible = [n for n in names if len(ids[n]) >= min_images]
    if len(eligible) < n_classes:
        raise ValueError(f"only {len(eligible)} {victims} identities have >= {min_images} faces, asked for "
                         f"{n_classes} classes; lower n_classes or min_images")
    private = sorted(eligible[:n_classes])
    public_ids = sorted(celeba) if victims == "lfw" else [n for n in names if n not in set(private)]
    train_p, train_y, gal_p, gal_l = [], [], [], []
    for i, n in enumerate(private):
        files = list(ids[n])
        rng.shuffle(files)
        gal_p += files[:gallery_per_class]
        gal_l += [n] * gallery_per_class
        train_p += files[gallery_per_class:]
        train_y += [i] * (len(files) - gallery_per_class)
    pub_p = [p for n in public_ids for p in celeba[n]]
    rng.shuffle(pub_p)
    pub_p = pub_p[:n_public]
    if len(pub_p) < 2:
        raise ValueError(f"fewer than 2 attacker-public faces outside the {n_classes} private identities")
    return ClassData(
        train=load_faces(train_p, progress, "private faces"), train_labels=torch.tensor(train_y), class_names=private,
        gallery=load_faces(gal_p, progress, "gallery"), gallery_labels=gal_l,
        public=load_faces(pub_p, progress, "public faces"), public_identities=sorted({p.parent.name for p in pub_p}),
        targets=list(range(n_classes)), info=dict(victims=victims, n_classes=n_classes, n_train_images=len(train_p), n_gallery_images=len(gal_p),
                  n_public=len(pub_p), min_images=min_images, seed=seed))


def build_classifier_data(class_names: Sequence[str], class_root: Union[str, os.PathLike],
                          data_root: Union[str, os.PathLike], n_targets: int = 10, gallery_per_class: int = 5,
                          n_public: int = 1500, seed: int = 0, progress: bool = True) -> ClassData:
    """Class-inversion data for a classifier trained elsewhere (class ``i`` is identity ``class_names[i]``).

    Targets: up to ``n_targets`` classes (seeded) whose identity has a folder under ``class_root``;
    the judge's gallery: up to ``gallery_per_class`` of their faces. Attacker-public faces: faces of
    ``celeba_112`` identities that are not classes, or of ``lfw_112`` ones when CelebA has fewer than
    ``n_public`` such faces and LFW more (a recognizer trained on all of CelebA is attacked with LFW faces).
    ``train`` is empty: the classifier is already trained.
    """
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError("the classifier's class names are not unique")
    for name, v in (("n_targets", n_targets), ("gallery_per_class", gallery_per_class), ("n_public", n_public)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    rng = random.Random(seed)
    ids = list_identities(class_root)
    known = [i for i, n in enumerate(names) if n in ids]
    if not known:
        raise ValueError(f"none of the classifier's {len(names)} classes (e.g. {', '.join(names[:3])}) has a folder "
                         f"under {class_root}; pass the folder it was trained on")
    rng.shuffle(known)
    targets = sorted(known[:n_targets])
    gal_p, gal_l = [], []
    for i in targets:
        files = list(ids[names[i]])
        rng.shuffle(files)
        gal_p += files[:gallery_per_class]
        gal_l += [names[i]] * len(files[:gallery_per_class])
    pub_p: List[Path] = []
    for folder in ("celeba_112", "lfw_112"):
        if len(pub_p) >= n_public or not (Path(data_root) / folder).is_dir():
            continue
        pool = list_identities(Path(data_root) / folder)
        cand = [p for n in sorted(pool) if n not in set(names) for p in pool[n]]
        pub_p = cand if len(cand) > len(pub_p) else pub_p
    if len(pub_p) < 2:
        raise ValueError(f"no attacker-public faces under {data_root} (celeba_112/ or lfw_112/) outside the "
                         f"classifier's {len(names)} identities")
    rng.shuffle(pub_p)
    pub_p = pub_p[:n_public]
    return ClassData(
        train=torch.zeros(0, 3, 112, 112), train_labels=torch.zeros(0, dtype=torch.long), class_names=names,
        gallery=load_faces(gal_p, progress, "gallery"), gallery_labels=gal_l,
        public=load_faces(pub_p, progress, "public faces"), public_identities=sorted({p.parent.name for p in pub_p}),
        targets=targets, info=dict(n_classes=len(names), n_targets=len(targets), n_gallery_images=len(gal_p),
                                   n_public=len(pub_p), class_root=str(class_root), seed=seed))
