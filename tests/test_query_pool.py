"""Issue-14 candidate: test-time queries mixed with faces of a public pool (``query_k``, ``pool``, ``pool_sha256``
on ``ppfrfd`` / ``freq_mixup`` / ``adaptive``). What is checked is the mechanics under the defense contract:
``query_k=1`` is today's query bit for bit; ``query_k=K`` mixes each face with K - 1 pool faces, the face the
heaviest, every face on its own secrets; training releases are pool mixes too; the pool round-trips through a
config (file + SHA-256, loaded lazily; a missing or changed pool is refused); argument errors; ``structure()``.
Not their privacy or accuracy. Tiny CPU tensors only."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from hybridmask.defenses import create_defense
from hybridmask.defenses.adaptive import save_policy
from hybridmask.defenses.io import (PublicPoolError, load_defense, pool_fingerprint, save_defense)
from hybridmask.freq import HybridMask
from hybridmask.freq.hybrid import anchor_largest
from hybridmask.freq.mixup import MixRecord

SIZE = 16
DEFENSES = (("ppfrfd", {}), ("freq_mixup", {"k": 2}), ("adaptive", {"k_values": (2, 3), "policy_seed": 0}))
IDS = [n for n, _ in DEFENSES]
QUERY_KEYS = ("query_k", "pool", "pool_sha256")


def _faces(n=4, seed=1):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pool(n=6, seed=7):
    return _faces(n, seed)


def _png_pool(folder, n=5, seed=3):
    """A folder of n tiny PNG 'faces' (one in a sub-folder) -> the pool tensor they decode to."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / ("sub" if i == 0 else ".") / f"face{i}.png")
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    (folder / "README.txt").write_text("not an image: ignored")
    return out


# ---- query_k = 1: today's query ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args", DEFENSES, ids=IDS)
def test_query_k_1_is_todays_query_bit_for_bit(name, args):
    x = _faces()
    default = create_defense(name, seed=0, **args)
    explicit = create_defense(name, seed=0, query_k=1, **args)
    old = create_defense(name, seed=0, **args)
    q = default.query(x)
    assert torch.equal(q, explicit.query(x))
    assert torch.equal(q, old.apply(x, old.draw(x, 1))[0])              # the k=1 query as it was defined
    if name == "ppfrfd":
        assert torch.equal(q, HybridMask(seed=0, k=1).encode(x))         # BDCT + PPFR-FD, nothing else
        assert default.mixes is False and default.max_k == 1
    assert not any(k in default.config for k in QUERY_KEYS)             # existing configs (and records) unchanged
    assert default.config == explicit.config
    st = default.structure()
    assert st.query_k == 1 and st.pool is None


def test_hybridmask_query_k_1_and_pool_setter_unchanged():
    x, pool = _faces(), _pool()
    assert torch.equal(HybridMask(seed=0).query(x), HybridMask(seed=0, query_k=1).query(x))
    a, b = HybridMask(k=3, pool=pool, seed=0), HybridMask(k=3, seed=0)
    b.pool = pool                                                      # the setter the trainer's tests use
    ra, rb = a(x), b(x)
    assert torch.equal(ra[0], rb[0]) and ra[1].source == "pool"
    assert "query_k" not in a.config and "anchor_largest" not in a.config


# ---- query_k = 3: pool partners, the face the heaviest -------------------------------------------------------------
@pytest.mark.parametrize("name,args", DEFENSES, ids=IDS)
def test_query_k_3_mixes_two_pool_partners_with_the_face_heaviest(name, args):
    x, pool = _faces(), _pool()
    d = create_defense(name, seed=0, query_k=3, pool=pool, **args)
    draw = d.draw_query(x)
    rec = draw.mix
    assert rec.source == "pool" and rec.k.tolist() == [3] * 4 and rec.indices.shape == (4, 3)
    assert torch.equal(rec.indices[:, 0], torch.arange(4))               # column 0: the face itself
    partners = rec.indices[:, 1:]
    assert int(partners.min()) >= 0 and int(partners.max()) < pool.shape[0]
    assert all(len(set(row)) == 2 for row in partners.tolist())          # two distinct pool faces
    assert torch.allclose(rec.weights.sum(1), torch.ones(4))
    assert bool((rec.weights[:, 0] >= rec.weights.max(1).values).all())  # the private face keeps the largest
    assert bool((rec.label_weights[:, 0] >= rec.label_weights.max(1).values).all())
    # the release is the weighted sum of each face masked on its own secrets (mask_mix): the face's permutation,
    # each partner's own permutation
    q = d.apply(x, draw)[0]
    m = d.mask
    manual = rec.weights[:, 0].view(4, 1, 1, 1) * m.encode(x, draw.perm, draw.subset)
    for j in (1, 2):
        partner = m.encode(pool[partners[:, j - 1]], draw.pool_perm[:, j - 1])
        manual = manual + rec.weights[:, j].view(4, 1, 1, 1) * partner
    torch.testing.assert_close(q, manual)
    assert not torch.equal(draw.pool_perm[:, 0], draw.perm)               # partners are not on the face's secrets
    alone = m.encode(x, draw.perm, draw.subset)
    assert not torch.allclose(q, alone)                                  # not the face in the clear
    assert q.shape == alone.shape == (4, d.in_channels, d.grid_for(SIZE), d.grid_for(SIZE))


