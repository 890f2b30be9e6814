"""Client keys (issue 13 items 4 and 6): ``shuffle="keys:R"`` draws every sample's permutation from R
fixed secret keys; a keyed defense's key is saved apart (mode 0600), a checkpoint records only its
fingerprint, and a model is refused the wrong key."""
from __future__ import annotations

import json
import os
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hybridmask.cli import main as cli_main
from hybridmask.defenses import create_defense
from hybridmask.defenses.io import (ClientKeyMismatchError, defense_record, key_fingerprint, load_client_key,
                                    load_defense, save_client_key, save_defense)
from hybridmask.freq import HybridMask
from hybridmask.freq.ppfrfd import PPFRFD

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_run_safety import REPO, TINY  # noqa: E402


def _faces(n=4, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---- keys:R ----------------------------------------------------------------------------------------
def test_keys_r_draws_only_the_r_keys_and_all_of_them():
    p = PPFRFD(shuffle="keys:3", seed=0)
    assert p.keys.shape == (3, p.out_channels)
    for row in p.keys:   # each key is a permutation of the kept channels
        assert torch.equal(row.sort().values, torch.arange(p.out_channels))
    rows = torch.cat([p.permutations(64) for _ in range(4)])
    match = (rows.unsqueeze(1) == p.keys.unsqueeze(0)).all(-1)          # (N, R)
    assert bool(match.any(1).all()), "a sample's permutation is not one of the R keys"
    assert bool(match.any(0).all()), "not every key is drawn"
    assert len({tuple(k.tolist()) for k in p.keys}) == 3


def test_keys_r_validation_and_keys_1_is_key():
    for bad in ("keys:0", "keys:-2", "keys:x", "keys:", "keys:1.5", "key:3", 3):
        with pytest.raises(ValueError):
            PPFRFD(shuffle=bad)
    one, key = PPFRFD(shuffle="keys:1", seed=5), PPFRFD(shuffle="key", seed=5)
    assert one.shuffle == "key" and torch.equal(one.keys, key.keys)
    assert torch.equal(one.permutations(3), key.permutations(3))
    d = create_defense("ppfrfd", shuffle="keys:1", seed=0)
    assert d.structure().shuffle == "key" and not d.stochastic


def test_defenses_accept_keys_r():
    x = _faces()
    for name, args in (("ppfrfd", {}), ("freq_mixup", {"k": 2}), ("adaptive", {})):
        d = create_defense(name, shuffle="keys:4", seed=0, **args)
        assert d.structure().shuffle == "keys:4" and d.stochastic
        assert d.client_key().shape == (4, d.in_channels)
        assert d.query(x).shape[1] == d.in_channels
    assert create_defense("ppfrfd", shuffle="sample").client_key() is None
    assert create_defense("none").client_key() is None
    with pytest.raises(ValueError, match="no client key"):
        create_defense("ppfrfd", shuffle="sample").use_client_key(torch.arange(189).unsqueeze(0))


def test_keys_r_round_trips_through_secret_state():
    a = HybridMask(shuffle="keys:3", seed=0)
    state = a.secret_state()
    assert state["keys"].shape == (3, 189)
    ref = [a.ppfrfd.permutations(5) for _ in range(3)]
    b = HybridMask(shuffle="keys:3", seed=99)
    b.load_secret_state(state)
    assert torch.equal(b.ppfrfd.keys, state["keys"])
    assert all(torch.equal(r, b.ppfrfd.permutations(5)) for r in ref)
    # the one-key state of earlier checkpoints still loads
    c = HybridMask(shuffle="key", seed=1)
    c.load_secret_state({"generator": state["generator"], "key_perm": state["keys"][0]})
    assert torch.equal(c.ppfrfd.keys[0], state["keys"][0])
    with pytest.raises(ValueError, match="shape"):
        HybridMask(shuffle="keys:2", seed=0).load_secret_state(state)


# ---- key files and fingerprints --------------------------------------------------------------------
def test_client_key_file_round_trip_and_mode(tmp_path):
    d = create_defense("ppfrfd", shuffle="keys:3", seed=0)
    fp = save_client_key(tmp_path / "k.pt", d)
    assert stat.S_IMODE(os.stat(tmp_path / "k.pt").st_mode) == 0o600
    loaded = load_client_key(tmp_path / "k.pt")
    assert torch.equal(loaded["keys"], d.client_key()) and loaded["fingerprint"] == fp == key_fingerprint(d.client_key())
    assert loaded["defense"]["shuffle"] == "keys:3"
    e = create_defense("ppfrfd", shuffle="keys:3")
    assert not torch.equal(e.client_key(), d.client_key())
    e.use_client_key(loaded["keys"])
    assert torch.equal(e.client_key(), d.client_key())
    with pytest.raises(ValueError, match="no client key"):
        save_client_key(tmp_path / "none.pt", create_defense("ppfrfd", shuffle="sample"))
    blob = torch.load(tmp_path / "k.pt", weights_only=False)
    blob["fingerprint"] = "0" * 64
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="fingerprint"):
        load_client_key(tmp_path / "bad.pt")


