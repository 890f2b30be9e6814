"""Tests of the attack harness (hybridmask.attacks): declared/validated parameters, metrics against
hand-made cases, every attack on small inputs, and on real faces: the cgan attack reconstructs
recognisably against no defense and fails against a defense that releases noise."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from hybridmask.attacks import create_attack, describe_attack, list_attacks
from hybridmask.attacks import metrics as M
from hybridmask.attacks.base import Param, differentiable_query
from hybridmask.attacks.harness import markdown_table, save_grid, write_json
from hybridmask.defenses import Defense, create_defense
from hybridmask.utils import HybridMaskInputError


def faces(n, seed=0, size=112, latent=None):
    """Smooth random 'images' in [-1, 1] (real structure is not needed for the unit tests)."""
    g = torch.Generator().manual_seed(seed)
    lat = latent or size // 8
    x = torch.randn(n, 3, lat, lat, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).tanh()


class NoiseDefense(Defense):
    """A 'defense' whose release ignores the face: pure noise of the right shape."""
    name = "test_noise"

    def __init__(self, seed=None):
        super().__init__()
        self.g = torch.Generator().manual_seed(0 if seed is None else seed)

    def query(self, images):
        return torch.randn(images.shape, generator=self.g).clamp(-1, 1)

    def as_image(self, released):
        return released.clamp(-1, 1)


# ---- registry and declared parameters --------------------------------------------------------------
def test_registry_lists_all_attacks_and_rejects_unknown():
    assert {"cgan", "demix", "embedding_inversion", "gmi"} <= set(list_attacks())
    with pytest.raises(KeyError, match="unknown attack"):
        create_attack("nope")
    for n in list_attacks():
        assert n in describe_attack(n)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=1.5), TypeError, "epochs"),
    (dict(epochs=True), TypeError, "epochs"),
    (dict(lr=float("nan")), ValueError, "finite"),
    (dict(size=50), ValueError, "size"),
    (dict(target="train"), ValueError, "target"),
    (dict(mode="greybox"), ValueError, "mode"),
    (dict(bogus=1), ValueError, "unknown parameter"),
    (dict(feature_weight=1.0), ValueError, "feature_model"),
])
def test_cgan_params_validated(kw, err, msg):
    with pytest.raises(err, match=msg):
        create_attack("cgan", **kw)


def test_required_and_object_params():
    with pytest.raises(ValueError, match="recognizer"):
        create_attack("embedding_inversion")
    with pytest.raises(TypeError, match="callable"):
        create_attack("embedding_inversion", recognizer=3)
    with pytest.raises(TypeError, match="Module"):
        create_attack("gmi", classifier=lambda x: x)
    with pytest.raises(ValueError, match="white-box"):
        create_attack("embedding_inversion", recognizer=nn.Flatten(), method="optimize", mode="blackbox")
    a = create_attack("cgan", epochs=2, seed=3)
    assert a.epochs == 2 and a.params["seed"] == 3 and a.public_params()["epochs"] == 2
    p = Param("x", float, 1.0, range=(0.0, 1.0))
    assert p.validate(1, "t") == 1.0
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        p.validate(1.5, "t")


def test_attack_inputs_validated():
    d = create_defense("none")
    a = create_attack("cgan", epochs=1, n_images=4, batch_size=2, width=4, disc_width=4, size=32, progress=False)
    with pytest.raises(RuntimeError, match="fitted"):
        a.decode(torch.zeros(1, 3, 112, 112))
    with pytest.raises(HybridMaskInputError, match="112x112"):
        a.fit(d, torch.zeros(4, 3, 64, 64))
    bad = faces(4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(HybridMaskInputError, match="NaN"):
        a.fit(d, bad)
    with pytest.raises(HybridMaskInputError, match=r"\[-1, 1\]"):
        a.fit(d, faces(4) * 3)
    with pytest.raises(TypeError, match="Defense interface"):
        a.fit(object(), faces(4))
    a.fit(d, faces(4))
    with pytest.raises(ValueError, match="channels"):
        a.decode(torch.zeros(1, 189, 14, 14))


def test_whitebox_attacker_builds_its_own_instance():
    victim = create_defense("ppfrfd", seed=1)
    a = create_attack("cgan", seed=0)
    own = a.attacker_defense(victim)
    assert own is not victim and own.config == victim.config
    x = faces(2)
    assert not torch.allclose(own.query(x), victim.query(x))   # different secrets
    assert create_attack("cgan", mode="blackbox").attacker_defense(victim) is victim
    with pytest.raises(ValueError, match="blackbox"):
        a.attacker_defense(NoiseDefense())


def test_differentiable_query_for_masked_defense():
    fn = differentiable_query(create_defense("ppfrfd", seed=0))
    x = faces(1).requires_grad_(True)
    fn(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---- metrics -------------------------------------------------------------------------------------------
def test_ssim_psnr_hand_made_cases():
    x = faces(3)
    assert np.allclose(M.ssim(x, x), 1.0)
    assert np.all(np.isinf(M.psnr(x, x)))
    # a constant offset d: MSE = d^2, PSNR = 10 log10(range^2 / d^2) with range 2
    d = 0.05
    y = (x * 0.9 + d).clamp(-1, 1)
    x9 = x * 0.9
    assert np.allclose(M.psnr(y, x9), 10 * math.log10(4 / d ** 2), atol=1e-6)
    # Gaussian noise of known sigma (no clipping: images kept well inside the range)
    g = torch.Generator().manual_seed(0)
    base = x * 0.5
    noisy = base + 0.02 * torch.randn(base.shape, generator=g, dtype=base.dtype)
    mse = ((noisy.double() - base.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    assert np.allclose(M.psnr(noisy, base), 10 * np.log10(4 / mse), atol=1e-4)
    s = M.ssim(noisy, base)
    assert np.all((s < 1) & (s > 0.5))
    more = (base + 0.2 * torch.randn(base.shape, generator=g, dtype=base.dtype)).clamp(-1, 1)
    assert np.all(M.ssim(more, base) < s)                          # more noise, lower SSIM
    with pytest.raises(HybridMaskInputError, match=r"\[-1, 1\]"):
        M.ssim(x * 2, x)
    with pytest.raises(HybridMaskInputError, match="shape"):
        M.psnr(x[:2], x)


def test_identity_metrics_hand_made():
    e = torch.eye(4)
    assert np.allclose(M.identity_similarity(e, e), 1.0)
    assert np.allclose(M.identity_similarity(e, e.roll(1, 0)), 0.0)
    assert np.allclose(M.identity_similarity(e, -e), -1.0)
    gal = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    labels = ["a", "a", "b", "c"]
    q = torch.tensor([[1.0, 0.05, 0], [0, 0.2, 1.0], [0.6, 0.5, 0.0]])
    r = M.reidentification(q, ["a", "b", "b"], gal, labels)
    assert r["ranks"] == [1, 2, 2]
    assert r["rank1"] == pytest.approx(1 / 3) and r["rank5"] == 1.0
    assert r["chance"]["rank1"] == pytest.approx(1 / 3)
    with pytest.raises(HybridMaskInputError, match="absent"):
        M.reidentification(q, ["a", "b", "zz"], gal, labels)
    # images through an embedder
    emb = lambda imgs: imgs.mean(dim=(2, 3))
    x = faces(2)
    assert np.allclose(M.identity_similarity(x, x, embedder=emb), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="embedder"):
        M.identity_similarity(x, x)


def test_paper_scores():
    s = M.s_scores(0.2, 0.1, 0.6, 0.5)
    assert s == pytest.approx({"S1": 0.8, "S2": 0.9, "S3": 0.4, "S4": 0.5})
    v = M.score_pp(s["S1"], s["S2"], s["S3"], s["S4"])
    assert v == pytest.approx(0.4 * (0.8 + 0.9) / 2 + 0.6 * (0.4 + 0.5) / 2)
    assert M.compute_metric("score_pp", 0, 0, 0, 0) == 0.0
    assert M.compute_metric("score_cls", 0.97) == 0.97
    with pytest.raises(ValueError, match="fraction"):
        M.score_cls(97.0)
    with pytest.raises(ValueError, match="S3"):
        M.score_pp(0.1, 0.1, 2.5, 0.1)
    with pytest.raises(ValueError, match="ssim_masked"):
        M.s_scores(1.5, 0, 0, 0)
    with pytest.raises(KeyError):
        M.compute_metric("nope")
    assert set(M.list_metrics()) >= {"ssim", "psnr", "identity_similarity", "reidentification", "score_pp"}


# ---- attacks on small inputs (no real data needed) -----------------------------------------------------
TINY = dict(epochs=1, width=4, disc_width=4, size=32, batch_size=4, progress=False, seed=0)


@pytest.mark.parametrize("name, kw", [("none", {}), ("ppfrfd", {}), ("freq_mixup", {"k": 2}),
                                      ("instahide", {"k": 2}), ("ppfrfd", {"u": 2})])
def test_cgan_runs_on_every_representation(name, kw):
    d = create_defense(name, seed=1, **kw)
    a = create_attack("cgan", **TINY).fit(d, faces(8))
    out = a.attack(d, faces(3, seed=5))
    assert out.shape == (3, 3, 112, 112) and out.abs().max() <= 1
    assert len(a.history) == 1 and math.isfinite(a.history[0]["l1"])
    if name in ("freq_mixup", "instahide"):
        r = create_attack("cgan", target="release", **TINY).fit(d, faces(8))
        assert r.attack(d, faces(4, seed=5)).shape == (4, 3, 112, 112)


def test_cgan_release_needs_batch_of_k():
    d = create_defense("freq_mixup", k=4, seed=1)
    with pytest.raises(ValueError, match="batch"):
        create_attack("cgan", target="release", **{**TINY, "batch_size": 2}).fit(d, faces(8))


def test_demix_exact_without_defense_and_improves_with_T():
    x = faces(4, seed=2)
    pub = faces(64, seed=3)
    d0 = create_defense("none")
    for grouping in ("given", "cluster"):
        a = create_attack("demix", T=3, grouping=grouping, progress=False, seed=0).fit(d0, pub)
        assert np.allclose(M.ssim(a.attack(d0, x), x), 1.0, atol=1e-5)
        assert a.report()["grouping_purity"] == 1.0
    # known channel order (shuffle none): white-box least squares; more encodings -> better
    for kw, gain in ((dict(drop="none", mix="none"), 0.3), (dict(), 0.02)):   # DC kept / DC dropped + mixed
        d = create_defense("freq_mixup", k=3, shuffle="none", seed=1, **kw)
        s = {}
        for T in (1, 48):
            a = create_attack("demix", T=T, partners_per_batch=16, progress=False, seed=0).fit(d, pub)
            assert a.report()["decoder"] == "lstsq"
            s[T] = M.ssim(a.attack(d, x), x).mean()
        assert s[48] > s[1] + gain
    with pytest.raises(ValueError, match="k"):
        create_attack("demix", mode="blackbox").fit(d, pub)
    with pytest.raises(ValueError, match="observe"):
        a.invert(torch.zeros(2, 3))


def test_demix_per_sample_shuffle_goes_to_image_domain():
    d = create_defense("freq_mixup", k=2, seed=1)
    a = create_attack("demix", T=2, partners_per_batch=4, grouping="cluster", progress=False, seed=0).fit(d, faces(16))
    assert a.report()["combine"] == "decoded"
    out = a.attack(d, faces(3, seed=4))
    assert out.shape == (3, 3, 112, 112)
    assert 0 <= a.report()["grouping_purity"] <= 1


def test_embedding_inversion_decoder_and_optimisation():
    torch.manual_seed(0)
    # images with a 4x4x3 latent and a stand-in recognizer that sees a 4x4 thumbnail: invertible
    pub, vic = faces(96, seed=1, latent=4), faces(6, seed=2, latent=4)
    thumb = lambda q: torch.nn.functional.avg_pool2d(q, 28).flatten(1)
    d = create_defense("none")
    a = create_attack("embedding_inversion", recognizer=thumb, epochs=30, width=8, size=32, lr=3e-3,
                      progress=False, seed=0).fit(d, pub)
    rec = a.attack(d, vic)
    mean_face = pub.mean(0, keepdim=True).expand_as(vic)
    assert (rec - vic).abs().mean() < 0.8 * (mean_face - vic).abs().mean()
    # white-box optimisation through a (random) torch recognizer and the masked query path
    from hybridmask.models import create_model
    net = create_model("tiny_test", stem="freq", in_chans=189, grid=14, embedding_size=32).eval()
    dm = create_defense("ppfrfd", seed=1)
    o = create_attack("embedding_inversion", recognizer=net, method="optimize", steps=25, opt_size=28,
                      progress=False, seed=0).fit(dm, pub[:8])
    out = o.attack(dm, vic[:2])
    assert out.shape == (2, 3, 112, 112)
    assert o.opt_history[-1] > o.opt_history[0] + 0.05
    assert all(p.requires_grad for p in net.parameters())          # restored after optimisation


def test_gmi_small_pipeline():
    d = create_defense("none")
    torch.manual_seed(0)
    lin = nn.Linear(3, 5)              # a classifier that reads the mean colour: sensitive to the GAN's output
    with torch.no_grad():
        lin.weight.mul_(30)
    clf = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()
    a = create_attack("gmi", classifier=clf, gan_epochs=4, n_images=32, batch_size=8, width=4, nz=8, steps=30,
                      opt_lr=0.1, n_candidates=2, progress=False, seed=0).fit(d, faces(32))
    labels = torch.tensor([0, 1, 2, 3, 4])
    out = a.invert(labels)
    assert out.shape == (5, 3, 112, 112)
    # the latent optimisation lowers the target classifier's loss for the chosen identities
    assert a.opt_history[-1]["ce"] < a.opt_history[0]["ce"]
    assert 0 <= a.last_target_accuracy <= 1
    assert a.sample(3).shape == (3, 3, 112, 112)
    with pytest.raises(ValueError, match="target labels"):
        a.invert(torch.tensor([7]))


def test_outputs_are_written(tmp_path):
    p = save_grid(tmp_path / "g.png", [faces(2), faces(2, 1)], ["a", "b"])
    from PIL import Image
    assert Image.open(p).size[1] > 2 * 112
    write_json(tmp_path / "r.json", {"x": float("inf"), "t": torch.tensor([1.0])})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": "inf", "t": [1.0]}


def test_cli_resolves_defenses(tmp_path):
    from hybridmask.attacks.cli import resolve_defense
    (tmp_path / "d.yaml").write_text("defense:\n  name: freq_mixup\n  args: {k: 3}\n")
    d = resolve_defense(str(tmp_path / "d.yaml"), {"u": 2})
    assert d.config["name"] == "freq_mixup" and d.config["k"] == 3 and d.grid == 28
    from hybridmask.models import create_model, save_model
    m = create_model("tiny_test", stem="freq", in_chans=189, grid=14, embedding_size=8)
    save_model(tmp_path / "m.pt", m, masking={"u": 1, "drop": "dc", "shuffle": "sample", "mix": "neighbour", "k": 4})
    d = resolve_defense(str(tmp_path / "m.pt"), {})
    assert d.config["name"] == "freq_mixup" and d.config["k"] == 4
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_defense(str(tmp_path / "bad.pt"), {})
    with pytest.raises(KeyError):
        resolve_defense("nope", {})
    with pytest.raises(ValueError, match="does not take"):
        resolve_defense("none", {"k": 3})


# ---- real faces ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_real(faces_root):
    from hybridmask.attacks.data import build_attack_data
    return build_attack_data(faces_root, "celeba_heldout", n_victims=12, n_distractors=20, n_public=128,
                             gallery_per_victim=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def sface():
    pytest.importorskip("onnxruntime")
    try:
        from hybridmask.eval.onnx_models import SFace
        return SFace()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        pytest.skip(f"SFace not available: {e}")


def test_real_split_is_identity_disjoint(small_real):
    d = small_real
    assert not set(d.public_identities) & set(d.gallery_labels)
    assert set(d.victim_labels) <= set(d.gallery_labels)
    assert d.victims.shape == (12, 3, 112, 112) and d.public.shape[0] == 128


@pytest.mark.realdata
@pytest.mark.slow
def test_cgan_tells_no_defense_from_noise_on_real_faces(small_real, sface, tmp_path):
    """Against no defense the reconstruction is recognisable by the independent SFace; against a
    release that ignores the face it is not - and the harness scores the two apart."""
    from hybridmask.attacks.harness import evaluate_defense
    kw = dict(mode="blackbox", epochs=3, width=16, size=48, disc_width=8, batch_size=8, progress=False, seed=0)
    res = {}
    for d in (create_defense("none"), NoiseDefense(seed=1)):
        r = evaluate_defense(d, {"cgan": create_attack("cgan", **kw)}, small_real, embedder=sface,
                             grid_dir=tmp_path, progress=False)
        res[r["defense"]] = r
    none, noise = res["none"]["attacks"]["cgan"], res["test_noise"]["attacks"]["cgan"]
    other = res["none"]["baselines"]["different_person"]
    chance = res["none"]["baselines"]["chance"]["rank1"]
    # no defense: identity survives the reconstruction
    assert none["identity_similarity"]["mean"] > other["identity_similarity"]["mean"] + 0.2
    assert none["rank1"] >= max(5 * chance, 0.3)
    assert none["ssim"]["mean"] > 0.4
    # noise "defense": nothing to reconstruct
    assert noise["identity_similarity"]["mean"] < other["identity_similarity"]["mean"] + 0.1
    assert noise["ssim"]["mean"] < 0.25
    # the harness tells them apart
    assert none["rank1"] > noise["rank1"] + 0.3
    assert none["score_pp"] < noise["score_pp"] - 0.3
    assert (tmp_path / "none_cgan.png").is_file()
    assert "| none | cgan |" in markdown_table(list(res.values()))


def test_cli_errors_are_one_line(capsys, tmp_path):
    from hybridmask.cli import main
    assert main(["attack", "--defense", "none", "--attacks", "foo", "--data", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "unknown attack 'foo'" in capsys.readouterr().err
    assert main(["attack", "--defense", "none"]) == 1
    assert "--data" in capsys.readouterr().err
    assert main(["attack", "--defense", "none", "--defense-arg", "k", "--data", str(tmp_path),
                 "--out", str(tmp_path)]) == 1
    assert "key=value" in capsys.readouterr().err
    assert main(["attack", "--defense", "none", "--attack-arg", "demix.T=2", "--data", str(tmp_path),
                 "--out", str(tmp_path)]) == 1
    assert "not run" in capsys.readouterr().err
    assert main(["attack", "--list"]) == 0 and "demix" in capsys.readouterr().out


@pytest.mark.realdata
def test_cli_end_to_end_on_real_faces(faces_root, sface, tmp_path):
    from hybridmask.cli import main
    out = tmp_path / "run"
    rc = main(["attack", "--defense", "freq_mixup", "--defense-arg", "k=2", "--attacks", "cgan,demix",
               "--attack-arg", "cgan.epochs=1", "--attack-arg", "cgan.width=4", "--attack-arg", "cgan.size=32",
               "--attack-arg", "cgan.disc_width=4", "--attack-arg", "demix.T=2", "--data", str(faces_root),
               "--victims", "celeba_heldout", "--n-victims", "4", "--n-distractors", "4", "--n-public", "16",
               "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["attacks"]) == {"cgan", "demix"}
    for a in res["attacks"].values():
        assert -1 <= a["ssim"]["mean"] <= 1 and 0 <= a["rank1"] <= 1 and 0 <= a["score_pp"] <= 2
    assert (out / "results.md").read_text().count("| freq_mixup |") == 3
    assert (out / "grids" / "freq_mixup_cgan.png").is_file()
