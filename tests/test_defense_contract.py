"""The defense contract, for every registered defense (``list_defenses()``): built, released and queried
on real faces, round-tripped through its record (``save_defense`` -> ``load_defense``), and its declared
capabilities checked against what it does."""
from __future__ import annotations

import pytest
import torch

from hybridmask.defenses import (Defense, build_defense, create_defense, defense_record, list_defenses,
                                 load_defense, save_defense)
from hybridmask.freq import Draw, MixRecord

# small, fast constructor arguments where a defense's defaults are heavy (ARL's encoder), and a seeded
# policy sampler for the adaptive defense (its k draws are then reproducible too)
SMALL = {"arl": {"width": 4, "fc_dim": 16, "input_size": 32}, "adaptive": {"policy_seed": 0}}


def build(name: str, seed: int = 0) -> Defense:
    return create_defense(name, seed=seed, **SMALL.get(name, {}))


@pytest.fixture(scope="module")
def faces(real_faces):
    return real_faces


@pytest.fixture(scope="module")
def real_faces():
    import os
    from pathlib import Path
    root = Path(os.environ.get("HYBRIDMASK_DATA", Path(__file__).resolve().parents[2] / "shared/data/faces"))
    lfw = root / "lfw_112"
    if not lfw.is_dir():
        pytest.skip(f"real faces not found at {lfw} (set HYBRIDMASK_DATA)")
    from hybridmask.data import load_image
    files = sorted(lfw.glob("*/*.jpg"))[:8]
    return torch.stack([load_image(f) for f in files])


@pytest.mark.realdata
@pytest.mark.parametrize("name", list_defenses())
def test_contract(name, faces, tmp_path):
    d = build(name)
    assert d.input_kind in ("pixel", "freq", "feature")
    released, record = d.release(faces)
    query = d.query(faces)
    assert released.shape[0] == faces.shape[0] and torch.isfinite(released).all()
    assert tuple(released.shape[1:]) == (d.in_channels, d.grid, d.grid) == tuple(query.shape[1:])
    # mixing: a record that says whose faces with which weights; otherwise none
    if d.mixes:
        assert isinstance(record, MixRecord) and record.k.shape == (faces.shape[0],)
        torch.testing.assert_close(record.label_weights.sum(1), torch.ones(faces.shape[0], dtype=record.label_weights.dtype))
        assert d.max_k >= 2
    else:
        assert record is None and d.max_k == 1
    # stochastic: two releases differ; deterministic: identical
    again, _ = d.release(faces)
    q2 = d.query(faces)
    if d.stochastic:
        assert not torch.equal(query, q2)
    else:
        assert torch.equal(query, q2) and torch.equal(released, again)
    # draw / apply: replaying a held draw gives the same release; release == apply(draw)
    draw = d.draw(faces)
    assert isinstance(draw, Draw)
    a1, _ = d.apply(faces, draw)
    a2, _ = d.apply(faces, draw)
    assert torch.equal(a1, a2)
    if d.stochastic:   # two instances with the same seed: release() == apply(draw())
        r_twin, _ = build(name, seed=0).release(faces)
        other = build(name, seed=0)
        r_apply, _ = other.apply(faces, other.draw(faces))
    else:
        r_twin, r_apply = d.release(faces)[0], d.apply(faces, d.draw(faces))[0]
    torch.testing.assert_close(r_twin, r_apply)
    # mixing split: mix(encode) == apply
    if d.mixes:
        enc = d.encode(faces, draw)
        m, rec = d.mix(enc, draw)
        torch.testing.assert_close(m, a1)
        d3 = d.draw_mix(faces, draw, 2)
        assert int(d3.mix.k.max()) == 2
    # trainable hooks exist and are consistent
    params = d.trainable_parameters()
    assert bool(params) == d.trainable
    loss = d.privacy_loss()
    assert (loss is not None) == d.trainable
    d.project_()
    assert isinstance(d.train_stats(), dict)
    # the view as a picture
    view = d.as_image(query)
    assert view.shape == (faces.shape[0], 3, 112, 112)
    # persistence: record -> file -> load_defense -> the same public function, fresh secrets
    save_defense(tmp_path / "defense.pt", d)
    back = load_defense(tmp_path / "defense.pt")
    assert back.name == d.name and back.config == d.config
    assert back.capabilities() == d.capabilities()
    if not d.stochastic:
        torch.testing.assert_close(back.query(faces), query)
    rec = defense_record(d)
    assert build_defense(rec["defense"], rec["defense_state"], seed=3).config == d.config
    assert load_defense(tmp_path).config == d.config            # a run folder holding defense.pt
    # secret state: restoring it replays the same secrets
    st = d.secret_state()
    if d.stochastic:
        assert st is not None
        q_a = d.query(faces)
        d.load_secret_state(st)
        assert torch.equal(d.query(faces), q_a)


def test_trained_state_is_required_and_kept():
    dct = create_defense("dctdp", seed=0)
    with torch.no_grad():
        dct.rho.add_(torch.linspace(-1, 1, dct.rho.numel()).view_as(dct.rho))
    rec = defense_record(dct)
    back = build_defense(rec["defense"], rec["defense_state"])
    torch.testing.assert_close(back.epsilon(), dct.epsilon())
    with pytest.raises(ValueError, match="untrained"):
        build_defense(rec["defense"], None)
    with pytest.raises(ValueError, match="cannot override budget_mean"):
        build_defense(rec["defense"], rec["defense_state"], overrides={"budget_mean": 2.0})
    bad = {k: v.clone() for k, v in rec["defense_state"].items()}
    bad["rho"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build_defense(rec["defense"], bad)


def test_adaptive_policy_is_state_not_a_path(tmp_path):
    from hybridmask.policy import StrategyNet
    pol = StrategyNet(k_values=[2, 3], seed=0)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(0.5)
    d = create_defense("adaptive", policy=pol, seed=0)
    assert "policy_path" not in d.config and d.config["policy_config"]["name"] == "adaptive"
    save_defense(tmp_path / "a.pt", d)
    back = load_defense(tmp_path / "a.pt")
    for k, v in pol.state_dict().items():
        if not k.endswith("_extra_state"):
            torch.testing.assert_close(back.policy.state_dict()[k], v)
    with pytest.raises(ValueError, match="untrained"):
        build_defense(d.config, None)


def test_non_mixing_defense_refuses_k():
    with pytest.raises(ValueError, match="one face at a time"):
        create_defense("ppfrfd", seed=0).release(torch.zeros(4, 3, 112, 112), k=2)
