"""Tests for hybridmask.policy: features, policies, REINFORCE, the constrained reward, the env."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from hybridmask.policy import (CONTEXT_DIM, K_VALUES, LagrangianReward, MaskingEnv, Reinforce,
                               StrategyNet, ToyMaskingGame, UniformPolicy, context_dim, context_features,
                               create_policy)
from hybridmask.utils import HybridMaskInputError, atomic_save, safe_torch_load


# ----------------------------------------------------------------------------------------------
# context features
# ----------------------------------------------------------------------------------------------
def test_context_features_shape_finite_and_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 189, 14, 14, generator=g) * torch.tensor([0.01, 1.0, 30.0, 1e4]).view(4, 1, 1, 1)
    ctx = context_features(x, running_loss=12.5, progress=0.3)
    assert ctx.shape == (4, CONTEXT_DIM) == (4, context_dim(189))
    assert ctx.dtype == x.dtype and torch.isfinite(ctx).all()
    # per sample: a row does not depend on the other samples of the batch, nor on its position
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(context_features(x[perm], 12.5, 0.3), ctx[perm])
    other = torch.randn(3, 189, 14, 14, generator=g)
    torch.testing.assert_close(context_features(torch.cat([x[1:2], other]), 12.5, 0.3)[0], ctx[1])
    torch.testing.assert_close(context_features(x[3:4], 12.5, 0.3)[0], ctx[3])
    # broadcast scalars
    assert torch.allclose(ctx[:, -1], torch.tensor(0.3)) and torch.allclose(ctx[:, -2], torch.tensor(math.log1p(12.5)))


def test_context_features_scale_stable_and_channel_permutation_invariant():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 189, 14, 14, generator=g) * torch.linspace(0.1, 2.0, 189).view(1, -1, 1, 1)
    a = context_features(x)
    b = context_features(x * 1000.0)
    # only log_energy moves, by exactly 2*log(1000)
    torch.testing.assert_close(b[:, 0] - a[:, 0], torch.full((3,), 2 * math.log(1000.0)), rtol=0, atol=1e-4)
    torch.testing.assert_close(b[:, 1:], a[:, 1:], rtol=0, atol=1e-4)
    # a secret per-sample channel shuffle does not change the features
    shuffled = torch.stack([xi[torch.randperm(189, generator=g)] for xi in x])
    torch.testing.assert_close(context_features(shuffled), a, rtol=0, atol=1e-5)
    # ... but the features do see the mixing degree: a mix of 6 images is more Gaussian
    imgs = torch.randn(6, 189, 14, 14, generator=g) ** 3   # heavy-tailed coefficients
    single, mixed = context_features(imgs[:1]), context_features(imgs.sum(0, keepdim=True))
    assert mixed[0, 9] < single[0, 9] - 0.5                  # log_kurtosis drops
    # degenerate inputs stay finite
    assert torch.isfinite(context_features(torch.zeros(2, 189, 14, 14))).all()
    assert torch.isfinite(context_features(torch.randn(2, 5, 1, 1, dtype=torch.float64))).all()


@pytest.mark.parametrize("bad, kw, match", [
    (torch.randn(4, 189, 14), {}, "shape"),
    (torch.full((2, 3, 4, 4), float("nan")), {}, "NaN"),
    (torch.ones(2, 3, 4, 4, dtype=torch.long), {}, "floating"),
    (torch.randn(2, 3, 4, 4), {"progress": 1.5}, "progress"),
    (torch.randn(2, 3, 4, 4), {"running_loss": float("inf")}, "running_loss"),
])
def test_context_features_bad_input(bad, kw, match):
    with pytest.raises(HybridMaskInputError, match=match):
        context_features(bad, **kw)


# ----------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------
def test_strategy_net_act_reproducible_and_interface():
    pol = StrategyNet(CONTEXT_DIM, K_VALUES, hidden=16, seed=0)
    ctx = torch.randn(32, CONTEXT_DIM, generator=torch.Generator().manual_seed(0))
    k1, a1, lp1 = pol.act(ctx, generator=torch.Generator().manual_seed(7))
    k2, a2, lp2 = pol.act(ctx, generator=torch.Generator().manual_seed(7))
    assert torch.equal(k1, k2) and torch.equal(a1, a2) and torch.equal(lp1, lp2)
    assert k1.shape == a1.shape == lp1.shape == (32,) and k1.dtype == torch.long
    assert set(k1.tolist()) <= set(K_VALUES) and torch.equal(k1, torch.tensor(K_VALUES)[a1])
    assert lp1.requires_grad
    # initial policy is uniform; log_prob matches dist
    torch.testing.assert_close(pol.probs(ctx), torch.full((32, 5), 0.2))
    torch.testing.assert_close(lp1, pol.dist(ctx).log_prob(a1))
    lp, ent = pol.evaluate(ctx, a1)
    torch.testing.assert_close(lp, lp1)
    torch.testing.assert_close(ent, torch.full((32,), math.log(5)))
    # the owned generator: same seed -> same draws; different seed -> different draws
    b1 = StrategyNet(hidden=16, seed=3).act(ctx)[1]
    b2 = StrategyNet(hidden=16, seed=3).act(ctx)[1]
    b3 = StrategyNet(hidden=16, seed=4).act(ctx)[1]
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    # greedy picks the arg-max
    with torch.no_grad():
        pol.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]))
    kg, ag, _ = pol.act(ctx, greedy=True)
    assert (kg == 4).all() and (ag == 2).all()
    assert pol.action_of(torch.tensor([2, 6, 4])).tolist() == [0, 4, 2]


def test_fixed_and_uniform_policies():
    ctx = torch.randn(50, 7)   # baselines ignore the context (any D)
    fixed = create_policy("fixed", k=3, seed=0)
    k, a, lp = fixed.act(ctx)
    assert (k == 3).all() and (a == 0).all() and (lp == 0).all()
    assert not fixed.trainable and fixed.k_values == (3,)
    uni = create_policy("uniform", k_values=(2, 4, 6), seed=0)
    k, a, lp = uni.act(torch.randn(3000, 4))
    assert set(k.tolist()) == {2, 4, 6} and not uni.trainable
    torch.testing.assert_close(lp, torch.full((3000,), -math.log(3)))
    frac = torch.bincount(a, minlength=3).double() / 3000
    assert (frac - 1 / 3).abs().max() < 0.05
    assert isinstance(create_policy("adaptive", hidden=8), StrategyNet)
    with pytest.raises(KeyError, match="unknown policy"):
        create_policy("greedy")
    # a non-trainable policy goes through Reinforce without error and without an update
    stats = Reinforce(fixed).update(lp[:50].detach(), torch.randn(50))
    assert stats["updated"] == 0.0


@pytest.mark.parametrize("k_values, match", [
    ((0, 2, 3), ">= 1"), ((2, 3.5), "ints"), ((2, 2, 3), "distinct"), ((), "empty"), ("23", "sequence"),
    ((2, True), "ints"),
])
def test_bad_k_values(k_values, match):
    with pytest.raises(HybridMaskInputError, match=match):
        StrategyNet(CONTEXT_DIM, k_values)
    with pytest.raises(HybridMaskInputError, match=match):
        UniformPolicy(k_values)


def test_bad_context_and_rewards():
    pol = StrategyNet(hidden=8, seed=0)
    with pytest.raises(HybridMaskInputError, match="12 features"):
        pol.act(torch.randn(4, 11))
    with pytest.raises(HybridMaskInputError, match=r"\(B, D\)"):
        pol.act(torch.randn(12))
    with pytest.raises(HybridMaskInputError, match="NaN"):
        pol.dist(torch.full((2, 12), float("nan")))
    with pytest.raises(HybridMaskInputError):
        pol.act(torch.ones(2, 12, dtype=torch.long))
    rl = Reinforce(pol)
    _, _, lp = pol.act(torch.randn(4, 12))
    with pytest.raises(HybridMaskInputError, match="NaN"):
        rl.update(lp, torch.tensor([1.0, float("nan"), 0.0, 1.0]))
    with pytest.raises(HybridMaskInputError, match="same shape"):
        rl.update(lp, torch.ones(5))
    with pytest.raises(HybridMaskInputError, match="no gradient"):
        rl.update(lp.detach(), torch.ones(4))
    with pytest.raises(HybridMaskInputError, match="baseline"):
        Reinforce(pol, baseline="mean")
    rw = LagrangianReward(utility_target=0.8)
    with pytest.raises(HybridMaskInputError, match="NaN"):
        rw(torch.tensor([1.0, float("nan")]), torch.tensor([2, 3]))
    with pytest.raises(HybridMaskInputError, match="not in k_values"):
        rw(torch.tensor([1.0, 2.0]), torch.tensor([2, 7]))
    with pytest.raises(HybridMaskInputError, match="finite"):
        rw.update_multiplier(float("nan"))
    with pytest.raises(HybridMaskInputError, match=">= 1"):
        LagrangianReward(k_values=(0, 2))
    with pytest.raises(HybridMaskInputError, match="cost"):
        LagrangianReward(cost=[0.1, 0.2])


# ----------------------------------------------------------------------------------------------
# REINFORCE on a bandit
# ----------------------------------------------------------------------------------------------
ARM_MEANS = torch.tensor([0.0, 0.3, 1.0, 0.2, -0.2])   # arm 2 is best; Gaussian noise sd 1


def _train_bandit(baseline: str, sign: float, seed: int, steps: int = 150, batch: int = 32) -> float:
    torch.manual_seed(seed)
    pol = StrategyNet(context_dim=4, hidden=16, seed=seed)
    rl = Reinforce(pol, lr=0.01, baseline=baseline, entropy_coef=0.01)
    g = torch.Generator().manual_seed(seed + 100)
    ctx = torch.randn(batch, 4, generator=g)
    for _ in range(steps):
        k, a, lp = pol.act(ctx)
        r = ARM_MEANS[a] + torch.randn(batch, generator=g)
        rl.update(lp, sign * r, entropy=pol.dist(ctx).entropy())
    return float(pol.probs(ctx)[:, 2].mean())


@pytest.mark.parametrize("baseline", ["ema", "zscore"])
def test_reinforce_learns_best_arm(baseline, one_thread):
    p_best = _train_bandit(baseline, +1.0, seed=0)
    assert p_best > 0.8, p_best
    # the same loop run on the negated reward must avoid the arm: the test can tell the sign
    p_worst = _train_bandit(baseline, -1.0, seed=0)
    assert p_worst < 0.1, p_worst


# ----------------------------------------------------------------------------------------------
# collapse demonstration on the toy game
# ----------------------------------------------------------------------------------------------
def _play(constraint: bool, target: float, seed: int, steps: int = 250, batch: int = 32, **reward_kw):
    game = ToyMaskingGame(seed=seed)
    torch.manual_seed(seed)
    pol = StrategyNet(hidden=32, seed=seed + 1)
    pol.calibrate(game.contexts(256, 2.0, 0.5))
    rl = Reinforce(pol, lr=3e-3, entropy_coef=0.1)
    rw = LagrangianReward(utility_target=target, constraint=constraint, **reward_kw)
    utils, running = [], 0.0
    for t in range(steps):
        ctx = game.contexts(batch, running, t / steps)
        k, a, lp = pol.act(ctx)
        fr, u = game.play(k)                       # utility depends on the recent mix of k
        running = 0.9 * running + 0.1 * float(fr.mean())
        rl.update(lp, rw(fr, k), entropy=pol.dist(ctx).entropy())
        rw.update_multiplier(u)
        utils.append(u)
    probs = pol.probs(game.contexts(512, running, 1.0)).mean(0)
    tail = utils[-steps * 3 // 10:]
    return probs, sum(tail) / len(tail), rw


@pytest.mark.parametrize("reward_kw, check_free", [(dict(), True), (dict(per_k_norm=False), False)])
def test_constraint_prevents_collapse(reward_kw, check_free, one_thread):
    target = 0.75
    game = ToyMaskingGame()
    pure = game.pure_utilities()
    assert pure[6] < target - 0.1 < pure[2]         # the constraint binds and is feasible
    if check_free:
        # FR loss alone (same learner, same settings): collapse to the most private k
        p_free, u_free, rw_free = _play(False, target, seed=0, **reward_kw)
        assert p_free[-1] > 0.9, p_free
        assert u_free < target - 0.1 and rw_free.mu == 0.0
    # with the utility constraint: a non-degenerate mix, utility on target, not k=6
    p, u, rw = _play(True, target, seed=0, **reward_kw)
    entropy = float(-(p * p.log()).sum())
    assert p.max() < 0.9 and entropy > 0.6, p       # log(5) = 1.61 is uniform
    assert p[-1] < 0.2, p
    assert abs(u - target) < 0.03, u
    assert rw.mu > 0.5                               # the multiplier is what holds the policy back
    mean_k = float((p * torch.tensor(K_VALUES, dtype=p.dtype)).sum())
    assert 2.5 < mean_k < 5.0, mean_k


# ----------------------------------------------------------------------------------------------
# LagrangianReward mechanics
# ----------------------------------------------------------------------------------------------
def test_reward_keeps_privacy_benefit_and_charges_cost():
    rw = LagrangianReward(utility_target=0.8, mu_init=0.0, mu_lr=0.2, mu_kp=0.0)
    g = torch.Generator().manual_seed(0)
    k = torch.tensor(K_VALUES).repeat(40)
    for _ in range(5):
        fr = 10.0 + k.double().log() + 0.1 * torch.randn(k.numel(), generator=g, dtype=torch.float64)
        r = rw(fr, k)
    by_k = torch.stack([r[k == v].mean() for v in K_VALUES])
    assert (by_k.diff() > 0).all(), by_k           # per-k normalisation kept the between-k benefit
    # dual ascent: a deficit raises mu, a surplus lowers it, never below 0
    assert rw.update_multiplier(0.6) == pytest.approx(0.2 * 0.2)
    assert rw.update_multiplier(0.85) == pytest.approx(0.2 * 0.2 - 0.2 * 0.05)
    assert rw.update_multiplier(1.0) == 0.0
    pi = LagrangianReward(utility_target=0.8, mu_lr=0.5, mu_kp=10.0)   # PI form: mu = I + kp * deficit
    assert pi.update_multiplier(0.7) == pytest.approx(0.05 + 1.0)
    assert pi.update_multiplier(0.85) == 0.0 and pi.mu_int == pytest.approx(0.025)
    rw.mu = rw.mu_int = 5.0
    r_pen = rw(fr, k, update=False)
    torch.testing.assert_close(r - r_pen, 5.0 * torch.tensor(rw.costs, dtype=r.dtype)[k - 2])
    # constraint off: mu is neither applied nor updated
    free = LagrangianReward(utility_target=0.8, constraint=False, mu_init=3.0)
    free(fr, k)
    free.update_multiplier(0.1)
    assert free.mu == 3.0 and torch.allclose(free(fr, k, update=False), free.privacy(fr, k))
    s = rw.stats()
    assert s["count_k6"] == 200 and s["frac_k2"] == pytest.approx(0.2) and s["mu"] == 5.0
    assert rw.histogram() == {v: 200 for v in K_VALUES}
    rw.set_costs({2: 0.0, 3: 0.1, 4: 0.3, 5: 0.6, 6: 1.0})
    assert rw.costs == (0.0, 0.1, 0.3, 0.6, 1.0)


# ----------------------------------------------------------------------------------------------
# state dicts: exact resume
# ----------------------------------------------------------------------------------------------
def test_state_dict_round_trip_exact_resume(tmp_path):
    def build():
        pol = StrategyNet(hidden=16, seed=11)
        return pol, Reinforce(pol, lr=0.01, baseline="zscore"), LagrangianReward(utility_target=0.75, mu_kp=2.0)

    game = ToyMaskingGame(seed=5)

    def steps(pol, rl, rw, n, game):
        out = []
        for t in range(n):
            ctx = game.contexts(16, 1.0, t / 10)
            k, a, lp = pol.act(ctx)
            fr, u = game.play(k)
            r = rw(fr, k)
            st = rl.update(lp, r, entropy=pol.dist(ctx).entropy())
            rw.update_multiplier(u)
            out.append((a.clone(), r.clone(), st["baseline"], rw.mu))
        return out

    pol, rl, rw = build()
    steps(pol, rl, rw, 5, game)
    atomic_save({"rl": rl.state_dict(), "reward": rw.state_dict()}, tmp_path / "ckpt.pt")
    game_copy = copy.deepcopy(game)
    ref = steps(pol, rl, rw, 5, game)

    pol2, rl2, rw2 = build()
    pol2.generator.manual_seed(999)                 # the sampling state must come from the checkpoint
    state = safe_torch_load(tmp_path / "ckpt.pt")   # weights_only=True
    rl2.load_state_dict(state["rl"])
    rw2.load_state_dict(state["reward"])
    got = steps(pol2, rl2, rw2, 5, game_copy)
    for (a1, r1, b1, m1), (a2, r2, b2, m2) in zip(ref, got):
        assert torch.equal(a1, a2) and torch.equal(r1, r2) and b1 == b2 and m1 == m2
    assert rw2.state_dict() == rw.state_dict()
    assert rl2.state_dict()["baseline"] == rl.state_dict()["baseline"]
    # a policy restored alone samples exactly like the original from the same point
    pol3 = StrategyNet(hidden=16, seed=0)
    pol3.load_state_dict(pol.state_dict())
    ctx = torch.randn(8, CONTEXT_DIM)
    assert torch.equal(pol3.act(ctx)[1], pol.act(ctx)[1])


# ----------------------------------------------------------------------------------------------
# Gymnasium env
# ----------------------------------------------------------------------------------------------
def test_env_passes_check_env_and_is_deterministic():
    from gymnasium.utils.env_checker import check_env
    env = MaskingEnv(episode_length=6)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*render.*")
        check_env(env, skip_render_check=True)

    def rollout(seed):
        obs, _ = env.reset(seed=seed)
        traj = [obs]
        for t in range(9):                          # crosses an episode boundary
            obs, r, term, trunc, info = env.step(t % 5)
            traj += [obs, np.float64(r), info["utility"], info["mu"]]
            if term:
                assert t == 5
                obs, _ = env.reset()
                traj.append(obs)
        return traj

    a, b, c = rollout(3), rollout(3), rollout(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert env.observation_space.contains(a[0])
    with pytest.raises(HybridMaskInputError, match="action"):
        env.step(7)


def test_env_with_user_reward_fn():
    calls = []

    def reward_fn(k):
        calls.append(k)
        return float(k), 1.0 - 0.1 * k

    def freq_fn(rng):
        return torch.from_numpy(rng.standard_normal((1, 8, 2, 2)).astype(np.float32))

    shaper = LagrangianReward((2, 4), utility_target=0.9, mu_lr=0.1, mu_kp=0.0)
    env = MaskingEnv(k_values=(2, 4), reward_fn=reward_fn, freq_fn=freq_fn, episode_length=3, reward=shaper)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (CONTEXT_DIM,) and obs.dtype == np.float32
    rewards = []
    for a in (0, 1, 1):
        obs, r, term, trunc, info = env.step(a)
        rewards.append(r)
    assert calls == [2, 4, 4] and term and not trunc
    assert info["mu"] == pytest.approx(0.1 * (0.1 + 0.3 + 0.3)) and env.reward is shaper
    assert rewards[1] > rewards[0]                  # the more private action, with a small mu
    assert rewards[1] == pytest.approx(1.0 - 0.1 * 0.1 * shaper.costs[1])
    bad = MaskingEnv(reward_fn=lambda k: (float("nan"), 0.5))
    bad.reset(seed=0)
    with pytest.raises(HybridMaskInputError, match="non-finite"):
        bad.step(0)
