"""Masking policies: which MixUp degree ``k`` each sample gets.

All policies share one interface (:class:`MaskingPolicy`), so the trainer can swap the adaptive
policy for the fixed-k or uniform baselines without code changes:

* ``policy.k_values``: the tuple of k values; action ``a`` means ``k = k_values[a]``. ``k = 1`` (the face
  released alone) is allowed: a level of a masking ladder whose per-face strength is more than k
  (``AdaptiveMask(subset_by_k=...)``: the level also sets how many channels the face keeps, in training
  and in its queries).
* ``policy.dist(ctx)``: a :class:`torch.distributions.Categorical` over actions, one row per
  sample of the context ``ctx`` ``(B, D)``.
* ``policy.act(ctx, generator=None, greedy=False) -> (k, action, log_prob)``, each ``(B,)``:
  ``k`` and ``action`` are ``long`` tensors on ``ctx``'s device, ``log_prob`` the log-probability
  of the chosen action (with gradient for a trainable policy; compute it outside
  ``torch.no_grad()`` if you want to update the policy with it).
* ``policy.evaluate(ctx, action) -> (log_prob, entropy)``: re-score stored actions (for several
  policy steps on one rollout, since a backward pass frees the graph of ``act``'s log-prob).
* ``policy.trainable``: whether there are parameters for :class:`~hybridmask.policy.Reinforce`.

Sampling randomness: each policy owns a :class:`torch.Generator` (``seed=None`` -> securely
seeded, see :mod:`hybridmask.utils.rng`); ``act(generator=g)`` overrides it for one call.
Sampling is done on the CPU (a ``(B, K)`` table), so results do not depend on the device. The
owned generator's state is part of ``state_dict()`` (exact resume).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.distributions import Categorical

from ..utils import HybridMaskInputError, Registry, make_generator
from .features import CONTEXT_DIM

K_VALUES: Tuple[int, ...] = (2, 3, 4, 5, 6)

POLICIES = Registry("policy")


def validate_k_values(k_values: Sequence[int], min_k: int = 1) -> Tuple[int, ...]:
    """Return ``k_values`` as a tuple of distinct Python ints ``>= min_k`` or raise a clear error."""
    if isinstance(k_values, (str, bytes)) or not hasattr(k_values, "__iter__"):
        raise HybridMaskInputError(f"k_values must be a sequence of ints, got {k_values!r}")
    ks = []
    for k in k_values:
        if isinstance(k, torch.Tensor) and k.numel() == 1 and not torch.is_floating_point(k):
            k = int(k.item())
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise HybridMaskInputError(f"k_values must contain ints, got {k!r} ({type(k).__name__}) in {k_values!r}")
        if k < min_k:
            raise HybridMaskInputError(
                f"k_values must be >= {min_k} (k = number of images mixed), got {int(k)} in {list(k_values)!r}")
        ks.append(int(k))
    if not ks:
        raise HybridMaskInputError("k_values must not be empty")
    if len(set(ks)) != len(ks):
        raise HybridMaskInputError(f"k_values must be distinct, got {ks}")
    return tuple(ks)


class MaskingPolicy(nn.Module):
    """Base class: a distribution over ``k_values`` per context row. Subclasses implement
    :meth:`logits`."""

    context_dim: Optional[int] = None  # None: any D accepted (the context is ignored)

    def __init__(self, k_values: Sequence[int], seed=None, min_k: int = 1):
        super().__init__()
        self.k_values = validate_k_values(k_values, min_k=min_k)
        self.generator = make_generator(seed)
        self.register_buffer("_k_table", torch.tensor(self.k_values, dtype=torch.long), persistent=False)

    # --- interface -------------------------------------------------------------------------
    @property
    def num_actions(self) -> int:
        return len(self.k_values)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def logits(self, ctx: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_context(self, ctx) -> None:
        if not isinstance(ctx, torch.Tensor):
            raise HybridMaskInputError(f"context must be a torch.Tensor, got {type(ctx).__name__}")
        if not torch.is_floating_point(ctx):
            raise HybridMaskInputError(f"context must be a floating-point tensor, got dtype {ctx.dtype}")
        if ctx.dim() != 2 or ctx.shape[0] < 1:
            raise HybridMaskInputError(f"context must have shape (B, D) with B >= 1, got {tuple(ctx.shape)}")
        if self.context_dim is not None and ctx.shape[1] != self.context_dim:
            raise HybridMaskInputError(
                f"context must have {self.context_dim} features per sample, got {ctx.shape[1]} (shape {tuple(ctx.shape)})")
        if not torch.isfinite(ctx).all():
            raise HybridMaskInputError("context contains NaN or infinite values")

    def dist(self, ctx: torch.Tensor) -> Categorical:
        """Categorical over actions, batch shape ``(B,)``."""
        self.check_context(ctx)
        return Categorical(logits=self.logits(ctx))

    def probs(self, ctx: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` action probabilities (no gradient)."""
        with torch.no_grad():
            return self.dist(ctx).probs

    def k_of(self, action: torch.Tensor) -> torch.Tensor:
        """Map action indices to k values (same device)."""
        return self._k_table.to(action.device)[action]

    def action_of(self, k: torch.Tensor) -> torch.Tensor:
        """Map k values to action indices; raises for a k that is not in ``k_values``."""
        k = torch.as_tensor(k).long()
        table = self._k_table.to(k.device)
        match = k.reshape(-1, 1) == table.reshape(1, -1)
        if not bool(match.any(dim=1).all()):
            bad = sorted(set(k[~match.any(dim=1).reshape(k.shape)].tolist()))
            raise HybridMaskInputError(f"k values {bad} are not in this policy's k_values {self.k_values}")
        return match.long().argmax(dim=1).reshape(k.shape)

    def act(self, ctx: torch.Tensor, generator: Optional[torch.Generator] = None,
            greedy: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or, ``greedy=True``, take the arg-max) one action per context row.

        Returns ``(k, action, log_prob)``, each of shape ``(B,)``. ``generator`` (a CPU
        generator) overrides the policy's own one for this call.
        """
        d = self.dist(ctx)
        probs = d.probs.detach()
        if greedy:
            action = probs.argmax(dim=1)
        else:
            g = self.generator if generator is None else generator
            if not isinstance(g, torch.Generator) or g.device.type != "cpu":
                raise HybridMaskInputError("generator must be a CPU torch.Generator (sampling runs on the CPU)")
            action = torch.multinomial(probs.to("cpu", torch.float64), 1, generator=g).squeeze(1).to(probs.device)
        return self.k_of(action), action, d.log_prob(action)

    def evaluate(self, ctx: torch.Tensor, action: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(log_prob, entropy)`` of given actions under the current policy (with gradient)."""
        d = self.dist(ctx)
        action = torch.as_tensor(action, device=ctx.device).long()
        if action.shape != (ctx.shape[0],):
            raise HybridMaskInputError(f"action must have shape ({ctx.shape[0]},), got {tuple(action.shape)}")
        if bool(((action < 0) | (action >= self.num_actions)).any()):
            raise HybridMaskInputError(f"action indices must be in [0, {self.num_actions}), got {action.tolist()}")
        return d.log_prob(action), d.entropy()

    # the owned generator travels with the state dict (exact resume)
    def get_extra_state(self):
        return {"generator": self.generator.get_state().clone()}

    def set_extra_state(self, state) -> None:
        if isinstance(state, dict) and "generator" in state:
            self.generator.set_state(state["generator"].clone().to(torch.uint8).cpu())

    def extra_repr(self) -> str:
        return f"k_values={self.k_values}"


