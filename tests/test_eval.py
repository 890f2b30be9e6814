"""hybridmask.eval: embedding with flip, verification metrics, evaluate() and the eval CLI."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from hybridmask.data import synthetic_pairs, write_bin
from hybridmask.eval import embed, evaluate, plot_roc, verification_metrics
from hybridmask.eval.metrics import best_threshold, fold_ids, roc_curve, tar_at_far


class TinyNet(nn.Module):
    def __init__(self, dim: int = 8, in_ch: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_ch, 4, 5, stride=4)
        self.fc = nn.LazyLinear(dim)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


# ---------------------------------------------------------------- metrics
def _perfect(n=600, seed=0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    scores = np.where(same, rng.uniform(0.6, 1.0, n), rng.uniform(-0.2, 0.4, n))
    return scores, same


def test_accuracy_perfect_and_random_embeddings():
    # perfect embeddings: identical vectors for same pairs, orthogonal-ish otherwise
    rng = np.random.default_rng(1)
    n, d = 1000, 64
    same = np.arange(n) % 2 == 0
    a = rng.standard_normal((n, d))
    b = np.where(same[:, None], a, rng.standard_normal((n, d)))
    cos = lambda u, v: (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)  # noqa: E731
    r = verification_metrics(cos(a, b), same)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0 and r["auc"] == 1.0
    assert r["folds"] == 10 and len(r["fold_accuracies"]) == 10
    # random embeddings: chance
    b2 = rng.standard_normal((n, d))
    r2 = verification_metrics(cos(a, b2), same)
    assert 0.40 <= r2["accuracy"] <= 0.60
    assert 0.40 <= r2["auc"] <= 0.60


def test_best_threshold_is_exact():
    rng = np.random.default_rng(2)
    s = np.round(rng.standard_normal(60), 1)  # ties on purpose
    y = rng.random(60) < 0.5
    thr, acc = best_threshold(s, y)
    brute = max(((s > t) == y).mean() for t in np.r_[s - 1e-9, s.max() + 1])
    assert acc == pytest.approx(brute)
    assert ((s > thr) == y).mean() == pytest.approx(acc)


def test_tar_at_far_monotone_and_honest():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    s = np.r_[rng.normal(1.0, 1.0, 3000), rng.normal(-1.0, 1.0, 3000)]
    fars = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.5, 1.0]
    tars = [tar_at_far(s, y, f) for f in fars]
    for prev, cur in zip(tars, tars[1:]):
        assert cur["tar"] >= prev["tar"]
    for f, t in zip(fars, tars):
        assert t["far"] <= f + 1e-12  # never above the target
    assert tars[2]["false_accepts_allowed"] == 3  # FAR 1e-3 of 3,000 negatives
    assert tars[0]["false_accepts_allowed"] == 0
    assert tars[-1]["tar"] == 1.0
    with pytest.raises(ValueError):
        tar_at_far(s, y, 0)


def test_roc_auc_matches_rank_statistic():
    rng = np.random.default_rng(4)
    y = rng.random(300) < 0.4
    s = np.round(rng.standard_normal(300) + y, 1)
    fpr, tpr, _ = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    pos, neg = s[y], s[~y]
    mw = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert verification_metrics(s, y)["auc"] == pytest.approx(mw)


def test_folds_given_or_contiguous():
    assert np.bincount(fold_ids(23, 10)).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    s, y = _perfect(40)
    folds = np.arange(40) % 4
    r = verification_metrics(s, y, folds=folds)
    assert r["folds"] == 4
    with pytest.raises(ValueError):
        verification_metrics(s, y, folds=np.zeros(40))
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics(np.r_[s[:-1], np.nan], y)
    with pytest.raises(ValueError, match="length"):
        verification_metrics(s[:-1], y)


def test_plot_roc_writes_png(tmp_path):
    s, y = _perfect(200)
    s = s + np.random.default_rng(0).normal(0, 0.3, len(s))
    r = verification_metrics(s, y)
    path = tmp_path / "roc.png"
    plot_roc({"a": r, "b": r}, path)
    assert Image.open(path).format == "PNG"
    with pytest.raises(ValueError):
        plot_roc({"a": {"accuracy": 1}}, tmp_path / "x.png")


# ---------------------------------------------------------------- embed
def test_embed_flip_sum_and_batching():
    net = TinyNet()
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    e = embed(net, x, batch_size=16, progress=False)  # fewer images than a batch
    assert e.shape == (5, 8)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(x) + net(x.flip(3)), dim=1)
    assert torch.allclose(e, ref, atol=1e-5)
    e1 = embed(net, x, batch_size=2, progress=False)  # batches of 2, 2, 1
    assert torch.allclose(e, e1, atol=1e-5)
    # iterable of single images and of (image, label) tuples
    e2 = embed(net, ((img, 0) for img in x), batch_size=3, progress=False)
    assert torch.allclose(e, e2, atol=1e-5)
    e3 = embed(net, x, flip=False, normalize=False, progress=False)
    with torch.no_grad():
        assert torch.allclose(e3, net(x), atol=1e-5)


def test_embed_transform_after_flip():
    seen = []

    def transform(batch):
        seen.append(batch.clone())
        return batch[:, :, :, :56]  # not flip-equivariant: order matters

    def fn(batch):
        return batch.mean(dim=(2, 3)) + torch.arange(3.0)

    x = torch.rand(4, 3, 112, 112) * 2 - 1
    e = embed(fn, x, transform=transform, normalize=False, progress=False)
    assert torch.equal(seen[0], x) and torch.equal(seen[1], x.flip(3))
    ref = fn(x[..., :56]) + fn(x.flip(3)[..., :56])
    assert torch.allclose(e, ref)


def test_embed_bad_input():
    net = TinyNet()
    with pytest.raises(ValueError, match="batch_size"):
        embed(net, torch.zeros(2, 3, 112, 112), batch_size=256)
    with pytest.raises(ValueError, match="NaN"):
        embed(net, torch.full((2, 3, 112, 112), float("nan")), progress=False)
    with pytest.raises(ValueError, match="no images"):
        embed(net, [], progress=False)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        embed(lambda b: b, torch.zeros(2, 3, 112, 112), progress=False)


def test_embed_restores_training_mode():
    net = TinyNet()
    net.train()
    embed(net, torch.zeros(1, 3, 112, 112), progress=False)
    assert net.training


# ---------------------------------------------------------------- evaluate
def test_evaluate_synthetic_and_bin(tmp_path):
    net = TinyNet()
    vs = synthetic_pairs(24, num_identities=6, images_per_identity=2, size=112, seed=0)
    r = evaluate(net, vs, batch_size=16, progress=False, return_scores=True)
    for k in ("accuracy", "accuracy_std", "auc", "tar_at_far", "roc", "seconds", "images_per_second"):
        assert k in r
    assert r["pairs"] == 24 and r["fold_source"] == "contiguous" and r["images"] == vs.num_images
    # the same pairs as a .bin file give the same numbers
    def jpeg(t):
        arr = ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()
    imgs = [jpeg(vs.image(int(k))) for p in vs.pairs for k in p]
    write_bin(tmp_path / "syn.bin", imgs, vs.issame.tolist())
    rb = evaluate(net, str(tmp_path / "syn.bin"), batch_size=16, progress=False, return_scores=True)
    assert rb["issame"] == r["issame"]
    assert np.allclose(rb["scores"], r["scores"], atol=0.02)  # only 8-bit quantisation differs
    sub = evaluate(net, vs, max_pairs=12, progress=False)
    assert sub["pairs"] == 12


def test_evaluate_target_errors(tmp_path):
    net = TinyNet()
    with pytest.raises(KeyError, match="unknown verification target"):
        evaluate(net, "imagenet", data_root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="LFW"):
        evaluate(net, "lfw", data_root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="agedb_30"):
        evaluate(net, "agedb_30", data_root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        evaluate(net, str(tmp_path / "none.bin"), progress=False)


def test_eval_cli_with_checkpoint(tmp_path, capsys):
    models = pytest.importorskip("hybridmask.models")
    from hybridmask.cli import main
    net = models.create_model("tiny_test", stem="pixel", in_chans=3, grid=112, embedding_size=16)
    ckpt = tmp_path / "m.pt"
    models.save_model(ckpt, net)
    out, roc = tmp_path / "r.json", tmp_path / "roc.png"
    rc = main(["eval", "--model", str(ckpt), "--targets", "synthetic", "--max-pairs", "20", "--batch-size", "16",
               "--out", str(out), "--roc", str(roc), "--quiet", "--device", "cpu"])
    assert rc == 0
    doc = json.loads(out.read_text())
    res = doc["results"]["synthetic600"]
    assert res["pairs"] == 20 and 0.0 <= res["accuracy"] <= 1.0 and "roc" not in res
    assert "synthetic600" in capsys.readouterr().out
    assert Image.open(roc).format == "PNG"


def test_eval_cli_masked_checkpoint(tmp_path):
    models = pytest.importorskip("hybridmask.models")
    from hybridmask.eval.recognizers import load_recognizer
    from hybridmask.defenses import create_defense, defense_record
    d = create_defense("ppfrfd", u=1, drop="dc", seed=0)
    net = models.create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=d.grid, embedding_size=16)
    ckpt = tmp_path / "m.pt"
    models.save_model(ckpt, net, extra=defense_record(d))
    model, transform, info = load_recognizer(str(ckpt), device="cpu")
    assert transform is not None and info["defense_config"]["drop"] == "dc"
    r = evaluate(model, synthetic_pairs(20, num_identities=5, images_per_identity=2), transform=transform,
                 progress=False)
    assert r["masked_query"] and r["pairs"] == 20
    models.save_model(ckpt, net)  # frequency model without its defense record: clear error
    with pytest.raises(ValueError, match="records no defense"):
        load_recognizer(str(ckpt), device="cpu")


def test_eval_cli_errors(tmp_path, capsys):
    from hybridmask.cli import main
    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--targets", "synthetic", "--quiet"]) == 1
    assert "model not found" in capsys.readouterr().err
