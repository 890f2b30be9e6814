"""Issue-14 masking candidates: per-face random channel subsets (``subset=m``, ``subset_keys=R``,
PartialFace-style) and the keyed dense orthogonal channel mix (``mix="orthogonal"``). What is checked here
is the mechanics under the defense contract (shapes, draw/apply, client keys, configs, attack
applicability), not their privacy, which is measured elsewhere. Tiny CPU tensors only."""
from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

from hybridmask.defenses import create_defense
from hybridmask.defenses.io import (ClientKeyMismatchError, defense_record, key_fingerprint, load_client_key,
                                    load_defense, save_client_key, save_defense)
from hybridmask.freq import HybridMask
from hybridmask.freq.ppfrfd import PPFRFD, haar_orthogonal

C = 189   # kept channels for drop="dc"
MASK_DEFENSES = (("ppfrfd", {}), ("freq_mixup", {"k": 2}), ("adaptive", {"k_values": (2, 3), "policy_seed": 0}))
OPTIONS = ({"subset": 40}, {"subset": 40, "subset_keys": 3}, {"mix": "orthogonal"},
           {"shuffle": "key", "mix": "orthogonal", "subset": 25, "subset_keys": 1})


def _faces(n=4, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _bdct(n=6, g=2, seed=2):
    """Random (non-zero everywhere) BDCT coefficients (B, 192, g, g)."""
    return torch.randn(n, 192, g, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _nonzero_planes(t):
    return (t.flatten(2).abs().sum(-1) > 0).sum(1)


# ---- shapes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("u", [1, 2])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_shapes_and_structure(u, opts):
    x = _faces()
    g = 2 * u
    for name, args in MASK_DEFENSES:
        d = create_defense(name, u=u, seed=0, **args, **opts)
        assert d.query(x).shape == (4, C, g, g)
        assert d.release(x)[0].shape == (4, C, g, g)
        st = d.structure()
        assert st.subset == opts.get("subset") and st.subset_keys == opts.get("subset_keys")
        assert st.channel_mix == opts.get("mix", "neighbour")
    hm = HybridMask(u=u, k=2, seed=0, **opts)
    assert hm(x)[0].shape == hm.query(x).shape == (4, C, g, g)


# ---- per-face subsets -----------------------------------------------------------------------------------------
def test_subset_keeps_exactly_m_planes_per_face_and_differs_between_faces():
    m, freq = 20, _bdct(8)
    p = PPFRFD(shuffle="sample", mix="none", subset=m, seed=0)
    out = p(freq)
    assert _nonzero_planes(out).tolist() == [m] * 8
    # which channels survive: before the shuffle they are the draw's subset
    q = PPFRFD(shuffle="none", mix="none", subset=m, seed=0)
    perm, subset = q.draw_faces(8)
    assert perm is None and subset.shape == (8, C) and subset.dtype == torch.bool
    assert subset.sum(1).tolist() == [m] * 8
    out = q(freq, perm, subset)
    assert torch.equal(out.flatten(2).abs().sum(-1) > 0, subset)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in subset}) == 8   # a different subset per face
    # the kept planes are the face's own coefficients, untouched
    kept = freq[:, p.kept]
    assert torch.equal(out[subset], kept[subset])
    # through a defense: the query keeps m planes (no mix), and the Draw carries the subset
    d = create_defense("ppfrfd", mix="none", subset=m, seed=0)
    assert _nonzero_planes(d.query(_faces(6))).tolist() == [m] * 6
    draw = d.draw(_faces(6), 1)
    assert draw.subset.shape == (6, C) and draw.perm.shape == (6, C)


@pytest.mark.parametrize("name,args", MASK_DEFENSES)
@pytest.mark.parametrize("opts", [{"subset": 30}, {"subset": 30, "subset_keys": 2}, {"mix": "orthogonal"}])
def test_apply_with_the_same_draw_is_deterministic(name, args, opts):
    x = _faces(6)
    d = create_defense(name, seed=0, **args, **opts)
    for k in (1, None):
        draw = d.draw(x, k)
        a, _ = d.apply(x, draw)
        b, _ = d.apply(x, draw)
        assert torch.equal(a, b)
        if "subset" in opts:
            assert draw.subset is not None and draw.subset.sum(1).eq(30).all()
    # the mixing split replays the same subsets: encode + mix == apply
    if d.mixes:
        draw = d.draw(x, 2)
        assert torch.equal(d.mix(d.encode(x, draw), draw)[0], d.apply(x, draw)[0])


