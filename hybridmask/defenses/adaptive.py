"""The adaptive defense: HybridMask whose MixUp degree ``k`` comes from a masking policy.

    from hybridmask.defenses import create_defense
    d = create_defense("adaptive", policy_path="outputs/quickstart/policy.pt")   # a trained policy
    released, record = d.release(faces)       # per-sample k chosen by the policy (record.k)
    query = d.query(faces)                    # test-time query: k=1, BDCT + PPFR-FD only

A masking ladder (issue 14): with ``subset_by_k`` the policy's choice sets each face's whole masking strength,
in training *and at query time*. Level ``k`` (one of the policy's ``k_values``; ``k=1`` allowed) releases the
face mixed with k faces in training, each keeping a fresh secret subset of ``subset_by_k[i]`` of its channels
(None: all), and its query keeps that many channels (k=1, no mix). The policy reads the face's context from its
masking with every channel, so the same choice is made for a query as for a training release::

    d = create_defense("adaptive", drop="low15", policy_config={"name": "adaptive", "k_values": [1, 2, 3]},
                       subset_by_k=[None, 90, 60])
    q = d.query(faces)        # per face: all 147 channels, 90 or 60 of them, as the policy chooses

``release(images)`` encodes each face (block DCT + PPFR-FD with fresh secret draws), computes the
policy's context from that encoding (:func:`hybridmask.policy.context_features`), lets the policy
pick one ``k`` per face and mixes (``order="mask_mix"``, the default; with ``"mix_mask"`` the
context comes from the faces' BDCT, which is mixed and then masked). Without a
policy (``policy=None`` and no ``policy_path``) the k is drawn uniformly from ``k_values``.

Trained policies are stored with :func:`save_policy` (``policy.pt``: a plain dict that loads
with ``torch.load(weights_only=True)``; it holds the policy weights, its k values, the masking
config it was trained for and the training context, but *no* secret: neither the masking
generator nor the policy's sampling generator).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Union

import torch

from ..utils import atomic_save, safe_torch_load
from ..utils.rng import SeedLike
from ..freq.hybrid import subset_config
from .base import MaskDefense, default_mix, register_defense

POLICY_FORMAT = "hybridmask.policy"
POLICY_FORMAT_VERSION = 1


def describe_policy(policy) -> Dict[str, Any]:
    """Plain-data constructor arguments of a :mod:`hybridmask.policy` policy (for ``create_policy``)."""
    from ..policy import FixedKPolicy, StrategyNet, UniformPolicy
    if isinstance(policy, StrategyNet):
        return {"name": "adaptive", "context_dim": policy.context_dim, "k_values": list(policy.k_values),
                "hidden": policy.hidden}
    if isinstance(policy, FixedKPolicy):
        return {"name": "fixed", "k": policy.k}
    if isinstance(policy, UniformPolicy):
        return {"name": "uniform", "k_values": list(policy.k_values)}
    raise TypeError(f"cannot describe policy of type {type(policy).__name__} (use one from hybridmask.policy)")


def _public_state(policy) -> Dict[str, torch.Tensor]:
    """The policy's state dict without its sampling generator (not needed to use it, and not
    something to publish)."""
    return {k: v for k, v in policy.state_dict().items() if not k.endswith("_extra_state")}


def save_policy(path: Union[str, os.PathLike], policy, masking: Optional[Dict[str, Any]] = None,
                context: Optional[Dict[str, float]] = None, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write a trained policy to ``path`` atomically (see the module doc for what is stored).

    ``masking``: the HybridMask config the policy was trained with; ``context``: the
    ``running_loss`` / ``progress`` scalars to feed its context at deployment (the end-of-training
    values); ``extra``: plain data (training summary, k histogram, ...).
    """
    atomic_save({
        "format": POLICY_FORMAT,
        "format_version": POLICY_FORMAT_VERSION,
        "policy_config": describe_policy(policy),
        "policy_state": _public_state(policy),
        "masking": dict(masking) if masking is not None else None,
        "context": dict(context) if context is not None else {"running_loss": 0.0, "progress": 1.0},
        "extra": dict(extra) if extra is not None else None,
    }, path)


