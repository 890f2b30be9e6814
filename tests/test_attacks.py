"""Tests of the attack harness (hybridmask.attacks): declared/validated parameters, metrics against
hand-made cases, every attack on small inputs, and every attack on a few dozen real faces: cgan
reconstructs recognisably against no defense and fails against a defense that releases noise; demix
recovers a face from T encodings far better than from one; embedding inversion (learned decoder and
white-box optimisation) beats the mean face; GMI makes the target classifier see the target. The CLI
runs every attack, gmi included."""
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
    from hybridmask.defenses import create_defense, defense_record
    save_model(tmp_path / "m.pt", m, extra=defense_record(create_defense("freq_mixup", k=4)))
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


# ---- every attack on real faces (a few dozen CelebA faces; SFace judge) -----------------------------------
def assert_scores_in_range(sc):
    """Reconstruction scores from the harness lie in their ranges."""
    assert -1 <= sc["ssim"]["mean"] <= 1
    assert sc["psnr"]["mean"] > 0
    assert -1 <= sc["identity_similarity"]["mean"] <= 1
    assert 0 <= sc["rank1"] <= sc["rank5"] <= 1
    assert all(0 <= sc[k] <= 2 for k in ("S1", "S2", "S3", "S4")) and 0 <= sc["score_pp"] <= 2


def mean_l1(a, b):
    return float((a - b).abs().mean())


@pytest.mark.realdata
def test_harness_scores_the_separation_of_a_query_time_pool_mix(small_real, sface, tmp_path):
    """A query mixed with public-pool faces (query_k=2) is a mixture the separate attack reads; its partners
    are pool faces, not other victims, so the harness scores the separated face against the victim (the
    heaviest face of each query) and adds no in-batch ``mixed`` block (which used to raise)."""
    from hybridmask.attacks.harness import evaluate_defense
    pool = tmp_path / "pool.pt"
    torch.save(small_real.public[:16].clone(), pool)
    d = create_defense("ppfrfd", query_k=2, pool=str(pool), seed=3)
    atk = create_attack("separate", n_images=32, classifier_epochs=1, classifier_hidden=16, refine_epochs=0,
                        mix_batch=8, restarts=1, iterations=1, seed=0, progress=False)
    res = evaluate_defense(d, {"separate": atk}, small_real, embedder=sface, progress=False)
    sc = res["attacks"]["separate"]
    assert_scores_in_range(sc)
    assert "mixed" not in sc and len(sc["per_image"]["rank"]) == small_real.victims.shape[0]
    # the attacker's own releases mix its faces with pool faces: slots owned by a pool face are labelled with
    # that face's own channel permutation and point past the attacker's faces, into the pool
    _, _, chans, owners, recs = atk._own_releases(small_real.public[:16])
    assert all(r.source == "pool" for r in recs)
    assert bool((owners >= 16).any()) and int(owners.max()) < 32 and int(owners.min()) >= 0
    assert int(chans.min()) >= 0 and int(chans.max()) < len(d.structure().kept)


@pytest.mark.realdata
def test_demix_on_real_faces(small_real, sface):
    """T encodings of a real face with fresh partners recover it far better than one encoding when the
    attacker knows the channel order; the harness scores it as re-identifiable."""
    from hybridmask.attacks.harness import evaluate_defense
    x = small_real.victims
    kw = dict(partners_per_batch=16, progress=False, seed=0)
    # MixUp of plain BDCT coefficients (nothing dropped, mixed or shuffled): only the partners hide the face
    d = create_defense("freq_mixup", k=3, shuffle="none", drop="none", mix="none", seed=1)
    res = evaluate_defense(d, {"demix": create_attack("demix", T=16, **kw)}, small_real, embedder=sface, progress=False)
    sc, other = res["attacks"]["demix"], res["baselines"]["different_person"]
    assert_scores_in_range(sc)
    assert sc["attack_info"]["decoder"] == "lstsq" and sc["attack_info"]["grouping_purity"] == 1.0
    one = create_attack("demix", T=1, **kw).fit(d, small_real.public).attack(d, x)
    assert one.shape == x.shape and one.abs().max() <= 1
    assert sc["ssim"]["mean"] > M.ssim(one, x).mean() + 0.2           # measured 0.60 vs 0.16
    assert sc["identity_similarity"]["mean"] > other["identity_similarity"]["mean"] + 0.2
    assert sc["rank1"] >= 5 * res["baselines"]["chance"]["rank1"]
    # k-means grouping of the unordered bag finds the sources far above chance (1/12)
    a = create_attack("demix", T=16, grouping="cluster", **kw).fit(d, small_real.public)
    assert M.ssim(a.attack(d, x), x).mean() > M.ssim(one, x).mean() + 0.1
    assert a.report()["grouping_purity"] > 3 / x.shape[0]
    # DC dropped + neighbour mixing (order known): still better with T
    d2 = create_defense("freq_mixup", k=3, shuffle="none", seed=1)
    s = {T: M.ssim(create_attack("demix", T=T, **kw).fit(d2, small_real.public).attack(d2, x), x).mean()
         for T in (1, 16)}
    assert s[16] > s[1] + 0.05                                           # measured 0.22 vs 0.10