@POLICIES.register("adaptive")
class StrategyNet(MaskingPolicy):
    """Adaptive policy: MLP ``context -> logits over k_values`` (the strategy network).

    ``Linear(D, hidden) - Tanh - Linear(hidden, hidden) - Tanh - Linear(hidden, K)``. The output
    layer starts at zero, so the initial policy is uniform over ``k_values`` (no prior bias
    toward any k before the reward has said anything). Inputs are standardised with fixed
    buffers ``feature_mean``/``feature_std`` (identity by default; set them once with
    :meth:`calibrate`, e.g. on the first batch, since the raw log-energy level depends on the
    data and the grid).
    """

    def __init__(self, context_dim: int = CONTEXT_DIM, k_values: Sequence[int] = K_VALUES, hidden: int = 64,
                 seed=None):
        for name, v in (("context_dim", context_dim), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise HybridMaskInputError(f"{name} must be a positive int, got {v!r}")
        super().__init__(k_values, seed=seed)
        self.context_dim = int(context_dim)
        self.hidden = int(hidden)
        self.net = nn.Sequential(
            nn.Linear(self.context_dim, self.hidden), nn.Tanh(),
            nn.Linear(self.hidden, self.hidden), nn.Tanh(),
            nn.Linear(self.hidden, self.num_actions),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        # fixed input standardisation (identity until calibrate() is called); part of state_dict
        self.register_buffer("feature_mean", torch.zeros(self.context_dim))
        self.register_buffer("feature_std", torch.ones(self.context_dim))

    @torch.no_grad()
    def calibrate(self, ctx: torch.Tensor, min_std: float = 1e-2) -> None:
        """Set the input standardisation from a representative context batch (e.g. the first
        training batch): ``(ctx - mean) / max(std, min_std)`` per feature. Done once, explicitly,
        so the policy stays a fixed per-sample function between updates."""
        self.check_context(ctx)
        if ctx.shape[0] < 2:
            raise HybridMaskInputError(f"calibrate needs at least 2 context rows, got {ctx.shape[0]}")
        c = ctx.to(self.feature_mean)
        self.feature_mean.copy_(c.mean(0))
        self.feature_std.copy_(c.std(0).clamp_min(min_std))

    def logits(self, ctx: torch.Tensor) -> torch.Tensor:
        x = ctx.to(device=self.feature_mean.device, dtype=self.feature_mean.dtype)
        return self.net((x - self.feature_mean) / self.feature_std)

    def extra_repr(self) -> str:
        return f"context_dim={self.context_dim}, k_values={self.k_values}, hidden={self.hidden}"


@POLICIES.register("fixed")
class FixedKPolicy(MaskingPolicy):
    """Always ``k`` (the fixed-k MixUp baseline). ``log_prob`` is 0, entropy 0; no parameters.
    ``k=1`` (no MixUp: the PPFR-FD baseline) is allowed here."""

    def __init__(self, k: int = 4, seed=None):
        super().__init__((k,), seed=seed, min_k=1)
        self.k = self.k_values[0]

    def logits(self, ctx: torch.Tensor) -> torch.Tensor:
        return ctx.new_zeros(ctx.shape[0], 1)

    def extra_repr(self) -> str:
        return f"k={self.k}"


@POLICIES.register("uniform")
class UniformPolicy(MaskingPolicy):
    """k drawn uniformly from ``k_values`` for every sample (the random-k baseline);
    ``log_prob = -log K``; no parameters."""

    def __init__(self, k_values: Sequence[int] = K_VALUES, seed=None):
        super().__init__(k_values, seed=seed)

    def logits(self, ctx: torch.Tensor) -> torch.Tensor:
        return ctx.new_zeros(ctx.shape[0], self.num_actions)



def create_policy(name: str, **kw) -> MaskingPolicy:
    """Build a policy by name: ``"adaptive"`` (:class:`StrategyNet`), ``"fixed"``
    (:class:`FixedKPolicy`) or ``"uniform"`` (:class:`UniformPolicy`); ``kw`` go to the class."""
    return POLICIES.get(name)(**kw)
