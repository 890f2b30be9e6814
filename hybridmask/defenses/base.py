"""The defense interface shared by the trainer and the attack harness.

A defense is what runs on the client: it turns aligned faces (B, 3, 112, 112) in [-1, 1] into
the representation that leaves the device.

* ``release(images, k=None) -> (tensor, MixRecord | None)`` - the *training-time* release
  (may mix several faces; the record says whose labels with which weights);
* ``query(images) -> tensor`` - the *test-time* release of one face (k=1);
* ``as_image(released) -> (B, 3, 112, 112)`` - what the release shows when viewed as a picture
  (for the paper's visual-level S1/S2 and for figures);
* ``in_channels`` / ``grid`` - the recognizer's input shape; ``input_kind`` "pixel" or "freq";
* ``config`` - plain data to rebuild it with :func:`create_defense` (no secrets).

Randomness that protects privacy comes from the defense's own generator (``seed=None`` =
secure OS seed).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..freq import HybridMask, MixRecord
from ..freq.mixup import draw_partners, sample_weights
from ..utils import Registry, check_images, make_generator
from ..utils.rng import SeedLike

DEFENSES = Registry("defense")


def register_defense(name: str):
    return DEFENSES.register(name)


def create_defense(name: str, **kwargs) -> "Defense":
    """Build a registered defense by name (``list_defenses()`` lists them)."""
    return DEFENSES.get(name)(**kwargs)


def list_defenses():
    return DEFENSES.names()


class Defense(nn.Module):
    name = "defense"
    input_kind = "pixel"

    def __init__(self, **config):
        super().__init__()
        self._config = dict(config)

    @property
    def config(self) -> Dict[str, Any]:
        return {"name": self.name, **self._config}

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def grid(self) -> int:
        return 112

    def release(self, images: torch.Tensor, k=None) -> Tuple[torch.Tensor, Optional[MixRecord]]:
        return self.query(images), None

    def query(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def as_image(self, released: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, k=None):
        return self.release(images, k=k)


@register_defense("none")
class NoDefense(Defense):
    """The unprotected pixel path: the client sends the aligned face."""
    name = "none"

    def __init__(self, seed: SeedLike = None):
        super().__init__()

    def query(self, images):
        check_images(images)
        return images

    def as_image(self, released):
        return released


class _MaskDefense(Defense):
    input_kind = "freq"

    def __init__(self, own: Dict[str, Any], seed: SeedLike = None, **mask_kwargs):
        super().__init__(**own)  # the defense's own constructor arguments, for create_defense(**config)
        self.mask = HybridMask(seed=seed, **mask_kwargs)

    @property
    def in_channels(self) -> int:
        return self.mask.out_channels

    @property
    def grid(self) -> int:
        return self.mask.grid(112)

    def release(self, images, k=None):
        return self.mask(images, k=k)

    def query(self, images):
        return self.mask.encode(images)

    def as_image(self, released):
        return self.mask.as_image(released, size=(112, 112))


@register_defense("freq_only")
class FrequencyOnly(_MaskDefense):
    """All 192 BDCT channels, nothing dropped or shuffled (frequency input without privacy)."""
    name = "freq_only"

    def __init__(self, u: int = 1, seed: SeedLike = None):
        super().__init__(dict(u=u), seed=seed, u=u, drop="none", shuffle="none", mix="none", k=1)


@register_defense("ppfrfd")
class PPFRFDDefense(_MaskDefense):
    """PPFR-FD: DC dropped, keyed shuffle-and-mix, no MixUp."""
    name = "ppfrfd"

    def __init__(self, u: int = 1, drop="dc", shuffle: str = "sample", mix: str = "neighbour", seed: SeedLike = None):
        own = dict(u=u, drop=drop, shuffle=shuffle, mix=mix)
        super().__init__(own, seed=seed, **own, k=1)


@register_defense("freq_mixup")
class FixedKMixUp(_MaskDefense):
    """PPFR-FD followed by frequency MixUp of a fixed k (k=2..6)."""
    name = "freq_mixup"

    def __init__(self, k: int = 4, u: int = 1, drop="dc", shuffle: str = "sample", mix: str = "neighbour",
                 weights: str = "instahide", max_weight: float = 0.65, granularity: str = "image",
                 order: str = "mask_mix", seed: SeedLike = None):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        own = dict(k=k, u=u, drop=drop, shuffle=shuffle, mix=mix, weights=weights, max_weight=max_weight,
                   granularity=granularity, order=order)
        super().__init__(own, seed=seed, **own)


@register_defense("instahide")
class InstaHide(Defense):
    """InstaHide (Huang et al. 2020), inside-dataset variant: pixel MixUp of k faces from the batch
    with |N(0,1)| weights bounded by ``max_weight``, then a fresh random sign flip of every pixel.
    The test-time query is the sign-flipped face alone (k=1)."""
    name = "instahide"

    def __init__(self, k: int = 4, max_weight: float = 0.65, seed: SeedLike = None):
        super().__init__(k=k, max_weight=max_weight)
        self.k, self.max_weight = int(k), float(max_weight)
        self.generator = make_generator(seed)

    def _flip(self, x):
        signs = torch.randint(0, 2, x.shape, generator=self.generator).to(x.device, x.dtype) * 2 - 1
        return x * signs

    def release(self, images, k=None):
        check_images(images)
        b = images.shape[0]
        kk = self.k if k is None else k
        kt = torch.as_tensor(kk).long().expand(b).clone() if torch.as_tensor(kk).dim() == 0 else torch.as_tensor(kk).long()
        if (kt < 1).any() or (kt > b).any():
            raise ValueError(f"k must be in 1..batch size ({b}), got {kt.tolist()}")
        kmax = int(kt.max())
        idx = draw_partners(kt, kmax, b, 0, self.generator)
        w = sample_weights(kt, kmax, 1, "instahide", self.generator, self.max_weight)[:, :, 0]
        wd = w.to(images.device, images.dtype)
        mixed = sum(wd[:, j].view(b, 1, 1, 1) * images[idx[:, j].to(images.device)] for j in range(kmax))
        rec = MixRecord(indices=idx, weights=w.to(images.dtype), label_weights=w.to(images.dtype), k=kt)
        return self._flip(mixed), rec

    def query(self, images):
        check_images(images)
        return self._flip(images)

    def as_image(self, released):
        return released.clamp(-1, 1)
