"""The key-invariant Gram attack (issue 14): its features do not depend on the secrets (channel permutation,
orthogonal key), equal the unmasked face's after the public unmix / whitening of the neighbour mix, its
parameters and applicability are checked, and a tiny fit/attack round runs (tiny synthetic tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from hybridmask.attacks import create_attack, list_attacks
from hybridmask.attacks.gram import (GramAttack, estimate_rotation, feature_names, gram_features, offsets,
                                     public_planes, shared_rotation, subset_rows)
from hybridmask.defenses import create_defense
from hybridmask.freq import Draw
from hybridmask.freq.ppfrfd import haar_orthogonal


def smooth_faces(n: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency 112x112 pictures in [-1, 1]: BDCT energy falls with frequency as in faces, so
    the Gram's leading eigenvalues are well separated (stable principal planes)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 7, 7, generator=g)
    fine = torch.randn(n, 3, 28, 28, generator=g)
    up = lambda t: torch.nn.functional.interpolate(t, size=(112, 112), mode="bicubic", align_corners=False)
    return torch.tanh(0.6 * up(coarse) + 0.15 * up(fine))


def features_of(defense, x: torch.Tensor, released: torch.Tensor = None, **kw) -> torch.Tensor:
    st = defense.structure()
    return gram_features(public_planes(defense.query(x) if released is None else released, st.channel_mix), **kw)


def assert_same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal to ``tol`` relative to each map's scale (the releases are float32)."""
    scale = b.abs().amax(dim=(0, 2, 3), keepdim=True).clamp_min(1.0)
    err = float(((a - b).abs() / scale).max())
    assert err < tol, err


def test_registered_and_feature_layout():
    assert "gram" in list_attacks()
    assert len(offsets(1)) == 8 and len(offsets(2)) == 24 and (0, 0) not in offsets(2)
    assert feature_names(1, 3) == ["energy"] + [f"cos{d}" for d in offsets(1)] + ["pc0", "pc1", "pc2"]
    f = gram_features(torch.randn(2, 5, 6, 6), radius=2, principal=7)   # k = min(7, C=5): zero-padded
    assert f.shape == (2, 1 + 24 + 7, 6, 6) and torch.all(f[:, -2:] == 0)
    # energy = sqrt of the Gram's diagonal, cosines = its normalised off-diagonal entries
    z = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    zf = z.reshape(4, 9)
    gram = zf.T @ zf
    f = gram_features(z, radius=1, principal=0)
    torch.testing.assert_close(f[0, 0].flatten(), gram.diag().sqrt())
    k = offsets(1).index((0, 1))                                        # block (1, 1) and its right neighbour (1, 2)
    assert math.isclose(float(f[0, 1 + k, 1, 1]), float(gram[4, 5] / (gram[4, 4] * gram[5, 5]).sqrt()), rel_tol=1e-12)
    assert float(f[0, 1 + k, 1, 2]) == 0.0                              # the neighbour leaves the grid


