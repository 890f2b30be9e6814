"""Adaptive masking policy: context features, strategy network, REINFORCE, the constrained
(Lagrangian) reward that prevents collapse to k=6, a synthetic game and a Gymnasium adapter.

Typical use inside an alternating trainer (per batch; the decision is taken before mixing)::

    enc = hm.encode(faces)                                         # BDCT + PPFR-FD, k=1: (B, C, h, w)
    ctx = context_features(enc, running_loss, progress)            # (B, CONTEXT_DIM)
    k, a, logp = policy.act(ctx)                                   # k in K_VALUES per sample
    masked, record = hm(faces, k=k)                                # MixUp with per-sample k
    ... train the recogniser on masked, get per-sample FR losses fr (B,) ...
    r = reward(fr.detach(), k)                                     # LagrangianReward, (B,)
    rl.update(logp, r, entropy=policy.dist(ctx).entropy())         # Reinforce
    (attacker in the loop: r = reward(fr, k, attack_error=attacker.step(masked, dominant_faces(faces, record))))
    every evaluation: reward.update_multiplier(U)                  # dual ascent on mu (U: k=1 accuracy)
    log reward.stats() / reward.histogram()                        # mu, utility, the k histogram

Per-batch k (instead of per sample): ``policy.act(ctx.mean(0, keepdim=True))`` and broadcast.
"""
from .features import CONTEXT_DIM, FEATURE_NAMES, FEATURE_CLIP, context_dim, context_features
from .strategy import (K_VALUES, POLICIES, FixedKPolicy, MaskingPolicy, StrategyNet, UniformPolicy,
                       create_policy, validate_k_values)
from .reinforce import Reinforce
from .reward import LagrangianReward
from .toy import ToyAttacker, ToyMaskingGame
from .attacker import ATTACKERS, DecoderAttacker, create_attacker, dominant_faces

__all__ = [
    "CONTEXT_DIM", "FEATURE_NAMES", "FEATURE_CLIP", "context_dim", "context_features",
    "K_VALUES", "POLICIES", "MaskingPolicy", "StrategyNet", "FixedKPolicy", "UniformPolicy",
    "create_policy", "validate_k_values", "Reinforce", "LagrangianReward", "ToyMaskingGame",
    "ToyAttacker", "ATTACKERS", "DecoderAttacker", "create_attacker", "dominant_faces",
    "MaskingEnv",
]


def __getattr__(name):  # gymnasium is imported only when the env is used
    if name == "MaskingEnv":
        from .env import MaskingEnv
        return MaskingEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