def test_anchor_largest_per_band_and_the_rule():
    x, pool = _faces(), _pool()
    d = create_defense("freq_mixup", k=3, granularity="band", seed=0, query_k=3, pool=pool)
    w = d.draw_query(x).mix.weights                                      # (B, K, C): one simplex per band
    assert w.dim() == 3 and bool((w[:, 0] >= w.max(1).values).all())
    # anchor_largest only moves weights: same multiset per row, partners keep their indices
    rec = MixRecord(indices=torch.tensor([[0, 4, 2]]), weights=torch.tensor([[0.2, 0.5, 0.3]]),
                    label_weights=torch.tensor([[0.2, 0.5, 0.3]]), k=torch.tensor([3]), source="pool")
    out = anchor_largest(rec)
    assert torch.equal(out.weights, torch.tensor([[0.5, 0.2, 0.3]])) and torch.equal(out.indices, rec.indices)
    torch.testing.assert_close(out.label_weights, torch.tensor([[0.5, 0.2, 0.3]]))


@pytest.mark.parametrize("name,args", DEFENSES, ids=IDS)
def test_secrets_differ_per_query(name, args):
    x, pool = _faces(), _pool(12)
    d = create_defense(name, seed=0, query_k=3, pool=pool, **args)
    a, b = d.draw_query(x), d.draw_query(x)
    assert not torch.equal(a.perm, b.perm)
    assert not torch.equal(a.mix.weights, b.mix.weights)
    assert not torch.equal(a.mix.indices, b.mix.indices)
    assert not torch.equal(d.query(x), d.query(x))
    assert d.stochastic and d.capabilities()["stochastic"]
    # under one client key the permutation is fixed, but partners and weights stay fresh per query
    k = create_defense(name, seed=0, shuffle="key", query_k=3, pool=pool, **args)
    a, b = k.draw_query(x), k.draw_query(x)
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.mix.weights, b.mix.weights)
    assert k.stochastic and not torch.equal(k.query(x), k.query(x))
    # a seeded defense replays its queries (tests); seed=None draws from the OS
    assert torch.equal(create_defense(name, seed=5, query_k=3, pool=pool, **args).query(x),
                       create_defense(name, seed=5, query_k=3, pool=pool, **args).query(x))


def test_training_releases_are_pool_mixes_like_the_queries():
    x, pool = _faces(), _pool()
    p = create_defense("ppfrfd", seed=0, query_k=3, pool=pool)
    assert p.mixes and p.max_k == 3 and p.capabilities()["mixes"]         # its release now returns a MixRecord
    released, rec = p.release(x)
    assert rec.source == "pool" and rec.k.tolist() == [3] * 4
    assert bool((rec.weights[:, 0] >= rec.weights.max(1).values).all())
    assert released.shape == p.query(x).shape
    f = create_defense("freq_mixup", k=2, seed=0, query_k=3, pool=pool)
    _, rec = f.release(x)
    assert rec.source == "pool" and rec.k.tolist() == [2] * 4 and bool((rec.weights[:, 0] >= rec.weights[:, 1]).all())
    # the trainer's split: per-face draw, encode, draw_mix for the policy's k (adaptive), mix
    a = create_defense("adaptive", k_values=(2, 3), policy_seed=0, seed=0, query_k=3, pool=pool)
    base = a.draw(x, 1)
    mixed, rec = a.mix(a.encode(x, base), a.draw_mix(x, base, torch.tensor([2, 3, 3, 2])))
    assert rec.source == "pool" and rec.k.tolist() == [2, 3, 3, 2]
    assert bool((rec.weights[:, 0] >= rec.weights.max(1).values).all())
    # labels of pool partners are unknown (-1): the mixed-label loss leaves them out
    assert rec.mixed_labels(torch.arange(4))[:, 1:].eq(-1).all()
    # a pool on freq_mixup alone (query_k=1): training partners from the pool, queries unchanged
    g = create_defense("freq_mixup", k=2, seed=0, pool=pool)
    assert torch.equal(g.query(x), create_defense("freq_mixup", k=2, seed=0).query(x))
    assert g.release(x)[1].source == "pool" and g.structure().pool == "public" and g.structure().query_k == 1


