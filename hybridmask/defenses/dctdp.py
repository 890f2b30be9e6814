"""DCTDP-style baseline (after Ji et al., ECCV 2022, "Privacy-preserving face recognition with
learnable privacy budgets in frequency domain"): block DCT, DC dropped, Laplace noise whose
per-channel privacy budget is learned together with the recognizer.

Pipeline for faces ``x`` (B, 3, 112, 112) in [-1, 1]::

    f = BDCT_u(x)[:, kept]                      # (B, 189, g, g), g = 112*u/8, DC of each colour dropped
    released = f + loc + (sensitivity / eps) * L,  L ~ Laplace(0, 1) i.i.d.

* ``eps`` is one privacy budget per channel (``granularity="channel"``, 189 values) or per
  coefficient (``"element"``, 189*g*g values, what the DCTDP code does).
* Budget allocation (the total-budget constraint):
  - ``allocation="softmax"`` (DCTDP): ``eps = softmax(rho) * budget_mean * n``, so the budgets always
    sum to ``budget_mean * n`` (n = number of budgets) and learning only *moves* budget between
    channels;
  - ``allocation="free"``: ``eps = budget_mean * exp(rho)``; the total may drift and
    :meth:`privacy_loss` adds the penalty ``penalty_weight * relu(sum(eps) / total - 1)``;
    :meth:`project_` rescales the budgets onto the constraint (call it after an optimiser step for a
    hard constraint).
  Every budget is kept >= ``min_budget_fraction * budget_mean`` (default 1 %: softmax = that floor
  plus a softmax share of the rest, so the sum is unchanged; free = clamped): the privacy loss is
  unbounded below as one budget -> 0, which otherwise drives that channel's noise to infinity.
* The noise is reparameterised: ``L = -sign(U) * log(1 - 2|U|)`` with ``U ~ Uniform(-1/2, 1/2)`` drawn
  from the defense's own generator (``seed=None``: secure OS seed), so the recognizer's loss
  back-propagates into ``rho`` (and ``loc``) while the draws stay secret.
* :meth:`privacy_loss` = ``-log(mean(noise scale))`` (DCTDP's auxiliary loss: it rewards more noise;
  the recognizer's loss pulls the other way), plus the budget penalty for ``allocation="free"``.
  :class:`~hybridmask.train.AlternatingTrainer` trains ``rho`` and ``loc`` with the recognizer:
  it releases with gradients, adds ``privacy_weight * defense.privacy_loss()`` to the recognizer
  loss, steps them with its ``defense_optim`` (``hybridmask train``: Adam with ``defense.lr``, the
  recognizer's LR schedule) and calls :meth:`project_` after every step
  (``configs/celeba_dctdp.yaml``). Note on the uniform start: under the softmax allocation the
  uniform budget is a stationary point of :meth:`privacy_loss` (mean noise scale is smallest
  there, by the AM-HM inequality); the recognizer's gradient moves the budgets off it.

Sensitivity. ``sensitivity`` is a float in the units of hybridmask's coefficients (images in
[-1, 1]); the default ``1/127.5`` is one grey level, the DCTDP code's default (sensitivity 1 on
0..255 pixels) - a *nominal* value, not a worst-case bound. ``sensitivity="bound"`` uses the true
L1 range of each coefficient for values in [-1, 1]: ``2 * ||b_f||_1`` for the 8x8 DCT basis
function ``b_f`` of the channel's frequency (each YCbCr value lies in [-1, 1]); with it each
coefficient is ``eps``-differentially private w.r.t. any change of its block, and an image's
budget is the sum of its coefficients' budgets (``total_epsilon_per_image``).

The noise is applied to every release, training and query alike (k is always 1: no mixing).
Faces of another size than 112 work with ``granularity="channel"`` (the noise takes the shape of
the coefficients); ``"element"`` budgets are tied to the 112x112 grid.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ..freq import BlockDCT, Draw, split_channels
from ..freq.dct import block_basis
from ..utils import make_generator
from ..utils.rng import SeedLike
from ..utils.validate import HybridMaskInputError
from .base import Defense, Structure, register_defense

GRANULARITIES = ("channel", "element")
ALLOCATIONS = ("softmax", "free")


def laplace_noise(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Standard Laplace(0, 1) samples by inverse CDF from ``generator`` (CPU, float64 inside)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5  # [-0.5, 0.5)
    a = u.abs().clamp(max=0.5 - 1e-12)
    return (-torch.sign(u) * torch.log1p(-2.0 * a)).to(dtype)


def coefficient_l1_range(kept) -> torch.Tensor:
    """``2 * ||b_f||_1`` for each kept channel: the range of that DCT coefficient over blocks with
    values in [-1, 1]."""
    basis = block_basis(8, torch.float64)  # row f = basis function of frequency f
    l1 = basis.abs().sum(1)
    return torch.tensor([2.0 * float(l1[c % 64]) for c in kept], dtype=torch.float64)


@register_defense("dctdp")
class DCTDPDefense(Defense):
    """BDCT, DC dropped, Laplace noise with a learnable per-channel (or per-coefficient) budget.

    Args:
        u: BDCT upsampling factor (grid = 112*u/8: 14 for u=1, 112 for u=8 as in DCTDP).
        budget_mean: mean privacy budget per channel/coefficient (the total is ``budget_mean * n``).
        granularity: ``"channel"`` (one budget per kept channel) or ``"element"``.
        allocation: ``"softmax"`` (sum fixed) or ``"free"`` (penalty / projection).
        sensitivity: float (coefficient units; default one grey level) or ``"bound"``.
        learn_loc: learn a per-budget mean shift ``loc`` as DCTDP does (does not affect privacy).
        penalty_weight: weight of the over-budget penalty (``allocation="free"``).
        Trained budgets are learned state (:meth:`defense_state`), rebuilt by
        :func:`~hybridmask.defenses.io.load_defense` from a run; a new defense starts uniform, ``loc`` = 0.
        seed: seed/generator of the noise (None = secure OS seed).
    """
    name = "dctdp"
    input_kind = "freq"
    stochastic = True
    trainable = True
    state_keys = ("u", "budget_mean", "granularity", "allocation", "sensitivity", "learn_loc", "min_budget_fraction")

    def __init__(self, u: int = 1, budget_mean: float = 4.0, granularity: str = "channel",
                 allocation: str = "softmax", sensitivity: Union[float, str] = 1.0 / 127.5,
                 learn_loc: bool = True, penalty_weight: float = 1.0, min_budget_fraction: float = 0.01,
                 seed: SeedLike = None):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if not (isinstance(budget_mean, (int, float)) and math.isfinite(budget_mean) and budget_mean > 0):
            raise ValueError(f"budget_mean must be a positive number, got {budget_mean!r}")
        if not (isinstance(min_budget_fraction, (int, float)) and 0 <= min_budget_fraction < 1):
            raise ValueError(f"min_budget_fraction must be in [0, 1), got {min_budget_fraction!r}")
        if isinstance(sensitivity, str):
            if sensitivity != "bound":
                raise ValueError(f"sensitivity must be a positive number or 'bound', got {sensitivity!r}")
        elif not (isinstance(sensitivity, (int, float)) and math.isfinite(sensitivity) and sensitivity > 0):
            raise ValueError(f"sensitivity must be a positive number or 'bound', got {sensitivity!r}")
        super().__init__(u=u, budget_mean=float(budget_mean), granularity=granularity, allocation=allocation,
                         sensitivity=sensitivity if isinstance(sensitivity, str) else float(sensitivity),
                         learn_loc=bool(learn_loc), penalty_weight=float(penalty_weight),
                         min_budget_fraction=float(min_budget_fraction))
        self.bdct = BlockDCT(u)
        _, kept = split_channels("dc")
        self.register_buffer("kept_index", torch.tensor(kept, dtype=torch.long), persistent=False)
        self.kept = list(kept)
        g = self.bdct.grid(112)
        self._grid = g
        shape = (len(kept), 1, 1) if granularity == "channel" else (len(kept), g, g)
        self.budget_shape = shape
        self.budget_mean = float(budget_mean)
        self.granularity, self.allocation = granularity, allocation
        self.penalty_weight = float(penalty_weight)
        # floor on every budget: privacy_loss (-log mean noise scale) is unbounded below as any single
        # budget -> 0, so without a floor the optimiser drives one channel's budget to underflow and its
        # noise to inf (a 400-step CelebA run hit NaN at step 204)
        self.min_budget = float(min_budget_fraction) * float(budget_mean)
        self.rho = nn.Parameter(torch.zeros(shape))
        self.loc = nn.Parameter(torch.zeros(shape), requires_grad=bool(learn_loc))
        if sensitivity == "bound":
            sens = coefficient_l1_range(kept).float().view(-1, 1, 1).expand(shape).clone()
        else:
            sens = torch.full(shape, float(sensitivity))
        self.register_buffer("sensitivity", sens)
        self.generator = make_generator(seed)

    def structure(self):
        return Structure(transform="bdct", bdct=self.bdct, kept=tuple(self.kept), noise="laplace")

    # ---- learned state -----------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in (self.rho, self.loc) if p.requires_grad]

    def defense_state(self):
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_defense_state(self, state) -> None:
        if not state:
            return
        if not isinstance(state, dict) or "rho" not in state:
            raise ValueError("holds no trained dctdp budgets (no 'rho' in the defense state)")
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"the trained dctdp state {k!r} holds NaN or infinite values")
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"the trained budgets do not fit this dctdp defense "
                             f"({str(e).strip().splitlines()[0]})") from e

    # ---- shape -----------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return len(self.kept)

    def grid_for(self, size: int) -> int:
        return self.bdct.grid(size)

    @property
    def num_budgets(self) -> int:
        return int(self.rho.numel())

    @property
    def total_budget(self) -> float:
        """The budget constraint: ``budget_mean * number of budgets``."""
        return self.budget_mean * self.num_budgets

    # ---- budgets ---------------------------------------------------------------------------
    def epsilon(self) -> torch.Tensor:
        """Per-channel (C,1,1) or per-coefficient (C,g,g) budgets, differentiable in ``rho``."""
        if self.allocation == "softmax":
            w = torch.softmax(self.rho.reshape(-1), 0).reshape(self.budget_shape)
            # floor + a softmax share of the rest: the sum stays exactly the total budget
            return self.min_budget + w * (self.total_budget - self.min_budget * self.num_budgets)
        return (self.budget_mean * torch.exp(self.rho)).clamp_min(self.min_budget)

    def noise_scale(self) -> torch.Tensor:
        """Laplace scale ``b = sensitivity / eps`` (std = sqrt(2) * b)."""
        return self.sensitivity / self.epsilon()

    def total_epsilon_per_image(self) -> float:
        """Sum of the budgets of all coefficients of one released image (basic composition)."""
        eps = self.epsilon().detach()
        per_coeff = eps.expand(len(self.kept), self._grid, self._grid)
        return float(per_coeff.sum())

    def privacy_loss(self) -> torch.Tensor:
        """``-log(mean noise scale)`` (+ over-budget penalty for ``allocation="free"``)."""
        loss = -torch.log(self.noise_scale().mean())
        if self.allocation == "free":
            loss = loss + self.penalty_weight * torch.relu(self.epsilon().sum() / self.total_budget - 1.0)
        return loss

    @torch.no_grad()
    def train_stats(self) -> dict:
        """Plain numbers for training logs: budget range, mean noise scale, budget of one image."""
        eps = self.epsilon()
        return {"eps_min": float(eps.min()), "eps_max": float(eps.max()),
                "eps_sum_over_total": float(eps.sum()) / self.total_budget,
                "noise_scale_mean": float(self.noise_scale().mean()),
                "epsilon_per_image": self.total_epsilon_per_image()}

    @torch.no_grad()
    def project_(self) -> None:
        """Hard constraint for ``allocation="free"``: rescale so that sum(eps) <= total budget."""
        if self.allocation != "free":
            return
        s = float(self.epsilon().sum())
        if s > self.total_budget:
            self.rho.sub_(math.log(s / self.total_budget))

    # ---- release ---------------------------------------------------------------------------
    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """Noise-free BDCT with DC dropped: (B, 189, g, g)."""
        return self.bdct(images).index_select(1, self.kept_index.to(images.device))

    def draw_noise(self, batch: int, dtype=torch.float32, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Standard Laplace draws (B, 189, h, w) from the secret generator (``size=(h, w)``; default
        the grid of a 112x112 face)."""
        h, w = (self._grid, self._grid) if size is None else (int(size[0]), int(size[1]))
        return laplace_noise((batch, len(self.kept), h, w), self.generator, dtype)

    def draw(self, images: torch.Tensor, k=None) -> Draw:
        """Standard Laplace draws for every released coefficient (scaled by the budgets in :meth:`apply`)."""
        self._check_k(k)
        if self.granularity == "element" and tuple(images.shape[-2:]) != (112, 112):
            raise HybridMaskInputError(f"dctdp with granularity='element' has one budget per coefficient of a "
                                       f"112x112 face; got {images.shape[-2]}x{images.shape[-1]} faces "
                                       f"(use granularity='channel' for other sizes)")
        g = self.bdct.grid(images.shape[-1])
        return Draw(noise=self.draw_noise(images.shape[0], images.dtype, size=(self.bdct.grid(images.shape[-2]), g)))

    def apply(self, images: torch.Tensor, draw: Draw):
        f = self.coefficients(images)
        lap = draw.noise.to(f.device, f.dtype)
        return f + self.loc.to(f.dtype) + self.noise_scale().to(f.dtype) * lap, None

    def as_image(self, released: torch.Tensor) -> torch.Tensor:
        if released.dim() != 4 or released.shape[1] != len(self.kept):
            raise HybridMaskInputError(f"expected (B, {len(self.kept)}, h, w), got {tuple(released.shape)}")
        return self.bdct.inverse(released, kept=self.kept, size=(112, 112)).clamp(-1, 1)

    def extra_repr(self) -> str:
        return (f"u={self.bdct.u}, grid={self._grid}, budgets={self.num_budgets} ({self.granularity}), "
                f"allocation={self.allocation}, budget_mean={self.budget_mean}")
