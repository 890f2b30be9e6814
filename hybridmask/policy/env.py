"""Gymnasium adapter: one masking decision per step.

``MaskingEnv`` exposes the masking game to any Gymnasium-compatible RL code:

* observation: the context vector of the next sample, ``Box(-FEATURE_CLIP, FEATURE_CLIP,
  (CONTEXT_DIM,), float32)`` (see :func:`~hybridmask.policy.context_features`);
* action: ``Discrete(len(k_values))``, action ``a`` mixes the sample with ``k_values[a]`` images;
* reward: the shaped reward of :class:`~hybridmask.policy.LagrangianReward` for that decision;
  the multiplier ``mu`` is updated by dual ascent with the step's utility every
  ``multiplier_every`` steps;
* episode: ``episode_length`` decisions (then ``terminated=True``).

The outcome of a decision comes from ``reward_fn(k) -> (fr_loss, utility)`` if given (e.g. a
closure around a real recogniser), else from the built-in :class:`~hybridmask.policy.ToyMaskingGame`
(FR loss grows with k, utility drops with the recent mix of k), so the env runs standalone. The
sample whose context is observed comes from ``freq_fn(np_random) -> (1, C, h, w)`` masked
frequency tensor if given, else from the toy game.

Seeding: ``reset(seed=s)`` restarts the whole experiment (toy game, reward statistics and ``mu``
return to their initial state, all randomness re-derived from ``s``), so it is deterministic.
``reset()`` without a seed starts a new episode (the recogniser's mix memory and the running
loss restart) but keeps the reward's running statistics and ``mu``, which keep adapting across
episodes as they would during training.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ..utils import HybridMaskInputError
from .features import CONTEXT_DIM, FEATURE_CLIP, context_features
from .reward import LagrangianReward
from .strategy import K_VALUES, validate_k_values
from .toy import ToyMaskingGame


class MaskingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, k_values: Sequence[int] = K_VALUES, episode_length: int = 32,
                 reward_fn: Optional[Callable[[int], Tuple[float, float]]] = None,
                 freq_fn: Optional[Callable[[np.random.Generator], torch.Tensor]] = None,
                 reward: Optional[LagrangianReward] = None, utility_target: float = 0.75,
                 multiplier_every: int = 1, game: Optional[ToyMaskingGame] = None):
        super().__init__()
        self.k_values = validate_k_values(k_values, min_k=2)
        for name, v in (("episode_length", episode_length), ("multiplier_every", multiplier_every)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise HybridMaskInputError(f"{name} must be a positive int, got {v!r}")
        if reward_fn is not None and not callable(reward_fn):
            raise HybridMaskInputError("reward_fn must be callable: reward_fn(k) -> (fr_loss, utility)")
        if freq_fn is not None and not callable(freq_fn):
            raise HybridMaskInputError("freq_fn must be callable: freq_fn(np_random) -> (1, C, h, w) tensor")
        self.episode_length = int(episode_length)
        self.multiplier_every = int(multiplier_every)
        self.reward_fn = reward_fn
        self.freq_fn = freq_fn
        self.reward = reward if reward is not None else LagrangianReward(self.k_values, utility_target=utility_target)
        if tuple(self.reward.k_values) != self.k_values:
            raise HybridMaskInputError(f"reward k_values {self.reward.k_values} differ from env k_values {self.k_values}")
        self._reward_init = copy.deepcopy(self.reward.state_dict())
        # one decision per step: a long training-mix memory so the utility reflects recent policy
        self.game = game if game is not None else ToyMaskingGame(self.k_values, memory=0.95, seed=0)
        self.observation_space = spaces.Box(-FEATURE_CLIP, FEATURE_CLIP, shape=(CONTEXT_DIM,), dtype=np.float32)
        self.action_space = spaces.Discrete(len(self.k_values))
        self._t = 0
        self._steps = 0
        self._running_loss = 0.0
        self._obs: Optional[np.ndarray] = None

    # ------------------------------------------------------------------------------------------
    def _observe(self) -> np.ndarray:
        if self.freq_fn is not None:
            x = self.freq_fn(self.np_random)
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.asarray(x))
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[0] != 1:
                raise HybridMaskInputError(f"freq_fn must return one sample (1, C, h, w), got {tuple(x.shape)}")
        else:
            x = self.game.sample_freq(1)
        ctx = context_features(x, self._running_loss, min(self._t / self.episode_length, 1.0))
        return ctx[0].detach().cpu().numpy().astype(np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if seed is not None:
            self.reward.load_state_dict(copy.deepcopy(self._reward_init))
            self._steps = 0
        self.game.reseed(int(self.np_random.integers(0, 2**62)))
        self._t = 0
        self._running_loss = 0.0
        self._obs = self._observe()
        return self._obs.copy(), {}

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if isinstance(action, bool) or not isinstance(action, (numbers.Integral, np.integer)) \
                or not self.action_space.contains(int(action)):
            raise HybridMaskInputError(f"action must be an int in [0, {len(self.k_values)}), got {action!r}")
        a = int(action)
        k = self.k_values[a]
        if self.reward_fn is not None:
            out = self.reward_fn(k)
            try:
                fr_loss, utility = (float(v) for v in out)
            except (TypeError, ValueError) as e:
                raise HybridMaskInputError(f"reward_fn(k) must return (fr_loss, utility) numbers, got {out!r}") from e
            if not (math.isfinite(fr_loss) and math.isfinite(utility)):
                raise HybridMaskInputError(f"reward_fn({k}) returned non-finite values ({fr_loss}, {utility})")
        else:
            loss_t, utility = self.game.play(torch.tensor([k]))
            fr_loss = float(loss_t[0])
        r = float(self.reward(torch.tensor([fr_loss], dtype=torch.float64), k)[0])
        self._steps += 1
        self._t += 1
        if self._steps % self.multiplier_every == 0:
            self.reward.update_multiplier(utility)
        self._running_loss = fr_loss if self._t == 1 else 0.9 * self._running_loss + 0.1 * fr_loss
        terminated = self._t >= self.episode_length
        self._obs = self._observe()
        info = {"k": k, "fr_loss": fr_loss, "utility": float(utility), "mu": float(self.reward.mu)}
        return self._obs.copy(), r, terminated, False, info
