"""PPFR-FD masking (Wang et al., AAAI 2022): channel dropping + keyed shuffle-and-mix.

1. Drop channels (default: the DC channel of each colour, which carries most of the energy
   and most of what a human sees).
2. Optionally keep only a secret random subset of ``subset=m`` of the kept channels per face
   (PartialFace-style; the others are zeroed so the release keeps its shape): drawn fresh per face, or,
   with ``subset_keys=R``, one of R fixed secret subsets per face (a client key). Issue-14 candidate.
3. "Fast masking" of the kept channels with secrets drawn from a generator that is *not* the
   training seed:
   * ``shuffle="sample"`` - a fresh secret permutation per sample (the DESIGN default);
     ``"key"`` - one secret permutation per masking object (a client key), the same for every
     sample; ``"keys:R"`` - R such keys, one drawn per sample; ``"none"``.
   * ``mix="neighbour"`` - ``c'_i = (c_P(i) + c_P(i+1 mod C)) / sqrt(2)``: *public*, so it adds no
     secrecy (the circulant ``(I + S)/sqrt(2)`` is invertible iff the number of kept channels is odd,
     e.g. 189 for ``drop="dc"``); ``"orthogonal"`` - ``c' = Q c_P`` with a *secret* Haar-random
     ``C x C`` orthogonal ``Q`` drawn once per masking object (a client key; issue-14 candidate);
     ``"none"`` - no mixing.

The secrets of one release are drawn by :meth:`PPFRFD.draw_faces` (permutations, then subsets) and
applied by :meth:`PPFRFD.forward`; the secrets fixed for the object's lifetime (permutation keys, the
orthogonal matrix, the fixed subsets) form its client key (:meth:`PPFRFD.client_key`).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..utils.rng import SeedLike, make_generator
from ..utils.validate import check_freq
from .channels import NUM_CHANNELS, ChannelSpec, split_channels

SHUFFLE_MODES = ("sample", "key", "keys:R", "none")
MIX_MODES = ("neighbour", "orthogonal", "none")
#: the parts a client key may hold, in the order they are drawn: ``perm`` (R, C) permutations
#: (``shuffle="key"|"keys:R"``), ``orthogonal`` (C, C) float64 (``mix="orthogonal"``), ``subsets``
#: (R, m) sorted kept-channel indices (``subset_keys=R``)
KEY_PARTS = ("perm", "orthogonal", "subsets")
#: a client key: the (R, C) permutations alone (the original format), or a mapping of KEY_PARTS
ClientKey = Union[torch.Tensor, Dict[str, torch.Tensor]]
#: how far ``Q^T Q`` may be from the identity in an installed orthogonal key (float64)
ORTHOGONAL_TOL = 1e-6


def parse_shuffle(shuffle) -> Tuple[str, Optional[int]]:
    """``shuffle`` -> ``(mode, number of key permutations)``: ``("sample", None)``, ``("none", None)``,
    ``("key", 1)`` (also for ``"keys:1"``) or ``("keys:R", R)`` for R >= 2. Raises ``ValueError``."""
    if isinstance(shuffle, str):
        if shuffle in ("sample", "none"):
            return shuffle, None
        if shuffle == "key":
            return "key", 1
        if shuffle.startswith("keys:"):
            r = shuffle[5:].strip()
            if not r.isdigit() or int(r) < 1:
                raise ValueError(f"shuffle='keys:R' needs an integer R >= 1 (the number of secret permutations), "
                                 f"got {shuffle!r}")
            r = int(r)
            return ("key", 1) if r == 1 else (f"keys:{r}", r)
    raise ValueError(f"shuffle must be one of {SHUFFLE_MODES} (e.g. 'keys:3'), got {shuffle!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_subset(subset, subset_keys, channels: int) -> Tuple[Optional[int], Optional[int]]:
    """Validate ``subset`` (None or m in 1..channels) and ``subset_keys`` (None or R >= 1, only with a
    subset) -> ``(m, R)`` as ints. Raises ``ValueError`` naming the argument."""
    if subset is None:
        if subset_keys is not None:
            raise ValueError(f"subset_keys={subset_keys!r} needs subset=m (the number of kept channels each face "
                             f"keeps); got subset=None")
        return None, None
    if not _is_int(subset) or not 1 <= int(subset) <= channels:
        raise ValueError(f"subset must be None or an int m in 1..{channels} (how many of the {channels} kept "
                         f"channels each face keeps), got {subset!r}")
    if subset_keys is not None and (not _is_int(subset_keys) or int(subset_keys) < 1):
        raise ValueError(f"subset_keys must be None (a fresh subset per face) or an int R >= 1 (R fixed secret "
                         f"subsets, one drawn per face), got {subset_keys!r}")
    return int(subset), None if subset_keys is None else int(subset_keys)


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed ``(n, n)`` orthogonal matrix (float64): QR of a Gaussian matrix, each column of
    Q multiplied by the sign of R's diagonal (Mezzadri 2007; without the fix Q is not Haar)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return q * d.unsqueeze(0)


class PPFRFD(nn.Module):
    """``(B, 192, h, w)`` BDCT coefficients -> ``(B, C_kept, h, w)`` masked coefficients.

    Args:
        drop: channels to drop (see :mod:`.channels`).
        shuffle: ``"sample" | "key" | "keys:R" | "none"``.
        mix: ``"neighbour" | "orthogonal" | "none"``.
        seed: seed or generator of every secret draw (``None``: secure OS seed).
        subset: None, or m: each face keeps a secret random m of the kept channels, the rest zeroed.
        subset_keys: None (a fresh subset per face) or R: R fixed secret subsets, one drawn per face.
    """

    def __init__(self, drop: ChannelSpec = "dc", shuffle: str = "sample", mix: str = "neighbour",
                 seed: SeedLike = None, subset: Optional[int] = None, subset_keys: Optional[int] = None):
        super().__init__()
        shuffle, num_keys = parse_shuffle(shuffle)
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}")
        self.dropped, self.kept = split_channels(drop)
        c = len(self.kept)
        self.subset, self.subset_keys = check_subset(subset, subset_keys, c)
        self.drop_spec = drop
        self.shuffle = shuffle
        self.mix = mix
        self.generator = make_generator(seed)
        self.register_buffer("kept_index", torch.tensor(self.kept, dtype=torch.long), persistent=False)
        self.num_keys = num_keys
        # the client key, drawn once from the secret generator in this order: the permutations
        # (shuffle="key" / "keys:R"), the orthogonal mix, the fixed subsets (subset_keys=R)
        self.keys: Optional[torch.Tensor] = None if num_keys is None else torch.stack(
            [torch.randperm(c, generator=self.generator) for _ in range(num_keys)])
        self.orthogonal: Optional[torch.Tensor] = haar_orthogonal(c, self.generator) if mix == "orthogonal" else None
        self.subset_masks: Optional[torch.Tensor] = None if self.subset_keys is None \
            else self._random_subsets(self.subset_keys)
        #: per-face subsets of varying size (:meth:`sized_subsets`) are accepted with ``subset=None``: set by a
        #: defense whose policy chooses each face's number of channels (``AdaptiveMask(subset_by_k=...)``)
        self.sized = False

    # ---- the client key ------------------------------------------------------------------------
    def key_parts(self) -> List[str]:
        """The parts (:data:`KEY_PARTS`) of this masking's client key; empty without one."""
        return [name for name, v in zip(KEY_PARTS, (self.keys, self.orthogonal, self.subset_masks)) if v is not None]

    def client_key(self) -> Optional[ClientKey]:
        """The secrets fixed for this object's lifetime: the ``(R, C)`` permutation tensor when that is all
        (the original key format), else a dict of :data:`KEY_PARTS`; None without any."""
        parts: Dict[str, torch.Tensor] = {}
        if self.keys is not None:
            parts["perm"] = self.keys.clone()
        if self.orthogonal is not None:
            parts["orthogonal"] = self.orthogonal.clone()
        if self.subset_masks is not None:
            parts["subsets"] = self.subset_index()
        if not parts:
            return None
        return parts["perm"] if list(parts) == ["perm"] else parts

    def set_client_key(self, key: ClientKey) -> None:
        """Install a client key from :meth:`client_key` (all parts checked before any is installed)."""
        need = self.key_parts()
        if not need:
            raise ValueError(f"this PPFR-FD has no client key (shuffle={self.shuffle!r}, mix={self.mix!r}, "
                             f"subset_keys={self.subset_keys!r}); a key needs shuffle='key'/'keys:R', "
                             f"mix='orthogonal' or subset_keys=R")
        parts = dict(key) if isinstance(key, Mapping) else {"perm": key}
        if sorted(parts) != sorted(need):
            raise ValueError(f"client key holds {sorted(parts)}, but this masking's key is {need} "
                             f"(shuffle={self.shuffle!r}, mix={self.mix!r}, subset_keys={self.subset_keys!r})")
        checked = {"perm": self._checked_perm(parts["perm"]) if "perm" in parts else None,
                   "orthogonal": self._checked_orthogonal(parts["orthogonal"]) if "orthogonal" in parts else None,
                   "subsets": self._checked_subsets(parts["subsets"]) if "subsets" in parts else None}
        if checked["perm"] is not None:
            self.keys = checked["perm"]
        if checked["orthogonal"] is not None:
            self.orthogonal = checked["orthogonal"]
        if checked["subsets"] is not None:
            self.subset_masks = checked["subsets"]

    def set_keys(self, keys: torch.Tensor) -> None:
        """Install the permutation part of a client key: ``(R, C_kept)`` permutations (a single ``(C_kept,)``
        row for R=1)."""
        if self.num_keys is None:
            raise ValueError(f"this PPFR-FD has no client key (shuffle={self.shuffle!r}); a key needs "
                             f"shuffle='key' or 'keys:R'")
        self.keys = self._checked_perm(keys)

    def set_orthogonal(self, q: torch.Tensor) -> None:
        """Install the orthogonal-mix part of a client key (a ``(C, C)`` orthogonal matrix)."""
        if self.mix != "orthogonal":
            raise ValueError(f"this PPFR-FD has no orthogonal mix (mix={self.mix!r})")
        self.orthogonal = self._checked_orthogonal(q)

    def set_subset_keys(self, index: torch.Tensor) -> None:
        """Install the fixed subsets of a client key: ``(R, m)`` kept-channel indices per subset."""
        if self.subset_keys is None:
            raise ValueError("this PPFR-FD has no fixed subsets (subset_keys=None)")
        self.subset_masks = self._checked_subsets(index)

    def subset_index(self) -> torch.Tensor:
        """The fixed subsets as ``(R, m)`` sorted kept-channel indices (their client-key form)."""
        if self.subset_masks is None:
            raise ValueError("this PPFR-FD has no fixed subsets (subset_keys=None)")
        return torch.stack([row.nonzero().flatten() for row in self.subset_masks]).long()

    def _checked_perm(self, keys) -> torch.Tensor:
        if self.num_keys is None:
            raise ValueError(f"this PPFR-FD has no permutation key (shuffle={self.shuffle!r})")
        keys = torch.as_tensor(keys)
        if keys.dim() == 1:
            keys = keys.unsqueeze(0)
        c = len(self.kept)
        if tuple(keys.shape) != (self.num_keys, c):
            raise ValueError(f"client key must have shape ({self.num_keys}, {c}) for shuffle={self.shuffle!r} with "
                             f"{c} kept channels, got {tuple(keys.shape)}")
        if keys.is_floating_point():
            raise ValueError("client key permutations must be integers")
        keys = keys.long()
        if not bool((keys.sort(dim=1).values == torch.arange(c)).all()):
            raise ValueError("client key rows must be permutations of the kept channels")
        return keys.clone()

    def _checked_orthogonal(self, q) -> torch.Tensor:
        c = len(self.kept)
        q = torch.as_tensor(q)
        if tuple(q.shape) != (c, c) or not q.is_floating_point():
            raise ValueError(f"the orthogonal key must be a ({c}, {c}) float matrix, got {tuple(q.shape)} {q.dtype}")
        q = q.detach().to("cpu", torch.float64).clone()
        err = float((q.T @ q - torch.eye(c, dtype=torch.float64)).abs().max()) if bool(torch.isfinite(q).all()) \
            else float("inf")
        if err > ORTHOGONAL_TOL:
            raise ValueError(f"the orthogonal key is not orthogonal (max |Q^T Q - I| = {err:.2e})")
        return q

    def _checked_subsets(self, index) -> torch.Tensor:
        c, m, r = len(self.kept), self.subset, self.subset_keys
        index = torch.as_tensor(index)
        if tuple(index.shape) != (r, m) or index.is_floating_point():
            raise ValueError(f"the subset key must be ({r}, {m}) integer kept-channel indices for subset={m}, "
                             f"subset_keys={r}, got {tuple(index.shape)} {index.dtype}")
        index = index.long()
        if bool(((index < 0) | (index >= c)).any()):
            raise ValueError(f"subset key indices must be in 0..{c - 1}")
        masks = torch.zeros(r, c, dtype=torch.bool).scatter_(1, index, True)
        if bool((masks.sum(1) != m).any()):
            raise ValueError("each subset key row must hold m distinct kept-channel indices")
        return masks

    # ---- description ---------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return len(self.kept)

    def extra_repr(self) -> str:
        sub = "" if self.subset is None else f", subset={self.subset}, subset_keys={self.subset_keys}"
        return f"kept={len(self.kept)}, shuffle={self.shuffle!r}, mix={self.mix!r}{sub}"

    def select(self, freq: torch.Tensor) -> torch.Tensor:
        """Channel dropping only."""
        check_freq(freq, NUM_CHANNELS, "BDCT coefficients")
        return freq.index_select(1, self.kept_index.to(freq.device))

    # ---- the per-face draws --------------------------------------------------------------------
    def permutations(self, batch: int) -> Optional[torch.Tensor]:
        """Draw the (B, C_kept) permutations for one batch (None for ``shuffle="none"``)."""
        c = len(self.kept)
        if self.shuffle == "none":
            return None
        if self.num_keys == 1:
            return self.keys[0].unsqueeze(0).expand(batch, c)
        if self.num_keys is not None:   # keys:R: one of the R keys per sample, drawn in secret
            return self.keys[torch.randint(self.num_keys, (batch,), generator=self.generator)]
        return torch.rand(batch, c, generator=self.generator).argsort(dim=1)

    def _random_subsets(self, n: int) -> torch.Tensor:
        return self.sized_subsets(torch.full((n,), self.subset, dtype=torch.long))

    def sized_subsets(self, sizes: torch.Tensor) -> torch.Tensor:
        """Fresh secret (B, C_kept) bool masks with ``sizes[b]`` kept channels in row b (``sizes``: (B,) ints in
        1..C_kept; which channels is secret, the number is the caller's choice). Drawn from the secret generator."""
        c = len(self.kept)
        sizes = torch.as_tensor(sizes).long().reshape(-1).cpu()
        if sizes.numel() and bool(((sizes < 1) | (sizes > c)).any()):
            raise ValueError(f"subset sizes must be in 1..{c}, got {sorted(set(sizes.tolist()))}")
        rank = torch.rand(sizes.numel(), c, generator=self.generator).argsort(dim=1).argsort(dim=1)
        return rank < sizes.unsqueeze(1)

    def subsets(self, batch: int) -> Optional[torch.Tensor]:
        """Draw the (B, C_kept) bool masks of the kept channels (in kept order, before the shuffle) each face
        keeps (None without ``subset``)."""
        if self.subset is None:
            return None
        if self.subset_keys == 1:
            return self.subset_masks[0].unsqueeze(0).expand(batch, len(self.kept))
        if self.subset_keys is not None:   # one of the R fixed subsets per face, drawn in secret
            return self.subset_masks[torch.randint(self.subset_keys, (batch,), generator=self.generator)]
        return self._random_subsets(batch)

    def draw_faces(self, batch: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """All per-face secrets of one batch, in the order :meth:`forward` draws them: ``(perm, subset)``."""
        perm = self.permutations(batch)
        return perm, self.subsets(batch)

    def _check_perm(self, perm: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
        if perm is None:
            return self.permutations(b)
        if self.shuffle == "none":
            raise ValueError("this PPFR-FD does not shuffle (shuffle='none'); pass perm=None")
        if tuple(perm.shape) != (b, len(self.kept)):
            raise ValueError(f"perm must have shape ({b}, {len(self.kept)}), got {tuple(perm.shape)}")
        return perm

    def _check_subset(self, subset: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
        if subset is None:
            return self.subsets(b)
        if self.subset is None and not self.sized:
            raise ValueError("this PPFR-FD keeps every kept channel (subset=None); pass subset=None")
        if tuple(subset.shape) != (b, len(self.kept)) or subset.dtype != torch.bool:
            raise ValueError(f"subset must be a ({b}, {len(self.kept)}) bool mask, got {tuple(subset.shape)} "
                             f"{subset.dtype}")
        if self.subset is None:
            if bool((subset.sum(1) < 1).any()):
                raise ValueError("every subset row must keep at least one channel")
            return subset
        if bool((subset.sum(1) != self.subset).any()):
            raise ValueError(f"every subset row must keep exactly subset={self.subset} channels")
        return subset

    # ---- the transform -------------------------------------------------------------------------
    def mix_channels(self, z: torch.Tensor) -> torch.Tensor:
        """The channel mix along dim 1 of a ``(B, C_kept, ...)`` tensor (neighbour, orthogonal or none)."""
        if self.mix == "neighbour":
            return (z + torch.roll(z, shifts=-1, dims=1)) * (1.0 / math.sqrt(2.0))
        if self.mix == "orthogonal":
            q = self.orthogonal.to(z.device, z.dtype)
            return torch.matmul(q, z.reshape(z.shape[0], z.shape[1], -1)).view(z.shape)
        return z

    def unmix_channels(self, y: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`mix_channels` *with this object's key*: ``Q^T y`` for the orthogonal
        mix (the owner's view; an attacker without the key cannot do this), the circulant solve for the
        neighbour mix (odd C)."""
        if self.mix == "orthogonal":
            q = self.orthogonal.to(y.device, y.dtype)
            return torch.matmul(q.T, y.reshape(y.shape[0], y.shape[1], -1)).view(y.shape)
        if self.mix == "neighbour":
            c = y.shape[1]
            if c % 2 == 0:
                raise ValueError(f"the neighbour mix of an even number of channels ({c}) is not invertible")
            w = torch.exp(2j * math.pi * torch.arange(c, dtype=torch.float64, device=y.device) / c)
            eig = ((1 + w) / math.sqrt(2.0)).view((1, c) + (1,) * (y.dim() - 2))
            return torch.fft.ifft(torch.fft.fft(y.double(), dim=1) / eig, dim=1).real.to(y.dtype)
        return y

    def _shuffle_subset(self, kept: torch.Tensor, perm: Optional[torch.Tensor],
                        subset: Optional[torch.Tensor]) -> torch.Tensor:
        """Zero the channels outside each face's subset, then permute: ``(B, C_kept, ...)``."""
        if subset is not None:   # (B, C) masks broadcast against a batch of 1 (scramble_rows)
            kept = kept * subset.to(kept.device, kept.dtype).view(subset.shape + (1,) * (kept.dim() - 2))
        if perm is not None:
            rows = torch.arange(perm.shape[0], device=kept.device).unsqueeze(1)
            kept = kept.expand((perm.shape[0],) + tuple(kept.shape[1:]))[rows, perm.to(kept.device)]
        return kept

    def scramble(self, kept: torch.Tensor) -> torch.Tensor:
        """Subset, shuffle and mix already-selected channels ``(B, C_kept, h, w)`` (fresh draws)."""
        perm, subset = self.draw_faces(kept.shape[0])
        return self.mix_channels(self._shuffle_subset(kept, perm, subset))

    def scramble_rows(self, matrix: torch.Tensor, batch: int) -> torch.Tensor:
        """Apply this batch's secret subset, shuffle and mix to the rows of a ``(C_kept, N)`` linear map,
        giving the ``(B or 1, C_kept, N)`` per-sample maps. Draws exactly what :meth:`scramble` would draw, so
        ``scramble_rows(W) @ v == scramble(W @ v)``."""
        perm, subset = self.draw_faces(batch)
        return self.mix_channels(self._shuffle_subset(matrix.unsqueeze(0), perm, subset))

    def forward(self, freq: torch.Tensor, perm: Optional[torch.Tensor] = None,
                subset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Select, subset, shuffle and mix in one pass: each output channel is gathered straight from
        ``freq`` (row ``b*192 + kept[perm_b[i]]`` of the flattened tensor); without a subset the neighbour
        mix adds a second gather in place. Same result and draws as ``scramble(select(freq))``.
        ``perm`` / ``subset``: the (B, C_kept) permutations and bool subset masks to apply (from
        :meth:`draw_faces`); None draws them."""
        check_freq(freq, NUM_CHANNELS, "BDCT coefficients")
        b, _, h, w = freq.shape
        c = len(self.kept)
        kept = self.kept_index.to(freq.device)
        perm = self._check_perm(perm, b)
        subset = self._check_subset(subset, b)
        src = kept.expand(b, -1) if perm is None else kept[perm.to(freq.device)]         # (B, C_kept)
        src = src + NUM_CHANNELS * torch.arange(b, device=freq.device).unsqueeze(1)
        rows = freq.reshape(b * NUM_CHANNELS, h * w)
        out = rows.index_select(0, src.reshape(-1))
        if subset is None and self.mix == "neighbour":
            out = out.add_(rows.index_select(0, src.roll(-1, dims=1).reshape(-1))).mul_(1.0 / math.sqrt(2.0))
            return out.view(b, c, h, w)
        out = out.view(b, c, h, w)
        if subset is not None:   # slot i holds kept channel perm[b, i]: it survives iff that channel is kept
            keep = subset.to(freq.device)
            if perm is not None:
                keep = keep.gather(1, perm.to(freq.device))
            out = out * keep.to(out.dtype).view(b, c, 1, 1)
        return self.mix_channels(out)
