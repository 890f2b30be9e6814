"""Rebuilding a trained run's defense (hybridmask.defenses.io) for the attack harness and evaluation:
tiny real training runs (tiny_test model, synthetic faces, 2 steps) for dctdp, instahide and the adaptive
defense, then ``hybridmask attack`` / ``hybridmask eval`` on their outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridmask.defenses import build_defense, load_defense
from hybridmask.defenses.io import DefenseNotRecordedError
from hybridmask.models import create_model, save_model
from hybridmask.utils import atomic_save, safe_torch_load

REPO = Path(__file__).resolve().parents[1]

# a 2-step hybridmask train run on 36 synthetic 112x112 faces (seconds on 2 cores)
TINY_RUN = ["train.steps=2", "data.synthetic.identities=6", "data.synthetic.images_per_identity=6",
            "data.synthetic.size=112", "data.batch_size=8", "model.name=tiny_test", "model.args={}",
            "model.embedding_size=16", "head.name=cosface", "head.s=16", "optim.lr=0.05", "run.mask_seed=1",
            "run.progress=false", "eval.final=false", "train.utility_every=100", "optim.defense_lr=0.05"]

RUNS = {
    "dctdp": ["defense.name=dctdp", "defense.args={u: 1, budget_mean: 4.0}", "policy.name=none"],
    "instahide": ["defense.name=instahide", "defense.args={k: 2}", "policy.name=none"],
    "adaptive": ["defense.name=adaptive", "defense.args={}", "policy.name=adaptive", "policy.k_values=[2,3]"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hybridmask.train import load_config, run_training
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, ov in RUNS.items():
        cfg = load_config(REPO / "configs" / "base.yaml", TINY_RUN + ov + [f"run.out_dir={root}", f"run.name={name}"])
        run_training(cfg)
        out[name] = root / name
    return out


def trained_rho(run):
    return safe_torch_load(run / "ckpt" / "last.pt")["defense_state"]["rho"]


# ---- the loaders -----------------------------------------------------------------------------------------
def test_dctdp_run_rebuilds_its_trained_budgets(runs):
    run = runs["dctdp"]
    rho = trained_rho(run)
    assert float(rho.abs().max()) > 0                       # moved off the uniform start
    d = load_defense(run / "model.pt")
    assert d.name == "dctdp" and "state_path" not in d.config
    torch.testing.assert_close(d.rho.detach(), rho)
    # a white-box attacker's own instance (config + learned state, its own secrets) has the same budgets
    torch.testing.assert_close(build_defense(d.config, d.defense_state(), seed=1).epsilon(), d.epsilon())
    # run folder, its config.yaml and an unfinished run (no model.pt: the trainer checkpoint) agree
    for spec in (run, run / "config.yaml"):
        torch.testing.assert_close(load_defense(spec).rho.detach(), rho)
    partial = run.parent / "dctdp_partial"
    shutil.copytree(run, partial)
    (partial / "model.pt").unlink()
    torch.testing.assert_close(load_defense(partial).rho.detach(), rho)
    shutil.rmtree(partial / "ckpt")          # only the config left: refuse to rebuild untrained budgets
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_defense(partial)
    with pytest.raises(ValueError, match="untrained"):
        load_defense(partial / "config.yaml")
    # fresh secrets: two rebuilds draw different noise
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert not torch.equal(d.query(x), load_defense(run / "model.pt").query(x))
    with pytest.raises(ValueError, match="budget_mean"):
        load_defense(run / "model.pt", overrides={"budget_mean": 2.0})


def test_instahide_run(runs):
    d = load_defense(runs["instahide"] / "model.pt")
    assert d.name == "instahide" and d.k == 2
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    torch.testing.assert_close(d.query(x).abs(), x.abs())   # test-time query: the sign-flipped face alone
    assert load_defense(runs["instahide"], overrides={"k": 3}).k == 3


def test_adaptive_run_carries_its_policy(runs, tmp_path):
    run = runs["adaptive"]
    d = load_defense(run / "model.pt")
    assert d.name == "adaptive" and "policy_path" not in d.config
    pol = safe_torch_load(run / "policy.pt")["policy_state"]
    for k, v in pol.items():
        torch.testing.assert_close(d.policy.state_dict()[k], v)
    assert list(d.policy.k_values) == [2, 3]
    # the policy travels inside the model's defense record: the model alone is enough
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run / "model.pt", lone / "model.pt")
    assert list(load_defense(lone / "model.pt").policy.k_values) == [2, 3]
    blob = safe_torch_load(run / "model.pt")         # without its learned state it would be untrained
    blob["extra"]["defense_state"] = None
    atomic_save(blob, lone / "model.pt")
    with pytest.raises(ValueError, match="untrained"):
        load_defense(lone / "model.pt")
    assert list(load_defense(run / "policy.pt").policy.k_values) == [2, 3]


def test_checkpoints_without_a_defense_record(tmp_path):
    net = create_model("tiny_test", stem="pixel", in_chans=3, grid=112, embedding_size=8)
    save_model(tmp_path / "plain.pt", net)
    with pytest.raises(DefenseNotRecordedError, match="--defense none"):
        load_defense(tmp_path / "plain.pt")
    save_model(tmp_path / "none.pt", net, extra={"defense": {"name": "none"}})
    assert load_defense(tmp_path / "none.pt").name == "none"
    save_model(tmp_path / "wrong.pt", net, extra={"defense": {"name": "ppfrfd", "u": 1}})
    with pytest.raises(ValueError, match="pixel input"):
        load_defense(tmp_path / "wrong.pt")
    save_model(tmp_path / "dct.pt", create_model("tiny_test", stem="freq", in_chans=189, grid=14, embedding_size=8),
               extra={"defense": {"name": "dctdp", "u": 1}})
    with pytest.raises(ValueError, match="untrained"):
        load_defense(tmp_path / "dct.pt")
    atomic_save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hybridmask"):
        load_defense(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_defense(tmp_path)
    with pytest.raises(KeyError, match="unknown defense"):
        load_defense("nope")


# ---- the CLIs -------------------------------------------------------------------------------------------
def _synthetic_attack_data(*args, **kw):
    from hybridmask.attacks.data import AttackData
    g = torch.Generator().manual_seed(0)
    faces = torch.rand(28, 3, 112, 112, generator=g) * 2 - 1
    return AttackData(victims=faces[:4], victim_labels=["a", "b", "c", "d"], gallery=faces[4:12],
                      gallery_labels=list("abcdabcd"), public=faces[12:], public_labels=torch.arange(16) % 4,
                      public_identities=["p0", "p1", "p2", "p3"], info={"synthetic": True})


def _cheap_embedder(_spec):
    return lambda x: F.avg_pool2d(x, 16).flatten(1)


@pytest.mark.parametrize("kind", ["dctdp", "instahide"])
def test_attack_cli_attacks_the_trained_defense(runs, kind, tmp_path, monkeypatch):
    """``hybridmask attack --defense <run>/model.pt`` attacks the run's defense (not ``none``); the harness
    runs on stand-in data and judge (the real-face path is tested in test_attacks.py)."""
    import hybridmask.attacks.cli as cli
    import hybridmask.attacks.data as adata
    from hybridmask.cli import main
    monkeypatch.setattr(adata, "build_attack_data", _synthetic_attack_data)
    monkeypatch.setattr(cli, "_embedder", _cheap_embedder)
    out = tmp_path / "att"
    rc = main(["attack", "--defense", str(runs[kind] / "model.pt"), "--attacks", "cgan", "--attack-arg",
               "cgan.epochs=1", "--attack-arg", "cgan.width=4", "--attack-arg", "cgan.size=32", "--attack-arg",
               "cgan.disc_width=4", "--data", str(tmp_path), "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["defense"] == kind and res["config"]["name"] == kind
    if kind == "instahide":
        assert res["config"]["k"] == 2
    assert "cgan" in res["attacks"]


@pytest.mark.parametrize("kind", ["dctdp", "instahide"])
def test_eval_cli_queries_through_the_trained_defense(runs, kind, tmp_path):
    from hybridmask.cli import main
    from hybridmask.eval.recognizers import load_recognizer
    model_pt = runs[kind] / "model.pt"
    _, transform, info = load_recognizer(str(model_pt), device="cpu")
    assert info["defense"] == kind and transform is not None
    defense = transform.__self__
    if kind == "dctdp":
        torch.testing.assert_close(defense.rho.detach(), trained_rho(runs[kind]))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_pt), "--targets", "synthetic", "--max-pairs", "10", "--batch-size", "16",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert doc["model_info"]["defense"] == kind
    assert 0.0 <= doc["results"]["synthetic600"]["accuracy"] <= 1.0