def load_policy(path: Union[str, os.PathLike], seed: SeedLike = None):
    """Rebuild a policy saved by :func:`save_policy` -> ``(policy, meta)``; ``meta`` holds
    ``masking``, ``context`` and ``extra``. ``seed`` seeds the policy's sampling generator
    (``None``: secure OS seed)."""
    from ..policy import create_policy
    blob = safe_torch_load(path)
    if not isinstance(blob, dict) or blob.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path} is not a hybridmask policy file (no format={POLICY_FORMAT!r} entry)")
    if not isinstance(blob.get("format_version"), int) or blob["format_version"] > POLICY_FORMAT_VERSION:
        raise ValueError(f"{path}: policy format version {blob.get('format_version')!r} is not supported")
    cfg = dict(blob.get("policy_config") or {})
    if "name" not in cfg:
        raise ValueError(f"{path}: policy_config has no 'name'")
    name = cfg.pop("name")
    policy = create_policy(name, seed=seed, **cfg)
    state = blob.get("policy_state")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: policy_state is missing")
    load_policy_state(policy, state, str(path))
    policy.eval()
    meta = {k: blob.get(k) for k in ("masking", "context", "extra")}
    meta["path"] = str(path)
    return policy, meta


@register_defense("adaptive")
class AdaptiveMask(MaskDefense):
    """HybridMask (BDCT -> PPFR-FD -> frequency MixUp) with a per-sample k chosen by a policy.

    Args:
        policy: a :class:`hybridmask.policy.MaskingPolicy` object (e.g. the StrategyNet being
            trained), or ``None``.
        policy_path: a ``policy.pt`` written by :func:`save_policy` (used when ``policy`` is None).
        policy_config: the policy's constructor arguments (``{"name": "adaptive", ...}``): an
            untrained policy of that shape, whose weights :meth:`load_defense_state` then sets (this is
            how :func:`~hybridmask.defenses.io.load_defense` rebuilds a trained run).
        k_values: the k values of the uniform fallback policy (no policy given).
        greedy: take the policy's most likely k instead of sampling it.
        running_loss, progress: the scalar context features at deployment (default: those
            stored in ``policy_path``, else 0 and 1).
        u, drop, shuffle, mix, weights, max_weight, granularity, order, subset, subset_keys: see
            :class:`HybridMask`.
        subset_by_k: one entry per policy k value (None or a number of channels): the masking ladder of the
            module doc; None: no ladder (every face keeps every kept channel, queries are plain ``low``-drop queries).
        query_k, pool, pool_sha256: partners from a public pool (the face the heaviest of each mix) and
            queries mixed with ``query_k - 1`` of them (see :class:`~hybridmask.defenses.base.MaskDefense`).
        seed: masking secrets (``None``: secure OS seed). ``policy_seed``: the policy's sampling.
    """
    name = "adaptive"
    mixes = True
    takes_policy = True
    state_keys = ("policy_config",)

    def __init__(self, policy=None, policy_path: Optional[str] = None, policy_config: Optional[Dict[str, Any]] = None,
                 k_values: Sequence[int] = (2, 3, 4, 5, 6), greedy: bool = False,
                 running_loss: Optional[float] = None, progress: Optional[float] = None,
                 u: int = 1, drop="dc", shuffle: str = "sample", mix: Optional[str] = None, weights: str = "instahide",
                 max_weight: float = 0.65, granularity: str = "image", order: str = "mask_mix",
                 subset: Optional[int] = None, subset_keys: Optional[int] = None,
                 subset_by_k: Optional[Sequence[Optional[int]]] = None,
                 query_k: int = 1, pool=None, pool_sha256: Optional[str] = None,
                 seed: SeedLike = None, policy_seed: SeedLike = None):
        from ..policy import UniformPolicy, create_policy
        if policy_seed is None and isinstance(seed, int):   # a seeded (test) defense samples its k reproducibly too
            policy_seed = seed + 1
        mask_args = dict(u=u, drop=drop, shuffle=shuffle, mix=default_mix(shuffle, mix), weights=weights,
                         max_weight=max_weight,
                         granularity=granularity, order=order, **subset_config(subset, subset_keys))
        super().__init__({}, seed=seed, k=1, query_k=query_k, pool=pool, pool_sha256=pool_sha256, **mask_args)
        ctx = {"running_loss": 0.0, "progress": 1.0}
        if policy is None and policy_path is not None:
            policy, meta = load_policy(policy_path, seed=policy_seed)
            ctx.update(meta.get("context") or {})
        if policy is None and policy_config is not None:
            cfg = dict(policy_config)
            policy = create_policy(cfg.pop("name"), seed=policy_seed, **cfg)
        if policy is None:
            policy = UniformPolicy(k_values, seed=policy_seed)
        self.policy = policy
        self.greedy = bool(greedy)
        self.running_loss = float(ctx["running_loss"] if running_loss is None else running_loss)
        self.progress = float(ctx["progress"] if progress is None else progress)
        small = [k for k in self.policy.k_values if k > 1]
        if weights == "instahide" and small and max_weight * min(small) < 1 - 1e-9:
            raise ValueError(f"max_weight {max_weight} is infeasible for k={min(small)} (k * max_weight must be >= 1)")
        self.subset_by_k = self._check_ladder(subset_by_k, subset, subset_keys, query_k, order)
        self.mask.ppfrfd.sized = self.subset_by_k is not None
        ladder = {} if self.subset_by_k is None else {"subset_by_k": list(self.subset_by_k)}
        # the config rebuilds the policy's shape; its weights are defense_state (never a file path)
        self._config = dict(policy_config=describe_policy(self.policy), greedy=self.greedy, **mask_args,
                            **ladder, **self._query_config)

    def _check_ladder(self, subset_by_k, subset, subset_keys, query_k, order):
        """Validate ``subset_by_k`` against the policy's k values -> a tuple (or None)."""
        if subset_by_k is None:
            return None
        ks = self.policy.k_values
        if isinstance(subset_by_k, (str, bytes)) or not isinstance(subset_by_k, (list, tuple)) \
                or len(subset_by_k) != len(ks):
            raise ValueError(f"subset_by_k must be a list with one entry (None or a number of channels) per policy "
                             f"k value {list(ks)}, got {subset_by_k!r}")
        c = self.mask.out_channels
        for m in subset_by_k:
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= c):
                raise ValueError(f"subset_by_k entries must be None or an int in 1..{c} (channels a face keeps), "
                                 f"got {m!r} in {list(subset_by_k)}")
        if subset is not None or subset_keys is not None:
            raise ValueError("subset_by_k sets each face's subset from its level; it cannot be combined with a fixed "
                             f"subset={subset!r} / subset_keys={subset_keys!r}")
        if query_k != 1 or order != "mask_mix":
            raise ValueError(f"subset_by_k needs query_k=1 and order='mask_mix' (the policy reads each face's own "
                             f"masking), got query_k={query_k!r}, order={order!r}")
        if 1 in ks and subset_by_k[ks.index(1)] is not None:
            raise ValueError("subset_by_k: the level k=1 is the face alone with every kept channel (None), got "
                             f"{subset_by_k[ks.index(1)]!r}")
        return tuple(subset_by_k)

    def _ladder_sizes(self, k, batch: int) -> torch.Tensor:
        """The number of channels each face keeps at its level ``k`` -> (B,) long (refuses a k off the ladder)."""
        kt = torch.as_tensor(k).long().reshape(-1).cpu()
        if kt.numel() == 1:
            kt = kt.expand(batch)
        c = self.mask.out_channels
        table = {kv: (c if m is None else m) for kv, m in zip(self.policy.k_values, self.subset_by_k)}
        bad = sorted({int(v) for v in kt.tolist()} - set(table))
        if bad:
            raise ValueError(f"k values {bad} are not levels of this ladder (k_values {list(self.policy.k_values)})")
        return torch.tensor([table[int(v)] for v in kt.tolist()], dtype=torch.long)

    def _with_ladder(self, draw, sizes: torch.Tensor):
        """``draw`` with each face's fresh secret subset of ``sizes`` channels (the ladder)."""
        from dataclasses import replace
        return replace(draw, subset=self.mask.ppfrfd.sized_subsets(sizes))

    @property
    def max_k(self) -> int:
        return int(max(self.policy.k_values))

    def structure(self):
        from dataclasses import replace
        return replace(super().structure(), k=None, k_values=tuple(int(k) for k in self.policy.k_values),
                       subset_levels=self.subset_by_k)

    def needs_state(self) -> bool:
        return bool(getattr(self.policy, "trainable", False))

    def defense_state(self) -> Dict[str, Any]:
        return {"policy_state": _public_state(self.policy), "running_loss": self.running_loss,
                "progress": self.progress}

    def load_defense_state(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        unknown = set(state) - {"policy_state", "running_loss", "progress"}
        if unknown:
            raise ValueError(f"adaptive defense state has unknown entries {sorted(unknown)}")
        load_policy_state(self.policy, state.get("policy_state") or {}, "adaptive defense state")
        self.running_loss = float(state.get("running_loss", self.running_loss))
        self.progress = float(state.get("progress", self.progress))

    def end_training(self, running_loss: Optional[float] = None, progress: float = 1.0) -> None:
        if running_loss is not None:
            self.running_loss = float(running_loss)
        self.progress = float(progress)

    def context(self, encoded: torch.Tensor) -> torch.Tensor:
        from ..policy import context_features
        return context_features(encoded, self.running_loss, min(max(self.progress, 0.0), 1.0))

    def _choose(self, images):
        """The per-face secrets (no subset yet) and the policy's k per face, read from their masking."""
        d = self.mask.face_draw(images.shape[0])
        kk, _, _ = self.policy.act(self.context(self.mask.front(images, d)), greedy=self.greedy)
        return d, kk

    @torch.no_grad()
    def draw(self, images, k=None):
        """The policy picks k per face from the context of the masked batch (unless ``k`` is given:
        the trainer, or an attacker's white-box probe). ``k=1`` for every face: the per-face secrets the
        trainer encodes before its policy chooses (with a ladder: every channel, as level 1)."""
        if k is None:
            d, kk = self._choose(images)
            return self.draw_mix(images, d, kk)
        if self.subset_by_k is None or bool((torch.as_tensor(k) == 1).all()):
            return super().draw(images, k)
        sizes = self._ladder_sizes(k, images.shape[0])
        return self._with_ladder(super().draw(images, k), sizes)

    def draw_mix(self, images, draw, k):
        if self.subset_by_k is None:
            return super().draw_mix(images, draw, k)
        sizes = self._ladder_sizes(k, images.shape[0])
        return self._with_ladder(super().draw_mix(images, draw, k), sizes)

    def mix_for(self, images, base, encoded, k):
        if self.subset_by_k is None:
            return super().mix_for(images, base, encoded, k)
        return self.mask.apply(images, self.draw_mix(images, base, k))   # each face at its level's subset

    @torch.no_grad()
    def draw_query(self, images):
        """A query: each face alone (k=1); with a ladder, keeping the number of channels of the level the policy
        chooses for it."""
        if self.subset_by_k is None:
            return super().draw_query(images)
        d, kk = self._choose(images)
        return self._with_ladder(d, self._ladder_sizes(kk, images.shape[0]))


def load_policy_state(policy, state: Dict[str, torch.Tensor], where: str) -> None:
    """Load public policy weights, refusing a mismatch or non-finite values."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: policy weight {k!r} holds NaN or infinite values")
    missing, unexpected = policy.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{where}: policy weights do not match its config (missing {missing}, unexpected {unexpected})")


__all__ = ["AdaptiveMask", "save_policy", "load_policy", "describe_policy", "load_policy_state", "POLICY_FORMAT"]