def test_subset_keys_draw_only_the_r_fixed_subsets():
    p = PPFRFD(subset=10, subset_keys=3, seed=0)
    masks = p.subset_masks
    assert masks.shape == (3, C) and masks.sum(1).tolist() == [10] * 3
    rows = torch.cat([p.subsets(64) for _ in range(3)])
    match = (rows.unsqueeze(1) == masks.unsqueeze(0)).all(-1)
    assert bool(match.any(1).all()) and bool(match.any(0).all())
    one = create_defense("ppfrfd", shuffle="key", subset=10, subset_keys=1, seed=0)
    assert not one.stochastic            # one key, one subset: a fixed secret function
    assert create_defense("ppfrfd", shuffle="key", subset=10, seed=0).stochastic


def test_subsets_with_mix_mask_order_and_a_public_pool():
    x, pool = _faces(4), _faces(6, seed=3)
    hm = HybridMask(k=3, subset=15, order="mix_mask", seed=0)
    draw = hm.draw(x)
    assert draw.subset.shape == (4, C)
    assert torch.equal(hm.apply(x, draw)[0], hm.apply(x, draw)[0])
    hp = HybridMask(k=3, subset=15, pool=pool, seed=0)
    draw = hp.draw(x)
    assert draw.pool_subset.shape == (4, 2, C) and draw.pool_subset.sum(-1).eq(15).all()
    assert torch.equal(hp.apply(x, draw)[0], hp.apply(x, draw)[0])


# ---- the orthogonal mix ---------------------------------------------------------------------------------------
def test_orthogonal_key_is_orthogonal_dense_and_inverted_with_the_key():
    p = PPFRFD(shuffle="sample", mix="orthogonal", seed=0)
    q = p.orthogonal
    assert q.shape == (C, C) and q.dtype == torch.float64
    assert torch.allclose(q.T @ q, torch.eye(C, dtype=torch.float64), atol=1e-5)
    assert abs(float(q.var() * C) - 1.0) < 0.05      # a dense Haar matrix: entries of variance ~1/C
    assert float((q.abs() > 1e-3).float().mean()) > 0.9
    freq = _bdct(5).float()
    perm, subset = p.draw_faces(5)
    released = p(freq, perm)
    pre = PPFRFD(shuffle="sample", mix="none", seed=1)(freq, perm)     # the same shuffle, no mix
    assert not torch.allclose(released, pre, atol=1e-2)
    assert torch.allclose(p.unmix_channels(released), pre, atol=1e-5)
    # the same through the step-by-step view and the per-sample linear maps
    a, b = PPFRFD(mix="orthogonal", subset=50, seed=4), PPFRFD(mix="orthogonal", subset=50, seed=4)
    assert torch.allclose(a(freq), b.scramble(b.select(freq)), atol=1e-5)
    c, e = PPFRFD(mix="orthogonal", subset=50, seed=3), PPFRFD(mix="orthogonal", subset=50, seed=3)
    w, v = torch.randn(C, 5, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64)
    assert torch.allclose(torch.matmul(c.scramble_rows(w, 2), v),
                          e.scramble(torch.matmul(w, v).unsqueeze(-1)).squeeze(-1), atol=1e-10)


def test_orthogonal_key_comes_from_the_defense_generator():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(haar_orthogonal(7, g), haar_orthogonal(7, torch.Generator().manual_seed(0)))
    k0 = create_defense("ppfrfd", mix="orthogonal", seed=0).client_key()["orthogonal"]
    assert torch.equal(k0, create_defense("ppfrfd", mix="orthogonal", seed=0).client_key()["orthogonal"])
    a = create_defense("ppfrfd", mix="orthogonal").client_key()["orthogonal"]     # seed=None: OS randomness
    b = create_defense("ppfrfd", mix="orthogonal").client_key()["orthogonal"]
    assert not torch.allclose(a, b) and not torch.allclose(a, k0)


