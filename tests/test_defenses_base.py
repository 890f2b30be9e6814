"""The shared defense interface: shapes, config round trip, invertibility properties."""
import pytest
import torch

from hybridmask.defenses import create_defense, list_defenses

BASE = ["none", "freq_only", "ppfrfd", "freq_mixup", "instahide"]


def images(b=6, seed=0):
    return torch.rand(b, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", BASE)
def test_defense_shapes_and_config_round_trip(name):
    d = create_defense(name, seed=0)
    x = images()
    r, rec = d.release(x)
    q = d.query(x)
    assert r.shape == q.shape == (6, d.in_channels, d.grid, d.grid)
    assert d.as_image(q).shape == (6, 3, 112, 112)
    cfg = dict(d.config)
    d2 = create_defense(cfg.pop("name"), seed=0, **cfg)
    assert d2.config == d.config


def test_invertibility_properties():
    x = images()
    assert torch.equal(create_defense("none").query(x), x)
    fo = create_defense("freq_only")
    assert (fo.as_image(fo.query(x)) - x).abs().max() < 1e-5        # all channels: exact inverse
    pp = create_defense("ppfrfd", seed=0)
    assert (pp.as_image(pp.query(x)) - x).abs().mean() > 0.1        # DC dropped + shuffled: not invertible
    ih = create_defense("instahide", seed=0)
    q = ih.query(x)
    assert torch.allclose(q.abs(), x.abs()) and not torch.allclose(q, x)  # a sign flip per pixel
    r, rec = ih.release(x)
    assert rec.k.tolist() == [4] * 6 and torch.allclose(rec.label_weights.sum(1), torch.ones(6, dtype=x.dtype))


def test_unknown_defense_name():
    with pytest.raises(KeyError, match="unknown defense"):
        create_defense("nope")
    assert set(BASE) <= set(list_defenses())
