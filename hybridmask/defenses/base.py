"""The defense contract: a defense is the only place that knows itself.

A defense is what runs on the client: it turns aligned faces (B, 3, H, W) in [-1, 1] into the
representation that leaves the device. Everything outside :mod:`hybridmask.defenses` (trainer,
evaluation, attacks, benchmark) talks to it through this class and never by its name.

**Capabilities** (class attributes, checked against behaviour by ``tests/test_defense_contract.py``):

* ``input_kind`` - what a recognizer reads: ``"pixel"``, ``"freq"`` (BDCT coefficients) or
  ``"feature"`` (a learned encoding);
* ``stochastic`` - two releases of the same faces differ (secret draws);
* ``mixes`` - the training-time release mixes several faces and returns a :class:`MixRecord`
  (non-mixing defenses return ``None`` as the record);
* ``trainable`` - it has parameters that train with the recognizer by gradient (DCTDP's budgets):
  :meth:`trainable_parameters`, :meth:`privacy_loss`, :meth:`project_`, :meth:`train_stats`.

**Draw / apply** (torchvision v2's ``_get_params`` / ``_transform``): :meth:`draw` returns the
secrets of one release as a :class:`Draw` value, :meth:`apply` releases with them
deterministically. ``release(x, k) == apply(x, draw(x, k))``; ``query(x) == apply(x, draw_query(x))`` is the
test-time release: each face alone (k=1; ``draw_query(x) == draw(x, 1)``), or, behind a frequency defense with
``query_k > 1``, each face mixed with ``query_k - 1`` faces of a public pool. A mixing defense also
splits :meth:`apply` into :meth:`encode` (each face on its own) and :meth:`mix`, and :meth:`draw_mix`
redraws only the MixUp for a new k - what the trainer does when a policy picks k from the encoded batch.

**Persistence**: ``config`` (plain constructor arguments, no secrets) + :meth:`defense_state`
(learned values: DCTDP's budgets, the adaptive policy's weights, ARL's networks) rebuild a trained
defense; :meth:`secret_state` (generator states, client key) restores the secrets for an exact
resume and is as secret as the key. :meth:`client_key` / :meth:`use_client_key`: the key a model
trained behind a keyed defense needs at query time (saved apart, mode 0600, by
:func:`hybridmask.defenses.io.save_client_key`). :func:`hybridmask.defenses.io.load_defense` is the one way to
rebuild a defense from a name, a YAML file, a checkpoint or a run folder.

Randomness that protects privacy comes from the defense's own generator (``seed=None`` = secure OS
seed; see :mod:`hybridmask.utils.rng`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..freq import Draw, HybridMask, MixRecord
from ..freq.hybrid import check_query_k, subset_config
from ..freq.mixup import draw_partners, sample_weights
from ..utils import Registry, check_images, make_generator
from ..utils.rng import SeedLike, generator_state, set_generator_state

DEFENSES = Registry("defense")


@dataclass(frozen=True)
class Structure:
    """The public algorithm of a defense: what a white-box attacker knows (never its secrets).

    transform:   ``"identity"`` (pixels), ``"bdct"`` (the public block DCT ``bdct``) or ``"learned"``.
    kept:        the BDCT channels released, in release order before any secret shuffle.
    shuffle:     secret channel permutation: ``"sample"`` (fresh per face), ``"key"`` (one client key),
                 ``"keys:R"`` (R client keys, one drawn per face; R >= 2) or ``"none"``.
    channel_mix: channel mixing after the shuffle: ``"neighbour"`` (``(I + S)/sqrt(2)``: public and invertible),
                 ``"orthogonal"`` (a *secret* Haar-random ``C x C`` orthogonal matrix, part of the client key: the
                 attacker knows only that it is orthogonal, not which one) or ``"none"``.
    sign_flip:   a fresh secret sign per released value (InstaHide).
    noise:       additive secret noise (``"laplace"``) or ``"none"``.
    k:           the fixed number of faces a training release mixes (None: chosen per face).
    k_values:    the numbers of faces a training release may mix.
    mix_order:   ``"mask_mix"`` (each face shuffled, then mixed) or ``"mix_mask"``; None without MixUp.
    weight_granularity: one MixUp weight per face (``"image"``), per band or per channel.
    subset:      each face keeps only a secret random ``subset`` of the ``kept`` channels, the others zeroed
                 (which ones is secret; the number is public); None: every kept channel.
    subset_keys: None: a fresh subset per face; R: one of R fixed secret subsets per face (client key).
    query_k:     the number of faces a test-time query mixes: 1 = the face alone; K >= 2: the face and K - 1
                 partners from the public pool, the face with the largest weight, every face masked on its own
                 secrets (which partners, their weights and the permutations are secret; K is public).
    subset_levels: with a policy that chooses each face's masking strength (``AdaptiveMask(subset_by_k=...)``): the
                 number of kept channels a face keeps at each of ``k_values`` (None: all), in their order; the face's
                 training release mixes k faces, its query keeps that many channels (a fresh secret subset; the number
                 is visible to an attacker who undoes the public channel mix). None: no such levels.
    pool:        where MixUp partners come from: ``"public"`` - a public pool of faces (of training releases and of
                 queries with ``query_k >= 2``; the attacker may own the same pool); None - the batch, or no MixUp.
    """
    transform: str = "identity"
    bdct: Optional[nn.Module] = None
    kept: Optional[Tuple[int, ...]] = None
    shuffle: str = "none"
    channel_mix: str = "none"
    sign_flip: bool = False
    noise: str = "none"
    k: Optional[int] = 1
    k_values: Tuple[int, ...] = (1,)
    mix_order: Optional[str] = None
    weight_granularity: str = "image"
    subset: Optional[int] = None
    subset_keys: Optional[int] = None
    query_k: int = 1
    pool: Optional[str] = None
    subset_levels: Optional[Tuple[Optional[int], ...]] = None


INPUT_KINDS = ("pixel", "freq", "feature")


def register_defense(name: str):
    return DEFENSES.register(name)


def create_defense(name: str, **kwargs) -> "Defense":
    """Build a registered defense by name (``list_defenses()`` lists them)."""
    return DEFENSES.get(name)(**kwargs)


def list_defenses():
    return DEFENSES.names()


class Defense(nn.Module):
    """Base class of every defense (see the module doc for the contract)."""
    name = "defense"
    input_kind = "pixel"
    stochastic = False
    mixes = False
    trainable = False
    #: whether its constructor takes a masking ``policy`` that picks k per face (the trainer's)
    takes_policy = False
    #: config keys whose learned state (:meth:`defense_state`) is only valid for the value it was learned at
    state_keys: Tuple[str, ...] = ()

    def __init__(self, **config):
        super().__init__()
        self._config = dict(config)

    # ---- description -------------------------------------------------------------------------
    @property
    def config(self) -> Dict[str, Any]:
        """``{"name": ..., <constructor arguments>}``: plain data, no secrets, no learned values."""
        return {"name": self.name, **self._config}

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def grid(self) -> int:
        """Side of the released map for a 112x112 face."""
        return self.grid_for(112)

    def grid_for(self, size: int) -> int:
        """Side of the released map for a ``size`` x ``size`` face."""
        return int(size)

    @property
    def max_k(self) -> int:
        """The largest number of faces one training release may mix (1: no mixing)."""
        return 1

    def structure(self) -> Structure:
        """The public algorithm (see :class:`Structure`); what white-box attacks build on."""
        return Structure(transform="learned" if self.input_kind == "feature" else "identity")

    def capabilities(self) -> Dict[str, Any]:
        return {"input_kind": self.input_kind, "stochastic": self.stochastic, "mixes": self.mixes,
                "trainable": self.trainable}

    # ---- draw / apply --------------------------------------------------------------------------
    def draw(self, images: torch.Tensor, k=None) -> Draw:
        """The secrets of one release of ``images`` (nothing for a deterministic defense)."""
        self._check_k(k)
        return Draw()

    def apply(self, images: torch.Tensor, draw: Draw) -> Tuple[torch.Tensor, Optional[MixRecord]]:
        """Release ``images`` with the secrets of ``draw`` -> ``(released, MixRecord or None)``."""
        raise NotImplementedError

    def release(self, images: torch.Tensor, k=None) -> Tuple[torch.Tensor, Optional[MixRecord]]:
        """The training-time release (may mix ``k`` faces; ``k=None``: the defense's own)."""
        check_images(images)
        return self.apply(images, self.draw(images, k))

    def public_pool(self) -> Optional[torch.Tensor]:
        """The public faces this defense mixes partners from, (N, 3, H, W) in [-1, 1], or None (partners, if
        any, come from the batch)."""
        return None

    def draw_query(self, images: torch.Tensor) -> Draw:
        """The secrets of one test-time query of ``images``: ``draw(images, 1)`` (each face alone) unless a defense
        mixes its queries (``query_k > 1``: pool partners and weights too)."""
        return self.draw(images, 1)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The test-time release: ``apply(images, draw_query(images))`` (each face on its own, k=1, unless the
        defense mixes its queries with public-pool faces, ``query_k > 1``)."""
        check_images(images)
        return self.apply(images, self.draw_query(images))[0]

    def as_image(self, released: torch.Tensor) -> torch.Tensor:
        """What a release shows when viewed as a (B, 3, 112, 112) picture (figures, visual metrics)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, k=None):
        return self.release(images, k=k)

    def _check_k(self, k) -> None:
        if self.mixes or k is None:
            return
        kt = torch.as_tensor(k)
        if kt.numel() and bool((kt != 1).any()):
            raise ValueError(f"{self.name} releases one face at a time (k=1), got k={k!r}")

    # ---- the mixing split (mixes=True) ---------------------------------------------------------
    def encode(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Each face on its own, before mixing (mixing defenses)."""
        raise NotImplementedError(f"{self.name} does not mix")

    def draw_mix(self, images: torch.Tensor, draw: Draw, k) -> Draw:
        """``draw`` with fresh partners and weights for ``k`` (its per-face secrets kept)."""
        raise NotImplementedError(f"{self.name} does not mix")

    def mix(self, encoded: torch.Tensor, draw: Draw) -> Tuple[torch.Tensor, MixRecord]:
        """Mix already-encoded faces with the partners and weights of ``draw``."""
        raise NotImplementedError(f"{self.name} does not mix")

    def mix_for(self, images: torch.Tensor, base: Draw, encoded: torch.Tensor, k) -> Tuple[torch.Tensor, MixRecord]:
        """The release once a policy has chosen ``k`` per face from ``encoded`` (``encode(images, base)``):
        fresh partners and weights for ``k``, ``base``'s per-face secrets kept. A defense whose per-face masking
        also depends on k (``AdaptiveMask(subset_by_k=...)``) encodes the faces again."""
        return self.mix(encoded, self.draw_mix(images, base, k))

    # ---- training hooks (trainable=True) -------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters that train with the recognizer (by gradient)."""
        return []

    def privacy_loss(self) -> Optional[torch.Tensor]:
        """A loss term the recognizer step adds (weighted); None: none."""
        return None

    def project_(self) -> None:
        """Put trained parameters back into their valid range after an optimiser step."""

    def train_stats(self) -> Dict[str, float]:
        """Plain numbers for training logs."""
        return {}

    def end_training(self, running_loss: Optional[float] = None, progress: float = 1.0) -> None:
        """Called once when training ends, with the trainer's final context (the adaptive policy keeps
        it as its deployment context)."""

    # ---- persistence ---------------------------------------------------------------------------
    def defense_state(self) -> Dict[str, Any]:
        """Learned values that ``config`` does not hold (tensors and plain data; never secrets)."""
        return {}

    def load_defense_state(self, state: Optional[Dict[str, Any]]) -> None:
        if state:
            raise ValueError(f"defense {self.name!r} has no learned state, got {sorted(state)}")

    def needs_state(self) -> bool:
        """True when ``create_defense(**config)`` alone would be an untrained copy (the learned values
        of :meth:`defense_state` are needed)."""
        return self.trainable

    def secret_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The secret generator state (and key) for an exact resume; keep it as secret as a key."""
        gen = getattr(self, "generator", None)
        return {"generator": generator_state(gen)} if isinstance(gen, torch.Generator) else None

    def load_secret_state(self, state: Optional[Dict[str, torch.Tensor]]) -> None:
        if state is None:
            return
        gen = getattr(self, "generator", None)
        if not isinstance(gen, torch.Generator):
            raise ValueError(f"defense {self.name!r} has no secret generator to restore")
        set_generator_state(gen, state["generator"])

    def client_key(self) -> Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]:
        """The client key: secret values fixed for the defense's lifetime that a recognizer trained behind it
        needs at query time; None for a defense without one. PPFR-FD's ``shuffle="key"``/``"keys:R"`` alone:
        the ``(R, C)`` permutations; with ``mix="orthogonal"`` or ``subset_keys=R``: a dict of ``perm``,
        ``orthogonal`` ``(C, C)``, ``subsets`` ``(R, m)`` (those it has). As secret as :meth:`secret_state`;
        saved apart from the model (:func:`hybridmask.defenses.io.save_client_key`)."""
        return None

    def use_client_key(self, key: Union[torch.Tensor, Dict[str, torch.Tensor]]) -> None:
        """Install a client key from :meth:`client_key` (of the defense a model was trained behind)."""
        raise ValueError(f"defense {self.name!r} has no client key")


@register_defense("none")
class NoDefense(Defense):
    """The unprotected pixel path: the client sends the aligned face."""
    name = "none"

    def __init__(self, seed: SeedLike = None):
        super().__init__()

    def apply(self, images, draw):
        return images, None

    def as_image(self, released):
        return released


def default_mix(shuffle: str, mix: Optional[str]) -> str:
    """PPFR-FD's neighbour mix is public and invertible: it only makes sense after a secret shuffle. The
    default (``mix=None``) is ``"neighbour"`` with a shuffle and ``"none"`` without one."""
    if mix is not None:
        return mix
    return "none" if shuffle == "none" else "neighbour"


def query_pool_config(name: str, query_k, pool, pool_sha256, pool_alone: bool):
    """Check a masking defense's ``query_k`` / ``pool`` / ``pool_sha256`` -> ``(query_k, pool source, config
    entries)``; the entries are empty for ``query_k=1`` without a pool, so existing configs stay as they were.
    ``pool_alone``: whether a pool means anything with ``query_k=1`` (training partners of a mixing defense)."""
    from .io import resolve_pool
    query_k = check_query_k(query_k)
    source, recorded = resolve_pool(pool, pool_sha256, where=name)
    if query_k > 1 and source is None:
        raise ValueError(f"{name}: query_k={query_k} needs pool=... (a folder of aligned public faces, a .pt tensor "
                         f"file or a tensor): a query's query_k - 1 partners are drawn from it")
    if source is not None and query_k == 1 and not pool_alone:
        raise ValueError(f"{name}: pool is only used with query_k >= 2 (the query's partners; {name} mixes nothing "
                         f"else), got query_k=1")
    entries = {"query_k": query_k, **recorded} if (query_k != 1 or recorded) else {}
    return query_k, source, entries


class MaskDefense(Defense):
    """A defense built on :class:`~hybridmask.freq.HybridMask` (BDCT -> PPFR-FD -> MixUp).

    ``query_k`` / ``pool`` / ``pool_sha256`` (issue 14, :func:`query_pool_config`): with a public ``pool`` of faces
    every MixUp partner comes from it and the face being released takes the largest weight; ``query_k >= 2``
    mixes each test-time query too, with ``query_k - 1`` pool faces (see docs/defenses.md)."""
    input_kind = "freq"
    stochastic = True

    def __init__(self, own: Dict[str, Any], seed: SeedLike = None, query_k: int = 1, pool=None,
                 pool_sha256: Optional[str] = None, pool_alone: bool = True, **mask_kwargs):
        query_k, source, query_config = query_pool_config(self.name, query_k, pool, pool_sha256, pool_alone)
        # the defense's own constructor arguments, for create_defense(**config)
        super().__init__(**own, **query_config)
        self._query_config = query_config
        if query_k > 1:   # its training release mixes query-like pool mixes (a MixRecord), whatever its class says
            self.mixes = True
        self.mask = HybridMask(seed=seed, pool=source, anchor_largest=source is not None, query_k=query_k,
                               **mask_kwargs)
        # a fresh draw per release: per-sample shuffles or subsets, one of R keys (keys:R) or R subsets, or MixUp
        p = self.mask.ppfrfd
        self.stochastic = p.shuffle not in ("key", "none") or self.mixes or (p.subset is not None
                                                                            and p.subset_keys != 1)

    @property
    def in_channels(self) -> int:
        return self.mask.out_channels

    def grid_for(self, size: int) -> int:
        return self.mask.grid(size)

    @property
    def max_k(self) -> int:
        return int(self.mask.mixup.k) if self.mixes and isinstance(self.mask.mixup.k, int) else 1

    @property
    def query_k(self) -> int:
        """The number of faces a test-time query mixes (1: the face alone)."""
        return self.mask.query_k

    def structure(self) -> Structure:
        m = self.mask
        return Structure(transform="bdct", bdct=m.bdct, kept=tuple(m.kept), shuffle=m.ppfrfd.shuffle,
                         channel_mix=m.ppfrfd.mix, k=self.max_k if isinstance(m.mixup.k, int) or not self.mixes
                         else None, k_values=(self.max_k,), mix_order=m.order if self.mixes else None,
                         weight_granularity=m.mixup.granularity, subset=m.ppfrfd.subset,
                         subset_keys=m.ppfrfd.subset_keys, query_k=m.query_k, pool="public" if m.has_pool else None)

    def draw(self, images, k=None):
        """Per-face secrets, and a MixUp unless every face is released alone (``k=1``: the query, or the
        per-face half the trainer encodes before its policy picks k)."""
        self._check_k(k)
        if not self.mixes or (k is not None and bool((torch.as_tensor(k) == 1).all())):
            return self.mask.face_draw(images.shape[0])
        return self.mask.draw(images, k)

    def public_pool(self):
        return self.mask.pool

    def draw_query(self, images):
        """Each face's own secrets (``query_k=1``: exactly ``draw(images, 1)``) and, with ``query_k >= 2``, its
        ``query_k - 1`` pool partners, their secrets and the weights (the face the heaviest)."""
        if self.mask.query_k == 1:
            return self.draw(images, 1)
        return self.mask.query_draw(images)

    def apply(self, images, draw):
        if draw.mix is None:
            return self.mask.encode(images, draw.perm, draw.subset), None
        return self.mask.apply(images, draw)

    def encode(self, images, draw):
        return self.mask.front(images, draw)

    def draw_mix(self, images, draw, k):
        return self.mask.draw_mix(images, draw, k)

    def mix(self, encoded, draw):
        return self.mask.mix(encoded, draw)

    def as_image(self, released):
        return self.mask.as_image(released, size=(112, 112))

    def secret_state(self):
        return self.mask.secret_state()

    def load_secret_state(self, state):
        if state is not None:
            self.mask.load_secret_state(state)

    def client_key(self):
        return self.mask.ppfrfd.client_key()

    def use_client_key(self, key) -> None:
        try:
            self.mask.ppfrfd.set_client_key(key)
        except ValueError as e:
            raise ValueError(f"defense {self.name!r}: {e}") from None


@register_defense("freq_only")
class FrequencyOnly(MaskDefense):
    """All 192 BDCT channels, nothing dropped or shuffled (frequency input without privacy)."""
    name = "freq_only"

    def __init__(self, u: int = 1, seed: SeedLike = None):
        super().__init__(dict(u=u), seed=seed, u=u, drop="none", shuffle="none", mix="none", k=1)


@register_defense("ppfrfd")
class PPFRFDDefense(MaskDefense):
    """PPFR-FD: DC dropped, a secret channel shuffle (per query, or one client key), then the public
    neighbour mix (invertible: it adds no secrecy, see docs/threat_model.md), no MixUp.
    Issue-14 candidates: ``mix="orthogonal"`` (a secret dense orthogonal mix, a client key),
    ``subset=m`` (each face keeps a secret m of the kept channels; ``subset_keys=R``: one of R fixed
    subsets) and ``query_k=K`` with ``pool`` (each query mixed with K-1 public-pool faces, the face the
    heaviest; the training release is then the same K-face pool mix), see docs/defenses.md."""
    name = "ppfrfd"

    def __init__(self, u: int = 1, drop="dc", shuffle: str = "sample", mix: Optional[str] = None,
                 subset: Optional[int] = None, subset_keys: Optional[int] = None, query_k: int = 1, pool=None,
                 pool_sha256: Optional[str] = None, seed: SeedLike = None):
        own = dict(u=u, drop=drop, shuffle=shuffle, mix=default_mix(shuffle, mix), **subset_config(subset, subset_keys))
        k = check_query_k(query_k)   # the training release matches the query: k faces, k - 1 from the pool
        super().__init__(own, seed=seed, query_k=query_k, pool=pool, pool_sha256=pool_sha256, pool_alone=False,
                         **own, k=k)


@register_defense("freq_mixup")
class FixedKMixUp(MaskDefense):
    """PPFR-FD followed by frequency MixUp of a fixed k (k=2..6). With a public ``pool`` the k - 1 partners of a
    training release come from it (the face the heaviest); ``query_k=K`` mixes each query with K - 1 pool faces."""
    name = "freq_mixup"
    mixes = True

    def __init__(self, k: int = 4, u: int = 1, drop="dc", shuffle: str = "sample", mix: Optional[str] = None,
                 weights: str = "instahide", max_weight: float = 0.65, granularity: str = "image",
                 order: str = "mask_mix", subset: Optional[int] = None, subset_keys: Optional[int] = None,
                 query_k: int = 1, pool=None, pool_sha256: Optional[str] = None, seed: SeedLike = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k == 1 and check_query_k(query_k) > 1:
            raise ValueError(f"freq_mixup: k=1 never mixes a training release, so a recognizer would never see the "
                             f"pool mixes its queries are (query_k={query_k}); use k >= 2, or ppfrfd with query_k")
        own = dict(k=k, u=u, drop=drop, shuffle=shuffle, mix=default_mix(shuffle, mix), weights=weights, max_weight=max_weight,
                   granularity=granularity, order=order, **subset_config(subset, subset_keys))
        super().__init__(own, seed=seed, query_k=query_k, pool=pool, pool_sha256=pool_sha256, **own)


@register_defense("instahide")
class InstaHide(Defense):
    """InstaHide (Huang et al. 2020), inside-dataset variant: pixel MixUp of k faces from the batch
    with |N(0,1)| weights bounded by ``max_weight``, then a fresh random sign flip of every pixel.
    The test-time query is the sign-flipped face alone (k=1)."""
    name = "instahide"
    stochastic = True
    mixes = True

    def __init__(self, k: int = 4, max_weight: float = 0.65, seed: SeedLike = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        super().__init__(k=k, max_weight=max_weight)
        self.k, self.max_weight = int(k), float(max_weight)
        self.generator = make_generator(seed)

    @property
    def max_k(self) -> int:
        return self.k

    def structure(self) -> Structure:
        return Structure(transform="identity", sign_flip=True, k=self.k, k_values=(self.k,), mix_order="mix_mask")

    def _signs(self, shape) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=self.generator, dtype=torch.int8)

    def draw(self, images, k=None):
        check_images(images)
        b = images.shape[0]
        kk = self.k if k is None else k
        kt = torch.as_tensor(kk).long()
        kt = kt.expand(b).clone() if kt.dim() == 0 else kt
        if kt.shape != (b,) or (kt < 1).any() or (kt > b).any():
            raise ValueError(f"k must be in 1..batch size ({b}) per sample, got {kt.tolist()}")
        if int(kt.max()) == 1:
            return Draw(noise=self._signs(images.shape))
        return self.draw_mix(images, Draw(), kt)

    def draw_mix(self, images, draw, k):
        b = images.shape[0]
        kt = torch.as_tensor(k).long()
        kt = kt.expand(b).clone() if kt.dim() == 0 else kt
        kmax = int(kt.max())
        idx = draw_partners(kt, kmax, b, 0, self.generator)
        w = sample_weights(kt, kmax, 1, "instahide", self.generator, self.max_weight)[:, :, 0]
        rec = MixRecord(indices=idx, weights=w.to(images.dtype), label_weights=w.to(images.dtype), k=kt)
        return Draw(mix=rec, noise=self._signs(images.shape))

    def encode(self, images, draw):
        return images

    def mix(self, encoded, draw):
        rec = draw.mix
        b = encoded.shape[0]
        wd = rec.weights.to(encoded.device, encoded.dtype)
        idx = rec.indices.to(encoded.device)
        mixed = sum(wd[:, j].view(b, 1, 1, 1) * encoded[idx[:, j]] for j in range(idx.shape[1]))
        return self._flip(mixed, draw), rec

    @staticmethod
    def _flip(x, draw):
        return x * (draw.noise.to(x.device, x.dtype) * 2 - 1)

    def apply(self, images, draw):
        if draw.mix is None:
            return self._flip(images, draw), None
        return self.mix(images, draw)

    def as_image(self, released):
        return released.clamp(-1, 1)
