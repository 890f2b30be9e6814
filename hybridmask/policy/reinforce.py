"""REINFORCE (Williams 1992) for the masking policy.

``grad J = E[(R - b) grad log pi(a|s)]`` is implemented as the loss

    loss = -mean_i(adv_i * log_prob_i) - entropy_coef * mean_i(H_i)

with ``adv_i = R_i - b`` (``baseline="ema"``) or ``adv_i = (R_i - m) / s`` (``baseline="zscore"``),
minimised with Adam and gradient-norm clipping. The baseline is computed from rewards of
*earlier* batches (the first batch initialises it from its own rewards), so it does not depend on
the current rewards and the gradient estimate stays unbiased; it is updated after each step:

* ``"ema"``: ``b <- ema * b + (1 - ema) * mean(R)``.
* ``"zscore"``: running mean ``m`` and variance ``s**2`` with the same momentum (exact mixture
  formula for the batch), so the advantage is scale free.

Usage inside an alternating trainer::

    k, a, logp = policy.act(ctx)              # logp keeps the graph (policy unchanged until update)
    rewards = reward(fr_loss_per_sample, k)   # LagrangianReward, (B,)
    stats = rl.update(logp, rewards, entropy=policy.dist(ctx).entropy())

For several policy steps on one stored rollout use ``logp, ent = policy.evaluate(ctx, a)``.
A policy without parameters (fixed / uniform) is accepted: ``update`` then only tracks the
baseline and returns the statistics with ``updated=False``, so baselines run through the same loop.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

import torch

from ..utils import HybridMaskInputError
from .strategy import MaskingPolicy


def _check_vector(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise HybridMaskInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise HybridMaskInputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 1 or x.shape[0] < 1:
        raise HybridMaskInputError(f"{name} must have shape (B,) with B >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise HybridMaskInputError(f"{name} contains NaN or infinite values")


class Reinforce:
    """REINFORCE updater for a :class:`~hybridmask.policy.MaskingPolicy`.

    Args:
        policy: the policy to train (its parameters are optimised in place).
        lr: Adam learning rate.
        baseline: ``"ema"`` (moving-average baseline) or ``"zscore"`` (running z-score).
        ema: momentum of the running baseline statistics, in ``[0, 1)``.
        entropy_coef: weight of the entropy bonus (needs ``entropy`` in :meth:`update`).
        grad_clip: max global gradient norm (``None`` or ``0`` disables clipping).
    """

    BASELINES = ("ema", "zscore")

    def __init__(self, policy: MaskingPolicy, lr: float = 1e-3, baseline: str = "ema", ema: float = 0.9,
                 entropy_coef: float = 0.01, grad_clip: Optional[float] = 1.0):
        if not isinstance(policy, torch.nn.Module):
            raise HybridMaskInputError(f"policy must be a torch.nn.Module, got {type(policy).__name__}")
        if baseline not in self.BASELINES:
            raise HybridMaskInputError(f"unknown baseline {baseline!r}; choose one of {self.BASELINES}")
        for name, v, lo, hi in (("lr", lr, 0.0, math.inf), ("ema", ema, 0.0, 1.0),
                                ("entropy_coef", entropy_coef, 0.0, math.inf)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not lo <= v <= hi:
                raise HybridMaskInputError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")
        if ema >= 1.0:
            raise HybridMaskInputError(f"ema must be < 1, got {ema}")
        if grad_clip is not None and (not isinstance(grad_clip, numbers.Real) or grad_clip < 0):
            raise HybridMaskInputError(f"grad_clip must be None or a number >= 0, got {grad_clip!r}")
        self.policy = policy
        self.lr = float(lr)
        self.baseline = baseline
        self.ema = float(ema)
        self.entropy_coef = float(entropy_coef)
        self.grad_clip = float(grad_clip) if grad_clip else None
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.lr) if params else None
        self._params = params
        # running baseline state
        self.b_mean = 0.0
        self.b_var = 1.0
        self.b_count = 0     # rewards seen
        self.steps = 0       # update() calls

    # ------------------------------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of ``rewards`` under the current baseline (does not update it)."""
        r = rewards.detach().double()
        if self.b_count == 0:   # first batch: initialise from itself
            mean = r.mean().item()
            var = r.var(unbiased=False).item() if r.numel() > 1 else 0.0
        else:
            mean, var = self.b_mean, self.b_var
        adv = r - mean
        if self.baseline == "zscore":
            adv = adv / math.sqrt(var + 1e-8)
        return adv.to(rewards.dtype)

    def _update_baseline(self, rewards: torch.Tensor) -> None:
        r = rewards.detach().double()
        bm = r.mean().item()
        bv = r.var(unbiased=False).item() if r.numel() > 1 else 0.0
        if self.b_count == 0:
            self.b_mean, self.b_var = bm, bv
        else:
            w = 1.0 - self.ema
            d = bm - self.b_mean
            self.b_mean = self.b_mean + w * d
            self.b_var = (1.0 - w) * self.b_var + w * bv + w * (1.0 - w) * d * d
        self.b_count += int(r.numel())

    def update(self, log_probs: torch.Tensor, rewards: torch.Tensor,
               entropy: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """One policy-gradient step. ``log_probs`` ``(B,)`` (with graph), ``rewards`` ``(B,)``,
        ``entropy`` optional ``(B,)`` (or scalar) with graph, for the entropy bonus.

        Returns a dict of floats: ``loss, reward_mean, reward_std, adv_mean, adv_std, baseline,
        baseline_std, entropy, grad_norm, updated``.
        """
        _check_vector(rewards, "rewards")
        _check_vector(log_probs, "log_probs")
        if log_probs.shape != rewards.shape:
            raise HybridMaskInputError(
                f"log_probs and rewards must have the same shape, got {tuple(log_probs.shape)} and {tuple(rewards.shape)}")
        if entropy is not None:
            if not isinstance(entropy, torch.Tensor) or not torch.isfinite(entropy).all():
                raise HybridMaskInputError("entropy must be a finite torch.Tensor")
            if entropy.dim() > 1 or (entropy.dim() == 1 and entropy.shape != rewards.shape):
                raise HybridMaskInputError(f"entropy must be a scalar or have shape {tuple(rewards.shape)}, "
                                           f"got {tuple(entropy.shape)}")
        trainable = self.optimizer is not None
        if trainable and not log_probs.requires_grad:
            raise HybridMaskInputError(
                "log_probs carry no gradient: compute them with policy.act()/evaluate() outside torch.no_grad()")

        adv = self.advantages(rewards).to(log_probs.device, log_probs.dtype)
        pg = -(adv * log_probs).mean()
        ent = entropy.mean() if entropy is not None else None
        loss = pg - self.entropy_coef * ent if ent is not None else pg
        grad_norm = 0.0
        if trainable:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip))
            else:
                grad_norm = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in self._params
                                                 if p.grad is not None)))
            self.optimizer.step()
        baseline_before = self.b_mean if self.b_count else float(rewards.detach().double().mean())
        self._update_baseline(rewards)
        self.steps += 1
        r = rewards.detach().double()
        a = adv.detach().double()
        return {
            "loss": float(loss.detach()),
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(unbiased=False)),
            "adv_mean": float(a.mean()),
            "adv_std": float(a.std(unbiased=False)),
            "baseline": baseline_before,
            "baseline_std": math.sqrt(max(self.b_var, 0.0)),
            "entropy": float(ent.detach()) if ent is not None else float("nan"),
            "grad_norm": grad_norm,
            "updated": float(trainable),
        }

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Policy weights, optimiser state and baseline state (plain types: loads with
        ``weights_only=True``)."""
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "baseline": {"mean": self.b_mean, "var": self.b_var, "count": self.b_count, "steps": self.steps},
            "config": {"lr": self.lr, "baseline": self.baseline, "ema": self.ema,
                       "entropy_coef": self.entropy_coef, "grad_clip": self.grad_clip},
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            cfg = state["config"]
            if cfg["baseline"] != self.baseline:
                raise HybridMaskInputError(
                    f"checkpoint uses baseline {cfg['baseline']!r}, this updater {self.baseline!r}")
            self.policy.load_state_dict(state["policy"])
            if self.optimizer is not None and state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            b = state["baseline"]
            self.b_mean, self.b_var = float(b["mean"]), float(b["var"])
            self.b_count, self.steps = int(b["count"]), int(b["steps"])
        except (KeyError, TypeError) as e:
            raise HybridMaskInputError(f"not a Reinforce state dict: missing or bad entry {e}") from e
