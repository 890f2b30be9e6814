"""The adaptive defense: HybridMask whose MixUp degree ``k`` comes from a masking policy.

    from hybridmask.defenses import create_defense
    d = create_defense("adaptive", policy_path="outputs/quickstart/policy.pt")   # a trained policy
    released, record = d.release(faces)       # per-sample k chosen by the policy (record.k)
    query = d.query(faces)                    # test-time query: k=1, BDCT + PPFR-FD only

``release(images)`` encodes each face (block DCT + PPFR-FD with fresh secret draws), computes the
policy's context from that encoding (:func:`hybridmask.policy.context_features`), lets the policy
pick one ``k`` per face and mixes (``order="mask_mix"``, the default; with ``"mix_mask"`` the
context comes from the k=1 encoding and the batch is then masked with the chosen k). Without a
policy (``policy=None`` and no ``policy_path``) the k is drawn uniformly from ``k_values``.

Trained policies are stored with :func:`save_policy` (``policy.pt``: a plain dict that loads
with ``torch.load(weights_only=True)``; it holds the policy weights, its k values, the masking
config it was trained for and the training context, but *no* secret: neither the masking
generator nor the policy's sampling generator).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..freq import MixRecord
from ..utils import atomic_save, safe_torch_load
from ..utils.rng import SeedLike
from .base import _MaskDefense, register_defense

POLICY_FORMAT = "hybridmask.policy"
POLICY_FORMAT_VERSION = 1


def policy_config(policy) -> Dict[str, Any]:
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
        "policy_config": policy_config(policy),
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
    missing, unexpected = policy.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path}: policy weights do not match its config (missing {missing}, unexpected {unexpected})")
    policy.eval()
    meta = {k: blob.get(k) for k in ("masking", "context", "extra")}
    meta["path"] = str(path)
    return policy, meta


@register_defense("adaptive")
class AdaptiveMask(_MaskDefense):
    """HybridMask (BDCT -> PPFR-FD -> frequency MixUp) with a per-sample k chosen by a policy.

    Args:
        policy: a :class:`hybridmask.policy.MaskingPolicy` object (e.g. the StrategyNet being
            trained), or ``None``.
        policy_path: a ``policy.pt`` written by :func:`save_policy` (used when ``policy`` is None).
        k_values: the k values of the uniform fallback policy (no policy given).
        greedy: take the policy's most likely k instead of sampling it.
        running_loss, progress: the scalar context features at deployment (default: those
            stored in ``policy_path``, else 0 and 1).
        u, drop, shuffle, mix, weights, max_weight, granularity, order: see :class:`HybridMask`.
        seed: masking secrets (``None``: secure OS seed). ``policy_seed``: the policy's sampling.
    """
    name = "adaptive"

    def __init__(self, policy=None, policy_path: Optional[str] = None, k_values: Sequence[int] = (2, 3, 4, 5, 6),
                 greedy: bool = False, running_loss: Optional[float] = None, progress: Optional[float] = None,
                 u: int = 1, drop="dc", shuffle: str = "sample", mix: str = "neighbour", weights: str = "instahide",
                 max_weight: float = 0.65, granularity: str = "image", order: str = "mask_mix",
                 seed: SeedLike = None, policy_seed: SeedLike = None):
        from ..policy import UniformPolicy
        own = dict(policy_path=None if policy_path is None else str(policy_path), k_values=list(k_values),
                   greedy=bool(greedy), u=u, drop=drop, shuffle=shuffle, mix=mix, weights=weights,
                   max_weight=max_weight, granularity=granularity, order=order)
        super().__init__(own, seed=seed, u=u, drop=drop, shuffle=shuffle, mix=mix, k=1, weights=weights,
                         max_weight=max_weight, granularity=granularity, order=order)
        ctx = {"running_loss": 0.0, "progress": 1.0}
        if policy is None and policy_path is not None:
            policy, meta = load_policy(policy_path, seed=policy_seed)
            ctx.update(meta.get("context") or {})
        if policy is None:
            policy = UniformPolicy(k_values, seed=policy_seed)
        self.policy = policy
        self.greedy = bool(greedy)
        self.running_loss = float(ctx["running_loss"] if running_loss is None else running_loss)
        self.progress = float(ctx["progress"] if progress is None else progress)
        small = [k for k in self.policy.k_values if k > 1]
        if weights == "instahide" and small and max_weight * min(small) < 1 - 1e-9:
            raise ValueError(f"max_weight {max_weight} is infeasible for k={min(small)} (k * max_weight must be >= 1)")

    # -- pieces the trainer uses (so the policy decision can be made on the gathered batch) ------
    @property
    def fast_path(self) -> bool:
        """Whether :meth:`encode` + :meth:`mix` reproduce ``mask(images, k)`` (mask -> mix order)."""
        return can_split(self)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """BDCT + PPFR-FD of every face on its own (fresh secret permutations)."""
        return self.mask.encode(images)

    @torch.no_grad()
    def mix(self, encoded: torch.Tensor, k) -> Tuple[torch.Tensor, MixRecord]:
        return mix_encoded(self, encoded, k)

    def context(self, encoded: torch.Tensor) -> torch.Tensor:
        from ..policy import context_features
        return context_features(encoded, self.running_loss, min(max(self.progress, 0.0), 1.0))

    # -- the Defense interface --------------------------------------------------------------------
    @torch.no_grad()
    def release(self, images, k=None):
        if k is not None:           # an explicit k (the trainer, or an attacker's white-box probe)
            return self.mask(images, k=k)
        encoded = self.mask.encode(images)
        ctx = self.context(encoded)
        kk, _, _ = self.policy.act(ctx, greedy=self.greedy)
        if can_split(self):
            return mix_encoded(self, encoded, kk)
        return self.mask(images, k=kk)


def can_split(defense) -> bool:
    """True when ``defense.mask`` is a HybridMask whose release is ``mixup(encode(x))``."""
    m = getattr(defense, "mask", None)
    return m is not None and getattr(m, "order", None) == "mask_mix" and getattr(m, "pool", "x") is None


def mix_encoded(defense, encoded: torch.Tensor, k) -> Tuple[torch.Tensor, MixRecord]:
    """MixUp of already-encoded faces, exactly as ``defense.mask(images, k)`` would do it after
    its encoding step (same generator draws in the same order)."""
    m = defense.mask
    return m.mixup(encoded, k=k, bands=m.ppfrfd.kept_index % 64)


__all__ = ["AdaptiveMask", "save_policy", "load_policy", "policy_config", "can_split", "mix_encoded",
           "POLICY_FORMAT"]
