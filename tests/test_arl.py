"""ARL: the defense (hybridmask.defenses.arl), its networks (hybridmask.models.arl_nets, .perceptual),
its training (hybridmask.train.arl), its data (hybridmask.data.celeba) and the representation metrics
(hybridmask.eval.representation); image and face scores are the library's one set (hybridmask.attacks.metrics)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridmask.attacks.metrics import identity_similarity, psnr, ssim
from hybridmask.data.celeba import read_celeba_attributes
from hybridmask.defenses import (ARLDefense, build_defense, create_defense, list_defenses, load_defense,
                                 save_defense)
from hybridmask.eval.representation import knn_label_agreement, lda_score, mcc_per_attribute, mean_mcc, plot_tsne, tsne
from hybridmask.models.arl_nets import FEATURE_LAYERS, ARLNet
from hybridmask.models.blocks import resize
from hybridmask.models.perceptual import RandomConvFeatures, VGGFeatures, build_perceptual, vgg16_features
from hybridmask.train.arl import ARLTrainer, load_arl_model, merge_config, save_arl_run, train_arl
from hybridmask.utils import HybridMaskInputError

TINY = dict(width=4, input_size=32, fc_dim=16, disc_width=4)


def faces(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 112, 112, generator=g) * 2 - 1


# --------------------------------------------------------------------------- metrics
def test_mcc_hand_computed():
    pred = np.array([[1, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 0]])
    tgt = np.array([[1, 1, 1, 1], [0, 1, 0, 1], [0, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1]])
    # column 0: TP=2 FP=1 TN=2 FN=0 -> (2*2 - 1*0) / sqrt(3*2*3*2) = 4/6
    # column 1: constant target -> undefined; column 2: perfect -> 1; column 3: constant target -> undefined
    m = mcc_per_attribute(pred, tgt)
    assert m[0] == pytest.approx(4 / 6)
    assert math.isnan(m[1]) and math.isnan(m[3])
    assert m[2] == pytest.approx(1.0)
    assert mean_mcc(pred, tgt) == pytest.approx((4 / 6 + 0 + 1 + 0) / 4)
    assert mean_mcc(pred, tgt, constant="skip") == pytest.approx((4 / 6 + 1) / 2)
    # -1/1 coding and an inverted predictor
    assert mean_mcc(2 * tgt[:, [0, 2]] - 1, 2 * (1 - tgt[:, [0, 2]]) - 1) == pytest.approx(-1.0)
    # hand example 2: TP=1 FP=1 TN=1 FN=1 -> 0
    assert mean_mcc([1, 1, 0, 0], [1, 0, 0, 1]) == pytest.approx(0.0)


def test_mcc_bad_input():
    with pytest.raises(HybridMaskInputError, match="same shape"):
        mean_mcc(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(HybridMaskInputError, match="binary"):
        mean_mcc(np.array([[0.5]]), np.array([[1]]))
    with pytest.raises(ValueError, match="constant"):
        mean_mcc([1, 0], [1, 0], constant="nope")


def test_lda_hand_computed():
    z = np.array([[0.0], [2.0], [10.0], [12.0], [100.0]])
    y = np.array([0, 0, 1, 1, 2])  # the singleton class 2 is dropped (min_per_class=2)
    # means 1 and 11, overall 6: S_B = 2*25 + 2*25 = 100, S_W = 4*1 = 4
    assert lda_score(z, y) == pytest.approx(25.0)
    assert lda_score(z, y, dof=True) == pytest.approx((100 / 1) / (4 / 2))
    # 2-D, flattened from (N, 1, 2): class means (0,0), (3,4); overall (1.5, 2)
    z2 = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]], [[3.0, 5.0]], [[3.0, 3.0]]])
    sb = 2 * (1.5 ** 2 + 2 ** 2) * 2
    sw = 1 + 1 + 1 + 1
    assert lda_score(z2, [7, 7, 9, 9]) == pytest.approx(sb / sw)
    with pytest.raises(HybridMaskInputError, match="at least 2 classes"):
        lda_score(z, [0, 1, 2, 3, 4])


def test_ssim_psnr_and_face_similarity():
    """ARL is scored with the library's one SSIM / PSNR / face similarity (the attack harness's)."""
    x = faces(3)
    assert np.allclose(ssim(x, x), 1.0) and np.isinf(psnr(x, x)).all()
    noisy = (x + 0.2 * faces(3, 1)).clamp(-1, 1)
    s2, p2 = ssim(noisy, x), psnr(noisy, x)
    assert (s2 < 1).all() and 5 < p2.mean() < 40 and np.isfinite(p2).all()
    assert "11x11" in ssim.__doc__ and "1.5" in ssim.__doc__  # the window is stated
    ev = lambda im: im.flatten(1)[:, :64]  # noqa: E731 - a stand-in evaluator
    assert identity_similarity(x, x, embedder=ev).mean() == pytest.approx(1.0)
    assert identity_similarity(-x, x, embedder=ev).mean() == pytest.approx(-1.0)
    with pytest.raises(HybridMaskInputError):
        ssim(x[:2], x)
    with pytest.raises(HybridMaskInputError):
        psnr(x[:2], x)


def test_tsne_separates_clusters(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (30, 10))
    b = rng.normal(0, 1, (30, 10)) + 8
    x = np.concatenate([a, b])
    lab = np.array([0] * 30 + [1] * 30)
    y = tsne(x, perplexity=10, iterations=400, seed=0)
    assert y.shape == (60, 2) and np.isfinite(y).all()
    assert knn_label_agreement(y, lab, k=5) > 0.95
    out = plot_tsne(x, np.stack([lab, rng.integers(0, 2, 60)], 1), ["cluster", "random"], tmp_path / "t.png",
                    embedding=y)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out is y


# --------------------------------------------------------------------------- networks
@pytest.mark.parametrize("layer", FEATURE_LAYERS)
def test_every_feature_layer_builds_a_matching_decoder(layer):
    torch.manual_seed(0)
    net = ARLNet(feature_layer=layer, **TINY)
    x = faces(2)
    z = net.encoder(x)
    assert tuple(z.shape[1:]) == net.z_shape == net.decoder.z_shape
    assert net.decoder(z).shape == (2, 3, 112, 112)
    assert net.decoder(z, native=True).shape == (2, 3, 32, 32)
    assert net.utility.predict(z).shape == (2, 40)


def test_layer_alias_identity_task_and_errors():
    net = ARLNet(feature_layer="stem", task="identity", num_outputs=5, head="cosface", **TINY)
    assert net.config["feature_layer"] == "conv1"
    z = net.encoder(faces(3))
    loss, scores = net.utility.loss(z, torch.tensor([0, 1, 4]))
    assert loss.dim() == 0 and scores.shape == (3, 5)
    with pytest.raises(KeyError, match="feature layer"):
        ARLNet(feature_layer="layer9")
    with pytest.raises(KeyError, match="arch"):
        ARLNet(arch="vgg", **TINY)
    with pytest.raises(KeyError, match="unknown ARL model keys"):
        ARLNet(colour=3)
    with pytest.raises(HybridMaskInputError):
        net.encoder(torch.zeros(2, 1, 112, 112))


def test_resnet50_bottleneck_layers():
    net = ARLNet(arch="resnet50", feature_layer="layer3", **TINY)
    assert net.z_shape[0] == 4 * 4 * 4  # width*4 planes * expansion 4
    assert net.decoder(net.encoder(faces(2))).shape == (2, 3, 112, 112)


# --------------------------------------------------------------------------- the game
def _rec_loss(net, x):
    net.encoder.train()
    net.decoder.eval()
    with torch.no_grad():
        return float(F.mse_loss(net.decoder(net.encoder(x), native=True), resize(x, net.config["input_size"])))


def _fresh(lambda1, lambda2=0.0, g=None):
    torch.manual_seed(0)
    net = ARLNet(feature_layer="layer1", **TINY)
    tr = ARLTrainer(net, g, lambda1=lambda1, lambda2=lambda2, mu1=0.0, mu2=0.0, lr_enc=0.05, optimizer="sgd",
                    weight_decay=0.0)
    x = faces(8, 3)
    for _ in range(3):  # make Dec a (weak) adversary first
        tr.decoder_step(x)
    return net, tr, x


def test_encoder_gets_the_negated_reconstruction_gradient():
    y = torch.randint(0, 2, (8, 40), generator=torch.Generator().manual_seed(0))
    lam = 3.0
    net, tr, x = _fresh(lam)
    enc_params = [p for p in net.encoder.parameters()]
    # the gradients of the full objective ...
    loss, _ = tr.encoder_objective(x, y)
    g_full = torch.autograd.grad(loss, enc_params)
    # ... equal grad(L_u) - lambda1 * grad(rec) with rec = ||Dec(z) - x||^2 (same BN batch statistics)
    z = net.encoder(x)
    l_u, _ = net.utility.loss(z, y)
    rec = F.mse_loss(net.decoder(z, native=True), resize(x, 32))
    g_u = torch.autograd.grad(l_u, enc_params, retain_graph=True)
    g_rec = torch.autograd.grad(rec, enc_params)
    for a, b, c in zip(g_full, g_u, g_rec):
        torch.testing.assert_close(a, b - lam * c, rtol=1e-4, atol=1e-6)
    assert sum(float(c.abs().sum()) for c in g_rec) > 0
    # lambda1 = 0: the reconstruction term does not enter at all
    net0, tr0, _ = _fresh(0.0)
    loss0, info0 = tr0.encoder_objective(x, y)
    g0 = torch.autograd.grad(loss0, list(net0.encoder.parameters()))
    z0 = net0.encoder(x)
    g0_u = torch.autograd.grad(net0.utility.loss(z0, y)[0], list(net0.encoder.parameters()))
    for a, b in zip(g0, g0_u):
        torch.testing.assert_close(a, b)
    assert "loss_rec" not in info0


def test_one_encoder_step_raises_the_frozen_decoders_loss():
    y = torch.randint(0, 2, (8, 40), generator=torch.Generator().manual_seed(1))
    net, tr, x = _fresh(20.0)
    dec_before = copy.deepcopy(net.decoder.state_dict())
    before = _rec_loss(net, x)
    tr.encoder_step(x, y)
    after = _rec_loss(net, x)
    assert after > before
    for k, v in net.decoder.state_dict().items():  # Dec frozen in (b)
        assert torch.equal(v, dec_before[k]), k
    # with lambda1 = 0 the same step does not push the reconstruction loss up as much
    net0, tr0, x0 = _fresh(0.0)
    b0 = _rec_loss(net0, x0)
    tr0.encoder_step(x0, y)
    assert _rec_loss(net0, x0) - b0 < after - before


def test_decoder_step_freezes_the_encoder_and_trains_the_decoder():
    net, tr, x = _fresh(1.0)
    tr.game.mu1 = 0.5  # with the GAN term: D is updated too
    enc_before = copy.deepcopy(net.encoder.state_dict())
    dec_before = copy.deepcopy(net.decoder.state_dict())
    d_before = copy.deepcopy(net.discriminator.state_dict())
    out = tr.decoder_step(x)
    assert {"loss_rec", "loss_gan", "loss_disc"} <= set(out)
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert any(not torch.equal(v, dec_before[k]) for k, v in net.decoder.state_dict().items())
    assert any(not torch.equal(v, d_before[k]) for k, v in net.discriminator.state_dict().items())


def test_perceptual_term_enters_both_sides():
    g = RandomConvFeatures(seed=0)
    net, tr, x = _fresh(1.0, lambda2=2.0, g=g)
    y = torch.zeros(8, 40, dtype=torch.long)
    _, info = tr.encoder_objective(x, y)
    assert info["loss_b"] == pytest.approx(info["loss_u"] - info["loss_rec"] - 2.0 * info["loss_perc"], rel=1e-5)
    with pytest.raises(ValueError, match="perceptual"):
        ARLTrainer(net, None, lambda2=1.0)


# --------------------------------------------------------------------------- perceptual nets
def test_perceptual_networks(tmp_path):
    g1, g2 = RandomConvFeatures(seed=3), RandomConvFeatures(seed=3)
    x = faces(2)[:, :, :32, :32]
    f1, f2 = g1(x), g2(x)
    assert len(f1) == 5 and all(torch.equal(a, b) for a, b in zip(f1, f2))
    g1.train()
    assert not g1.training and not any(p.requires_grad for p in g1.parameters())
    assert "NOT trained" in build_perceptual("auto").description
    with pytest.raises(FileNotFoundError, match="VGG-16 weights"):
        VGGFeatures(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="VGG-16 weights"):
        build_perceptual("auto", vgg_weights=str(tmp_path / "missing.pth"))
    feats = vgg16_features()
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "vgg.pth")
    vgg = build_perceptual("auto", vgg_weights=str(tmp_path / "vgg.pth"))
    assert [t.shape[1] for t in vgg(x)] == [64, 128, 256, 512, 512]
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError):
        VGGFeatures(tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="perceptual kind"):
        build_perceptual("lpips")


def _check_frozen_features(g, x, shapes):
    """g gives feature maps of ``shapes``, has no trainable parameter, stays in eval mode (BatchNorm
    statistics untouched by a forward after .train()) and passes the perceptual gradient to its input."""
    g.train()
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    buffers = [b.clone() for b in g.buffers()]
    assert [tuple(f.shape) for f in g(x)] == shapes
    assert all(torch.equal(a, b) for a, b in zip(buffers, g.buffers()))
    a = x.clone().requires_grad_(True)
    g.loss(a, x.flip(0)).backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert all(p.grad is None for p in g.parameters())


@pytest.mark.parametrize("arch,shapes", [
    ("tiny_test", [(2, 8, 56, 56), (2, 8, 28, 28), (2, 8, 14, 14), (2, 16, 7, 7), (2, 16, 7, 7)]),
    ("mobilefacenet", [(2, 64, 56, 56), (2, 64, 56, 56), (2, 64, 28, 28), (2, 128, 14, 14), (2, 128, 7, 7)]),
])
def test_perceptual_g_from_a_saved_recognizer(tmp_path, arch, shapes):
    """The default g: stem/stage features of a pixel recognizer written by hybridmask.models.save_model."""
    from hybridmask.models import create_model, save_model
    net = create_model(arch, stem="pixel", in_chans=3, grid=112, embedding_size=16)
    save_model(tmp_path / "rec.pt", net)
    g = build_perceptual("auto", recognizer=str(tmp_path / "rec.pt"))
    assert str(tmp_path / "rec.pt") in g.description
    for k, v in net.state_dict().items():   # the weights come from the file
        torch.testing.assert_close(g.model.state_dict()[k], v)
    _check_frozen_features(g, faces(2), shapes)
    assert [tuple(t.shape) for t in g(faces(2)[:, :, :64, :64])] == shapes  # other sizes are resized to 112
    # wrong files: a frequency recognizer, a VGG state dict, a recognizer given as VGG weights
    save_model(tmp_path / "freq.pt", create_model(arch, stem="freq", in_chans=189, grid=14, embedding_size=16))
    with pytest.raises(ValueError, match="pixel input"):
        build_perceptual("recognizer", recognizer=str(tmp_path / "freq.pt"))
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="not a hybridmask recognizer"):
        build_perceptual("recognizer", recognizer=str(tmp_path / "vgg.pth"))
    with pytest.raises(ValueError, match="not a VGG-16 state dict.*perceptual.recognizer"):
        build_perceptual("vgg16", vgg_weights=str(tmp_path / "rec.pt"))
    with pytest.raises(FileNotFoundError):
        build_perceptual("recognizer", recognizer=str(tmp_path / "missing.pt"))


def test_perceptual_g_from_a_torchvision_vgg16_state_dict(tmp_path):
    """g from a whole torchvision vgg16 state dict (random weights; the architecture and key names come from
    torchvision itself). Its classifier (119M numbers g never reads) is stored as zero-stride broadcast views
    so that the file stays small; the conv weights are real random tensors."""
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tv.models.vgg16(weights=None).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * 0.05 if k.startswith("features.") else torch.zeros(1).expand(s))
             for k, s in shapes.items()}
    assert any(k.startswith("classifier.") for k in state)
    torch.save(state, tmp_path / "vgg16.pth")
    g = build_perceptual("auto", vgg_weights=str(tmp_path / "vgg16.pth"))
    assert "VGG-16" in g.description
    torch.testing.assert_close(g.net[0].weight, state["features.0.weight"])     # conv1_1 from the file
    torch.testing.assert_close(g.net[28].weight, state["features.28.weight"])   # conv5_3 from the file
    _check_frozen_features(g, faces(2), [(2, 64, 112, 112), (2, 128, 56, 56), (2, 256, 28, 28), (2, 512, 14, 14),
                                         (2, 512, 7, 7)])
    # wrong files: a state dict missing conv5_3's weight, a truncated file
    torch.save({k: v for k, v in state.items() if k != "features.28.weight"}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a VGG-16 state dict"):
        build_perceptual("vgg16", vgg_weights=str(tmp_path / "partial.pth"))
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "vgg16.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read"):
        build_perceptual("vgg16", vgg_weights=str(tmp_path / "trunc.pth"))


# --------------------------------------------------------------------------- defense + checkpoints
def test_arl_defense_interface_and_checkpoint(tmp_path):
    assert "arl" in list_defenses()
    d = create_defense("arl", feature_layer="layer3", width=4, input_size=32)
    assert d.capabilities() == {"input_kind": "feature", "stochastic": False, "mixes": False, "trainable": False}
    assert not d.needs_state() and "checkpoint" not in d.config
    x = faces(3)
    z, rec = d.release(x)
    assert rec is None and z.shape == (3, d.in_channels, d.grid, d.grid)
    assert torch.equal(d.release(x)[0], z) and torch.equal(d.query(x), z)  # deterministic
    assert d.as_image(z).shape == (3, 3, 112, 112)
    with pytest.raises(ValueError, match="k=1"):
        d.release(x, k=2)
    with pytest.raises(HybridMaskInputError):
        d.as_image(z[:, :1])
    blank = create_defense("arl", feature_layer="fc", width=4, input_size=32, as_image="blank")
    zf = blank.query(x)
    assert zf.shape == (3, 128, 1, 1) and blank.grid == 1
    assert torch.equal(blank.as_image(zf), torch.zeros(3, 3, 112, 112))
    # a trained model: defense file round trip (weights_only load) gives the same release
    torch.manual_seed(0)
    net = ARLNet(feature_layer="layer2", **TINY)
    path = tmp_path / "defense.pt"
    save_arl_run(path, net)
    d2 = load_defense(tmp_path)
    net.eval()
    torch.testing.assert_close(d2.query(x), net.encoder(x))
    torch.testing.assert_close(d2.as_image(d2.query(x)), net.decoder(net.encoder(x)).clamp(-1, 1))
    assert d2.needs_state() and "checkpoint" not in d2.config and d2.config["trained"] is True
    d3 = build_defense(d2.config, d2.defense_state())
    torch.testing.assert_close(d3.query(x), d2.query(x))
    with pytest.raises(ValueError, match="learns values"):
        build_defense(d2.config)                      # a trained model's config alone is not the defense
    with pytest.raises(ValueError, match="encoder"):
        build_defense(d2.config, {"encoder": d2.defense_state()["encoder"]})
    loaded, _ = load_arl_model(path)
    assert loaded.config == net.config
    for k, v in net.state_dict().items():             # encoder, utility, decoder and discriminator
        torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(FileNotFoundError):
        load_arl_model(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        load_arl_model(tmp_path / "bad.pt")
    save_defense(tmp_path / "other.pt", create_defense("none"))
    with pytest.raises(ValueError, match="not an ARL training output"):
        load_arl_model(tmp_path / "other.pt")
    torch.manual_seed(5)                                # from_net leaves the global random state alone
    a = torch.rand(1)
    torch.manual_seed(5)
    ARLDefense.from_net(net)
    assert torch.equal(torch.rand(1), a)


# --------------------------------------------------------------------------- data + train_arl
ATTR_NAMES = [f"A{i}" for i in range(40)]


def _write_celeba_like(root, n_ids=9, per_id=4, attributed_ids=6):
    from PIL import Image
    rng = np.random.default_rng(0)
    rows, k = [], 0
    for i in range(n_ids):
        d = root / "celeba_112" / f"{1000 + i}"
        d.mkdir(parents=True)
        for j in range(per_id):
            k += 1
            name = f"{k:06d}.jpg"
            base = rng.integers(0, 255, 3)
            img = (np.clip(base + rng.normal(0, 30, (112, 112, 3)), 0, 255)).astype(np.uint8)
            Image.fromarray(img).save(d / name, quality=90)
            if i < attributed_ids:
                rows.append(name + " " + " ".join(str(v) for v in rng.choice([-1, 1], 40)))
    (root / "celeba_attributes.txt").write_text(f"{len(rows)}\n" + " ".join(ATTR_NAMES) + "\n" + "\n".join(rows) + "\n")


def test_read_celeba_attributes(tmp_path):
    _write_celeba_like(tmp_path)
    names, files, a = read_celeba_attributes(tmp_path / "celeba_attributes.txt")
    assert names == ATTR_NAMES and len(files) == 24 and a.shape == (24, 40) and set(np.unique(a)) <= {-1, 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("1\nA B\nx.jpg 1 0\n")
    with pytest.raises(ValueError, match="1 or -1"):
        read_celeba_attributes(bad)
    bad.write_text("2\nA B\nx.jpg 1 -1\n")
    with pytest.raises(ValueError, match="header says 2"):
        read_celeba_attributes(bad)
    with pytest.raises(FileNotFoundError):
        read_celeba_attributes(tmp_path / "none.txt")


def _tiny_config(root, out, task="attributes", **loss):
    return {"method": "arl", "name": "t", "output_dir": str(out), "progress": False, "threads": 1,
            "data": {"root": str(root), "task": task, "private_fraction": 0.5, "num_public_identities": 3,
                     "max_public_images": 12},
            "model": dict(TINY, feature_layer="layer2"),
            "loss": dict({"lambda1": 1.0, "lambda2": 0.5, "mu1": 0.01, "mu2": 0.5}, **loss),
            "train": {"batch_size": 4, "warmup_epochs": 1, "epochs": 1, "decoder_warmup_steps": 2},
            "attack": {"steps": 3, "batch_size": 4, "feature_attack_steps": 3},
            "eval": {"sface": False, "tsne": True, "tsne_attributes": ["A0", "A1"], "batch_size": 8}}


def test_train_arl_end_to_end(tmp_path):
    _write_celeba_like(tmp_path / "data")
    cfg = _tiny_config(tmp_path / "data", tmp_path / "run")
    r = train_arl(cfg)
    assert -1 <= r["utility"]["mcc"] <= 1 and -1 <= r["attack"]["ssim"] <= 1   # SSIM's range (it can be < 0)
    assert r["attack"]["ssim"] < r["resolution_ceiling"]["ssim"] <= 1 and 0 < r["attack"]["psnr"] < 40
    assert r["data"]["num_private"] + r["data"]["num_test"] == 24 and r["data"]["num_public"] == 12
    assert {"feature_sim", "feature_sim_raw"} <= set(r["feature_attack"]) and r["lda"] is not None
    assert [h["phase"] for h in r["history"]] == ["warmup", "adversarial"]
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["name"] == "t" and written["config"] == merge_config(cfg)   # the run records its config
    assert (tmp_path / "run" / "tsne.png").is_file() and (tmp_path / "run" / "examples.png").is_file()
    ck = torch.load(tmp_path / "run" / "defense.pt", weights_only=True)
    assert ck["format"] == "hybridmask.defense" and ck["extra"]["arl"]["epoch"] == 2
    assert r["checkpoint"] == str(tmp_path / "run" / "defense.pt")
    trained = load_defense(tmp_path / "run")        # the run folder gives the trained defense
    net, _ = load_arl_model(tmp_path / "run")
    net.eval()
    torch.testing.assert_close(trained.query(faces(2)), net.encoder(faces(2)))
    # resume: nothing left to train, the same encoder is evaluated
    cfg["train"]["resume"] = True
    r2 = train_arl(cfg)
    assert r2["history"] == r["history"] and r2["utility"]["mcc"] == pytest.approx(r["utility"]["mcc"])
    # identity task with a shared warm-up checkpoint as the start
    cfg_id = _tiny_config(tmp_path / "data", tmp_path / "run_id", task="identity")
    cfg_id["train"].update(epochs=0)
    cfg_id["eval"]["tsne"] = False
    r3 = train_arl(cfg_id)
    assert 0 <= r3["utility"]["identity_accuracy"] <= 1
    cfg_id2 = _tiny_config(tmp_path / "data", tmp_path / "run_id2", task="identity")
    cfg_id2["train"].update(warmup_epochs=0, decoder_warmup_steps=0, init_checkpoint=r3["checkpoint"])
    cfg_id2["eval"]["tsne"] = False
    assert train_arl(cfg_id2)["history"][0]["phase"] == "adversarial"


def test_config_errors():
    with pytest.raises(KeyError, match="lamda1"):
        merge_config({"loss": {"lamda1": 1}})
    with pytest.raises(ValueError, match="method"):
        train_arl({"method": "hybridmask"})


@pytest.mark.realdata
def test_real_celeba_attributes_match_the_folder(faces_root):
    from hybridmask.data.celeba import index_identity_folder
    path = faces_root / "celeba_attributes.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    names, files, a = read_celeba_attributes(path)
    assert len(names) == 40 and "Male" in names and a.shape == (len(files), 40)
    index = index_identity_folder(faces_root / "celeba_112")
    assert all(f in index for f in files)