def test_exactly_invariant_to_permutation_and_orthogonal_key_float64():
    g = torch.Generator().manual_seed(3)
    x = create_defense("ppfrfd", shuffle="none", mix="none").query(smooth_faces(3)).double()
    c = x.shape[1]
    q = haar_orthogonal(c, g)
    perm = torch.rand(3, c, generator=g).argsort(1)
    y = torch.einsum("ij,bjhw->bihw", q, x[torch.arange(3)[:, None], perm])
    torch.testing.assert_close(gram_features(y, radius=2, principal=8), gram_features(x, radius=2, principal=8),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("kw", [dict(shuffle="key", mix="orthogonal"), dict(shuffle="sample", mix="orthogonal"),
                                dict(shuffle="keys:3", mix="orthogonal"), dict(shuffle="key", mix="none")])
def test_two_releases_with_different_secrets_give_the_same_features(kw):
    x = smooth_faces(4)
    a, b = create_defense("ppfrfd", seed=1, **kw), create_defense("ppfrfd", seed=2, **kw)
    ya, yb = a.query(x), b.query(x)
    assert (ya - yb).abs().max() > 1e-2                                  # the releases do differ
    fa, fb = features_of(a, x, ya), features_of(b, x, yb)
    assert_same(fa, fb)
    plain = create_defense("ppfrfd", shuffle="none", mix="none")          # the unmasked kept coefficients X
    assert_same(fa, features_of(plain, x))


def test_neighbour_mix_equal_after_the_public_whitening():
    x = smooth_faces(4)
    d = create_defense("ppfrfd", seed=4)                                  # default: per-face shuffle, neighbour mix
    assert d.structure().channel_mix == "neighbour"
    y = d.query(x)
    plain = features_of(create_defense("ppfrfd", shuffle="none", mix="none"), x)
    assert_same(features_of(d, x, y), plain)                              # the exact inverse of M
    # the same through the whitening (M M^T)^(-1/2): Y^T (M M^T)^-1 Y = X^T X
    c = y.shape[1]
    m = (torch.eye(c, dtype=torch.float64) + torch.roll(torch.eye(c, dtype=torch.float64), 1, dims=1)) / math.sqrt(2)
    evals, evecs = torch.linalg.eigh(m @ m.T)
    white = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    yw = torch.einsum("ij,bjhw->bihw", white, y.double())
    assert_same(gram_features(yw), plain)


def test_subset_features_depend_only_on_the_subset():
    x = smooth_faces(3)
    a = create_defense("ppfrfd", shuffle="sample", mix="orthogonal", subset=90, seed=5)
    b = create_defense("ppfrfd", shuffle="sample", mix="orthogonal", subset=90, seed=6)
    da = a.draw(x, 1)
    db = Draw(perm=b.draw(x, 1).perm, subset=da.subset)                   # same subsets, other permutations and key
    fa = features_of(a, x, a.apply(x, da)[0])
    fb = features_of(b, x, b.apply(x, db)[0])
    assert_same(fa, fb)
    # = the features of X with the dropped channels zeroed (what is released), not those of X
    plain = create_defense("ppfrfd", shuffle="none", mix="none")
    xs = plain.query(x) * da.subset.float()[:, :, None, None]
    assert_same(fa, gram_features(public_planes(xs, "none")))
    assert float((fa - features_of(plain, x)).abs().max()) > 1e-2


def test_applicable_and_params():
    assert GramAttack.applicable(create_defense("none")) is not None       # not a block DCT
    assert "block-DCT" in GramAttack.applicable(create_defense("instahide"))
    assert "even" in GramAttack.applicable(create_defense("ppfrfd", drop="none"))   # 192 channels: singular mix
    for d in (create_defense("ppfrfd"), create_defense("ppfrfd", shuffle="key", mix="orthogonal"),
              create_defense("ppfrfd", shuffle="key", mix="orthogonal", subset=90), create_defense("dctdp"),
              create_defense("ppfrfd", u=2, shuffle="key", mix="orthogonal")):
        assert GramAttack.applicable(d) is None
    with pytest.raises(ValueError, match="radius"):
        create_attack("gram", radius=0)
    with pytest.raises(ValueError, match="principal"):
        create_attack("gram", principal=-1)
    with pytest.raises(TypeError, match="epochs"):
        create_attack("gram", epochs="3")
    with pytest.raises(TypeError, match="flip"):
        create_attack("gram", flip=1)
    with pytest.raises(ValueError, match="mode"):
        create_attack("gram", mode="blackbox")
    with pytest.raises(ValueError, match="unknown parameter"):
        create_attack("gram", key="x")
    atk = create_attack("gram", epochs=1, progress=False)
    with pytest.raises(ValueError, match="block-DCT"):
        atk.fit(create_defense("none"), smooth_faces(4))
    with pytest.raises(RuntimeError, match="fitted"):
        atk.invert(torch.zeros(1, 189, 14, 14))


def test_tiny_fit_and_attack_round_with_a_fresh_key_per_batch():
    public, victims = smooth_faces(16, seed=1), smooth_faces(3, seed=2)
    victim_defense = create_defense("ppfrfd", shuffle="key", mix="orthogonal", subset=120, seed=7)
    atk = create_attack("gram", n_images=16, epochs=1, width=4, batch_size=8, principal=4, seed=0, progress=False)
    keys = []
    own = atk.attacker_defense

    def spy(defense):
        d = own(defense)
        keys.append(d.client_key()["orthogonal"])
        return d
    atk.attacker_defense = spy
    atk.fit(victim_defense, public)
    # begin_fit's instance + one per batch of 8 faces, per view (face and mirror): all different keys
    assert len(keys) == 1 + 2 * 2
    assert all(float((keys[i] - keys[j]).abs().max()) > 1e-3 for i in range(len(keys)) for j in range(i))
    secret = victim_defense.client_key()["orthogonal"]
    assert all(float((k - secret).abs().max()) > 1e-3 for k in keys)    # never the victim's key
    recon = atk.attack(victim_defense, victims)
    assert recon.shape == (3, 3, 112, 112) and torch.isfinite(recon).all()
    assert float(recon.min()) >= -1 and float(recon.max()) <= 1
    assert atk.report()["fresh_key"] and atk.report()["grid"] == 14 and len(atk.report()["train_l1"]) == 1
    with pytest.raises(ValueError, match="expects"):
        atk.invert(torch.zeros(2, 10, 14, 14))


def test_procrustes_recovers_the_release_given_the_true_face():
    """``R = polar(X_pred Z^T)`` with ``Z = K X``: for ``X_pred = X`` it is ``K^T`` (``X X^T`` is positive definite),
    so ``R Z = X``: the orthogonal key is undone exactly; the dropped DC then comes back from edge continuity."""
    public, victims = smooth_faces(12, seed=1), smooth_faces(3, seed=2)
    d = create_defense("ppfrfd", shuffle="sample", mix="orthogonal", seed=8)
    atk = create_attack("gram", n_images=12, epochs=1, width=4, batch_size=6, principal=2, seed=0, progress=False,
                        project="procrustes")
    atk.fit(d, public)
    q = d.query(victims)
    back = atk.procrustes(q, victims)
    assert float((back - victims).abs().mean()) < 0.02
    # the kept AC coefficients are those of the victims to float precision
    st = d.structure()
    kept = list(st.kept)
    torch.testing.assert_close(st.bdct(back)[:, kept], st.bdct(victims)[:, kept], rtol=0, atol=2e-3)
    off = atk.procrustes(q, victims.flip(0))                           # another face's prediction: far from it
    assert float((off - victims).abs().mean()) > float((back - victims).abs().mean()) + 0.02
    recon = atk.invert(q)                                             # project="procrustes" in the attack itself
    assert recon.shape == (3, 3, 112, 112) and float(recon.abs().max()) <= 1
    with pytest.raises(ValueError, match="project"):
        create_attack("gram", project="exact")


# ---- the pooled client key --------------------------------------------------------------------------------
def keyed_planes(b: int = 40, c: int = 12, n: int = 30, m: int = None, seed: int = 0):
    """Tiny synthetic ``(B, C, N)`` coefficients with energy falling over the channels, a Haar key ``K`` and the
    releases ``Z = K D X`` (``D``: a random ``m`` of the C channels per face when ``m`` is given)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3, 0.3, c, dtype=torch.float64)
    x = torch.randn(b, c, n, generator=g, dtype=torch.float64) * scale[:, None]
    k = haar_orthogonal(c, g)
    d = None
    if m is not None:
        d = torch.zeros(b, c, dtype=torch.bool).scatter_(1, torch.rand(b, c, generator=g).argsort(1)[:, :m], True)
    z = k @ (x if d is None else x * d[..., None])
    return x, k, z, d, scale.pow(2) * n, g


def key_error(r: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(r - k.T)


def test_pooled_rotation_is_the_key_for_true_predictions():
    x, k, z, _, _, _ = keyed_planes()
    r = estimate_rotation(x, z, pooled=True)
    assert r.shape == (12, 12) and float(key_error(r, k)) < 1e-6
    per = estimate_rotation(x, z)                                      # per face: exact as well (N >= C)
    assert per.shape == (40, 12, 12) and float(key_error(per, k).max()) < 1e-6


def test_pooled_rotation_beats_the_per_face_estimates_from_noisy_predictions():
    x, k, z, _, _, g = keyed_planes()
    for sigma in (0.5, 1.0):
        noisy = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(dim=(0, 2))[:, None]
        pooled = float(key_error(estimate_rotation(noisy, z, pooled=True), k))
        per = key_error(estimate_rotation(noisy, z), k)
        assert pooled < 0.5 * float(per.mean()) and pooled < float(per.min()), (sigma, pooled, per.mean())


def test_pooled_rotation_with_per_face_subsets_alternates_to_the_key():
    x, k, z, d, energy, g = keyed_planes(m=6)
    plain = float(key_error(estimate_rotation(x, z, pooled=True, subset=6, energy=energy, iters=0), k))
    r = estimate_rotation(x, z, pooled=True, subset=6, energy=energy, iters=2)
    assert float(key_error(r, k)) < 1e-6 < plain                     # sum X X^T D is not symmetric; sum D X X^T D is
    assert torch.equal(subset_rows(r @ z, 6, energy), d)              # every face's kept channels found
    noisy = x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(dim=(0, 2))[:, None]
    pooled = float(key_error(estimate_rotation(noisy, z, pooled=True, subset=6, energy=energy), k))
    assert pooled < float(key_error(estimate_rotation(noisy, z), k).mean())
    with pytest.raises(ValueError, match="energy"):
        estimate_rotation(x, z, pooled=True, subset=6)
    with pytest.raises(ValueError, match="pred and released"):
        estimate_rotation(x, z[:, :-1])


def test_subset_alternation_does_not_drift_from_blurred_predictions():
    """A rough (blurred, half mean-face) prediction of the kept coefficients: the pooled estimate beats the
    per-face one and the alternation improves on its first estimate instead of drifting to an unrelated rotation
    (scoring the rows by their energy relative to the channel mean did drift: 0.14 -> 1.40)."""
    faces = smooth_faces(120, seed=3)
    d = create_defense("ppfrfd", shuffle="key", mix="orthogonal", subset=95, seed=5)
    st, n = d.structure(), faces.shape[0]
    kept = list(st.kept)
    key = d.client_key()
    k = key["orthogonal"] @ torch.eye(len(kept), dtype=torch.float64)[key["perm"][0]]
    z = d.query(faces).double().reshape(n, len(kept), -1)
    energy = st.bdct(faces)[:, kept].double().pow(2).sum((2, 3)).mean(0)
    blurred = torch.nn.functional.avg_pool2d(faces, 7, 1, 3, count_include_pad=False)
    pred = st.bdct(0.5 * blurred + 0.5 * faces.mean(0, keepdim=True))[:, kept].double().reshape(n, len(kept), -1)

    def err(r):
        return float((torch.linalg.matrix_norm((r - k.T) @ z) / torch.linalg.matrix_norm(z)).mean())
    first = err(estimate_rotation(pred, z, pooled=True, subset=95, energy=energy, iters=0))
    alternated = err(estimate_rotation(pred, z, pooled=True, subset=95, energy=energy, iters=3))
    assert first < err(estimate_rotation(pred, z)) and alternated < first < 0.5, (first, alternated)


def test_key_estimate_params_and_modes():
    assert shared_rotation(create_defense("ppfrfd", shuffle="key", mix="orthogonal").structure())
    assert shared_rotation(create_defense("ppfrfd", shuffle="key", mix="orthogonal", subset=90).structure())
    assert not shared_rotation(create_defense("ppfrfd", shuffle="sample", mix="orthogonal").structure())
    assert not shared_rotation(create_defense("ppfrfd", shuffle="keys:3", mix="orthogonal").structure())
    with pytest.raises(ValueError, match="key_estimate"):
        create_attack("gram", key_estimate="pooled")
    with pytest.raises(ValueError, match="client_queries"):
        create_attack("gram", client_queries=-1)
    with pytest.raises(ValueError, match="subset_iters"):
        create_attack("gram", subset_iters=-1)
    with pytest.raises(TypeError, match="subset_fill"):
        create_attack("gram", subset_fill=1)
    public = smooth_faces(8, seed=1)
    tiny = dict(n_images=8, epochs=1, width=4, batch_size=8, principal=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="per face"):                   # no single rotation to pool
        create_attack("gram", key_estimate="client", **tiny).fit(create_defense("ppfrfd", shuffle="sample",
                                                                                mix="orthogonal"), public)
    atk = create_attack("gram", **tiny).fit(create_defense("ppfrfd", shuffle="keys:2", mix="orthogonal"), public)
    assert atk.report()["key_estimate"] == "face" and atk.report()["client_queries"] == 0
    assert atk.observe(create_defense("ppfrfd", shuffle="keys:2", mix="orthogonal"), public[:2])["traffic"] is None


def test_pooled_attack_observes_the_clients_traffic_and_recovers_its_key():
    public, victims = smooth_faces(20, seed=1), smooth_faces(3, seed=2)
    d = create_defense("ppfrfd", shuffle="key", mix="orthogonal", seed=9)
    atk = create_attack("gram", n_images=12, epochs=1, width=4, batch_size=6, principal=2, seed=0, progress=False,
                        client_queries=10)
    atk.fit(d, public)
    rep = atk.report()
    assert rep["key_estimate"] == "client" and rep["client_queries"] == 10 and rep["traffic_faces"].startswith("8 ")
    calls = []
    query = d.query
    d.query = lambda x: calls.append(x.shape[0]) or query(x)           # every release goes through the victim's
    obs = atk.observe(d, victims)
    assert calls == [3, 10] and obs["queries"].shape == (3, 189, 14, 14) and obs["traffic"].shape == (10, 189, 14, 14)
    # the traffic faces: the 8 public faces the decoder was not trained on (of 20, 12 trained on)
    pool = {x.numpy().tobytes() for x in public}
    assert atk.traffic_pool.shape[0] == 8 and all(x.numpy().tobytes() in pool for x in atk.traffic_pool)
    key = d.client_key()
    perm, q = key["perm"][0], key["orthogonal"]
    k = q @ torch.eye(189, dtype=torch.float64)[perm]                   # Z = Q X[perm] = K X
    # with the true faces as predictions the pooled estimate is the key (to the float32 releases, ill-conditioned
    # in the weak high-frequency channels of these smooth pictures)
    back = atk.procrustes(obs["queries"], victims, key_estimate="client")
    assert atk.last_rotation.shape == (189, 189) and float(key_error(atk.last_rotation, k)) < 1e-2   # |K|_F = 13.7
    assert float((back - victims).abs().mean()) < 0.02
    recon = atk.invert(obs)                                            # the decoder's faces, pooled with the traffic
    assert recon.shape == (3, 3, 112, 112) and torch.isfinite(recon).all() and float(recon.abs().max()) <= 1
    assert atk.last_rotation.shape == (189, 189)
    atk.reconstruct(obs, "procrustes", key_estimate="face")
    assert atk.last_rotation.shape == (3, 189, 189)
    with pytest.raises(ValueError, match="traffic"):
        atk.invert({"queries": obs["queries"], "traffic": torch.zeros(2, 5, 14, 14)})