class Thumbnail(nn.Module):
    """A 'recognizer' whose embedding is the 8x8 colour thumbnail of the query: inverting it is possible."""

    def forward(self, q):
        return nn.functional.avg_pool2d(q, 14).flatten(1)


class BlockEnergy(nn.Module):
    """An embedding of a per-sample shuffled frequency release that does not depend on the secret channel
    order: the coefficient energy of each 2x2 group of blocks."""

    def forward(self, q):
        return nn.functional.avg_pool2d(q.pow(2).sum(1, keepdim=True), 2).flatten(1).sqrt()


@pytest.mark.realdata
def test_embedding_inversion_on_real_faces(small_real, sface):
    """Learned decoder: from the embeddings of a (randomly initialised) tiny_test recognizer it learns on
    128 public faces to reconstruct unseen victims closer than the mean face. White-box optimisation:
    matching a thumbnail embedding recovers the coarse face; through the per-sample masked PPFR-FD query
    it still raises the objective (the masked path carries gradients)."""
    from hybridmask.attacks.harness import evaluate_defense
    from hybridmask.models import create_model
    x, pub = small_real.victims, small_real.public
    mean_face = pub.mean(0, keepdim=True).expand_as(x)
    none = create_defense("none")
    torch.manual_seed(0)
    net = create_model("tiny_test", stem="pixel", embedding_size=64).eval()
    a = create_attack("embedding_inversion", recognizer=net, epochs=20, width=8, size=32, lr=3e-3, progress=False,
                      seed=0)
    res = evaluate_defense(none, {"embedding_inversion": a}, small_real, embedder=sface, progress=False)
    assert_scores_in_range(res["attacks"]["embedding_inversion"])
    assert a.history[-1]["l1"] < 0.8 * a.history[0]["l1"]
    rec = a.invert(a.observe(none, x))
    assert rec.shape == x.shape and rec.abs().max() <= 1
    assert mean_l1(rec, x) < 0.9 * mean_l1(mean_face, x)                   # measured 0.34 vs 0.40
    # white-box optimisation from the mean face
    o = create_attack("embedding_inversion", recognizer=Thumbnail(), method="optimize", steps=40, opt_size=28,
                      opt_lr=0.1, progress=False, seed=0).fit(none, pub)
    rec = o.attack(none, x)
    assert rec.shape == x.shape and rec.abs().max() <= 1
    assert o.opt_history[-1] > o.opt_history[0] + 0.3                     # cosine to the target embedding
    assert mean_l1(rec, x) < 0.6 * mean_l1(mean_face, x)                   # measured 0.15 vs 0.40
    assert M.ssim(rec, x).mean() > M.ssim(mean_face, x).mean() + 0.15
    dm = create_defense("ppfrfd", seed=1)
    o = create_attack("embedding_inversion", recognizer=BlockEnergy(), method="optimize", steps=30, opt_size=28,
                      progress=False, seed=0).fit(dm, pub)
    rec = o.attack(dm, x)
    assert rec.shape == x.shape and rec.abs().max() <= 1
    assert o.opt_history[-1] > o.opt_history[0] + 0.1                     # measured 0.81 -> 1.00
    assert np.all((M.ssim(rec, x) >= -1) & (M.ssim(rec, x) <= 1))


@pytest.fixture(scope="module")
def class_real(faces_root):
    from hybridmask.attacks.data import build_class_data
    return build_class_data(faces_root, "celeba_heldout", n_classes=4, n_public=128, seed=0, progress=False)


