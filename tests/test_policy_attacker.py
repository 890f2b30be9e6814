"""The attacker in the loop (issue 14 item 3): the online decoder attacker, the reward's attacker term, a toy
game where the privacy term changes the chosen k, exact resume, trainer wiring, config errors, DDP sync."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hybridmask.defenses import AdaptiveMask, create_defense
from hybridmask.models import create_head, create_model
from hybridmask.policy import (K_VALUES, DecoderAttacker, LagrangianReward, Reinforce, StrategyNet, ToyAttacker,
                               ToyMaskingGame, dominant_faces)
from hybridmask.policy.attacker import dominant_index, grey_target
from hybridmask.train import AlternatingTrainer, PolicySetup, TrainOptions
from hybridmask.train.config import ConfigKeyError, load_config
from hybridmask.train.run import build_reward
from hybridmask.utils import HybridMaskInputError, atomic_save, safe_torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_faces(n, g, size=112):
    """Random smooth colour images in [-1, 1] (enough structure for a decoder to learn)."""
    low = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# the decoder attacker
# ----------------------------------------------------------------------------------------------
def test_decoder_recovers_an_invertible_release_and_not_noise(one_thread):
    g = torch.Generator().manual_seed(0)
    defense = create_defense("ppfrfd", shuffle="none", seed=0)    # k=1, DC dropped, no secret shuffle
    train, test = smooth_faces(256, g), smooth_faces(64, g)
    with torch.no_grad():
        rel_train, rel_test = defense.release(train)[0], defense.release(test)[0]
    noise_train = torch.randn(rel_train.shape, generator=g) * rel_train.std()
    noise_test = torch.randn(rel_test.shape, generator=g) * rel_test.std()
    tgt = grey_target(test, 28)
    mean_face = float((tgt - tgt.mean(0)).abs().mean())             # the best face-independent guess
    errors = {}
    for name, (rtr, rte) in {"release": (rel_train, rel_test), "noise": (noise_train, noise_test)}.items():
        att = DecoderAttacker(defense.in_channels, lr=3e-3, seed=0)
        before = float(att.error(rte, test).mean())
        for step in range(100):
            sl = slice((step * 32) % 256, (step * 32) % 256 + 32)
            err = att.step(rtr[sl], train[sl])
            assert err.shape == (32,) and (err >= 0).all()
        errors[name] = (before, float(att.error(rte, test).mean()))
        assert att.updates == 100 and att.seen == 3200
    (r0, r1), (_, n1) = errors["release"], errors["noise"]
    assert r1 < 0.6 * r0 and r1 < 0.6 * n1, errors          # it learns to invert the release ...
    assert n1 > 0.9 * mean_face, (errors, mean_face)        # ... and learns nothing from noise
    rec = att.reconstruct(rel_test)
    assert rec.shape == (64, 1, 28, 28) and rec.abs().max() <= 1


def test_dominant_face_of_a_mix_and_bad_inputs():
    g = torch.Generator().manual_seed(1)
    x = smooth_faces(8, g, size=32)
    defense = AdaptiveMask(policy=None, seed=3)
    base = defense.draw(x, 1)
    enc = defense.encode(x, base)
    k = torch.tensor([2, 3, 4, 2, 3, 4, 2, 3])
    masked, rec = defense.mix(enc, defense.draw_mix(x, base, k))
    dom = dominant_index(rec, 8)
    w = rec.label_weights
    for b in range(8):   # the source with the largest weight, as attacks.harness.mixed_scores scores a mix
        assert dom[b] == rec.indices[b, int(w[b].argmax())]
    assert torch.equal(dominant_faces(x, rec), x[dom])
    assert torch.equal(dominant_faces(x, None), x)
    att = DecoderAttacker(masked.shape[1], size=8)
    assert att.error(masked, dominant_faces(x, rec)).shape == (8,)
    with pytest.raises(HybridMaskInputError, match="channels"):
        att.error(masked[:, :-1], x)
    with pytest.raises(HybridMaskInputError, match="faces for"):
        att.error(masked, x[:3])
    with pytest.raises(HybridMaskInputError, match="even"):
        DecoderAttacker(10, size=27)
    with pytest.raises(HybridMaskInputError, match="lr"):
        DecoderAttacker(10, lr=0.0)
    # construction is seeded and leaves the global RNG alone
    state = torch.get_rng_state()
    a, b = DecoderAttacker(10, seed=4), DecoderAttacker(10, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), DecoderAttacker(10, seed=5).parameters()))


# ----------------------------------------------------------------------------------------------
# the reward's attacker term
# ----------------------------------------------------------------------------------------------
def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        k = torch.tensor(K_VALUES)[torch.randint(0, 5, (40,), generator=g)]
        fr = 5.0 + k.double().log() + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
        err = 0.1 * k.double() + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
        yield fr, k, err


def test_weight_zero_is_the_fr_loss_reward_bit_for_bit():
    kw = dict(utility_target=0.8, mu_init=0.5, mu_lr=0.3)
    plain, zero, zero_err = LagrangianReward(**kw), LagrangianReward(**kw, attacker_weight=0.0), LagrangianReward(**kw)
    for i, (fr, k, err) in enumerate(_batches(6)):
        r = plain(fr, k)
        assert torch.equal(r, zero(fr, k))
        assert torch.equal(r, zero_err(fr, k, attack_error=err))     # tracked for logging, not used
        assert torch.equal(plain.privacy(fr, k), zero_err.privacy(fr, k, attack_error=err))
        for rw in (plain, zero, zero_err):
            rw.update_multiplier(0.6 + 0.05 * i)
        assert plain.mu == zero.mu == zero_err.mu
    s0, s1 = plain.stats(), zero_err.stats()
    assert {k: v for k, v in s0.items() if k in s1 and v == v} == {k: s1[k] for k, v in s0.items() if v == v}
    assert s1["attack_error_mean"] == pytest.approx(float(err.mean())) and s0["attack_error_mean"] != s0["attack_error_mean"]


def test_attacker_term_formula_and_errors():
    a = 0.4
    rw = LagrangianReward(utility_target=0.8, mu_init=2.0, mu_lr=0.0, mu_kp=0.0, attacker_weight=a)
    ref = LagrangianReward(utility_target=0.8, mu_init=2.0, mu_lr=0.0, mu_kp=0.0)
    for fr, k, err in _batches(4):
        r = rw(fr, k, attack_error=err)
        r_fr = ref(fr, k)
    p = ref.privacy(fr, k)
    z = ((err - rw.a_mean) / rw.a_var ** 0.5).clamp(-rw.clip, rw.clip)     # running global z-score
    cost = 2.0 * torch.tensor(rw.costs, dtype=torch.float64)[k - 2]
    torch.testing.assert_close(r, (1 - a) * p + a * z - cost)
    torch.testing.assert_close(r_fr, p - cost)
    # the attacker's error grows with k here: its term raises the reward of larger k
    by_k = torch.stack([(r - r_fr)[k == v].mean() for v in K_VALUES])
    assert (by_k.diff() > 0).all(), by_k
    with pytest.raises(HybridMaskInputError, match="attack_error"):
        rw(fr, k)                                      # weight > 0 needs the errors
    with pytest.raises(HybridMaskInputError, match="shape"):
        rw(fr, k, attack_error=err[:3])
    with pytest.raises(HybridMaskInputError, match="NaN"):
        rw(fr, k, attack_error=torch.full_like(err, float("nan")))
    with pytest.raises(HybridMaskInputError, match=r"\[0, 1\]"):
        LagrangianReward(attacker_weight=1.5)


# ----------------------------------------------------------------------------------------------
# the toy case: the privacy term changes the chosen k
# ----------------------------------------------------------------------------------------------
def _play_toy(a: float, seed: int, steps: int = 250, batch: int = 32):
    """FR loss 2 + log(min(k, 3)) (the recognizer's loss saturates at k=3), attacker error log k (the dominant
    face of a larger mix keeps getting harder to recover), linear cost c(k) at a fixed multiplier mu = 1."""
    game = ToyMaskingGame(seed=seed, saturate=3)
    attacker = ToyAttacker(seed=seed + 50)
    torch.manual_seed(seed)
    pol = StrategyNet(hidden=32, seed=seed + 1)
    pol.calibrate(game.contexts(256, 2.0, 0.5))
    rl = Reinforce(pol, lr=3e-3, entropy_coef=0.1)
    rw = LagrangianReward(utility_target=0.0, mu_init=1.0, mu_lr=0.0, mu_kp=0.0, attacker_weight=a)
    running = 0.0
    for t in range(steps):
        ctx = game.contexts(batch, running, t / steps)
        k, _, lp = pol.act(ctx)
        fr, _ = game.play(k)
        running = 0.9 * running + 0.1 * float(fr.mean())
        rl.update(lp, rw(fr, k, attack_error=attacker.error(k)), entropy=pol.dist(ctx).entropy())
    return pol.probs(game.contexts(512, running, 1.0)).mean(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_attacker_term_moves_the_chosen_k(seed, one_thread):
    # the FR-loss reward prefers k=3 (the cheapest k of the highest FR loss) ...
    p_fr = _play_toy(0.0, seed)
    assert int(p_fr.argmax()) == K_VALUES.index(3) and p_fr[K_VALUES.index(3)] > 0.8, p_fr
    # ... the attacker term (error still growing beyond k=3) moves the policy to the attacker-preferred k=6
    p_att = _play_toy(0.5, seed)
    assert int(p_att.argmax()) == K_VALUES.index(6) and p_att[-1] > 0.8, p_att
    assert p_att[K_VALUES.index(3)] < 0.1, p_att


# ----------------------------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------------------------
def test_attacker_and_reward_state_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 20, 4, 4, generator=g), smooth_faces(8, g, size=32)) for _ in range(6)]

    def build():
        att = DecoderAttacker(20, width=8, size=8, lr=1e-2, steps=2, seed=3)
        return att, LagrangianReward(attacker=att, attacker_weight=0.3)

    def run(att, rw, batches):
        out = []
        for x, f in batches:
            err = att.step(x, f)
            k = torch.tensor([2, 3, 4, 5, 6, 2, 3, 4])
            out.append(rw(5.0 + k.double(), k, attack_error=err.double()))
        return out

    full_att, full_rw = build()
    full = run(full_att, full_rw, data)
    a, rw = build()
    run(a, rw, data[:3])
    atomic_save(rw.state_dict(), tmp_path / "reward.pt")
    b, rw_b = build()
    rw_b.load_state_dict(safe_torch_load(tmp_path / "reward.pt"))        # weights_only load
    assert b.updates == 6 and b.calibrated
    rest = run(b, rw_b, data[3:])
    for x, y in zip(full[3:], rest):
        assert torch.equal(x, y)
    for p, q in zip(full_att.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # mismatches are named
    with pytest.raises(HybridMaskInputError, match="attacker"):
        LagrangianReward().load_state_dict(rw.state_dict())
    with pytest.raises(HybridMaskInputError, match="width"):
        DecoderAttacker(20, width=16, size=8).load_state_dict(a.state_dict())
    old = LagrangianReward().state_dict()
    for key in ("attacker", "attacker_weight", "a", "last_attack"):     # a state from before the attacker
        old.pop(key)
    LagrangianReward().load_state_dict(old)


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
SIZE, N_IDS, PER_ID = 32, 6, 6


def _trainer(attacker: bool, weight: float = 0.0, total=None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_IDS).repeat_interleave(PER_ID)
    protos = torch.rand(N_IDS, 3, SIZE, SIZE, generator=g) * 2 - 1
    x = (protos[labels] + 0.3 * torch.randn(len(labels), 3, SIZE, SIZE, generator=g)).clamp(-1, 1)
    policy = StrategyNet(seed=5, hidden=16)
    defense = AdaptiveMask(policy=policy, seed=3)
    model = create_model("tiny_test", stem="freq", in_chans=defense.in_channels, grid=SIZE // 8, embedding_size=16)
    head = create_head("cosface", 16, N_IDS, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    att = DecoderAttacker(defense.in_channels, width=8, size=8, seed=7) if attacker else None
    reward = LagrangianReward(policy.k_values, utility_target=0.9, attacker=att, attacker_weight=weight)
    setup = PolicySetup(policy, Reinforce(policy, lr=1e-2), reward, n_fr=1, n_pi=1)
    return AlternatingTrainer(model, head, opt, TensorDataset(x, labels), defense, policy=setup,
                              options=TrainOptions(batch_size=8, hflip=True, seed=11, total_steps=total))


def _params(*modules):
    return [p.detach().clone() for m in modules for p in m.state_dict().values() if torch.is_tensor(p)]


def test_trainer_attacker_trains_alongside_and_weight_zero_changes_nothing(one_thread):
    plain = _trainer(False)
    plain.fit(steps=4)
    watched = _trainer(True, weight=0.0)
    att0 = [p.detach().clone() for p in watched.attacker.parameters()]
    watched.fit(steps=4)
    # the attacker has its own parameters and optimizer and no randomness: with weight 0 the recognizer and
    # the policy train exactly as without it
    for p, q in zip(_params(plain.model, plain.head, plain.policy), _params(watched.model, watched.head, watched.policy)):
        assert torch.equal(p, q)
    assert watched.attacker.updates == 4 and watched.attacker.seen == 32
    assert any(not torch.equal(p, q) for p, q in zip(att0, watched.attacker.parameters()))
    st = watched.last_policy_stats
    assert st["policy/attack_error_mean"] > 0 and st["policy/attacker_train_loss"] > 0
    # with weight > 0 the reward, hence the policy, changes
    used = _trainer(True, weight=0.5)
    used.fit(steps=4)
    assert any(not torch.equal(p, q) for p, q in zip(_params(plain.policy), _params(used.policy)))
    with pytest.raises(ValueError, match="no attacker"):
        AlternatingTrainer(plain.model, plain.head, plain.optimizer, None, plain.defense,
                           policy=PolicySetup(plain.policy, Reinforce(plain.policy),
                                              LagrangianReward(attacker_weight=0.5)))


def test_trainer_resume_with_the_attacker_is_exact(tmp_path, one_thread):
    n = 6
    a = _trainer(True, weight=0.5)
    a.fit(steps=n)
    b = _trainer(True, weight=0.5, total=n)
    b.fit(steps=n // 2 + 1)
    b.save_checkpoint(tmp_path / "last.pt")
    c = _trainer(True, weight=0.5)
    c.load_checkpoint(tmp_path / "last.pt")
    c.fit(steps=n)
    for p, q in zip(_params(a.model, a.head, a.policy), _params(c.model, c.head, c.policy)):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    for p, q in zip(a.attacker.parameters(), c.attacker.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert a.attacker.updates == c.attacker.updates == n
    assert a.reward.a_mean == pytest.approx(c.reward.a_mean, abs=1e-9)
    with pytest.raises(HybridMaskInputError, match="attacker"):
        _trainer(False).load_checkpoint(tmp_path / "last.pt")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def _cfg(*overrides):
    return load_config(os.path.join(REPO, "configs", "quickstart.yaml"), list(overrides))


def test_config_builds_the_attacker_and_names_bad_keys():
    cfg = _cfg()
    assert cfg["reward"]["attacker"]["name"] == "none" and cfg["reward"]["attacker"]["weight"] == 0.0
    rw = build_reward(cfg["reward"], K_VALUES, 189, seed=0)
    assert rw.attacker is None and rw.attacker_weight == 0.0
    ref = LagrangianReward(K_VALUES, **{k: v for k, v in cfg["reward"].items() if k != "attacker"})
    fr, k = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([2, 4, 6])
    assert torch.equal(rw(fr, k), ref(fr, k))
    cfg = _cfg("reward.attacker.name=decoder", "reward.attacker.weight=0.3", "reward.attacker.width=8",
               "reward.attacker.steps=2")
    rw = build_reward(cfg["reward"], K_VALUES, 189, seed=0)
    assert isinstance(rw.attacker, DecoderAttacker) and rw.attacker_weight == 0.3
    assert rw.attacker.config() == {"name": "decoder", "in_channels": 189, "width": 8, "size": 28, "lr": 0.001,
                                    "steps": 2, "seed": 0}
    for override, match in [("reward.attacker.weight=1.5", "reward.attacker.weight"),
                            ("reward.attacker.weight=yes", "reward.attacker.weight"),
                            ("reward.attacker.steps=0", "reward.attacker.steps"),
                            ("reward.attacker.lr=-1", "reward.attacker.lr"),
                            ("reward.attacker.size=2", "reward.attacker.size"),
                            ("reward.attacker=decoder", "reward.attacker")]:
        with pytest.raises(ValueError, match=match):
            _cfg(override)
    with pytest.raises(ConfigKeyError, match="reward.attacker.wieght"):
        _cfg("reward.attacker.wieght=0.5")
    for overrides, match in [(["reward.attacker.name=gan"], "reward.attacker.name"),
                             (["reward.attacker.weight=0.5"], "reward.attacker.weight"),
                             (["reward.attacker.name=decoder", "reward.attacker.size=27"], "reward.attacker.size"),
                             (["reward.attacker.name=decoder", "reward.attacker.lr=0"], "reward.attacker.lr")]:
        with pytest.raises(ValueError, match=match):
            build_reward(_cfg(*overrides)["reward"], K_VALUES, 189, seed=0)


# ----------------------------------------------------------------------------------------------
# DDP: one attacker on every rank
# ----------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)       # every rank its own releases
        att = DecoderAttacker(12, width=8, size=8, lr=1e-2, seed=1)
        for _ in range(3):
            att.step(torch.randn(4, 12, 4, 4, generator=g), torch.rand(4, 3, 16, 16, generator=g) * 2 - 1)
        torch.save({"params": [p.detach() for p in att.parameters()], "mean": att.in_mean}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_attacker_stays_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "att")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"att.{i}") for i in range(2))
    assert torch.equal(r0["mean"], r1["mean"])
    assert all(torch.equal(p, q) for p, q in zip(r0["params"], r1["params"]))
