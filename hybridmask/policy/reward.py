r"""The policy's reward: privacy (FR loss) under an explicit utility constraint.

Rewarding the FR loss alone makes the largest k optimal (DESIGN 1.1 step 5), so
:class:`LagrangianReward` charges each sample for its own action,
``R_i = P_i - mu * c(k_i)``: ``P`` is the FR loss normalised with running statistics
(global, or per k with the between-k benefit kept), ``c`` a cost vector (``"linear"``,
``"log"`` or numbers per k, :meth:`LagrangianReward.set_costs`) and ``mu >= 0`` a multiplier
driven by the deficit ``U_target - U`` of a running k=1 held-out utility (PI-damped dual ascent,
:meth:`LagrangianReward.update_multiplier`). With ``constraint=False`` the cost term is dropped. Everything the
reward depends on is in :meth:`LagrangianReward.state_dict` (exact resume).

Attacker in the loop: with ``attacker_weight = a > 0`` the privacy term is
``(1 - a) * P_i + a * A_i``, ``A_i`` the attacker's per-sample reconstruction error (``attack_error``,
e.g. from :class:`~hybridmask.policy.attacker.DecoderAttacker`) as a running global z-score. ``a = 0``
(the default) gives the FR-loss reward bit for bit. The attacker object, when given, is checkpointed
with the reward.

Why this cannot collapse while the constraint binds, the credit-assignment argument, the
normalisation of ``P`` and tuning rules for the multiplier: ``docs/policy.md``
("The reward in detail").
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from ..utils import HybridMaskInputError
from .strategy import K_VALUES, validate_k_values


def _finite_float(v, name: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise HybridMaskInputError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise HybridMaskInputError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise HybridMaskInputError(f"{name} must be finite, got {v}")
    return v


def _mix(mean: float, var: float, bmean: float, bvar: float, w: float):
    """Mixture (1-w)*old + w*batch of two distributions: mean and variance."""
    d = bmean - mean
    return mean + w * d, (1.0 - w) * var + w * bvar + w * (1.0 - w) * d * d


class LagrangianReward:
    """Per-sample reward ``R_i = P_i - mu * c(k_i)`` with dual ascent on ``mu`` (see module doc).

    Args:
        k_values: the policy's k values.
        utility_target: ``U_target`` (same units as the utility passed to
            :meth:`update_multiplier`, e.g. verification accuracy in ``[0, 1]``).
        mu_init: initial multiplier (>= 0).
        mu_lr: dual ascent step (integral gain).
        mu_kp: proportional gain (0 = pure dual ascent, the DESIGN formula; the default 10 damps
            the oscillation, see module doc).
        per_k_norm: per-k normalisation of the within-k loss spread (module doc).
        constraint: ``False`` drops the utility term entirely (pure FR-loss reward).
        cost: ``"linear"``, ``"log"`` or a sequence of ``len(k_values)`` non-negative numbers.
        momentum: per-sample EMA momentum of the running loss statistics.
        mu_max: upper bound of ``mu`` (keeps an infeasible target from blowing it up).
        clip: the privacy term is clipped to ``[-clip, clip]``.
        attacker: an online attacker (:class:`~hybridmask.policy.attacker.DecoderAttacker`) the trainer trains
            and asks for ``attack_error``; the reward only stores it (its state is in :meth:`state_dict`).
        attacker_weight: ``a`` in ``[0, 1]``: the weight of the attacker term in the privacy term.
    """

    def __init__(self, k_values: Sequence[int] = K_VALUES, utility_target: float = 0.9, mu_init: float = 0.0,
                 mu_lr: float = 0.5, per_k_norm: bool = True, constraint: bool = True,
                 cost: Union[str, Sequence[float]] = "linear", momentum: float = 0.99, mu_max: float = 1e3,
                 clip: float = 5.0, mu_kp: float = 10.0, attacker=None, attacker_weight: float = 0.0):
        self.k_values = validate_k_values(k_values)
        self.utility_target = _finite_float(utility_target, "utility_target")
        self.mu = _finite_float(mu_init, "mu_init")
        self.mu_lr = _finite_float(mu_lr, "mu_lr")
        self.mu_max = _finite_float(mu_max, "mu_max")
        self.mu_kp = _finite_float(mu_kp, "mu_kp")
        self.mu_int = self.mu
        self.momentum = _finite_float(momentum, "momentum")
        self.clip = _finite_float(clip, "clip")
        if self.mu < 0 or self.mu_lr < 0 or self.mu_max < self.mu or self.mu_kp < 0:
            raise HybridMaskInputError(f"need 0 <= mu_init <= mu_max, mu_lr >= 0 and mu_kp >= 0, got mu_init={self.mu}, "
                                       f"mu_max={self.mu_max}, mu_lr={self.mu_lr}, mu_kp={self.mu_kp}")
        if not 0.0 <= self.momentum < 1.0:
            raise HybridMaskInputError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.clip <= 0:
            raise HybridMaskInputError(f"clip must be > 0, got {self.clip}")
        self.attacker = attacker
        self.attacker_weight = _finite_float(attacker_weight, "attacker_weight")
        if not 0.0 <= self.attacker_weight <= 1.0:
            raise HybridMaskInputError(f"attacker_weight must be in [0, 1], got {self.attacker_weight}")
        self.per_k_norm = bool(per_k_norm)
        self.constraint = bool(constraint)
        self.cost_spec = cost if isinstance(cost, str) else "explicit"
        self.costs = self._make_costs(cost)
        K = len(self.k_values)
        self._index = {k: i for i, k in enumerate(self.k_values)}
        # running FR-loss statistics: global and per k
        self.g_mean, self.g_var, self.g_count = 0.0, 0.0, 0
        self.k_mean, self.k_var, self.k_count = [0.0] * K, [0.0] * K, [0] * K
        # running statistics of the attacker's reconstruction error (global)
        self.a_mean, self.a_var, self.a_count = 0.0, 0.0, 0
        # counts for logging: last batch, since the last multiplier update
        self.last_counts, self.window_counts = [0] * K, [0] * K
        self.utility_last: Optional[float] = None
        self.utility_ema: Optional[float] = None
        self.multiplier_updates = 0
        self._last = {"reward_mean": float("nan"), "privacy_mean": float("nan"), "cost_mean": float("nan")}
        self._last_attack = {"attack_error_mean": float("nan"), "attack_term_mean": float("nan"),
                             "fr_privacy_mean": float("nan")}

    # --- costs ----------------------------------------------------------------------------------
    def _make_costs(self, cost) -> tuple:
        kmax = max(self.k_values)
        if isinstance(cost, str) and kmax == 1:   # k_values (1,): one action, nothing to charge
            return (0.0,)
        if isinstance(cost, str):
            if cost == "linear":
                return tuple((k - 1) / (kmax - 1) for k in self.k_values)
            if cost == "log":
                return tuple(math.log(k) / math.log(kmax) for k in self.k_values)
            raise HybridMaskInputError(f"unknown cost {cost!r}; use 'linear', 'log' or one number per k value")
        if isinstance(cost, Mapping):
            missing = [k for k in self.k_values if k not in cost]
            if missing:
                raise HybridMaskInputError(f"cost mapping lacks k values {missing}")
            cost = [cost[k] for k in self.k_values]
        vals = [_finite_float(c, "cost") for c in cost]
        if len(vals) != len(self.k_values):
            raise HybridMaskInputError(f"cost needs {len(self.k_values)} numbers (one per k in {self.k_values}), "
                                       f"got {len(vals)}")
        if any(c < 0 for c in vals):
            raise HybridMaskInputError(f"costs must be >= 0, got {vals}")
        return tuple(vals)

    def set_costs(self, cost: Union[str, Sequence[float], Mapping[int, float]]) -> None:
        """Replace the per-k utility cost ``c(k)`` (e.g. with a measured accuracy drop per k)."""
        self.costs = self._make_costs(cost)
        self.cost_spec = cost if isinstance(cost, str) else "explicit"

    # --- reward ---------------------------------------------------------------------------------
    def _check(self, fr_loss, k):
        if not isinstance(fr_loss, torch.Tensor) or not torch.is_floating_point(fr_loss):
            raise HybridMaskInputError("fr_loss must be a floating-point torch.Tensor of shape (B,)")
        if fr_loss.dim() != 1 or fr_loss.shape[0] < 1:
            raise HybridMaskInputError(f"fr_loss must have shape (B,), got {tuple(fr_loss.shape)}")
        if not torch.isfinite(fr_loss).all():
            raise HybridMaskInputError("fr_loss contains NaN or infinite values")
        k = torch.as_tensor(k)
        if torch.is_floating_point(k) or k.dtype == torch.bool:
            raise HybridMaskInputError(f"k must be an integer tensor of k values, got dtype {k.dtype}")
        if k.dim() == 0:
            k = k.expand(fr_loss.shape[0])
        if k.shape != fr_loss.shape:
            raise HybridMaskInputError(f"k must have shape {tuple(fr_loss.shape)} (one k per sample), got {tuple(k.shape)}")
        ks = k.detach().cpu().long().tolist()
        bad = sorted({v for v in ks if v not in self._index})
        if bad:
            raise HybridMaskInputError(f"k values {bad} are not in k_values {self.k_values}")
        return [self._index[v] for v in ks]

    def _check_attack(self, attack_error, n: int) -> Optional[torch.Tensor]:
        if attack_error is None:
            if self.attacker_weight > 0:
                raise HybridMaskInputError(f"attacker_weight={self.attacker_weight} > 0 needs the attacker's per-sample "
                                           f"errors: pass attack_error=(B,) tensor")
            return None
        if not isinstance(attack_error, torch.Tensor) or not torch.is_floating_point(attack_error):
            raise HybridMaskInputError("attack_error must be a floating-point torch.Tensor of shape (B,)")
        if attack_error.shape != (n,):
            raise HybridMaskInputError(f"attack_error must have shape ({n},) (one error per sample), "
                                       f"got {tuple(attack_error.shape)}")
        if not torch.isfinite(attack_error).all():
            raise HybridMaskInputError("attack_error contains NaN or infinite values")
        return attack_error.detach().double().cpu()

    def _observe_attack(self, err: torch.Tensor) -> None:
        n = err.numel()
        self.a_count += n
        w = max(1.0 - self.momentum ** n, n / self.a_count)
        self.a_mean, self.a_var = _mix(self.a_mean, self.a_var, err.mean().item(), err.var(unbiased=False).item(), w)

    def _attack_term(self, err: torch.Tensor) -> torch.Tensor:
        """Running global z-score of the attacker's error (high error = private), clipped."""
        floor = 1e-8 * (1.0 + abs(self.a_mean))
        s = max(math.sqrt(max(self.a_var, 0.0)), floor)
        return ((err - self.a_mean) / s).clamp(-self.clip, self.clip)

    def _observe(self, loss: torch.Tensor, idx: list) -> None:
        m = self.momentum
        n = loss.numel()
        self.g_count += n
        w = max(1.0 - m ** n, n / self.g_count)
        self.g_mean, self.g_var = _mix(self.g_mean, self.g_var, loss.mean().item(),
                                       loss.var(unbiased=False).item(), w)
        idx_t = torch.tensor(idx)
        counts = [0] * len(self.k_values)
        for a in range(len(self.k_values)):
            sel = loss[idx_t == a]
            nk = sel.numel()
            counts[a] = nk
            if nk == 0:
                continue
            self.k_count[a] += nk
            wk = max(1.0 - m ** nk, nk / self.k_count[a])
            self.k_mean[a], self.k_var[a] = _mix(self.k_mean[a], self.k_var[a], sel.mean().item(),
                                                 sel.var(unbiased=False).item(), wk)
        self.last_counts = counts
        self.window_counts = [a + b for a, b in zip(self.window_counts, counts)]

    def privacy(self, fr_loss: torch.Tensor, k, attack_error: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised privacy term under the current running statistics (no update): ``P``, or
        ``(1 - a) * P + a * A`` with ``attack_error`` and ``attacker_weight = a > 0``."""
        idx = self._check(fr_loss, k)
        err = self._check_attack(attack_error, fr_loss.shape[0])
        p = self._privacy(fr_loss.detach().double().cpu(), idx)
        if err is not None and self.attacker_weight > 0:
            a = self.attacker_weight
            p = (1.0 - a) * p + a * self._attack_term(err)
        return p.to(fr_loss.device, fr_loss.dtype)

    def _privacy(self, loss: torch.Tensor, idx: list) -> torch.Tensor:
        floor = 1e-8 * (1.0 + abs(self.g_mean))
        s_g = max(math.sqrt(max(self.g_var, 0.0)), floor)
        if not self.per_k_norm:
            p = (loss - self.g_mean) / s_g
        else:
            idx_t = torch.tensor(idx)
            mk = torch.tensor(self.k_mean, dtype=torch.float64)[idx_t]
            sk = torch.tensor([math.sqrt(max(v, 0.0)) if c >= 2 else s_g for v, c in zip(self.k_var, self.k_count)],
                              dtype=torch.float64).clamp_min(floor)[idx_t]
            p = (mk - self.g_mean) / s_g + (loss - mk) / sk
        return p.clamp(-self.clip, self.clip)

    def __call__(self, fr_loss: torch.Tensor, k, update: bool = True,
                 attack_error: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample rewards ``(B,)`` for per-sample FR losses ``fr_loss`` ``(B,)`` and the k
        values ``k`` ``(B,)`` (or one int/scalar for the whole batch) the samples were mixed with.
        ``attack_error`` ``(B,)``: the attacker's per-sample reconstruction error (required when
        ``attacker_weight > 0``; with weight 0 it is only tracked for logging).
        ``update=True`` first folds the batch into the running statistics. The result has
        ``fr_loss``'s dtype and device and no gradient."""
        idx = self._check(fr_loss, k)
        err = self._check_attack(attack_error, fr_loss.shape[0])
        loss = fr_loss.detach().double().cpu()
        if update:
            self._observe(loss, idx)
            if err is not None:
                self._observe_attack(err)
        p = self._privacy(loss, idx)
        if err is not None:
            z = self._attack_term(err)
            self._last_attack = {"attack_error_mean": float(err.mean()), "attack_term_mean": float(z.mean()),
                                 "fr_privacy_mean": float(p.mean())}
            if self.attacker_weight > 0:
                a = self.attacker_weight
                p = (1.0 - a) * p + a * z
        c = torch.tensor(self.costs, dtype=torch.float64)[torch.tensor(idx)]
        r = p - self.mu * c if self.constraint else p
        self._last = {"reward_mean": float(r.mean()), "privacy_mean": float(p.mean()), "cost_mean": float(c.mean())}
        return r.to(fr_loss.device, fr_loss.dtype)

    compute = __call__

    # --- dual ascent ----------------------------------------------------------------------------
    def update_multiplier(self, utility: float) -> float:
        """Dual ascent step with a new utility measurement ``U``; returns the new ``mu``.
        With ``constraint=False`` the measurement is only logged and ``mu`` stays unchanged."""
        u = _finite_float(utility, "utility")
        self.utility_last = u
        self.utility_ema = u if self.utility_ema is None else 0.9 * self.utility_ema + 0.1 * u
        if self.constraint:
            e = self.utility_target - u
            self.mu_int = min(max(0.0, self.mu_int + self.mu_lr * e), self.mu_max)
            self.mu = min(max(0.0, self.mu_int + self.mu_kp * e), self.mu_max)
        self.multiplier_updates += 1
        self.window_counts = [0] * len(self.k_values)
        return self.mu

    # --- logging --------------------------------------------------------------------------------
    def histogram(self) -> Dict[int, int]:
        """Cumulative number of samples per k value (the k histogram to log)."""
        return {k: c for k, c in zip(self.k_values, self.k_count)}

    def stats(self) -> Dict[str, float]:
        """Flat dict of floats for a logger: ``mu``, last-batch ``reward_mean``/``privacy_mean``/
        ``cost_mean``, ``utility``/``utility_ema``/``violation``/``penalty`` (NaN before the first
        measurement), the attacker's last-batch ``attack_error_mean``, ``attack_term_mean`` and the
        FR-loss part ``fr_privacy_mean`` (NaN without attack errors), and per k: ``count_k{k}`` (cumulative), ``frac_k{k}`` (last batch),
        ``loss_mean_k{k}`` (running mean FR loss)."""
        nan = float("nan")
        u = self.utility_last
        out = {"mu": self.mu, **self._last, **self._last_attack, "attacker_weight": self.attacker_weight,
               "utility": nan if u is None else u,
               "utility_ema": nan if self.utility_ema is None else self.utility_ema,
               "violation": nan if u is None else self.utility_target - u,
               "penalty": nan if u is None else self.mu * max(0.0, self.utility_target - u),
               "loss_mean": self.g_mean if self.g_count else nan}
        nlast = max(sum(self.last_counts), 1)
        for k, c, lc, m in zip(self.k_values, self.k_count, self.last_counts, self.k_mean):
            out[f"count_k{k}"] = float(c)
            out[f"frac_k{k}"] = lc / nlast
            out[f"loss_mean_k{k}"] = m if c else nan
        return out

    # --- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "k_values": list(self.k_values), "utility_target": self.utility_target, "mu": self.mu,
            "mu_int": self.mu_int, "mu_kp": self.mu_kp,
            "mu_lr": self.mu_lr, "mu_max": self.mu_max, "momentum": self.momentum, "clip": self.clip,
            "per_k_norm": self.per_k_norm, "constraint": self.constraint,
            "costs": list(self.costs), "cost_spec": self.cost_spec,
            "g": [self.g_mean, self.g_var, self.g_count],
            "k_mean": list(self.k_mean), "k_var": list(self.k_var), "k_count": list(self.k_count),
            "last_counts": list(self.last_counts), "window_counts": list(self.window_counts),
            "utility_last": self.utility_last, "utility_ema": self.utility_ema,
            "multiplier_updates": self.multiplier_updates, "last": dict(self._last),
            "attacker_weight": self.attacker_weight, "a": [self.a_mean, self.a_var, self.a_count],
            "last_attack": {k: None if v != v else v for k, v in self._last_attack.items()},   # NaN -> None
            "attacker": None if self.attacker is None else self.attacker.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            if tuple(int(k) for k in state["k_values"]) != self.k_values:
                raise HybridMaskInputError(f"checkpoint k_values {state['k_values']} differ from {self.k_values}")
            self.utility_target = float(state["utility_target"])
            self.mu, self.mu_lr, self.mu_max = float(state["mu"]), float(state["mu_lr"]), float(state["mu_max"])
            self.mu_int, self.mu_kp = float(state["mu_int"]), float(state["mu_kp"])
            self.momentum, self.clip = float(state["momentum"]), float(state["clip"])
            self.per_k_norm, self.constraint = bool(state["per_k_norm"]), bool(state["constraint"])
            self.costs, self.cost_spec = tuple(float(c) for c in state["costs"]), state["cost_spec"]
            self.g_mean, self.g_var, self.g_count = float(state["g"][0]), float(state["g"][1]), int(state["g"][2])
            self.k_mean = [float(v) for v in state["k_mean"]]
            self.k_var = [float(v) for v in state["k_var"]]
            self.k_count = [int(v) for v in state["k_count"]]
            self.last_counts = [int(v) for v in state["last_counts"]]
            self.window_counts = [int(v) for v in state["window_counts"]]
            self.utility_last = None if state["utility_last"] is None else float(state["utility_last"])
            self.utility_ema = None if state["utility_ema"] is None else float(state["utility_ema"])
            self.multiplier_updates = int(state["multiplier_updates"])
            self._last = {k: float(v) for k, v in state["last"].items()}
            # the attacker in the loop (absent from states written before it existed: weight 0, no attacker)
            self.attacker_weight = float(state.get("attacker_weight", 0.0))
            a = state.get("a", [0.0, 0.0, 0])
            self.a_mean, self.a_var, self.a_count = float(a[0]), float(a[1]), int(a[2])
            if "last_attack" in state:
                self._last_attack = {k: float("nan") if v is None else float(v) for k, v in state["last_attack"].items()}
            att = state.get("attacker")
            if (att is None) != (self.attacker is None):
                raise HybridMaskInputError(
                    f"checkpoint and reward disagree on the attacker: the checkpoint {'has' if att is not None else 'has no'} "
                    f"attacker state, this reward {'has' if self.attacker is not None else 'has no'} attacker")
            if att is not None:
                self.attacker.load_state_dict(att)
        except (KeyError, TypeError, IndexError) as e:
            raise HybridMaskInputError(f"not a LagrangianReward state dict: missing or bad entry {e}") from e