# ---- structure --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args", DEFENSES, ids=IDS)
def test_structure_states_query_k_and_public_pool(name, args):
    d = create_defense(name, seed=0, query_k=3, pool=_pool(), **args)
    st = d.structure()
    assert st.query_k == 3 and st.pool == "public" and st.transform == "bdct"
    assert st.mix_order == "mask_mix"
    if name == "ppfrfd":
        assert st.k == 3 and st.k_values == (3,)


# ---- config round trip and the pool file -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pt", "folder"])
@pytest.mark.parametrize("name,args", DEFENSES, ids=IDS)
def test_config_round_trip_with_a_pool_file(tmp_path, kind, name, args):
    if kind == "pt":
        path = tmp_path / "pool.pt"
        faces = _pool()
        torch.save({"images": faces}, path)
    else:
        path = tmp_path / "pool"
        faces = torch.stack(_png_pool(path))
    d = create_defense(name, seed=0, query_k=3, pool=str(path), **args)
    cfg = d.config
    assert cfg["query_k"] == 3 and cfg["pool"] == str(path) and cfg["pool_sha256"] == pool_fingerprint(path)
    assert d.mask._pool_faces is None                                   # loaded lazily, on first use
    x = _faces()
    assert d.query(x).shape == (4, d.in_channels, 2, 2)
    loaded = d.mask.pool
    assert loaded.shape == (faces.shape[0], 3, SIZE, SIZE)
    if kind == "pt":
        assert torch.equal(loaded, faces)
    else:   # folder: every image file (sub-folders too, in path order), nothing else
        assert sorted(loaded.flatten(1).sum(1).tolist()) == pytest.approx(sorted(faces.flatten(1).sum(1).tolist()))
    again = create_defense(**cfg)
    assert again.config == cfg and replace(again.structure(), bdct=None) == replace(d.structure(), bdct=None)
    via_load = load_defense(cfg, seed=0)
    assert via_load.config == cfg
    save_defense(tmp_path / "defense.pt", d)
    from_file = load_defense(tmp_path / "defense.pt", seed=0)
    assert from_file.config == cfg and from_file.structure().query_k == 3
    r1 = create_defense(name, seed=4, query_k=3, pool=str(path), **args).query(x)
    r2 = load_defense(cfg, seed=4).query(x)
    assert torch.equal(r1, r2)                                          # same pool, same seed -> same queries


def test_missing_or_changed_pool_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "pool.pt"
    torch.save(_pool(), path)
    cfg = create_defense("ppfrfd", seed=0, query_k=3, pool=str(path)).config
    torch.save(_pool(seed=8), path)                                     # other faces at the same path
    with pytest.raises(PublicPoolError, match=r"public pool .*pool\.pt changed"):
        load_defense(cfg)
    path.unlink()
    with pytest.raises(PublicPoolError, match=r"public pool .*pool\.pt not found"):
        load_defense(cfg)
    with pytest.raises(PublicPoolError, match="not found"):
        create_defense("ppfrfd", query_k=3, pool=str(tmp_path / "nowhere"))
    # changed after the defense was built, before its first use: refused when loaded
    torch.save(_pool(), path)
    d = create_defense("freq_mixup", k=2, seed=0, query_k=2, pool=str(path))
    torch.save(_pool(seed=9), path)
    with pytest.raises(PublicPoolError, match="changed"):
        d.query(_faces())
    # a folder pool: one changed byte of one image
    folder = tmp_path / "faces"
    _png_pool(folder)
    cfg = create_defense("ppfrfd", seed=0, query_k=2, pool=str(folder)).config
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(folder / "face3.png")
    with pytest.raises(PublicPoolError, match="faces changed"):
        load_defense(cfg)


def test_a_tensor_pool_records_its_fingerprint_and_must_be_given_again(tmp_path):
    pool = _pool()
    d = create_defense("ppfrfd", seed=0, query_k=3, pool=pool)
    cfg = d.config
    assert cfg["pool"] is None and cfg["pool_sha256"] == pool_fingerprint(pool)
    with pytest.raises(ValueError, match="in-memory pool tensor"):
        create_defense(**cfg)
    with pytest.raises(ValueError, match="in-memory pool tensor"):
        load_defense(cfg)
    back = load_defense(cfg, overrides={"pool": pool.clone()})
    assert back.config == cfg
    with pytest.raises(PublicPoolError, match="not the pool it was built with"):
        load_defense(cfg, overrides={"pool": _pool(seed=8)})


