"""A run folder is written by one trainer at a time, a resumed run keeps its config, checkpoints holding
secrets are private, killed writes leave nothing behind, published policies are verified, and every
training config value is type- and range-checked (issue 15 items 3-6 and 9)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridmask.cli import main as cli_main
from hybridmask.defenses import load_defense
from hybridmask.utils import FolderBusyError, FolderLock

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.identities=6", "data.synthetic.images_per_identity=6", "data.synthetic.size=32",
        "data.batch_size=8", "model.name=tiny_test", "model.args={}", "model.embedding_size=16", "head.s=16",
        "eval.final=false", "run.progress=false", "train.utility_every=0", "policy.name=none",
        "defense.name=ppfrfd", "defense.args={u: 2}"]


def train(out, *extra):
    return cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"run.out_dir={out}",
                     "run.name=r"] + TINY + list(extra))


def test_a_second_trainer_on_a_live_run_folder_is_refused(tmp_path, capsys):
    """Two trainers on one folder: the first (a separate process) holds the lock, the second gets one
    clear error naming the holder and writes nothing."""
    args = [sys.executable, "-m", "hybridmask", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
            f"run.out_dir={tmp_path}", "run.name=r", "train.steps=100000", "train.ckpt_every=0"] + TINY
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lock = tmp_path / "r" / ".lock"
        for _ in range(600):
            if lock.is_file() and lock.read_text().startswith(f"pid {first.pid}"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first trainer never took the run folder's lock")
        assert train(tmp_path, "train.steps=2") == 1
        err = capsys.readouterr().err
        assert f"in use by pid {first.pid}" in err and err.count("\n") == 1
        assert not (tmp_path / "r" / "model.pt").exists()
    finally:
        first.kill()
        first.wait()
    assert train(tmp_path, "train.steps=2", "run.resume=null") == 0   # a killed holder releases the lock


def test_folder_lock_is_exclusive(tmp_path):
    with FolderLock(tmp_path, "run"):
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
            FolderLock(tmp_path, "run").acquire()
    FolderLock(tmp_path, "run").acquire().release()


def test_resume_refuses_a_changed_config_unless_asked_and_records_it(tmp_path, capsys):
    assert train(tmp_path, "train.steps=2", "optim.lr=0.1") == 0
    ck = tmp_path / "r" / "ckpt" / "last.pt"
    assert stat.S_IMODE(ck.stat().st_mode) == 0o600                      # it holds the masking secrets
    before = (tmp_path / "r" / "config.yaml").read_text()
    assert train(tmp_path, "train.steps=3", "optim.lr=0.5") == 1
    err = capsys.readouterr().err
    assert "optim.lr: 0.1 -> 0.5" in err and "train.steps: 2 -> 3" in err
    assert (tmp_path / "r" / "config.yaml").read_text() == before        # nothing rewritten
    # harmless keys may change
    assert train(tmp_path, "train.steps=2", "optim.lr=0.1", "run.threads=1", "train.log_every=1") == 0
    # asked for: continues and says what changed
    assert train(tmp_path, "train.steps=3", "optim.lr=0.5", "run.allow_config_change=true") == 0
    import json
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert any(c.startswith("optim.lr: 0.1 -> 0.5") for c in res["config_changes_on_resume"])


def test_stale_temporaries_are_removed_on_start(tmp_path):
    assert train(tmp_path, "train.steps=1") == 0
    stale = tmp_path / "r" / "ckpt" / ".last.pt.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train(tmp_path, "train.steps=1") == 0
    assert not stale.exists()


def test_a_corrupted_published_policy_is_refused(tmp_path):
    pub = tmp_path / "policies"
    pub.mkdir()
    for f in ("quickstart.pt", "SHA256SUMS"):
        shutil.copy(REPO / "policies" / f, pub / f)
    assert load_defense(pub / "quickstart.pt").name == "adaptive"
    raw = bytearray((pub / "quickstart.pt").read_bytes())
    raw[-2000] ^= 0xFF                                                   # one flipped byte in the weights
    (pub / "quickstart.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256"):
        load_defense(pub / "quickstart.pt")
    # non-finite weights (no manifest to catch it): refused by name
    blob = torch.load(REPO / "policies" / "quickstart.pt", weights_only=True)
    key = next(k for k, v in blob["policy_state"].items() if v.is_floating_point())
    blob["policy_state"][key] = blob["policy_state"][key].clone().fill_(float("nan"))
    torch.save(blob, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="NaN"):
        load_defense(tmp_path / "nan.pt")


def test_every_shipped_policy_matches_the_manifest():
    from hybridmask.utils import file_sha256
    lines = (REPO / "policies" / "SHA256SUMS").read_text().split("\n")
    listed = {ln.split()[1]: ln.split()[0] for ln in lines if ln.strip()}
    shipped = sorted(p.name for p in (REPO / "policies").glob("*.pt"))
    assert sorted(listed) == shipped
    for name, digest in listed.items():
        assert file_sha256(REPO / "policies" / name) == digest


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=3.7", "'data.batch_size' must be an integer"),
    ("train.epochs=true", "'train.epochs' must be an integer"),
    ("train.steps=abc", "'train.steps' must be an integer"),
    ("data.batch_size=0", "'data.batch_size' must be in [1"),
    ("optim.lr=-1", "'optim.lr' must be in [0.0"),
    ("train=5", "section 'train' must be a mapping"),
    ("data.hflip=3", "'data.hflip' must be true or false"),
])
def test_config_values_are_checked(tmp_path, capsys, override, message):
    assert train(tmp_path, override) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