@pytest.mark.realdata
def test_gmi_on_real_faces(class_real, sface, tmp_path):
    """A classifier trained on 4 private CelebA identities; GMI's latent optimisation makes it assign the
    target to far more inversions than to random GAN samples; the SFace-judged scores lie in range."""
    from hybridmask.attacks.gmi import classifier_accuracy, train_target_classifier
    from hybridmask.attacks.harness import evaluate_class_inversion
    cd = class_real
    assert not set(cd.class_names) & set(cd.public_identities)
    assert set(cd.gallery_labels) == set(cd.class_names) and cd.train.shape[0] == len(cd.train_labels) >= 60
    d = create_defense("none")
    clf = train_target_classifier(d, cd.train, cd.train_labels, epochs=20, seed=0, progress=False)
    assert classifier_accuracy(clf, d, cd.train, cd.train_labels) > 0.8
    a = create_attack("gmi", classifier=clf, gan_epochs=5, batch_size=16, width=16, nz=32, steps=60, opt_lr=0.1,
                      n_candidates=2, progress=False, seed=0)
    targets = [i for i in cd.targets for _ in range(2)]
    r = evaluate_class_inversion(d, a, cd.public, targets, cd.class_names, cd.gallery, cd.gallery_labels,
                                 embedder=sface, grid_path=tmp_path / "gmi.png")
    assert r["n_targets"] == 8 and (tmp_path / "gmi.png").is_file()
    assert 0 <= r["attack_accuracy"] <= r["rank5"] <= 1 and r["chance"]["rank1"] == pytest.approx(0.25)
    assert -1 <= r["identity_similarity_to_target"]["mean"] <= 1
    assert a.opt_history[-1]["ce"] < 0.5 * a.opt_history[0]["ce"]           # measured 6.3 -> 1.0
    y = torch.tensor(targets)
    with torch.no_grad():
        random_hits = float((clf(d.query(a.sample(len(targets)))).argmax(1) == y).float().mean())
    assert r["attack_info"]["target_classifier_accuracy_on_inversions"] >= random_hits + 0.25  # 0.75 vs 0.25


# ---- gmi from the command line ---------------------------------------------------------------------------
def _tiny_classifier_ckpt(path, n_classes=3, head=True, class_names=None, stem="pixel"):
    from hybridmask.models import create_head, create_model, save_model
    kw = dict(in_chans=189, grid=14) if stem == "freq" else {}
    m = create_model("tiny_test", stem=stem, embedding_size=16, **kw)
    h = create_head("cosface", embedding_size=16, num_classes=n_classes) if head else None
    save_model(path, m, h, extra={"class_names": class_names} if class_names else None)
    return path


def test_cli_gmi_errors(capsys, tmp_path):
    from hybridmask.attacks.gmi import train_target_classifier
    from hybridmask.cli import main
    base = ["attack", "--defense", "none", "--data", str(tmp_path), "--out", str(tmp_path / "o")]

    def err(*extra):
        assert main(base + list(extra)) == 1
        return capsys.readouterr().err

    ck = _tiny_classifier_ckpt(tmp_path / "clf.pt")
    assert "only used by gmi" in err("--attacks", "cgan", "--classifier", str(ck))
    assert "not found" in err("--attacks", "gmi", "--classifier", str(tmp_path / "missing.pt"))
    assert "--gmi-classes must be >= 2" in err("--attacks", "gmi", "--gmi-classes", "1")
    assert "no classifier head" in err("--attacks", "gmi", "--classifier",
                                       str(_tiny_classifier_ckpt(tmp_path / "nohead.pt", head=False)))
    assert "--classifier-classes" in err("--attacks", "gmi", "--classifier", str(ck))
    e = main(["attack", "--defense", "ppfrfd", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
              "--attacks", "gmi", "--classifier", str(ck)])
    assert e == 1 and "takes pixel inputs of 3x112x112" in capsys.readouterr().err
    for n in ("a", "b"):
        (tmp_path / "ids" / n).mkdir(parents=True)
        (tmp_path / "ids" / n / "1.jpg").write_bytes(b"")
    assert "has 3 classes" in err("--attacks", "gmi", "--classifier", str(ck), "--classifier-classes",
                                  str(tmp_path / "ids"))
    named = _tiny_classifier_ckpt(tmp_path / "named.pt", class_names=["x", "y", "z"])
    (tmp_path / "ids").rename(tmp_path / "lfw_112")       # class names from the checkpoint, faces under --data
    assert "none of the classifier's 3 classes" in err("--attacks", "gmi", "--classifier", str(named),
                                                        "--victims", "lfw")
    with pytest.raises(ValueError, match="labels"):
        train_target_classifier(create_defense("none"), faces(4), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="C >= 2"):
        train_target_classifier(create_defense("none"), faces(4), torch.tensor([0, 0, 0, 0]))