def test_a_policy_file_keeps_the_query_pool(tmp_path):
    path = tmp_path / "pool.pt"
    torch.save(_pool(), path)
    d = create_defense("adaptive", k_values=(2, 3), policy_seed=0, seed=0, query_k=2, pool=str(path))
    save_policy(tmp_path / "policy.pt", d.policy, masking=d.config)
    back = load_defense(tmp_path / "policy.pt")
    assert back.config["query_k"] == 2 and back.config["pool_sha256"] == d.config["pool_sha256"]
    assert back.structure().pool == "public"


# ---- argument errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"query_k": 0}, "query_k must be an int >= 1"),
    ({"query_k": 2.0}, "query_k must be an int >= 1"),
    ({"query_k": True}, "query_k must be an int >= 1"),
    ({"query_k": "3"}, "query_k must be an int >= 1"),
    ({"query_k": 3}, r"query_k=3 needs pool="),
    ({"pool": "POOL"}, "pool is only used with query_k >= 2"),
    ({"query_k": 2, "pool": 5}, "pool must be a path"),
    ({"query_k": 2, "pool": "POOL", "pool_sha256": "abc"}, "pool_sha256 must be a 64-digit hex"),
    ({"pool_sha256": "0" * 64}, "pool_sha256 is set but pool is None"),
])
def test_bad_arguments_give_one_clear_value_error(tmp_path, kwargs, match):
    path = tmp_path / "pool.pt"
    torch.save(_pool(), path)
    kwargs = {k: (str(path) if v == "POOL" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        create_defense("ppfrfd", **kwargs)


def test_bad_combinations_on_mixing_defenses():
    pool = _pool()
    with pytest.raises(ValueError, match="k=1 never mixes"):
        create_defense("freq_mixup", k=1, query_k=3, pool=pool)
    with pytest.raises(ValueError, match=r"max_weight 0.3 is infeasible for query_k=3"):
        create_defense("freq_mixup", k=4, max_weight=0.3, query_k=3, pool=pool)
    with pytest.raises(ValueError, match="query_k must be an int"):
        create_defense("adaptive", query_k=-1, pool=pool)
    small = create_defense("ppfrfd", query_k=5, pool=_pool(2), seed=0)      # 4 distinct partners from 2 faces
    with pytest.raises(ValueError, match="pool size"):
        small.query(_faces())
    other = create_defense("ppfrfd", query_k=2, pool=torch.rand(3, 3, 8, 8) * 2 - 1, seed=0)
    with pytest.raises(ValueError, match="pool's faces are 8x8"):
        other.query(_faces())


# ---- the trainer reads it like any mixing defense ----------------------------------------------------------------
def test_one_training_step_behind_a_query_pool_defense():
    from torch.utils.data import TensorDataset
    from hybridmask.models import create_head, create_model
    from hybridmask.train import AlternatingTrainer, TrainOptions
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(2)
    x = torch.rand(len(y), 3, 32, 32, generator=g) * 2 - 1
    d = create_defense("ppfrfd", seed=0, query_k=3, pool=torch.rand(5, 3, 32, 32, generator=g) * 2 - 1)
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=4, embedding_size=8)
    head = create_head("cosface", 8, 4, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05)
    tr = AlternatingTrainer(model, head, opt, TensorDataset(x, y), d, options=TrainOptions(batch_size=8))
    out = tr.step(next(iter(tr.batches())))
    assert torch.isfinite(torch.tensor(out["loss"])) and out["k"].tolist() == [3] * 8


def test_trainer_takes_a_batch_smaller_than_k_when_partners_come_from_the_pool():
    from torch.utils.data import TensorDataset

    from hybridmask.models import create_head, create_model
    from hybridmask.train import AlternatingTrainer, TrainOptions
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    d = create_defense("freq_mixup", k=4, query_k=4, pool=pool, seed=1)
    x, y = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1, torch.arange(6) % 3
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=4, embedding_size=8)
    head = create_head("cosface", 8, 3, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01)
    tr = AlternatingTrainer(model, head, opt, TensorDataset(x, y), d, options=TrainOptions(batch_size=2))
    assert tr.step(next(iter(tr.batches())))["images"] == 2
