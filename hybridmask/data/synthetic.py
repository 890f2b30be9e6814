"""Synthetic "face-like" identities: the embedded default data set.

Each identity is a smooth random template -- background, hair, a skin-coloured face ellipse,
eyes, brows, nose, mouth and a few identity-specific Gaussian marks, all with identity-specific
colours, sizes and positions. Every image of the identity re-renders that template with
per-image jitter (shift, scale, rotation), expression (eye opening, mouth width), directional
lighting, contrast/colour cast and sensor noise. Identities are therefore learnable but not
trivially separable, which makes the set useful for smoke tests, examples and CI when no real
faces are given. Everything is deterministic in ``seed``; no file is read.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .pairs import VerificationSet

_MASK63 = (1 << 63) - 1


def _gen(*keys: int) -> np.random.Generator:
    # rendering uses NumPy (single-threaded): tiny torch ops under a multi-threaded OpenMP pool
    # are several times slower on a busy machine
    return np.random.default_rng([int(k) & _MASK63 for k in keys])


def _u(g, lo, hi, n=()):
    return lo + (hi - lo) * g.random(n)


def identity_params(seed: int, identity: int) -> Dict[str, np.ndarray]:
    """The identity template (a dict of float64 arrays)."""
    g = _gen(seed, identity, 0x1D)
    skin_base = np.array([0.80, 0.62, 0.50])
    skin = np.clip(skin_base * _u(g, 0.45, 1.15) + _u(g, -0.06, 0.06, (3,)), 0.15, 1.0)
    return {
        "bg": _u(g, 0.05, 0.95, (3,)),
        "skin": skin,
        "hair": _u(g, 0.02, 0.6, (3,)) * _u(g, 0.3, 1.0),
        "face_c": np.stack([_u(g, -0.04, 0.04), _u(g, 0.02, 0.10)]),
        "face_r": np.stack([_u(g, 0.50, 0.64), _u(g, 0.66, 0.82)]),
        "hair_c": np.stack([_u(g, -0.08, 0.08), _u(g, -0.62, -0.42)]),
        "hair_r": np.stack([_u(g, 0.55, 0.78), _u(g, 0.22, 0.42)]),
        "eye_dx": _u(g, 0.24, 0.36),
        "eye_y": _u(g, -0.20, -0.06),
        "eye_r": np.stack([_u(g, 0.07, 0.11), _u(g, 0.035, 0.06)]),
        "iris": _u(g, 0.0, 0.55, (3,)),
        "brow_dy": _u(g, 0.09, 0.16),
        "brow_r": np.stack([_u(g, 0.08, 0.14), _u(g, 0.015, 0.035)]),
        "brow_tilt": _u(g, -0.35, 0.35),
        "nose_len": _u(g, 0.14, 0.26),
        "nose_w": _u(g, 0.05, 0.10),
        "mouth_y": _u(g, 0.32, 0.48),
        "mouth_r": np.stack([_u(g, 0.14, 0.26), _u(g, 0.03, 0.06)]),
        "lip": np.stack([_u(g, 0.45, 0.85), _u(g, 0.15, 0.40), _u(g, 0.20, 0.45)]),
        "marks_c": np.stack([_u(g, -0.40, 0.40, (3,)), _u(g, -0.30, 0.55, (3,))], 1),
        "marks_s": _u(g, 0.04, 0.14, (3,)),
        "marks_col": _u(g, -0.35, 0.35, (3, 3)),
    }


def _ellipse(x, y, cx, cy, rx, ry, soft=0.08, angle=0.0):
    ca, sa = math.cos(float(angle)), math.sin(float(angle))
    dx, dy = x - float(cx), y - float(cy)
    xr, yr = ca * dx + sa * dy, -sa * dx + ca * dy
    r = np.sqrt((xr / float(rx)) ** 2 + (yr / float(ry)) ** 2)
    return 1.0 / (1.0 + np.exp(-(1.0 - r) / soft))


def _paint(img, mask, colour):
    return img * (1 - mask) + mask * np.asarray(colour).reshape(3, 1, 1)


def render_face(p: Dict[str, np.ndarray], g: np.random.Generator, size: int = 112) -> torch.Tensor:
    """Render one image of identity ``p`` with per-image randomness from ``g`` -> (3, S, S) in [-1, 1]."""
    lin = np.linspace(-1, 1, size)
    y0, x0 = np.meshgrid(lin, lin, indexing="ij")
    # per-image geometric jitter: inverse-map the canvas
    ang = float(_u(g, -0.10, 0.10))
    sc = float(_u(g, 0.93, 1.07))
    tx, ty = float(_u(g, -0.05, 0.05)), float(_u(g, -0.05, 0.05))
    ca, sa = math.cos(ang), math.sin(ang)
    x = (ca * (x0 - tx) + sa * (y0 - ty)) / sc
    y = (-sa * (x0 - tx) + ca * (y0 - ty)) / sc
    eye_open = float(_u(g, 0.6, 1.15))
    smile = float(_u(g, 0.85, 1.2))

    # the background is per image (a scene, not an identity cue), loosely tied to the identity's palette
    bg = (0.35 * p["bg"] + 0.65 * _u(g, 0.05, 0.95, (3,))).reshape(3, 1, 1)
    img = np.broadcast_to(bg, (3, size, size)).copy()
    img = img + 0.12 * (y0[None] * _u(g, -1, 1, (3, 1, 1)))  # background gradient
    img = _paint(img, _ellipse(x, y, *p["hair_c"], *p["hair_r"], soft=0.10), p["hair"])
    img = _paint(img, _ellipse(x, y, *p["face_c"], *p["face_r"], soft=0.06), p["skin"])
    fx, fy = float(p["face_c"][0]), float(p["face_c"][1])
    for side in (-1.0, 1.0):
        ex, ey = fx + side * float(p["eye_dx"]), fy + float(p["eye_y"])
        rx, ry = float(p["eye_r"][0]), float(p["eye_r"][1]) * eye_open
        img = _paint(img, _ellipse(x, y, ex, ey, rx, ry, soft=0.12), np.array([0.95, 0.95, 0.92]))
        img = _paint(img, _ellipse(x, y, ex, ey, 0.45 * rx, min(ry, 0.45 * rx) + 1e-3, soft=0.15), p["iris"])
        img = _paint(img, 0.85 * _ellipse(x, y, ex, ey - float(p["brow_dy"]), *p["brow_r"], soft=0.2,
                                          angle=side * float(p["brow_tilt"])), p["hair"] * 0.7)
    nose = _ellipse(x, y, fx, fy + float(p["eye_y"]) + 0.5 * float(p["nose_len"]) + 0.1,
                    float(p["nose_w"]), 0.5 * float(p["nose_len"]), soft=0.25)
    img = _paint(img, 0.5 * nose, p["skin"] * 0.6)
    mr = p["mouth_r"].copy()
    mr[0] = mr[0] * smile
    img = _paint(img, _ellipse(x, y, fx, fy + float(p["mouth_y"]), *mr, soft=0.15), p["lip"])
    for k in range(3):
        m = np.exp(-((x - p["marks_c"][k, 0]) ** 2 + (y - p["marks_c"][k, 1]) ** 2) / (2 * p["marks_s"][k] ** 2))
        img = img + 0.8 * m[None] * p["marks_col"][k].reshape(3, 1, 1)
    # lighting, contrast, colour cast, noise
    la = float(_u(g, 0, 2 * math.pi))
    light = 1.0 + float(_u(g, 0.0, 0.35)) * (math.cos(la) * x0 + math.sin(la) * y0)
    img = img * light[None]
    img = (img - 0.5) * float(_u(g, 0.8, 1.2)) + 0.5 + _u(g, -0.06, 0.06, (3, 1, 1))
    img = img + 0.03 * g.standard_normal(img.shape)
    return torch.from_numpy((np.clip(img, 0, 1) * 2 - 1).astype(np.float32))


class SyntheticFaces(Dataset):
    """``num_identities`` x ``images_per_identity`` synthetic faces; ``dataset[i] = (image, label)``.

    Image i belongs to identity ``i // images_per_identity``. ``first_identity`` offsets the
    identity keys, so two sets with disjoint ranges (e.g. train vs. evaluation) share no
    identity. ``transform`` is applied to the (3, size, size) tensor in [-1, 1].
    """

    def __init__(self, num_identities: int = 100, images_per_identity: int = 20, size: int = 112,
                 seed: int = 0, first_identity: int = 0, transform: Optional[Callable] = None):
        if int(num_identities) < 1 or int(images_per_identity) < 1:
            raise ValueError(f"need >= 1 identity and image per identity, got {num_identities}, {images_per_identity}")
        if int(size) < 16 or int(size) % 8:
            raise ValueError(f"size must be a multiple of 8 and >= 16, got {size}")
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.size = int(size)
        self.seed = int(seed)
        self.first_identity = int(first_identity)
        self.transform = transform
        self.classes = [f"synthetic_{self.first_identity + i:06d}" for i in range(self.num_identities)]
        self.targets = [i // self.images_per_identity for i in range(len(self))]
        self._params: Dict[int, Dict[str, np.ndarray]] = {}

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def render(self, identity: int, image: int) -> torch.Tensor:
        key = self.first_identity + int(identity)
        if key not in self._params:
            self._params[key] = identity_params(self.seed, key)
        return render_face(self._params[key], _gen(self.seed, key, int(image), 0x1A), self.size)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range ({len(self)} images)")
        ident, j = divmod(int(index), self.images_per_identity)
        img = self.render(ident, j)
        if self.transform is not None:
            img = self.transform(img)
        return img, ident


def synthetic_pairs(num_pairs: int = 600, num_identities: int = 100, images_per_identity: int = 10,
                    size: int = 112, seed: int = 0, first_identity: int = 1_000_000) -> VerificationSet:
    """A synthetic verification set of ``num_pairs`` pairs, alternating same / different.

    The identities start at ``first_identity`` (default far from the 0-based training keys of
    :class:`SyntheticFaces`), so training and verification identities are disjoint by default.
    Pairs alternate same/different, so every contiguous fold is balanced.
    """
    if int(num_pairs) < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    if int(num_identities) < 2 or int(images_per_identity) < 2:
        raise ValueError("synthetic_pairs needs >= 2 identities and >= 2 images per identity")
    faces = SyntheticFaces(num_identities, images_per_identity, size=size, seed=seed, first_identity=first_identity)
    rng = np.random.default_rng([int(seed), 0x5EED])
    keys = {}
    order = []
    pairs = np.empty((int(num_pairs), 2), dtype=np.int64)
    issame = np.zeros(int(num_pairs), dtype=bool)

    def index_of(ident: int, j: int) -> int:
        if (ident, j) not in keys:
            keys[(ident, j)] = len(order)
            order.append((ident, j))
        return keys[(ident, j)]

    for n in range(int(num_pairs)):
        if n % 2 == 0:
            ident = int(rng.integers(num_identities))
            j1, j2 = rng.choice(images_per_identity, size=2, replace=False)
            pairs[n] = index_of(ident, int(j1)), index_of(ident, int(j2))
            issame[n] = True
        else:
            a, b = rng.choice(num_identities, size=2, replace=False)
            pairs[n] = (index_of(int(a), int(rng.integers(images_per_identity))),
                        index_of(int(b), int(rng.integers(images_per_identity))))
    return VerificationSet(f"synthetic{num_pairs}", len(order), lambda k: faces.render(*order[k]), pairs, issame)