def test_fingerprint_check_refuses_a_wrong_key(tmp_path):
    d = create_defense("ppfrfd", shuffle="key", seed=0)
    rec = defense_record(d)
    assert rec["key_fingerprint"] == key_fingerprint(d.client_key())
    assert not any(torch.is_tensor(v) for v in rec.values())     # the fingerprint, never the key
    assert "key_fingerprint" not in defense_record(create_defense("ppfrfd", shuffle="sample"))
    save_defense(tmp_path / "defense.pt", d)
    save_client_key(tmp_path / "right.pt", d)
    save_client_key(tmp_path / "wrong.pt", create_defense("ppfrfd", shuffle="key", seed=1))
    got = load_defense(tmp_path / "defense.pt", key=tmp_path / "right.pt")
    assert torch.equal(got.client_key(), d.client_key())
    with pytest.raises(ClientKeyMismatchError, match="this model was trained with another client key"):
        load_defense(tmp_path / "defense.pt", key=tmp_path / "wrong.pt")
    from hybridmask.attacks.cli import resolve_defense   # hybridmask attack --key
    with pytest.raises(ClientKeyMismatchError, match="another client key"):
        resolve_defense(str(tmp_path / "defense.pt"), {}, key=str(tmp_path / "wrong.pt"))
    assert torch.equal(resolve_defense(str(tmp_path / "defense.pt"), {}, key=str(tmp_path / "right.pt")).client_key(),
                       d.client_key())
    with pytest.warns(UserWarning, match="will not match the model's key"):
        fresh = load_defense(tmp_path / "defense.pt")
    assert not torch.equal(fresh.client_key(), d.client_key())
    # a registered name with a key file: installed as is
    assert torch.equal(load_defense("ppfrfd", overrides={"shuffle": "key"}, key=tmp_path / "right.pt").client_key(),
                       d.client_key())


# ---- the trainer and eval --------------------------------------------------------------------------
def test_train_writes_the_key_and_eval_takes_it(tmp_path, capsys):
    out = tmp_path / "runs"
    rc = cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"run.out_dir={out}",
                   "run.name=r"] + TINY + ["data.synthetic.size=112", "defense.args={u: 1, shuffle: key}",
                                           "train.steps=2", "train.ckpt_every=0"])
    assert rc == 0
    run = out / "r"
    key = run / "client_key.pt"
    assert key.is_file() and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    model_blob = torch.load(run / "model.pt", weights_only=False)
    assert model_blob["extra"]["key_fingerprint"] == load_client_key(key)["fingerprint"]
    assert "keys" not in model_blob["extra"]
    ev = ["eval", "--model", str(run / "model.pt"), "--targets", "synthetic", "--max-pairs", "10", "--quiet",
          "--threads", "1"]
    assert cli_main(ev + ["--key", str(key)]) == 0
    assert "accuracy" in capsys.readouterr().out
    from hybridmask.train.card import recognizer_card        # the card's re-run command passes the key
    res = json.loads((run / "results.json").read_text())
    assert f"--key {run / 'client_key.pt'}" in recognizer_card(res, "0" * 64, 1).replace("\n", " ")
    wrong = tmp_path / "wrong.pt"
    save_client_key(wrong, create_defense("ppfrfd", shuffle="key"))
    assert cli_main(ev + ["--key", str(wrong)]) != 0
    assert "this model was trained with another client key" in capsys.readouterr().err


def test_key_path_is_validated_and_used(tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"run.out_dir={out}"] + TINY + [
        "train.steps=1", "train.ckpt_every=0"]
    assert cli_main(base + ["run.name=a", "run.key_path=5", "defense.args={u: 2, shuffle: key}"]) != 0
    assert "run.key_path" in capsys.readouterr().err
    assert cli_main(base + ["run.name=b", f"run.key_path={tmp_path / 'k.pt'}"]) != 0
    assert "no client key" in capsys.readouterr().err
    assert cli_main(base + ["run.name=c", f"run.key_path={tmp_path / 'mine.pt'}",
                            "defense.args={u: 2, shuffle: 'keys:2'}"]) == 0
    assert (tmp_path / "mine.pt").is_file() and not (out / "c" / "client_key.pt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = load_defense(out / "c", key=tmp_path / "mine.pt")
    assert d.client_key().shape[0] == 2
