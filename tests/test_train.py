"""Trainer, configs, CLI, adaptive defense and distributed training (tiny models, synthetic data)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hybridmask.cli import main as cli_main
from hybridmask.defenses import AdaptiveMask, create_defense, load_defense, load_policy, save_policy
from hybridmask.models import create_head, create_model
from hybridmask.policy import FixedKPolicy, LagrangianReward, Reinforce, StrategyNet
from hybridmask.train import (AlternatingTrainer, Checkpoint, DefenseOptim, Logging, PolicySetup, ResumableBatchSampler,
                              TrainOptions, Utility)
from hybridmask.train.config import ConfigKeyError, load_config
from hybridmask.utils import safe_torch_load

REPO = Path(__file__).resolve().parents[1]
SIZE = 32          # 32x32 faces -> a 4x4 frequency grid at u=1 (tiny_test takes any grid >= 4)
N_IDS, PER_ID = 6, 6


def faces(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_IDS).repeat_interleave(PER_ID)
    protos = torch.rand(N_IDS, 3, SIZE, SIZE, generator=g) * 2 - 1
    x = (protos[labels] + 0.3 * torch.randn(len(labels), 3, SIZE, SIZE, generator=g)).clamp(-1, 1)
    return x, labels


def make_trainer(tmp, policy_kind="adaptive", defense_name="adaptive", n_fr=1, total=None, loader_kind="loader",
                 mask_seed=3, log=True):
    torch.manual_seed(0)
    x, y = faces()
    policy = {"adaptive": lambda: StrategyNet(seed=5, hidden=16), "fixed": lambda: FixedKPolicy(3, seed=5),
              None: lambda: None}[policy_kind]()
    if defense_name == "adaptive":
        defense = AdaptiveMask(policy=policy, seed=mask_seed)
    else:
        defense = create_defense(defense_name, seed=mask_seed)
    stem = "pixel" if defense.input_kind == "pixel" else "freq"
    model = create_model("tiny_test", stem=stem, in_chans=defense.in_channels,
                         grid=SIZE if stem == "pixel" else SIZE // 8, embedding_size=16)
    head = create_head("cosface", 16, N_IDS, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=8) if loader_kind == "loader" else ds
    trainable = policy is not None and policy.trainable
    rl = Reinforce(policy, lr=1e-2) if trainable else None
    reward = LagrangianReward(policy.k_values, utility_target=0.9) if trainable else None
    setup = PolicySetup(policy, rl, reward, n_fr=n_fr, n_pi=1) if policy is not None else None
    callbacks = [Utility((x[::PER_ID], y[::PER_ID]), every=2), Logging((tmp / "tb") if log else None, every=2),
                 Checkpoint(tmp / "ckpt")]
    return AlternatingTrainer(model, head, opt, loader, defense, scheduler=sched, policy=setup, callbacks=callbacks,
                              options=TrainOptions(batch_size=8, hflip=True, seed=11, total_steps=total))


def params(*modules):
    return [p.detach().clone() for m in modules for p in m.state_dict().values() if torch.is_tensor(p)]


# ------------------------------------------------------------------ trainer
def test_two_steps_write_tensorboard_and_checkpoint(tmp_path):
    tr = make_trainer(tmp_path)
    summary = tr.fit(steps=2)
    tr.close()
    assert summary["steps"] == 2
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    ck = safe_torch_load(tmp_path / "ckpt" / "last.pt")
    assert ck["format"] == "hybridmask.trainer" and ck["global_step"] == 2
    assert ck["policy"] is not None and ck["reward"] is not None and len(ck["ranks"]) == 1
    assert ck["ranks"][0]["defense"]["generator"].dtype == torch.uint8   # the masking secret state travels
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/fr_loss", "policy/mu", "utility/identification", "train/throughput_img_s"} <= tags
    assert any(t.startswith("k/frac_k") for t in tags) and "k/hist" in ea.Tags()["histograms"]
    # a restarted run in the same folder replaces the old curve instead of interleaving with it
    tr2 = make_trainer(tmp_path)
    tr2.fit(steps=4)
    tr2.close()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("train/fr_loss")]
    assert steps == [2, 4], steps


@pytest.mark.parametrize("loader_kind", ["loader", "dataset"])
def test_resume_is_exact(tmp_path, loader_kind):
    n = 8   # 36 images / batch 8 = 4 batches per epoch: the split crosses an epoch boundary
    a = make_trainer(tmp_path / "a", loader_kind=loader_kind, log=False)
    a.fit(steps=n)
    b = make_trainer(tmp_path / "b", loader_kind=loader_kind, total=n, log=False)
    b.fit(steps=n // 2 + 1)      # mid-epoch, mid-cycle stop; fit() writes ckpt/last.pt
    del b
    c = make_trainer(tmp_path / "c", loader_kind=loader_kind, log=False)   # fresh objects
    c.load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")
    assert c.global_step == n // 2 + 1
    c.fit(steps=n)
    for pa, pc in zip(params(a.model, a.head), params(c.model, c.head)):
        assert torch.allclose(pa, pc, atol=1e-6, rtol=0), "recognizer differs after resume"
    for pa, pc in zip(params(a.policy), params(c.policy)):
        assert torch.allclose(pa, pc, atol=1e-6, rtol=0), "policy differs after resume"
    assert a.reward.mu == pytest.approx(c.reward.mu, abs=1e-9)
    assert a.k_counts == c.k_counts
    assert a.policy_optim.b_mean == pytest.approx(c.policy_optim.b_mean, abs=1e-9)


def test_ctrl_c_saves_a_clean_checkpoint_that_resumes_exactly(tmp_path):
    import signal
    a = make_trainer(tmp_path / "a", log=False)
    a.fit(steps=5)
    b = make_trainer(tmp_path / "b", total=5, log=False)
    real_step = b.step

    def step_then_interrupt(batch):
        out = real_step(batch)
        if b.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)   # arrives mid-run, handled after the step
        return out
    b.step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        b.fit(steps=5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    c = make_trainer(tmp_path / "c", log=False)
    c.load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")
    assert c.global_step == 2
    c.fit(steps=5)
    for pa, pc in zip(params(a.model, a.head, a.policy), params(c.model, c.head, c.policy)):
        assert torch.allclose(pa, pc, atol=1e-6, rtol=0)


def test_resume_detects_missing_parts(tmp_path):
    a = make_trainer(tmp_path / "a", log=False)
    a.fit(steps=1)
    b = make_trainer(tmp_path / "b", policy_kind=None, log=False)
    with pytest.raises(ValueError, match="policy"):
        b.load_checkpoint(tmp_path / "a" / "ckpt" / "last.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        b.load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("defense_name,policy_kind,expect_k", [("ppfrfd", None, {1}), ("none", None, {1}),
                                                               ("freq_mixup", "fixed", {3}),
                                                               ("freq_mixup", None, {4})])
def test_baselines_train_with_the_same_trainer(tmp_path, defense_name, policy_kind, expect_k):
    tr = make_trainer(tmp_path, policy_kind=policy_kind, defense_name=defense_name, log=False)
    losses = [tr.step(next(iter(tr.batches())))["loss"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(tr.k_counts) == expect_k
    assert not tr.learn_policy


def test_policy_moves_and_k_histogram(tmp_path):
    tr = make_trainer(tmp_path, log=False)
    before = params(tr.policy)
    tr.fit(steps=4)
    assert any(not torch.equal(p, q) for p, q in zip(before, params(tr.policy)))
    assert set(tr.k_counts) <= {2, 3, 4, 5, 6} and sum(tr.k_counts.values()) == 4 * 8
    assert tr.last_utility is not None and 0.0 <= tr.last_utility <= 1.0
    assert "policy/reward_mean" in tr.history[-1] and "k_mean" in tr.history[-1]


def test_trainer_rejects_bad_arguments(tmp_path):
    x, y = faces()
    model = create_model("tiny_test", stem="freq", in_chans=189, grid=4, embedding_size=16)
    head = create_head("arcface", 16, N_IDS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = create_defense("ppfrfd", seed=0)
    bs8 = TrainOptions(batch_size=8)
    with pytest.raises(ValueError, match="n_fr"):
        AlternatingTrainer(model, head, opt, TensorDataset(x, y), create_defense("freq_mixup", seed=0),
                           policy=PolicySetup(FixedKPolicy(3, seed=0), n_fr=0), options=bs8)
    with pytest.raises(ValueError, match="batch_size is required"):
        AlternatingTrainer(model, head, opt, TensorDataset(x, y), d)
    with pytest.raises(ValueError, match="largest k"):
        AlternatingTrainer(model, head, opt, TensorDataset(x, y), create_defense("freq_mixup", k=6, seed=0),
                           options=TrainOptions(batch_size=4))
    with pytest.raises(ValueError, match="largest k"):   # the policy's k count as well
        AlternatingTrainer(model, head, opt, TensorDataset(x, y), create_defense("freq_mixup", k=2, seed=0),
                           policy=FixedKPolicy(6, seed=0), options=TrainOptions(batch_size=4))
    with pytest.raises(ValueError, match="does not mix"):
        AlternatingTrainer(model, head, opt, TensorDataset(x, y), d, policy=FixedKPolicy(3, seed=0), options=bs8)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        AlternatingTrainer(model, head, opt, TensorDataset(x[:4], y[:4]), d, options=bs8)
    tr = AlternatingTrainer(model, head, opt, TensorDataset(x, y), d, options=bs8)
    with pytest.raises(ValueError, match="exactly one"):
        tr.fit()


def test_bn_warmup_keeps_eval_mode_statistics_right_after_a_short_run(tmp_path):
    x, y = faces()
    d = create_defense("ppfrfd", shuffle="key", seed=0)
    enc = d.query(x)
    true_var = enc.var(dim=(0, 2, 3), unbiased=False)
    ratios = {}
    for warm in (True, False):
        torch.manual_seed(0)
        model = create_model("tiny_test", stem="freq", in_chans=189, grid=4, embedding_size=16, input_norm=True)
        head = create_head("cosface", 16, N_IDS, s=16.0)
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01)
        tr = AlternatingTrainer(model, head, opt, TensorDataset(x, y), d,
                                options=TrainOptions(batch_size=12, bn_warmup=warm))
        tr.fit(steps=3)
        ratios[warm] = float((model.stem[0].running_var / true_var).median())
        assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert 0.5 < ratios[True] < 2.0          # the exact average of the 3 batches' variances
    assert ratios[False] > 3 * ratios[True]    # plain EMA still remembers running_var = 1


def test_callbacks_run_in_order_around_each_step(tmp_path):
    """fit() = step -> on_step_end (Utility's U reaches later callbacks in ``out``) -> epoch end -> on_batch_end
    (a resume point: the batch position has moved on), with start / end / teardown around the loop."""
    from hybridmask.train import Callback

    class Recorder(Callback):
        order = 70

        def __init__(self):
            self.events = []

        def on_train_start(self, trainer):
            self.events.append("start")

        def on_step_end(self, trainer, out):
            self.events.append(("step", trainer.global_step, "utility" in out, sorted(out["k"].tolist()) != []))

        def on_epoch_end(self, trainer, summary):
            self.events.append(("epoch", summary["epoch"], trainer.batch_in_epoch))

        def on_batch_end(self, trainer):
            self.events.append(("batch", trainer.epoch, trainer.batch_in_epoch))

        def on_train_end(self, trainer):
            self.events.append("end")

        def teardown(self, trainer):
            self.events.append("teardown")

    tr = make_trainer(tmp_path, log=False)
    rec = Recorder()
    tr.callbacks = sorted(tr.callbacks + [rec], key=lambda cb: cb.order)
    tr.fit(steps=5)   # 4 batches per epoch
    ev = rec.events
    assert ev[0] == "start" and ev[-2:] == ["end", "teardown"]
    assert ev[1:3] == [("step", 1, False, True), ("batch", 0, 1)]
    assert ("step", 2, True, True) in ev                      # Utility (order 10) ran first and put U in out
    i = ev.index(("step", 4, True, True))
    assert ev[i + 1:i + 3] == [("epoch", 0, 4), ("batch", 1, 0)]
    assert len(tr.epochs) == 1 and tr.epochs[0]["utility"] == pytest.approx(tr.history[1]["utility"])


def test_run_builds_policies_from_the_registry_and_dispatches_methods():
    from hybridmask.policy import UniformPolicy
    from hybridmask.train.run import TRAINERS, build_policy, run_training
    section = {"name": "fixed", "k": 3, "k_values": [2, 3], "hidden": 8, "lr": 0.1, "baseline": "ema"}
    pol = build_policy(section, seed=0)
    assert isinstance(pol, FixedKPolicy) and pol.k == 3
    pol = build_policy({**section, "name": "uniform"}, seed=0)
    assert isinstance(pol, UniformPolicy) and list(pol.k_values) == [2, 3]
    pol = build_policy({**section, "name": "adaptive"}, seed=0)
    assert isinstance(pol, StrategyNet) and pol.hidden == 8 and list(pol.k_values) == [2, 3]
    assert build_policy({"name": "none"}, seed=0) is None
    with pytest.raises(ValueError, match="unknown policy.name"):
        build_policy({"name": "greedy"}, seed=0)
    assert set(TRAINERS) == {"hybridmask", "arl"}
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        run_training({"method": "sgd"})


# ------------------------------------------------------------------ defenses with learnable parameters (DCTDP)
def make_dctdp_trainer(tmp, allocation="softmax", total=None, lr=0.05, privacy_weight=1.0, log=False):
    torch.manual_seed(0)
    x, y = faces()
    defense = create_defense("dctdp", allocation=allocation, budget_mean=0.05, seed=3)  # noise comparable to the signal
    if allocation == "free":
        with torch.no_grad():
            defense.rho.fill_(0.5)   # start over the total budget: project_() must pull it back
    model = create_model("tiny_test", stem="freq", in_chans=189, grid=SIZE // 8, embedding_size=16)
    head = create_head("cosface", 16, N_IDS, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    dopt = torch.optim.Adam(defense.trainable_parameters(), lr=lr)
    dsched = torch.optim.lr_scheduler.LambdaLR(dopt, lambda s: 1.0 / (1 + 0.1 * s))
    callbacks = [Utility((x[::PER_ID], y[::PER_ID]), every=2), Logging((tmp / "tb") if log else None, every=1),
                 Checkpoint(tmp / "ckpt")]
    return AlternatingTrainer(model, head, opt, DataLoader(TensorDataset(x, y), batch_size=8), defense,
                              scheduler=sched, defense_optim=DefenseOptim(dopt, dsched, privacy_weight=privacy_weight),
                              callbacks=callbacks, options=TrainOptions(hflip=True, seed=11, total_steps=total))


@pytest.mark.parametrize("allocation", ["softmax", "free"])
def test_dctdp_budgets_train_through_the_shared_trainer(tmp_path, allocation):
    tr = make_dctdp_trainer(tmp_path, allocation=allocation, log=True)
    d = tr.defense
    assert tr.learn_defense and {id(p) for p in tr.defense_params} == {id(d.rho), id(d.loc)}
    rho0, loc0 = d.rho.detach().clone(), d.loc.detach().clone()
    tr.fit(steps=3)
    tr.close()
    assert (d.rho - rho0).abs().max() > 1e-3 and (d.loc - loc0).abs().max() > 1e-3   # gradients reached them
    assert d.rho.grad is not None and torch.isfinite(d.rho).all()
    eps = d.epsilon().detach()
    assert (eps > 0).all() and torch.isfinite(eps).all()
    if allocation == "softmax":
        assert float(eps.sum()) == pytest.approx(d.total_budget, rel=1e-5)
    else:   # started at exp(0.5) = 1.65 x the total; 3 Adam steps of lr 0.05 move log-budgets by <= 0.15,
        # so only the projection after each step can bring the sum under the total
        assert float(eps.sum()) <= d.total_budget * (1 + 1e-5)
    rec = tr.history[-1]
    assert math.isfinite(rec["defense/privacy_loss"]) and rec["defense/eps_sum_over_total"] <= 1 + 1e-5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert {"defense/privacy_loss", "defense/noise_scale_mean"} <= set(ea.Tags()["scalars"])
    ck = safe_torch_load(tmp_path / "ckpt" / "last.pt")
    torch.testing.assert_close(ck["defense_state"]["rho"], d.rho.detach())
    assert ck["defense_optim"]["state"] and ck["defense_scheduler"]["last_epoch"] == 3


def test_privacy_weight_pushes_toward_more_noise(tmp_path):
    """-log(mean noise scale) in the loss: the same 5 steps end with a larger mean noise scale with
    a large privacy weight than with none (the budgets start slightly off the uniform point)."""
    scales = {}
    for w in (0.0, 50.0):
        tr = make_dctdp_trainer(tmp_path / str(w), privacy_weight=w, lr=0.2)
        with torch.no_grad():
            tr.defense.rho.copy_(0.1 * torch.randn(tr.defense.rho.shape, generator=torch.Generator().manual_seed(0)))
        tr.fit(steps=5)
        scales[w] = float(tr.defense.noise_scale().detach().mean())
    assert scales[50.0] > 1.2 * scales[0.0]


def test_dctdp_resume_is_exact(tmp_path):
    n = 6
    a = make_dctdp_trainer(tmp_path / "a")
    a.fit(steps=n)
    b = make_dctdp_trainer(tmp_path / "b", total=n)
    b.fit(steps=n // 2 + 1)
    del b
    c = make_dctdp_trainer(tmp_path / "c")
    c.load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")
    c.fit(steps=n)
    for pa, pc in zip(params(a.model, a.head, a.defense), params(c.model, c.head, c.defense)):
        assert torch.allclose(pa, pc, atol=1e-6, rtol=0), "recognizer or budgets differ after resume"
    assert a.defense_optim.state_dict()["state"][0]["step"] == c.defense_optim.state_dict()["state"][0]["step"]
    # the next secret draws continue identically as well
    x, _ = faces()
    torch.testing.assert_close(a.defense.query(x[:2]), c.defense.query(x[:2]))


def test_learnable_defense_errors_and_parameter_free_defenses_untouched(tmp_path):
    x, y = faces()
    model = create_model("tiny_test", stem="freq", in_chans=189, grid=4, embedding_size=16)
    head = create_head("cosface", 16, N_IDS)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.1)
    dct = create_defense("dctdp", seed=0)
    ds = TensorDataset(x, y)
    bs8 = TrainOptions(batch_size=8)
    with pytest.raises(ValueError, match="in no optimizer"):
        AlternatingTrainer(model, head, opt, ds, dct, options=bs8)
    with pytest.raises(ValueError, match="without a policy"):
        AlternatingTrainer(model, head, opt, ds, dct, policy=FixedKPolicy(1, seed=0),
                           defense_optim=torch.optim.Adam(dct.parameters()), options=bs8)
    with pytest.raises(ValueError, match="privacy_weight"):
        AlternatingTrainer(model, head, opt, ds, dct, defense_optim=DefenseOptim(torch.optim.Adam(dct.parameters()),
                                                                                  privacy_weight=-1.0), options=bs8)
    with pytest.raises(ValueError, match="no learnable parameters"):
        AlternatingTrainer(model, head, opt, ds, create_defense("ppfrfd", seed=0),
                           defense_optim=torch.optim.Adam(dct.parameters()), options=bs8)
    # the budgets may also sit in the recognizer's own optimizer
    opt2 = torch.optim.SGD(list(model.parameters()) + list(head.parameters()) + list(dct.parameters()), lr=0.1)
    assert AlternatingTrainer(model, head, opt2, ds, dct, options=bs8).learn_defense
    # parameter-free defenses (and the adaptive mask, whose policy REINFORCE trains) stay on the no-grad path
    for tr in (make_trainer(tmp_path / "p", policy_kind=None, defense_name="ppfrfd", log=False),
               make_trainer(tmp_path / "a", log=False)):
        assert not tr.learn_defense and tr.defense_params == []
        tr.fit(steps=1)
        ck = safe_torch_load(tr.ckpt_dir / "last.pt")
        assert ck["defense_learned"] is False and ck["defense_optim"] is None and ck["defense_scheduler"] is None
        # the defense record: ppfrfd has no learned state; the adaptive one records its policy's weights
        assert ck["defense"] == tr.defense.config
        if tr.defense.name == "ppfrfd":
            assert ck["defense_state"] is None
        else:
            assert set(ck["defense_state"]) == {"policy_state", "running_loss", "progress"}
    # checkpoints of the two kinds do not load into each other
    d = make_dctdp_trainer(tmp_path / "d")
    d.fit(steps=1)
    with pytest.raises(ValueError, match="learned defense parameters"):
        make_trainer(tmp_path / "q", policy_kind=None, defense_name="ppfrfd", log=False).load_checkpoint(
            tmp_path / "d" / "ckpt" / "last.pt")
    with pytest.raises(ValueError, match="learned defense parameters"):
        make_dctdp_trainer(tmp_path / "e").load_checkpoint(tmp_path / "p" / "ckpt" / "last.pt")


# ------------------------------------------------------------------ sampler
def test_sampler_shards_are_the_single_process_batch_and_resume():
    single = list(ResumableBatchSampler(50, 8, seed=3))
    r0 = list(ResumableBatchSampler(50, 4, seed=3, rank=0, world_size=2))
    r1 = list(ResumableBatchSampler(50, 4, seed=3, rank=1, world_size=2))
    assert len(single) == len(r0) == len(r1) == 6
    for s, a, b in zip(single, r0, r1):
        assert s == a + b
    s = ResumableBatchSampler(50, 8, seed=3)
    s.set_epoch(0, 4)
    assert list(s) == single[4:]
    s.set_epoch(1)
    assert list(s) != single and sorted(sum(list(s), [])) != sorted(range(50))  # new order, last batch dropped


# ------------------------------------------------------------------ adaptive defense and policy files
def test_adaptive_defense_release_query_and_policy_file(tmp_path):
    x, _ = faces()
    policy = StrategyNet(seed=1, hidden=8)
    d = create_defense("adaptive", policy=policy, seed=2)
    released, rec = d.release(x[:8])
    assert released.shape == (8, 189, SIZE // 8, SIZE // 8)
    assert set(rec.k.tolist()) <= set(policy.k_values)
    assert d.query(x[:8]).shape == released.shape
    save_policy(tmp_path / "policy.pt", policy, masking=d.config, context={"running_loss": 3.0, "progress": 1.0})
    blob = safe_torch_load(tmp_path / "policy.pt")
    assert not any("extra_state" in k for k in blob["policy_state"]), "the sampling generator must not be published"
    loaded, meta = load_policy(tmp_path / "policy.pt", seed=0)
    ctx = torch.randn(5, 12)
    assert torch.allclose(loaded.probs(ctx), policy.probs(ctx))
    d2 = create_defense("adaptive", policy_path=str(tmp_path / "policy.pt"), seed=4)
    assert d2.running_loss == 3.0 and d2.config["policy_config"]["name"] == "adaptive"
    # the config holds the policy's shape, the defense state its weights and context: they rebuild it
    from hybridmask.defenses.io import build_defense
    d3 = build_defense(d2.config, d2.defense_state(), seed=5)
    assert d3.running_loss == 3.0 and torch.allclose(d3.policy.probs(ctx), policy.probs(ctx))
    out, rec2 = d2.release(x[:8])
    assert out.shape == released.shape and set(rec2.k.tolist()) <= set(policy.k_values)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError):
        load_policy(tmp_path / "junk.pt")


# ------------------------------------------------------------------ configs
def test_config_inheritance_overrides_and_errors(tmp_path):
    (tmp_path / "parent.yaml").write_text("_base_: " + str(REPO / "configs" / "base.yaml") +
                                          "\ntrain:\n  steps: 7\nmodel:\n  name: tiny_test\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\ntrain:\n  n_fr: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["data.batch_size=12", "policy.k_values=[2, 4]", "data.train=null"])
    assert cfg["train"]["steps"] == 7 and cfg["train"]["n_fr"] == 3 and cfg["model"]["name"] == "tiny_test"
    assert cfg["data"]["batch_size"] == 12 and cfg["policy"]["k_values"] == [2, 4] and cfg["data"]["train"] is None
    assert cfg["optim"]["lr"] == 0.1   # filled in from base.yaml
    with pytest.raises(ConfigKeyError) as e:
        load_config(tmp_path / "child.yaml", ["train.stepz=3"])
    assert "train.stepz" in str(e.value) and "steps" in str(e.value) and "n_pi" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ValueError, match="loop"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config(tmp_path / "child.yaml", ["train.steps"])


def test_every_shipped_config_loads():
    from hybridmask.benchmark import load_benchmark
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("benchmark"):   # the benchmark's own schema (a list of training configs)
            for budget in ("tiny", "small", "full"):
                assert load_benchmark(path, budget)
            continue
        if path.name.startswith("frontier"):    # the frontier sweep's schema (a benchmark + masking variants)
            from hybridmask.benchmark.frontier import load_sweep
            assert load_sweep(path, "small")
            continue
        cfg = load_config(path)
        if cfg.get("method") == "arl":
            continue
        assert cfg["defense"]["name"] and cfg["model"]["name"]
    ks = [load_config(REPO / "configs" / f"celeba_fixed_k{k}.yaml")["defense"]["args"]["k"] for k in range(2, 7)]
    assert ks == [2, 3, 4, 5, 6]


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "bad.key=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'bad'" in err[0] and "train" in err[0] and "model" in err[0]
    assert cli_main(["train", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end
TINY = ["data.synthetic.identities=6", "data.synthetic.images_per_identity=6", f"data.synthetic.size={SIZE}",
        "data.batch_size=8", "eval.synthetic_pairs=40", "eval.synthetic_identities=10",
        "eval.synthetic_images_per_identity=2", "model.name=tiny_test", "model.args={}", "model.embedding_size=16",
        "run.mask_seed=1", "train.utility_every=2", "train.log_every=1", "head.name=cosface", "head.s=16",
        "optim.lr=0.05", "optim.warmup_steps=0"]


def test_cli_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "train.steps=4",
                   f"run.out_dir={out}"] + TINY)
    assert rc == 0
    run = out / "quickstart"
    for f in ("config.yaml", "model.pt", "policy.pt", "policy.md", "results.json", "ckpt/last.pt"):
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["steps"] == 4 and 0.0 <= res["verification"]["synthetic"]["accuracy"] <= 1.0
    assert sum(res["train"]["k_hist"].values()) == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "epoch 1:" in printed and "k-hist" in printed and "verification synthetic" in printed
    from hybridmask.models import load_model
    model, head, meta = load_model(run / "model.pt")
    assert meta["extra"]["defense"]["drop"] == "dc" and head.num_classes == 6
    d = create_defense("adaptive", policy_path=str(run / "policy.pt"), seed=0)
    x, _ = faces()
    assert model(d.query(x[:4])).shape == (4, 16)
    # a second invocation resumes (resume: auto) at the end and only re-evaluates
    assert cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "train.steps=4",
                     f"run.out_dir={out}"] + TINY) == 0
    assert "resumed from" in capsys.readouterr().out
    # the run's recognizer model card (fr_models/) and the run comparison table / k-histogram PNG
    card_main = _script("model_card").main
    assert card_main([str(run), "--out", str(tmp_path / "cards")]) == 0
    card = (tmp_path / "cards" / "quickstart.md").read_text()
    printed = capsys.readouterr().out
    assert "| quickstart | tiny_test-16 |" in printed and "[quickstart.md](quickstart.md)" in printed
    assert hashlib.sha256((run / "model.pt").read_bytes()).hexdigest() in card
    assert "mixed-label margin loss: yes" in card and "| LFW (pairs.txt) | not measured |" in card
    cmp_main = _script("compare_runs").main
    assert cmp_main([str(run), "--md", str(tmp_path / "cmp.md"), "--png", str(tmp_path / "k.png")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| quickstart | adaptive | adaptive |" in table
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="results.json"):
        cmp_main([str(tmp_path / "nowhere")])
    # publishing the policy into a policies/ folder: the same weights, a card naming the committed file
    pub = _script("publish_policy")
    assert pub.main([str(run), "--to", str(tmp_path / "pols")]) == 0
    printed = capsys.readouterr().out
    assert "| quickstart | [`quickstart.pt`](quickstart.pt) |" in printed and "[quickstart.md](quickstart.md)" in printed
    assert (tmp_path / "pols" / "quickstart.pt").read_bytes() == (run / "policy.pt").read_bytes()
    pcard = (tmp_path / "pols" / "quickstart.md").read_text()
    assert "published from" in pcard and "not in the repository" not in pcard
    assert "The FR loss is the recognizer's mixed-label margin loss." in pcard and "Attacker in the loop" not in pcard
    assert hashlib.sha256((run / "policy.pt").read_bytes()).hexdigest()[:16] in pcard
    assert sorted(p.name for p in (tmp_path / "pols").iterdir()) == ["SHA256SUMS", "quickstart.md", "quickstart.pt"]  # no temp files
    digest = hashlib.sha256((tmp_path / "pols" / "quickstart.pt").read_bytes()).hexdigest()
    assert (tmp_path / "pols" / "SHA256SUMS").read_text() == f"{digest}  quickstart.pt\n"   # loading verifies it
    assert pub.main([str(run), "--to", str(tmp_path / "pols3"), "--command", "hybridmask frontier --only x"]) == 0
    assert "| `hybridmask frontier --only x` |" in capsys.readouterr().out    # the command that trained it
    with pytest.raises(SystemExit, match="no policy|policy.pt"):       # a run without a trained policy
        (run / "policy.pt").rename(run / "policy.moved")
        pub.main([str(run), "--to", str(tmp_path / "pols2")])
    assert not (tmp_path / "pols2").exists()


def test_shipped_policies_load_and_match_their_cards_and_index():
    """Every policies/*.pt loads with weights_only, drives an adaptive defense, has a card that names its
    SHA-256 and a row in policies/README.md; every card with a published file has the file."""
    import hashlib as _h
    pol_dir = REPO / "policies"
    shipped = sorted(pol_dir.glob("*.pt"))
    assert shipped, "policies/ ships no trained policy"
    index = (pol_dir / "README.md").read_text()
    x, _ = faces()
    for f in shipped:
        policy, meta = load_policy(f, seed=0)
        card = (pol_dir / f"{f.stem}.md").read_text()
        assert _h.sha256(f.read_bytes()).hexdigest()[:16] in card, f
        assert f"[`{f.stem}.pt`]({f.stem}.pt)" in index, f
        assert meta["extra"]["k_hist"] and set(policy.k_values) <= {1, 2, 3, 4, 5, 6}   # 1: a ladder's level
        d = create_defense("adaptive", policy_path=str(f), seed=0)
        ladder = (meta["masking"] or {}).get("subset_by_k")
        assert (load_defense(str(f)).subset_by_k == (tuple(ladder) if ladder else None)), f   # the masking it trained for
        released, record = d.release(x[:8])
        assert released.shape[0] == 8 and torch.isfinite(released).all()
        assert set(torch.as_tensor(record.k).tolist()) <= set(policy.k_values)
    for card in pol_dir.glob("*.md"):
        if card.name != "README.md":
            assert (pol_dir / f"{card.stem}.pt").is_file(), f"{card.name} has no published policy file"


def _script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_dctdp_config_trains_its_budgets_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--config", str(REPO / "configs" / "celeba_dctdp.yaml"), "train.steps=2", f"run.out_dir={out}",
            "data.train=null", "eval.targets=[synthetic]", "optim.defense_lr=0.05"] + TINY
    assert cli_main(argv) == 0
    run = out / "celeba_dctdp"
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["steps"] == 2 and res["defense"]["name"] == "dctdp"
    assert res["defense_stats"]["eps_sum_over_total"] == pytest.approx(1.0, rel=1e-5)
    assert "defense/privacy_loss" in res["history"][-1]
    ck = safe_torch_load(run / "ckpt" / "last.pt")
    assert ck["defense_optim"] is not None and ck["defense_scheduler"]["last_epoch"] == 2
    assert float(ck["defense_state"]["rho"].abs().max()) > 0   # moved off the uniform start
    # the trained budgets travel in model.pt and rebuild the defense the harness attacks
    from hybridmask.defenses import load_defense
    for spec in (run / "model.pt", run):
        d = load_defense(spec, seed=0)
        assert d.config["budget_mean"] == 4.0 and d.config["allocation"] == "softmax"
        torch.testing.assert_close(d.rho.detach(), ck["defense_state"]["rho"])
    with pytest.raises(ValueError, match="budget_mean"):
        load_defense(run / "model.pt", overrides={"budget_mean": 2.0})
    capsys.readouterr()


@pytest.mark.slow
def test_ddp_two_processes_matches_single_process(tmp_path):
    """torchrun, 2 gloo processes x batch 8 vs one process x batch 16 over the same global batches."""
    common = ["train.steps=6", "train.n_fr=2", "run.threads=1", "train.ckpt_every=3", "policy.k_values=[2,3]"] + [
        t for t in TINY if not t.startswith("data.batch_size")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "hybridmask.cli", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
                        f"run.out_dir={single}", "data.batch_size=16", "run.progress=false"] + common,
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "hybridmask.cli", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
                        f"run.out_dir={ddp}", "data.batch_size=8", "run.progress=false"] + common,
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rs = json.loads((single / "quickstart" / "results.json").read_text())
    rd = json.loads((ddp / "quickstart" / "results.json").read_text())
    assert rd["world_size"] == 2 and rd["images_seen"] == rs["images_seen"] == 6 * 16
    ls = [h["loss"] for h in rs["history"]]
    ld = [h["loss"] for h in rd["history"]]
    assert len(ls) == len(ld) == 6
    # the same global batches: the losses agree step by step up to the per-process mixing partners
    # and BN statistics (measured: ~10 % apart on average)
    rel = [abs(d - s_) / s_ for d, s_ in zip(ld, ls)]
    assert sum(rel) / len(rel) < 0.25, (ls, ld)
    ck = safe_torch_load(ddp / "quickstart" / "ckpt" / "last.pt")
    assert len(ck["ranks"]) == 2
    g0, g1 = (ck["ranks"][i]["defense"]["generator"] for i in range(2))
    assert not torch.equal(g0, g1), "each process must draw its own masking secrets"
    # the replicas stayed identical: recognizer (DDP) and policy (decided on the gathered batch)
    assert ck["ranks"][0]["model_checksum"] == ck["ranks"][1]["model_checksum"]
    assert ck["ranks"][0]["policy_checksum"] == ck["ranks"][1]["policy_checksum"]
    assert (ddp / "quickstart" / "policy.pt").is_file() and not list((ddp / "quickstart").glob("*rank1*"))


@pytest.mark.slow
def test_ddp_keeps_learnable_defense_parameters_in_sync(tmp_path):
    """torchrun, 2 gloo processes with DCTDP: each rank draws its own noise, so only the averaged
    gradients keep the budgets identical on both ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "hybridmask.cli", "train", "--config", str(REPO / "configs" / "celeba_dctdp.yaml"),
                        f"run.out_dir={tmp_path}", "run.progress=false", "train.steps=4", "data.train=null",
                        "eval.targets=[synthetic]", "run.threads=1", "optim.defense_lr=0.1"] + TINY,
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ck = safe_torch_load(tmp_path / "celeba_dctdp" / "ckpt" / "last.pt")
    assert len(ck["ranks"]) == 2 and float(ck["defense_state"]["rho"].abs().max()) > 0
    assert ck["ranks"][0]["defense_checksum"] == ck["ranks"][1]["defense_checksum"]
    assert ck["ranks"][0]["model_checksum"] == ck["ranks"][1]["model_checksum"]


def test_copies_mask_each_copy_of_a_face_on_its_own():
    """data.copies: r: every face of the batch enters the step r times, each copy with its own masking draw."""
    torch.manual_seed(0)
    x, y = faces()
    defense = create_defense("ppfrfd", seed=4)      # a fresh channel permutation per release
    model = create_model("tiny_test", stem="freq", in_chans=defense.in_channels, grid=SIZE // 8, embedding_size=16)
    head = create_head("cosface", 16, N_IDS, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05)
    seen = []
    real = defense.release

    def spy(images, *a, **kw):
        out = real(images, *a, **kw)
        seen.append((images.detach().clone(), out[0].detach().clone()))
        return out
    defense.release = spy
    tr = AlternatingTrainer(model, head, opt, TensorDataset(x, y), defense,
                            options=TrainOptions(batch_size=4, seed=1, copies=3))
    out = tr.step((x[:4], y[:4]))
    assert out["images"] == 12 and out["k"].numel() == 12
    images, masked = seen[-1]
    assert images.shape[0] == 12
    for i in range(4):                                 # the same face three times, masked three different ways
        assert torch.equal(images[i], images[i + 4]) and torch.equal(images[i], images[i + 8])
        assert not torch.allclose(masked[i], masked[i + 4]) and not torch.allclose(masked[i], masked[i + 8])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="copies"):
            AlternatingTrainer(model, head, opt, TensorDataset(x, y), defense,
                               options=TrainOptions(batch_size=4, copies=bad))
