"""``HybridMask``: BDCT + PPFR-FD + frequency MixUp composed from one config.

>>> hm = HybridMask(u=1, drop="dc", k=4, seed=0)          # seed only in tests
>>> masked, record = hm(images)          # (B, 189, 14, 14) for 112x112 inputs, k=4 mixes
>>> query = hm.query(images)             # k=1: what a test-time query gets (PPFR-FD only)
>>> view = hm.as_image(masked)           # zero-filled inverse: what the masked tensor shows
>>> hm = HybridMask(k=3, pool=public_faces, anchor_largest=True, query_k=3)
>>> query = hm.query(images)             # each face mixed with 2 public-pool faces, itself the heaviest

``order="mask_mix"`` (default) masks each face with its own secret permutation and then mixes
(so different frequencies of different faces land in the same channel); ``"mix_mask"``
mixes the raw 192-channel BDCT tensors and masks the mix once.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..utils.rng import SeedLike, generator_state, make_generator, set_generator_state
from ..utils.validate import HybridMaskInputError, check_images
from .channels import ChannelSpec
from .dct import BlockDCT
from .mixup import Draw, FreqMixUp, KLike, MixRecord
from .ppfrfd import PPFRFD

ORDERS = ("mask_mix", "mix_mask")
#: the plain-data constructor arguments of :class:`HybridMask` (its ``config``)
CONFIG_KEYS = ("u", "drop", "shuffle", "mix", "k", "weights", "max_weight", "alpha", "granularity", "order",
               "subset", "subset_keys", "query_k", "anchor_largest")


def subset_config(subset, subset_keys) -> Dict[str, Any]:
    """The ``subset`` / ``subset_keys`` entries of a config: present only when a subset is set, so the
    configs (and records) of maskings without one stay as they were."""
    if subset is None and subset_keys is None:
        return {}
    return {"subset": subset, "subset_keys": subset_keys}


def check_query_k(query_k) -> int:
    """``query_k`` as an int >= 1, or one ``ValueError`` naming it."""
    if isinstance(query_k, bool) or not isinstance(query_k, int) or query_k < 1:
        raise ValueError(f"query_k must be an int >= 1 (the number of faces a test-time query mixes: the face and "
                         f"query_k - 1 public-pool partners; 1 = the face alone), got {query_k!r}")
    return int(query_k)


def anchor_largest(record: MixRecord) -> MixRecord:
    """``record`` with the anchor's (column 0's) weight swapped with the largest weight of its row (per band or
    channel for per-band/per-channel weights), so the face being released is always the heaviest of its mix.
    The weights of a symmetric rule (InstaHide's, Dirichlet's) are exchangeable, so this gives the anchor the
    largest order statistic and the partners the others in a random order; the partners keep their indices."""
    w = record.weights
    top = w.argmax(dim=1, keepdim=True)                     # (B, 1) or (B, 1, G)
    w0 = w.narrow(1, 0, 1)
    wmax = w.gather(1, top)
    out = w.clone()
    out.scatter_(1, top, w0)                                # the anchor's weight goes where the largest was
    out[:, :1] = wmax                                       # (a no-op when the anchor was already the largest)
    label = out if out.dim() == 2 else out.mean(dim=2)
    label = label / label.sum(dim=1, keepdim=True)
    return MixRecord(indices=record.indices, weights=out, label_weights=label.to(record.label_weights.dtype),
                     k=record.k, source=record.source, granularity=record.granularity)


class _EncodedPool:
    """Pool of public pixel faces, encoded through the same front end (with the drawn permutations
    of each partner column) only when drawn."""

    def __init__(self, images: torch.Tensor, encode, perms: Optional[torch.Tensor] = None,
                 subsets: Optional[torch.Tensor] = None):
        self.images = images
        self.encode = encode
        self.perms = perms     # (B, K-1, C) or None
        self.subsets = subsets  # (B, K-1, C) bool or None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __call__(self, idx: torch.Tensor, column: int) -> torch.Tensor:
        faces = self.images.index_select(0, idx.to(self.images.device))
        perm = None if self.perms is None else self.perms[:, column - 1]
        subset = None if self.subsets is None else self.subsets[:, column - 1]
        return self.encode(faces, perm, subset)


class HybridMask(nn.Module):
    """Block DCT -> PPFR-FD -> MixUp of k faces (or mix first, with ``order="mix_mask"``).

    Args:
        u: upsampling factor of the BDCT (1 -> 14x14 grid, 2 -> 28x28, 8 -> 112x112).
        drop: channels to drop (``"dc"``, ``"lowN"``, ``"none"`` or indices).
        shuffle / mix: PPFR-FD fast masking (``"sample"|"key"|"keys:R"|"none"`` /
            ``"neighbour"|"orthogonal"|"none"``; ``"orthogonal"``: a secret dense orthogonal channel mix, a
            client key).
        subset / subset_keys: each face keeps a secret random ``subset`` of the kept channels (the rest
            zeroed), fresh per face or one of ``subset_keys`` fixed subsets (see :class:`PPFRFD`).
        k: default number of faces per mix (int, per-sample tensor, or callable). 1 = no MixUp.
        weights, max_weight, alpha, granularity: see :class:`FreqMixUp`.
        order: ``"mask_mix"`` or ``"mix_mask"``.
        pool: optional (N, 3, H, W) public faces in [-1, 1] to draw partners from instead of the batch, or a
            zero-argument callable returning them (loaded on first use: a file-backed pool,
            :class:`hybridmask.defenses.io.PublicPool`).
        anchor_largest: in a mix with pool partners, the face being released takes the largest of the drawn
            weights (:func:`anchor_largest`): the private face dominates every mix, so a recognizer can learn it.
        query_k: the number of faces a test-time :meth:`query` mixes: the face and ``query_k - 1`` partners from
            ``pool`` (needs a pool; 1 = the face alone, the PPFR-FD query).
        seed: seed or generator for all secret draws; ``None`` (deployment) = secure OS seed.
    """

    def __init__(self, u: int = 1, drop: ChannelSpec = "dc", shuffle: str = "sample", mix: str = "neighbour",
                 k: KLike = 1, weights: str = "instahide", max_weight: float = 0.65, alpha: float = 1.0,
                 granularity: str = "image", order: str = "mask_mix", pool: Optional[torch.Tensor] = None,
                 seed: SeedLike = None, subset: Optional[int] = None, subset_keys: Optional[int] = None,
                 anchor_largest: bool = False, query_k: int = 1):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        query_k = check_query_k(query_k)
        if query_k > 1 and pool is None:
            raise ValueError(f"query_k={query_k} needs a public pool (pool=...): a query's partners come from it")
        if query_k > 1 and weights == "instahide" and max_weight * query_k < 1 - 1e-9:
            raise ValueError(f"max_weight {max_weight} is infeasible for query_k={query_k} "
                             f"(query_k * max_weight must be >= 1)")
        self._multiple = 8 // u if u in (1, 2, 4, 8) else None
        self.generator = make_generator(seed)
        self.bdct = BlockDCT(u)
        self.ppfrfd = PPFRFD(drop=drop, shuffle=shuffle, mix=mix, seed=self.generator, subset=subset,
                             subset_keys=subset_keys)
        self.mixup = FreqMixUp(k=k, weights=weights, max_weight=max_weight, alpha=alpha,
                               granularity=granularity, seed=self.generator)
        self.order = order
        self.pool = pool
        self.anchor_largest = bool(anchor_largest)
        self.query_k = query_k
        self._config = dict(u=u, drop=drop if isinstance(drop, (str, type(None))) else list(drop), shuffle=shuffle,
                            mix=mix, k=k if isinstance(k, int) else 1, weights=weights, max_weight=max_weight,
                            alpha=alpha, granularity=granularity, order=order, **subset_config(subset, subset_keys))
        if self.anchor_largest:   # present only when set: the configs of existing maskings stay as they were
            self._config["anchor_largest"] = True
        if query_k != 1:
            self._config["query_k"] = query_k

    # ---- the public pool (a tensor, or a loader called on first use) ----------------------
    @property
    def pool(self) -> Optional[torch.Tensor]:
        """The public pool's faces (N, 3, H, W), loaded on first access when given as a loader; None: none."""
        if self._pool_faces is None and self._pool_source is not None:
            faces = self._pool_source()
            check_images(faces, "pool", channels=3, multiple=self._multiple)
            self._pool_faces = faces
        return self._pool_faces

    @pool.setter
    def pool(self, pool) -> None:
        if pool is not None and not isinstance(pool, torch.Tensor) and not callable(pool):
            raise ValueError(f"pool must be a (N, 3, H, W) tensor of public faces or a loader, "
                             f"got {type(pool).__name__}")
        if isinstance(pool, torch.Tensor):
            check_images(pool, "pool", channels=3, multiple=self._multiple)
        object.__setattr__(self, "_pool_source", pool)
        object.__setattr__(self, "_pool_faces", pool if isinstance(pool, torch.Tensor) else None)

    @property
    def has_pool(self) -> bool:
        """Whether partners come from a public pool (without loading it)."""
        return self._pool_source is not None

    # ---- configuration -------------------------------------------------------------------
    @property
    def config(self) -> Dict[str, Any]:
        """Plain-data constructor arguments (no secrets, no pool) - stored in checkpoints."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: Dict[str, Any], seed: SeedLike = None, pool: Optional[torch.Tensor] = None):
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise KeyError(f"unknown HybridMask config keys: {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
        return cls(**config, seed=seed, pool=pool)

    @property
    def out_channels(self) -> int:
        return self.ppfrfd.out_channels

    @property
    def kept(self):
        return list(self.ppfrfd.kept)

    def grid(self, size: int = 112) -> int:
        return self.bdct.grid(size)

    # ---- secret state (for exact resume; keep it as secret as the key it is) -------------
    def secret_state(self) -> Dict[str, torch.Tensor]:
        """The generator state and the client key's parts: the ``(R, C)`` permutation ``keys``
        (``shuffle="key"``/``"keys:R"``), the ``(C, C)`` ``orthogonal`` mix, the ``(R, m)`` ``subset_keys``."""
        p = self.ppfrfd
        state = {"generator": generator_state(self.generator)}
        if p.keys is not None:
            state["keys"] = p.keys.clone()
        if p.orthogonal is not None:
            state["orthogonal"] = p.orthogonal.clone()
        if p.subset_masks is not None:
            state["subset_keys"] = p.subset_index()
        return state

    def load_secret_state(self, state: Dict[str, torch.Tensor]) -> None:
        set_generator_state(self.generator, state["generator"])
        if "keys" in state:
            self.ppfrfd.set_keys(state["keys"])
        elif "key_perm" in state:   # checkpoints written before keys:R (one key row)
            self.ppfrfd.set_keys(state["key_perm"])
        if "orthogonal" in state:
            self.ppfrfd.set_orthogonal(state["orthogonal"])
        if "subset_keys" in state:
            self.ppfrfd.set_subset_keys(state["subset_keys"])

    # ---- the transform: draw the secrets, then apply them --------------------------------
    def encode(self, images: torch.Tensor, perm: Optional[torch.Tensor] = None,
               subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """BDCT + PPFR-FD of each face on its own (no MixUp): ``(B, 3, H, W)`` -> ``(B, C_kept, h, w)``.
        ``perm`` / ``subset``: the channel permutations and subsets to apply (None: fresh ones from the
        secret generator)."""
        return self.ppfrfd(self.bdct(images), perm, subset)

    def face_draw(self, batch: int) -> Draw:
        """The per-face secrets of ``batch`` faces (no MixUp): channel permutations and subsets."""
        perm, subset = self.ppfrfd.draw_faces(batch)
        return Draw(perm=perm, subset=subset)

    def _mix_shape(self, images: torch.Tensor) -> torch.Tensor:
        """A zero stand-in with the (B, C) of the tensor the MixUp mixes (drawing needs only its shape)."""
        c = self.ppfrfd.out_channels if self.order == "mask_mix" else 192
        return images.new_zeros(images.shape[0], c, 1, 1)

    def draw(self, images: torch.Tensor, k: Optional[KLike] = None) -> Draw:
        """All secrets of one release of ``images``: the channel permutations and subsets and the MixUp's
        partners and weights (and the permutations and subsets of pool partners). ``apply(images, draw(images, k))`` is
        ``forward(images, k)``; a callable ``k`` is evaluated on the masked batch."""
        check_images(images)
        b = images.shape[0]
        if self.order == "mix_mask":
            mix = self._draw_mixup(self._mix_shape(images), k, None)
            face = self.face_draw(b)
            return Draw(perm=face.perm, subset=face.subset, mix=mix)
        return self.draw_mix(images, self.face_draw(b), k)

    def draw_mix(self, images: torch.Tensor, draw: Draw, k: Optional[KLike] = None,
                 encoded: Optional[torch.Tensor] = None) -> Draw:
        """``draw`` with fresh MixUp partners and weights for ``k`` (its per-face secrets kept): what the
        trainer does after the policy has chosen k from the masked batch. ``encoded``: the masked
        batch, needed only for a callable ``k``."""
        if callable(k) and not isinstance(k, torch.Tensor):
            k = k(encoded if encoded is not None else self.encode(images, draw.perm, draw.subset))
        shape = self._mix_shape(images)
        bands = self.ppfrfd.kept_index % 64 if self.order == "mask_mix" else None
        mix = self._draw_mixup(shape, k, bands)
        pool_perm = pool_subset = None
        kmax = mix.indices.shape[1]
        if self.pool is not None and self.order == "mask_mix" and kmax > 1:
            b = images.shape[0]
            if self.ppfrfd.shuffle != "none":
                pool_perm = torch.stack([self.ppfrfd.permutations(b) for _ in range(kmax - 1)], 1)
            if self.ppfrfd.subset is not None:
                pool_subset = torch.stack([self.ppfrfd.subsets(b) for _ in range(kmax - 1)], 1)
        return Draw(perm=draw.perm, mix=mix, pool_perm=pool_perm, noise=draw.noise, subset=draw.subset,
                    pool_subset=pool_subset)

    def _draw_mixup(self, shape: torch.Tensor, k, bands) -> MixRecord:
        mix = self.mixup.draw(shape, k, self._pool_size(), bands)
        if self.anchor_largest and mix.source == "pool":
            mix = anchor_largest(mix)
        return mix

    def _pool_size(self) -> Optional[int]:
        return None if self.pool is None else int(self.pool.shape[0])

    def _pool(self, images: torch.Tensor, draw: Draw):
        if self.pool is None:
            return None
        if images.dim() == 4 and images.shape[1] == 3 and tuple(self.pool.shape[-2:]) != tuple(images.shape[-2:]):
            raise HybridMaskInputError(f"the pool's faces are {self.pool.shape[-2]}x{self.pool.shape[-1]}, the "
                                       f"released faces {images.shape[-2]}x{images.shape[-1]}: a mix needs one size")
        pool = self.pool.to(images.device, images.dtype)
        if self.order == "mask_mix":
            return _EncodedPool(pool, self.encode, draw.pool_perm, draw.pool_subset)
        return _EncodedPool(pool, lambda faces, perm, subset: self.bdct(faces))

    def mix(self, encoded: torch.Tensor, draw: Draw, images: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, MixRecord]:
        """The MixUp half of :meth:`apply` on an already-encoded batch (``order="mask_mix"``: the masked
        faces; ``"mix_mask"``: their raw BDCT, masked after mixing). ``images``: the pixel batch, only
        needed to move a public pool to its device."""
        if draw.mix is None:
            raise ValueError("this draw has no MixUp (draw it with draw() or draw_mix())")
        pool = self._pool(images if images is not None else encoded, draw)
        mixed = self.mixup.apply(encoded, draw.mix, pool)
        if self.order == "mix_mask":
            mixed = self.ppfrfd(mixed, draw.perm, draw.subset)
        return mixed, draw.mix

    def front(self, images: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The per-face half of :meth:`apply`: masked faces (``mask_mix``) or their BDCT (``mix_mask``)."""
        return self.encode(images, draw.perm, draw.subset) if self.order == "mask_mix" else self.bdct(images)

    def apply(self, images: torch.Tensor, draw: Draw) -> Tuple[torch.Tensor, MixRecord]:
        """Release ``images`` with the secrets of ``draw`` (deterministic)."""
        return self.mix(self.front(images, draw), draw, images)

    def forward(self, images: torch.Tensor, k: Optional[KLike] = None):
        """``(B, 3, H, W)`` in [-1, 1] -> ``(masked (B, C_kept, H*u/8, W*u/8), MixRecord)``."""
        return self.apply(images, self.draw(images, k))

    def query_draw(self, images: torch.Tensor) -> Draw:
        """The secrets of one test-time query of ``images``: each face's own (permutation, subset) and, with
        ``query_k > 1``, ``query_k - 1`` pool partners, their own secrets and the weights (the face the
        heaviest when ``anchor_largest``)."""
        face = self.face_draw(images.shape[0])
        return face if self.query_k == 1 else self.draw_mix(images, face, self.query_k)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The masking a test-time query gets: BDCT + PPFR-FD of each face alone (``query_k=1``), or each face
        mixed with ``query_k - 1`` public-pool partners, every face masked on its own secrets."""
        if self.query_k == 1:
            return self.encode(images)
        check_images(images)
        return self.apply(images, self.query_draw(images))[0]

    def as_image(self, masked: torch.Tensor, size=None) -> torch.Tensor:
        """Zero-filled inverse of a masked tensor: place its channels at the kept positions and
        invert the BDCT. This is what the masked representation shows when viewed as a picture
        (the paper's "masked-as-image", used for S1/S2); it does not undo the secret shuffle."""
        if masked.shape[1] != self.out_channels:
            raise HybridMaskInputError(f"expected {self.out_channels} channels, got {masked.shape[1]}")
        return self.bdct.inverse(masked, kept=self.kept, size=size).clamp(-1, 1)