# ---- client keys ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{"mix": "orthogonal"}, {"subset": 30, "subset_keys": 3},
                                  {"shuffle": "keys:2", "mix": "orthogonal", "subset": 30, "subset_keys": 2}])
def test_client_key_file_round_trip_gives_identical_releases(tmp_path, opts):
    x = _faces(4)
    d = create_defense("freq_mixup", k=2, seed=0, **opts)
    key = d.client_key()
    assert isinstance(key, dict) and sorted(key) == sorted(d.mask.ppfrfd.key_parts())
    fp = save_client_key(tmp_path / "k.pt", d)
    assert stat.S_IMODE(os.stat(tmp_path / "k.pt").st_mode) == 0o600
    loaded = load_client_key(tmp_path / "k.pt")
    assert loaded["fingerprint"] == fp == key_fingerprint(key) == defense_record(d)["key_fingerprint"]
    e = create_defense(**d.config)                   # fresh secrets (seed=None)
    draw = d.draw(x, 1)
    assert key_fingerprint(e.client_key()) != fp
    if "mix" in opts:    # the orthogonal key acts at apply time (a draw holds the chosen subsets and permutations)
        assert not torch.allclose(e.apply(x, draw)[0], d.apply(x, draw)[0])
    e.use_client_key(loaded["keys"])
    assert key_fingerprint(e.client_key()) == fp
    if "subset_keys" in opts:   # e now draws from the same R subsets
        assert torch.equal(e.mask.ppfrfd.subset_masks, d.mask.ppfrfd.subset_masks)
    assert torch.equal(e.apply(x, draw)[0], d.apply(x, draw)[0])
    draw = d.draw(x)                                 # a training release too
    assert torch.equal(e.apply(x, draw)[0], d.apply(x, draw)[0])


def test_a_wrong_orthogonal_key_is_refused(tmp_path):
    d = create_defense("ppfrfd", mix="orthogonal", seed=0)
    save_defense(tmp_path / "defense.pt", d)
    save_client_key(tmp_path / "right.pt", d)
    save_client_key(tmp_path / "wrong.pt", create_defense("ppfrfd", mix="orthogonal", seed=1))
    got = load_defense(tmp_path / "defense.pt", key=tmp_path / "right.pt")
    assert torch.equal(got.client_key()["orthogonal"], d.client_key()["orthogonal"])
    with pytest.raises(ClientKeyMismatchError, match="another client key"):
        load_defense(tmp_path / "defense.pt", key=tmp_path / "wrong.pt")
    with pytest.warns(UserWarning, match="will not match"):
        load_defense(tmp_path / "defense.pt")
    # a key of another shape of masking, or a matrix that is not orthogonal: a clear ValueError
    save_client_key(tmp_path / "perm.pt", create_defense("ppfrfd", shuffle="key", seed=0))
    with pytest.raises(ValueError, match="orthogonal"):
        load_defense("ppfrfd", overrides={"mix": "orthogonal"}, key=tmp_path / "perm.pt")
    with pytest.raises(ValueError, match="not orthogonal"):
        d.use_client_key({"orthogonal": torch.randn(C, C, dtype=torch.float64)})
    with pytest.raises(ValueError, match="no client key"):
        create_defense("ppfrfd", subset=5).use_client_key({"subsets": torch.zeros(1, 5, dtype=torch.long)})
    # a permutation-only key keeps its original form (a tensor, key file version 1)
    assert torch.is_tensor(load_client_key(tmp_path / "perm.pt")["keys"])
    assert torch.load(tmp_path / "perm.pt", weights_only=False)["format_version"] == 1