def test_cli_classifier_classes_from_folder(tmp_path):
    import argparse
    from hybridmask.attacks.cli import _classifier_classes
    for n, k in (("b", 3), ("a", 2), ("c", 1)):
        (tmp_path / n).mkdir()
        for i in range(k):
            (tmp_path / n / f"{i}.jpg").write_bytes(b"")
    args = argparse.Namespace(classifier="clf.pt", classifier_classes=str(tmp_path), classifier_min_images=2,
                              data=str(tmp_path), victims="lfw")
    assert _classifier_classes(args, {}, 2) == (["a", "b"], tmp_path)       # FaceFolder order, min_images kept
    args.classifier_min_images = 1
    with pytest.raises(ValueError, match="has 2 classes but"):
        _classifier_classes(args, {}, 2)
    args.classifier_classes = None
    names, root = _classifier_classes(args, {"extra": {"class_names": ["p", "q"]}}, 2)
    assert names == ["p", "q"] and root == tmp_path / "lfw_112"


@pytest.mark.realdata
def test_cli_gmi_on_real_faces(faces_root, sface, tmp_path, capsys):
    """gmi from the CLI: with a small classifier trained on the spot (masked PPFR-FD query path) and with a
    recognizer checkpoint saved with its head, next to a reconstruction attack."""
    from hybridmask.cli import main
    tiny = ["--attack-arg", "gmi.gan_epochs=1", "--attack-arg", "gmi.steps=3", "--attack-arg", "gmi.width=4",
            "--attack-arg", "gmi.nz=8", "--attack-arg", "gmi.n_candidates=1", "--n-public", "16", "--quiet"]
    out = tmp_path / "fly"
    assert main(["attack", "--defense", "ppfrfd", "--attacks", "gmi", "--data", str(faces_root), "--victims", "lfw",
                 "--gmi-classes", "3", "--gmi-per-class", "2", "--gmi-clf-epochs", "1", "--out", str(out)] + tiny) == 0
    assert "no --classifier given: training a small target classifier" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    g = res["class_inversion"]["gmi"]
    assert g["n_targets"] == 6 and 0 <= g["attack_accuracy"] <= g["rank5"] <= 1
    assert g["target_classifier"]["n_classes"] == 3 and 0 <= g["target_classifier"]["gallery_accuracy"] <= 1
    assert (out / "grids" / "ppfrfd_gmi.png").is_file() and "| ppfrfd | gmi | 6 |" in (out / "results.md").read_text()
    # a trained recognizer's checkpoint (here untrained) with its head and the names of its classes
    lfw = sorted(p.name for p in (faces_root / "lfw_112").iterdir() if p.is_dir())[:3]
    ck = _tiny_classifier_ckpt(tmp_path / "clf.pt", class_names=lfw)
    out = tmp_path / "ckpt"
    assert main(["attack", "--defense", "none", "--attacks", "demix,gmi", "--attack-arg", "demix.T=2",
                 "--classifier", str(ck), "--data", str(faces_root), "--victims", "lfw", "--n-victims", "4",
                 "--n-distractors", "4", "--out", str(out)] + tiny) == 0
    res = json.loads((out / "results.json").read_text())
    g = res["class_inversion"]["gmi"]
    assert g["target_classifier"]["source"] == str(ck) and g["n_targets"] == 3 * 4      # 3 classes x 4 (default)
    assert set(res["attacks"]) == {"demix"}
    md = (out / "results.md").read_text()
    assert "| none | demix |" in md and "| none | gmi |" in md


def test_judged_victims_scores_the_victims_themselves_perfectly():
    from types import SimpleNamespace

    from hybridmask.attacks.harness import JudgedVictims
    g = torch.Generator().manual_seed(0)
    victims = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    gallery = torch.cat([victims + 0.01 * torch.randn(6, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)])
    data = SimpleNamespace(victims=victims, victim_labels=list(range(6)), gallery=gallery.clamp(-1, 1),
                           gallery_labels=list(range(6)) + [10, 11, 12, 13])
    judged = JudgedVictims(data, embedder=lambda x: x.flatten(1))
    s = judged.score(victims)
    assert s["rank1"] == 1.0 and s["ssim"] > 0.999 and s["identity_similarity"] > 0.999
    other = judged.score(victims.flip(0))
    assert other["rank1"] < 0.5 and other["identity_similarity"] < s["identity_similarity"]
