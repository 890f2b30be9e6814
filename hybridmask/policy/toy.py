"""A small synthetic model of the adversarial masking game (for tests, demos and the env).

It stands in for "recogniser + held-out evaluation" so the policy machinery can be exercised in
milliseconds:

* **Samples.** Each sample has a hardness ``h ~ N(0, 1)``; its masked frequency tensor
  ``(channels, grid, grid)`` is Gaussian noise with a decaying per-channel energy profile, scaled
  by ``exp(h)``, so the context features see ``h`` (through ``log_energy``).
* **FR loss (privacy).** A sample mixed with ``k`` images has loss
  ``base + gain_i * log(k) + 0.3 * h + loss_noise * N(0, 1)`` with ``gain_i = gain * (1 + hetero * tanh(h))``:
  it grows with k (k=6 is always the most private action) with diminishing returns.
  ``hetero > 0`` makes the privacy benefit of mixing sample dependent (then a context-aware
  policy can do better than any context-free one). ``saturate=s`` replaces ``log(k)`` by
  ``log(min(k, s))``: a recogniser whose loss stops growing beyond ``s`` mixed faces.
* **Attacker (** :class:`ToyAttacker` **).** A stand-in for the online attacker's per-sample
  reconstruction error: ``error[k] + noise * N(0, 1)`` (default ``error = log k``: the dominant face
  of a larger mix is harder to recover, and keeps getting harder where the FR loss has saturated).
* **Utility.** The recogniser "remembers" the mix of k it was recently trained on:
  ``mix <- memory * mix + (1 - memory) * fraction_of_each_k_in_batch``, and the measured utility
  is ``u_max - sum_k mix_k * damage_k + utility_noise * N(0, 1)``. By default
  ``damage_k = 0.04 * (k - 1) ** 1.5`` (convex: 0.04, 0.11, 0.21, 0.32, 0.45 for k = 2..6), so
  utility at a pure k is 0.91, 0.84, 0.74, 0.63, 0.50 with ``u_max = 0.95``. As in the real game,
  the utility depends on the policy's *recent action mix*, not on the current sample.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..utils import HybridMaskInputError, make_generator
from .features import context_features
from .strategy import K_VALUES, validate_k_values


class ToyMaskingGame:
    def __init__(self, k_values: Sequence[int] = K_VALUES, base: float = 2.0, gain: float = 1.0,
                 hetero: float = 0.0, loss_noise: float = 0.3, damage: Optional[Sequence[float]] = None,
                 u_max: float = 0.95, utility_noise: float = 0.01, memory: float = 0.8,
                 channels: int = 16, grid: int = 4, seed=None, saturate: Optional[int] = None):
        self.k_values = validate_k_values(k_values, min_k=2)
        self.base, self.gain, self.hetero, self.loss_noise = float(base), float(gain), float(hetero), float(loss_noise)
        if damage is None:
            damage = [0.04 * (k - 1) ** 1.5 for k in self.k_values]
        if len(damage) != len(self.k_values):
            raise HybridMaskInputError(f"damage needs one number per k value {self.k_values}, got {len(damage)}")
        self.damage = torch.tensor([float(d) for d in damage], dtype=torch.float64)
        self.u_max, self.utility_noise = float(u_max), float(utility_noise)
        if not 0.0 <= memory < 1.0:
            raise HybridMaskInputError(f"memory must be in [0, 1), got {memory}")
        self.memory = float(memory)
        if saturate is not None and (isinstance(saturate, bool) or not isinstance(saturate, int) or saturate < 1):
            raise HybridMaskInputError(f"saturate must be None or an int >= 1, got {saturate!r}")
        self.saturate = saturate
        self.channels, self.grid = int(channels), int(grid)
        self.profile = torch.exp(-torch.arange(self.channels, dtype=torch.float64) / max(self.channels / 4, 1.0))
        self.generator = make_generator(seed)
        self.mix: Optional[torch.Tensor] = None
        self._h: Optional[torch.Tensor] = None

    def reseed(self, seed: int) -> None:
        self.generator = make_generator(int(seed))
        self.reset_episode()

    def reset_episode(self) -> None:
        """Forget the recogniser's training mix and the pending samples."""
        self.mix = None
        self._h = None

    # --- samples ------------------------------------------------------------------------------
    def sample_freq(self, batch: int) -> torch.Tensor:
        """Draw ``batch`` new samples; returns their masked frequency tensors ``(B, C, g, g)``
        (float32). The samples stay pending until :meth:`play`."""
        g = self.generator
        h = torch.randn(batch, generator=g, dtype=torch.float64)
        x = torch.randn(batch, self.channels, self.grid, self.grid, generator=g, dtype=torch.float64)
        x = x * self.profile.sqrt().view(1, -1, 1, 1) * torch.exp(h).view(-1, 1, 1, 1)
        self._h = h
        return x.float()

    def contexts(self, batch: int, running_loss: float = 0.0, progress: float = 0.0) -> torch.Tensor:
        """New samples and their context features ``(B, CONTEXT_DIM)``."""
        return context_features(self.sample_freq(batch), running_loss, progress)

    # --- the game -----------------------------------------------------------------------------
    def expected_loss(self, k: torch.Tensor, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        k = torch.as_tensor(k, dtype=torch.float64)
        if self.saturate is not None:
            k = k.clamp(max=float(self.saturate))
        h = torch.zeros_like(k) if h is None else h
        gain = self.gain * (1.0 + self.hetero * torch.tanh(h))
        return self.base + gain * torch.log(k) + 0.3 * h

    def expected_utility(self, mix: Sequence[float]) -> float:
        """Noise-free utility of a recogniser trained on the given mix (fractions per k)."""
        mix = torch.as_tensor(mix, dtype=torch.float64)
        return float(self.u_max - (mix * self.damage).sum())

    def play(self, k: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """The pending samples are mixed with ``k`` ``(B,)`` images each. Returns per-sample FR
        losses ``(B,)`` (float32) and one utility measurement (float)."""
        k = torch.as_tensor(k).long().cpu().reshape(-1)
        if self._h is None or self._h.numel() != k.numel():
            self.sample_freq(k.numel())  # no pending samples of that size: draw fresh ones
        idx = [self.k_values.index(int(v)) if int(v) in self.k_values else -1 for v in k]
        if min(idx) < 0:
            raise HybridMaskInputError(f"k must be in {self.k_values}, got {k.tolist()}")
        g = self.generator
        loss = self.expected_loss(k, self._h) + self.loss_noise * torch.randn(k.numel(), generator=g, dtype=torch.float64)
        frac = torch.bincount(torch.tensor(idx), minlength=len(self.k_values)).double() / k.numel()
        self.mix = frac if self.mix is None else self.memory * self.mix + (1.0 - self.memory) * frac
        u = self.expected_utility(self.mix) + self.utility_noise * float(torch.randn(1, generator=g, dtype=torch.float64))
        self._h = None
        return loss.clamp_min(0.0).float(), u

    def pure_utilities(self) -> dict:
        """Noise-free utility when every sample uses one k (the table in the module doc)."""
        return {k: self.u_max - float(d) for k, d in zip(self.k_values, self.damage)}



class ToyAttacker:
    """Stand-in for the online attacker: per-sample reconstruction error ``error[k] + noise * N(0, 1)``
    (``error``: one number per k value; default ``log k``). Higher error = more private."""

    def __init__(self, k_values: Sequence[int] = K_VALUES, error: Optional[Sequence[float]] = None,
                 noise: float = 0.1, seed=None):
        self.k_values = validate_k_values(k_values, min_k=2)
        if error is None:
            error = [math.log(k) for k in self.k_values]
        if len(error) != len(self.k_values):
            raise HybridMaskInputError(f"error needs one number per k value {self.k_values}, got {len(error)}")
        self.curve = torch.tensor([float(e) for e in error], dtype=torch.float64)
        self.noise = float(noise)
        self.generator = make_generator(seed)

    def error(self, k: torch.Tensor) -> torch.Tensor:
        """(B,) float32 errors for the k values ``k`` ``(B,)``."""
        k = torch.as_tensor(k).long().cpu().reshape(-1)
        bad = sorted({int(v) for v in k if int(v) not in self.k_values})
        if bad:
            raise HybridMaskInputError(f"k must be in {self.k_values}, got {bad}")
        idx = torch.tensor([self.k_values.index(int(v)) for v in k])
        e = self.curve[idx] + self.noise * torch.randn(k.numel(), generator=self.generator, dtype=torch.float64)
        return e.float()