def test_secret_state_resumes_the_new_secrets_exactly():
    x = _faces(4)
    a = HybridMask(shuffle="key", mix="orthogonal", subset=30, subset_keys=2, k=2, seed=0)
    state = a.secret_state()
    assert state["orthogonal"].shape == (C, C) and state["subset_keys"].shape == (2, 30)
    ref = a(x)[0]
    b = HybridMask(shuffle="key", mix="orthogonal", subset=30, subset_keys=2, k=2, seed=7)
    c = HybridMask(shuffle="key", mix="orthogonal", subset=30, subset_keys=2, k=2, seed=7)
    a.load_secret_state(state)
    b.load_secret_state(state)
    assert torch.equal(a(x)[0], b(x)[0]) and torch.equal(b.ppfrfd.subset_masks, a.ppfrfd.subset_masks)
    assert not torch.allclose(c(x)[0], ref)


# ---- configs and validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args", MASK_DEFENSES)
def test_config_round_trip(name, args, tmp_path):
    for opts in OPTIONS:
        d = create_defense(name, seed=0, **args, **opts)
        cfg = dict(d.config)
        assert {k: cfg[k] for k in opts} == opts
        e = create_defense(cfg.pop("name"), **cfg)
        assert e.config == d.config and e.structure().subset == d.structure().subset
        save_defense(tmp_path / "d.pt", d)
        with warnings.catch_warnings():   # a keyed defense rebuilt without its key file warns
            warnings.simplefilter("ignore", UserWarning)
            assert load_defense(tmp_path / "d.pt").config == d.config
        assert load_defense(d.config).config == d.config
    # without the new options the config is what it was (no new keys)
    assert "subset" not in create_defense(name, seed=0, **args).config


@pytest.mark.parametrize("bad,match", [
    ({"subset": 0}, "subset must be"), ({"subset": C + 1}, "subset must be"), ({"subset": True}, "subset must be"),
    ({"subset": 2.5}, "subset must be"), ({"subset": "10"}, "subset must be"),
    ({"subset": 10, "subset_keys": 0}, "subset_keys must be"), ({"subset_keys": 3}, "subset_keys=3 needs subset"),
    ({"mix": "dense"}, "mix must be one of"),
])
def test_bad_arguments_name_the_argument(bad, match):
    for name, args in MASK_DEFENSES:
        with pytest.raises(ValueError, match=match):
            create_defense(name, seed=0, **args, **bad)
    with pytest.raises(ValueError, match=match):
        HybridMask(**bad)


def test_subset_of_every_kept_channel_is_allowed():
    d = create_defense("ppfrfd", mix="none", subset=C, seed=0)
    assert _nonzero_planes(d.query(_faces(2))).tolist() == [C, C]


# ---- attacks --------------------------------------------------------------------------------------------------
def test_attacks_that_invert_a_public_mix_decline_the_orthogonal_key():
    from hybridmask.attacks.linkage import LinkageAttack
    from hybridmask.attacks.separation import SeparationAttack
    from hybridmask.attacks.structure import StructureAttack
    ortho = create_defense("ppfrfd", mix="orthogonal", seed=0)
    why = StructureAttack.applicable(ortho)
    assert why is not None and "orthogonal" in why and "secret" in why
    with pytest.raises(ValueError, match="secret"):
        StructureAttack(n_images=None, seed=0, progress=False).fit(ortho, _faces(8, size=112))
    assert "orthogonal" in SeparationAttack.applicable(create_defense("freq_mixup", k=2, mix="orthogonal", seed=0))
    # linkage learns from its own releases, so it applies; its structure front is not used
    assert LinkageAttack.applicable(ortho) is None
    atk = LinkageAttack(seed=0, progress=False)
    atk._fit_front(ortho, _faces(8, size=112))
    assert atk.front is None
    # demix's white-box least-squares decoder needs a known channel mix as well
    from hybridmask.attacks import create_attack
    mixed = create_defense("freq_mixup", k=2, shuffle="none", mix="orthogonal", seed=0)
    with pytest.raises(ValueError, match="least-squares"):
        create_attack("demix", decoder="lstsq", progress=False, seed=0).fit(mixed, _faces(8, size=112))
    # subsets keep the public neighbour mix: the structure attack still applies (fewer planes to assign)
    assert StructureAttack.applicable(create_defense("ppfrfd", subset=40, seed=0)) is None
