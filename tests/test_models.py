"""Backbones (pixel + frequency stems), margin heads, mixed-label loss and checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridmask.models import (MixedMarginLoss, create_head, create_model, list_heads, list_models, load_model,
                               model_macs, register_model, save_model)
from hybridmask.models.base import MODELS, FRBackbone
from hybridmask.utils import HybridMaskInputError

BACKBONES = ["iresnet18", "iresnet34", "iresnet50", "mobilefacenet", "tiny_test"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)  # test data only


def _fwd_bwd(model, x):
    model.train()
    y = model(x)
    assert y.shape == (x.shape[0], model.embedding_size)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    return y


def test_registry_lists_all_backbones_and_heads():
    names = list_models()
    for n in BACKBONES:
        assert n in names
    assert {"arcface", "cosface"} <= set(list_heads())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("iresnet34", "iresnet50") else n
                                  for n in BACKBONES])
def test_pixel_stem_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, stem="pixel", embedding_size=128)
    assert model.embedding_size == 128 and model.config["stem"] == "pixel"
    x = torch.rand(2, 3, 112, 112, generator=_gen()) * 2 - 1  # images lie in [-1, 1]
    _fwd_bwd(model, x)


@pytest.mark.parametrize("name", BACKBONES)
def test_freq_stem_forward_backward_grid14(name):
    model = create_model(name, stem="freq", in_chans=189, grid=14)
    assert model.config["in_chans"] == 189 and model.config["grid"] == 14
    _fwd_bwd(model, torch.randn(2, 189, 14, 14, generator=_gen()))


@pytest.mark.parametrize("name", ["mobilefacenet", "tiny_test"])
@pytest.mark.parametrize("grid", [28, 56, 112])
def test_freq_stem_other_grids(name, grid):
    model = create_model(name, stem="freq", in_chans=21, grid=grid, embedding_size=64)
    _fwd_bwd(model, torch.randn(2, 21, grid, grid, generator=_gen()))


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
@pytest.mark.parametrize("grid", [14, 28, 56, 112])
def test_freq_stem_final_map_is_7x7_and_downsamples_only_as_needed(name, grid):
    model = create_model(name, stem="freq", in_chans=12, grid=grid, embedding_size=32).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(1, 12, grid, grid, generator=_gen()))
    assert feats["stem"].shape[-1] == grid  # no stride in the frequency stem
    assert feats["stage4"].shape[-2:] == (7, 7)
    sizes = [feats[f"stage{i}"].shape[-1] for i in range(1, 5)]
    n_down = sum(1 for a, b in zip([grid] + sizes[:-1], sizes) if b < a)
    assert n_down == int(math.log2(grid / 7))
    assert feats["embedding"].shape == (1, 32)


def test_pixel_stem_final_map_is_7x7():
    for name in ("iresnet18", "mobilefacenet"):
        model = create_model(name, embedding_size=32).eval()
        with torch.no_grad():
            feats = model.features(torch.rand(1, 3, 112, 112, generator=_gen()) * 2 - 1)
        assert feats["stage4"].shape[-2:] == (7, 7)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_freq_grid14_is_cheaper_than_pixels(name):
    pix = model_macs(name)
    f14, f28 = model_macs(name, stem="freq", grid=14), model_macs(name, stem="freq", grid=28)
    assert f14 < f28 < pix, (f14, f28, pix)
    assert model_macs(name, stem="freq", grid=14, downsample="early") < f14


def test_tiny_test_is_tiny_and_takes_small_inputs():
    model = create_model("tiny_test", embedding_size=16)
    assert sum(p.numel() for p in model.parameters()) < 10_000
    _fwd_bwd(create_model("tiny_test", grid=32, embedding_size=16), torch.rand(2, 3, 32, 32) * 2 - 1)
    _fwd_bwd(create_model("tiny_test", stem="freq", in_chans=9, grid=8, embedding_size=16), torch.randn(2, 9, 8, 8))


# ---------------------------------------------------------------- bad input and bad arguments
@pytest.mark.parametrize("stem,shape", [("pixel", (2, 3, 112, 112)), ("freq", (2, 189, 14, 14))])
def test_bad_inputs_give_clear_errors(stem, shape):
    model = create_model("tiny_test", stem=stem, grid=shape[-1]).eval()
    B, C, H, W = shape
    with pytest.raises(HybridMaskInputError, match=f"{C} channels, got {C + 1}"):
        model(torch.randn(B, C + 1, H, W))
    with pytest.raises(HybridMaskInputError, match=f"{H}x{W}, got {H * 2}x{W * 2}"):
        model(torch.rand(B, C, H * 2, W * 2) * 2 - 1)
    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(HybridMaskInputError, match="NaN"):
        model(x)
    with pytest.raises(HybridMaskInputError, match="floating-point"):
        model(torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(HybridMaskInputError, match="shape"):
        model(torch.randn(C, H, W))
    with pytest.raises(HybridMaskInputError, match="torch.Tensor"):
        model(x.tolist())


def test_input_error_is_a_value_error_naming_the_model():
    model = create_model("iresnet18", stem="freq", grid=28)
    with pytest.raises(ValueError, match=r"IResNet .*28x28, got 14x14"):
        model(torch.randn(2, 189, 14, 14))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="stem must be one of"):
        create_model("tiny_test", stem="dct")
    with pytest.raises(ValueError, match="frequency grid must be one of"):
        create_model("iresnet18", stem="freq", grid=20)
    with pytest.raises(ValueError, match="112x112"):
        create_model("iresnet18", stem="pixel", grid=56)
    with pytest.raises(ValueError, match="embedding_size"):
        create_model("tiny_test", embedding_size=0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("tiny_test", dropout=1.5)
    with pytest.raises(ValueError, match="downsample"):
        create_model("mobilefacenet", stem="freq", downsample="middle")


def test_unknown_model_name_lists_available_names():
    with pytest.raises(KeyError) as e:
        create_model("resnet9000")
    msg = str(e.value)
    assert "resnet9000" in msg
    for n in BACKBONES:
        assert n in msg


def test_register_model_timm_style():
    @register_model(name="_test_registered_net")
    def _net(**kw):
        return create_model("tiny_test", **kw)
    try:
        model = create_model("_test_registered_net", stem="freq", in_chans=5, grid=14, embedding_size=8)
        assert model.config["name"] == "_test_registered_net"
        assert model(torch.randn(2, 5, 14, 14)).shape == (2, 8)
        with pytest.raises(KeyError, match="already registered"):
            register_model(name="_test_registered_net")(_net)
    finally:
        MODELS._items.pop("_test_registered_net", None)


def test_config_rebuilds_same_architecture():
    model = create_model("mobilefacenet", stem="freq", in_chans=63, grid=28, embedding_size=128, dropout=0.2,
                         downsample="early")
    cfg = dict(model.config)
    again = create_model(cfg.pop("name"), **cfg)
    assert [tuple(p.shape) for p in again.state_dict().values()] == \
           [tuple(p.shape) for p in model.state_dict().values()]
    assert isinstance(again, FRBackbone) and again.config == model.config


# ---------------------------------------------------------------- heads
@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_head_logits_shapes(name):
    head = create_head(name, 16, 10)
    emb = torch.randn(4, 16, generator=_gen())
    y = torch.tensor([0, 3, 9, 3])
    out = head(emb, y)
    assert out.shape == (4, 10)
    cos = head.cosine(emb)
    assert cos.shape == (4, 10) and cos.abs().max() <= 1.0
    assert torch.allclose(head.logits(emb), head.s * cos)
    # margin only touches the target column
    mask = F.one_hot(y, 10).bool()
    assert torch.allclose(out[~mask], head.s * cos[~mask])
    assert (out[mask] < head.s * cos[mask]).all()


def test_head_defaults_and_config():
    arc, cos = create_head("arcface", 8, 3), create_head("cosface", 8, 3)
    assert (arc.s, arc.m, cos.s, cos.m) == (64.0, 0.5, 64.0, 0.35)
    assert create_head("arcface", 8, 3, s=30.0, m=0.3).config["m"] == 0.3
    with pytest.raises(KeyError, match="arcface"):
        create_head("sphereface2000", 8, 3)
    with pytest.raises(ValueError, match="num_classes"):
        create_head("arcface", 8, 0)


def test_arcface_margin_math():
    head = create_head("arcface", 2, 2, s=10.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.tensor([0.3, 1.2, 2.5, 3.0])  # theta to class 0; last two have theta + m > pi
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    out = head(emb, torch.zeros(4, dtype=torch.long))[:, 0] / 10.0
    m = 0.5
    expect = torch.where(angles + m < math.pi, torch.cos(angles + m), torch.cos(angles) - math.sin(math.pi - m) * m)
    assert torch.allclose(out, expect, atol=1e-5)
    # easy margin: no margin where cos <= 0
    easy = create_head("arcface", 2, 2, s=10.0, m=0.5, easy_margin=True)
    easy.weight.data.copy_(head.weight.data)
    out_e = easy(emb, torch.zeros(4, dtype=torch.long))[:, 0] / 10.0
    expect_e = torch.where(torch.cos(angles) > 0, torch.cos(angles + m), torch.cos(angles))
    assert torch.allclose(out_e, expect_e, atol=1e-5)


def test_cosface_margin_math():
    head = create_head("cosface", 8, 5, s=32.0, m=0.35)
    emb = torch.randn(3, 8, generator=_gen())
    y = torch.tensor([4, 0, 2])
    out = head(emb, y)
    cos = head.cosine(emb)
    assert torch.allclose(out[torch.arange(3), y], 32.0 * (cos[torch.arange(3), y] - 0.35), atol=1e-5)


def test_arcface_gradients_finite_at_cos_one():
    head = create_head("arcface", 4, 3)
    emb = head.weight.detach()[:2].clone().requires_grad_(True)  # cos(theta) = 1 exactly for the target
    F.cross_entropy(head(emb, torch.tensor([0, 1])), torch.tensor([0, 1])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_head_bad_inputs():
    head = create_head("arcface", 8, 5)
    emb = torch.randn(3, 8)
    with pytest.raises(HybridMaskInputError, match=r"\[0, 5\)"):
        head(emb, torch.tensor([0, 1, 5]))
    with pytest.raises(HybridMaskInputError, match="shape"):
        head(emb, torch.tensor([0, 1]))
    with pytest.raises(HybridMaskInputError, match="integer"):
        head(emb, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(HybridMaskInputError, match=r"\(B, 8\)"):
        head(torch.randn(3, 7), torch.tensor([0, 1, 2]))
    with pytest.raises(HybridMaskInputError, match="NaN"):
        head(torch.full((3, 8), float("nan")), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- mixed-label loss
@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_mixed_loss_equals_plain_ce_for_k1(name):
    head = create_head(name, 16, 7)
    emb = torch.randn(6, 16, generator=_gen(1), requires_grad=True)
    y = torch.randint(0, 7, (6,), generator=_gen(2))
    plain = F.cross_entropy(head(emb, y), y)
    loss = MixedMarginLoss(head)
    assert torch.allclose(loss(emb, y), plain, atol=1e-5)                                  # labels (B,)
    assert torch.allclose(loss(emb, y[:, None], torch.ones(6, 1)), plain, atol=1e-5)       # (B, 1)
    g1, = torch.autograd.grad(plain, emb)
    g2, = torch.autograd.grad(loss(emb, y), emb)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_mixed_loss_is_weighted_sum_for_k2_with_padding():
    head = create_head("arcface", 16, 7)
    emb = torch.randn(5, 16, generator=_gen(3))
    labels = torch.randint(0, 7, (5, 2), generator=_gen(4))
    w1 = torch.rand(5, generator=_gen(5))
    weights = torch.stack([w1, 1 - w1], 1)
    ce = [F.cross_entropy(head(emb, labels[:, m]), labels[:, m], reduction="none") for m in range(2)]
    expect = (weights[:, 0] * ce[0] + weights[:, 1] * ce[1]).mean()
    got = MixedMarginLoss(head)(emb, labels, weights)
    assert torch.allclose(got, expect, atol=1e-5)
    per_sample = MixedMarginLoss(head, reduction="none")(emb, labels, weights)
    assert per_sample.shape == (5,) and torch.allclose(per_sample.mean(), got)
    # a padded slot (weight 0, label -1) contributes nothing
    lab3 = torch.cat([labels, torch.full((5, 1), -1)], 1)
    w3 = torch.cat([weights, torch.zeros(5, 1)], 1)
    assert torch.allclose(MixedMarginLoss(head)(emb, lab3, w3), expect, atol=1e-5)


def test_mixed_loss_drops_unknown_pool_partners():
    head = create_head("arcface", 8, 4)
    emb = torch.randn(3, 8, generator=_gen(6))
    y = torch.tensor([0, 2, 3])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [1.0, 0.0]])
    labels = torch.stack([y, torch.full((3,), -1)], 1)  # partners from a public pool: identity unknown
    got = MixedMarginLoss(head, reduction="none")(emb, labels, w)
    ce = F.cross_entropy(head(emb, y), y, reduction="none")
    assert torch.allclose(got, w[:, 0] * ce, atol=1e-5)


def test_mixed_loss_with_hybridmask_record():
    from hybridmask.freq import HybridMask
    hm = HybridMask(u=1, drop="dc", k=3, seed=0)
    images = torch.rand(4, 3, 112, 112, generator=_gen(7)) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])
    masked, record = hm(images)
    model = create_model("tiny_test", stem="freq", in_chans=hm.out_channels, grid=hm.grid(112), embedding_size=16)
    head = create_head("arcface", 16, 3)
    loss = MixedMarginLoss(head)(model(masked), record.mixed_labels(y), record.label_weights)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    with torch.no_grad():
        assert model.eval()(hm.query(images)).shape == (4, 16)


def test_mixed_loss_rejects_bad_weights():
    head = create_head("cosface", 8, 4)
    loss = MixedMarginLoss(head)
    emb = torch.randn(2, 8)
    labels = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(HybridMaskInputError, match="sum to 1"):
        loss(emb, labels, torch.tensor([[0.5, 0.6], [0.5, 0.5]]))
    with pytest.raises(HybridMaskInputError, match="non-negative"):
        loss(emb, labels, torch.tensor([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(HybridMaskInputError, match="shape of labels"):
        loss(emb, labels, torch.tensor([[1.0], [1.0]]))
    with pytest.raises(HybridMaskInputError, match="weight is non-zero"):
        MixedMarginLoss(head, unknown_labels="error")(emb, torch.tensor([[0, -1], [2, 3]]),
                                                       torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(HybridMaskInputError, match="-1"):
        loss(emb, torch.tensor([[0, -2], [2, 3]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(TypeError, match="MarginHead"):
        MixedMarginLoss(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_test", stem="freq", in_chans=189, grid=14, embedding_size=32, downsample="early")
    head = create_head("arcface", 32, 11, m=0.4)
    model.train()
    for _ in range(2):  # move BN running stats away from their defaults
        model(torch.randn(4, 189, 14, 14))
    model.eval()
    record = {"defense": {"name": "freq_mixup", "u": 1, "drop": "dc", "k": 3}, "defense_state": None}
    extra = {"epoch": 3, "lfw": 0.5, "ids": ["a", "b"], "opt": {"lr": torch.tensor(0.1)}, **record}
    path = tmp_path / "sub" / "rec.pt"
    save_model(path, model, head, extra=extra)
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    raw = torch.load(path, weights_only=True)  # loads with the safe unpickler
    assert raw["extra"]["defense"] == record["defense"]
    model2, head2, meta = load_model(path)
    assert not model2.training and model2.config == model.config
    x = torch.randn(3, 189, 14, 14, generator=_gen(9))
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
        assert torch.equal(head(model(x), y), head2(model2(x), y))
    assert head2.config == head.config
    assert meta["extra"]["defense"] == record["defense"] and meta["extra"]["ids"] == ["a", "b"]
    assert meta["model_config"]["downsample"] == "early" and meta["hybridmask_version"]
    assert (meta["name"], meta["stem"], meta["grid"], meta["embedding_size"]) == ("tiny_test", "freq", 14, 32)


def test_save_load_without_head(tmp_path):
    model = create_model("mobilefacenet", stem="freq", in_chans=12, grid=14, embedding_size=16).eval()
    save_model(tmp_path / "m.pt", model)
    model2, head2, meta = load_model(tmp_path / "m.pt")
    assert head2 is None and meta["extra"] is None
    x = torch.randn(2, 12, 14, 14)
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))


def test_checkpoint_defense_record_rebuilds_query_masking(tmp_path):
    from hybridmask.defenses import create_defense, defense_record, load_defense
    d = create_defense("freq_mixup", u=2, drop="low10", k=2, seed=1)
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=d.grid, embedding_size=8)
    save_model(tmp_path / "r.pt", model.eval(), extra=defense_record(d))
    model2, _, meta = load_model(tmp_path / "r.pt")
    d2 = load_defense(tmp_path / "r.pt", seed=2)
    assert d2.config == d.config
    assert (d2.in_channels, d2.grid) == (model2.in_chans, model2.input_size)
    with torch.no_grad():
        assert model2(d2.query(torch.zeros(2, 3, 112, 112))).shape == (2, 8)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(bad)
    model = create_model("tiny_test", embedding_size=8)
    good = tmp_path / "good.pt"
    save_model(good, model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(truncated)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": model.state_dict()}, other)
    with pytest.raises(ValueError, match="not a hybridmask recognizer checkpoint"):
        load_model(other)
    ck = torch.load(good, weights_only=True)
    ck["model_config"]["name"] = "no_such_net"
    torch.save(ck, tmp_path / "unknown.pt")
    with pytest.raises(KeyError, match="no_such_net.*iresnet18"):
        load_model(tmp_path / "unknown.pt")
    ck["model_config"]["name"] = "tiny_test"
    ck["model_config"]["embedding_size"] = 9
    torch.save(ck, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "mismatch.pt")


def test_save_refuses_non_plain_objects(tmp_path):
    model = create_model("tiny_test", embedding_size=8)
    with pytest.raises(TypeError, match=r"extra\['gen'\].*Generator"):
        save_model(tmp_path / "x.pt", model, extra={"gen": torch.Generator()})
    with pytest.raises(TypeError, match=r"extra\['defense'\]"):
        save_model(tmp_path / "x.pt", model, extra={"defense": {"obj": object()}})
    with pytest.raises(TypeError, match="create_model"):
        save_model(tmp_path / "x.pt", torch.nn.Linear(2, 2))
    assert not (tmp_path / "x.pt").exists()
