"""DCTDP-style baseline (hybridmask.defenses.dctdp)."""
from __future__ import annotations

import pytest
import torch

from hybridmask.defenses import create_defense, list_defenses
from hybridmask.defenses.dctdp import DCTDPDefense, coefficient_l1_range, laplace_noise
from hybridmask.freq import BlockDCT
from hybridmask.freq.dct import block_basis
from hybridmask.utils import HybridMaskInputError


def faces(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 112, 112, generator=g) * 2 - 1


@pytest.mark.parametrize("u,grid", [(1, 14), (2, 28)])
def test_shapes(u, grid):
    d = create_defense("dctdp", u=u, seed=0)
    x = faces()
    out, rec = d.release(x)
    assert rec is None and out.shape == (2, 189, grid, grid)
    assert d.in_channels == 189 and d.grid == grid and d.input_kind == "freq"
    assert d.as_image(out).shape == (2, 3, 112, 112)
    assert "dctdp" in list_defenses()


def test_noise_is_added_to_the_dc_free_bdct():
    d = DCTDPDefense(u=1, budget_mean=2.0, seed=0)
    x = faces(64)
    f = BlockDCT(1)(x)
    keep = [c for c in range(192) if c % 64]
    torch.testing.assert_close(d.coefficients(x), f[:, keep])
    with torch.no_grad():
        lap = (d.query(x) - d.coefficients(x) - d.loc) / d.noise_scale()
    # Laplace(0, 1): mean 0, E|L| = 1, var 2 (64*189*196 draws)
    assert abs(float(lap.mean())) < 0.01
    assert float(lap.abs().mean()) == pytest.approx(1.0, abs=0.01)
    assert float(lap.var()) == pytest.approx(2.0, rel=0.02)


def test_budget_receives_gradients():
    for allocation in ("softmax", "free"):
        d = DCTDPDefense(u=1, allocation=allocation, seed=0)
        out = d.query(faces())
        out.pow(2).mean().backward()  # a stand-in recognizer loss
        assert d.rho.grad is not None and float(d.rho.grad.abs().sum()) > 0
        assert d.loc.grad is not None
        d.rho.grad = None
        d.privacy_loss().backward()
        assert float(d.rho.grad.abs().sum()) > 0 or allocation == "softmax"
    # DCTDP's privacy loss -log(mean scale) moves budget even under the softmax constraint
    d = DCTDPDefense(u=1, allocation="softmax", seed=0)
    with torch.no_grad():
        d.rho[0] += 1.0
    d.privacy_loss().backward()
    assert float(d.rho.grad.abs().sum()) > 0


def test_budget_constraint():
    d = DCTDPDefense(u=1, budget_mean=3.0, allocation="softmax", seed=0)
    with torch.no_grad():
        d.rho.copy_(torch.randn(d.rho.shape))
    assert d.epsilon().sum().item() == pytest.approx(3.0 * 189, rel=1e-5)
    f = DCTDPDefense(u=1, budget_mean=3.0, allocation="free", penalty_weight=5.0, seed=0)
    with torch.no_grad():
        f.rho.fill_(0.5)  # every budget exp(0.5) times the mean: over the total
    over = f.privacy_loss().item()
    base = -torch.log(f.noise_scale().mean()).item()
    assert over == pytest.approx(base + 5.0 * (torch.exp(torch.tensor(0.5)).item() - 1), rel=1e-5)
    f.project_()
    assert f.epsilon().sum().item() == pytest.approx(f.total_budget, rel=1e-5)
    assert f.privacy_loss().item() == pytest.approx(-torch.log(f.noise_scale().mean()).item(), rel=1e-5)
    e = DCTDPDefense(u=1, granularity="element", seed=0)
    assert e.rho.shape == (189, 14, 14) and e.num_budgets == 189 * 196
    assert e.total_epsilon_per_image() == pytest.approx(e.total_budget, rel=1e-5)
    assert d.total_epsilon_per_image() == pytest.approx(3.0 * 189 * 196, rel=1e-5)


def test_noise_comes_from_the_defense_generator():
    x = faces()
    a, b = DCTDPDefense(seed=7), DCTDPDefense(seed=7)
    torch.testing.assert_close(a.query(x), b.query(x))
    assert not torch.equal(a.query(x), a.query(x))  # fresh draws every release
    torch.manual_seed(0)
    s1 = DCTDPDefense(seed=None).query(x)
    torch.manual_seed(0)
    s2 = DCTDPDefense(seed=None).query(x)
    assert not torch.equal(s1, s2)  # the global torch seed does not fix the secret draws
    g = torch.Generator().manual_seed(3)
    n1 = laplace_noise((1000,), g)
    assert torch.isfinite(n1).all()
    st = a.secret_state()
    o1 = a.query(x)
    a.load_secret_state(st)
    torch.testing.assert_close(a.query(x), o1)


def test_sensitivity_bound():
    b = block_basis(8, torch.float64)
    r = coefficient_l1_range([1, 64 + 9, 128 + 63])
    for i, c in enumerate([1, 9, 63]):
        # the block sign(b_f) (values in [-1, 1]) reaches +||b_f||_1 and its negation -||b_f||_1
        blk = torch.sign(b[c])
        assert float(r[i]) == pytest.approx(2 * float(b[c] @ blk))
        rand = torch.rand(1000, 64, dtype=torch.float64) * 2 - 1
        assert float((rand @ b[c]).abs().max()) <= float(r[i]) / 2 + 1e-12
    d = DCTDPDefense(sensitivity="bound", seed=0)
    assert d.sensitivity.shape == (189, 1, 1) and float(d.sensitivity.min()) > 0


def test_rebuild_and_errors():
    d = DCTDPDefense(u=2, budget_mean=1.5, granularity="element", seed=0)
    cfg = d.config
    d2 = create_defense(**cfg)
    assert d2.config == cfg and d2.rho.shape == d.rho.shape
    with pytest.raises(ValueError, match="k=1"):
        d.release(faces(), k=3)
    with pytest.raises(ValueError, match="granularity"):
        DCTDPDefense(granularity="pixel")
    with pytest.raises(ValueError, match="allocation"):
        DCTDPDefense(allocation="uniform")
    with pytest.raises(ValueError, match="budget_mean"):
        DCTDPDefense(budget_mean=0)
    with pytest.raises(ValueError, match="sensitivity"):
        DCTDPDefense(sensitivity="big")
    with pytest.raises(HybridMaskInputError):
        d.query(torch.zeros(2, 3, 112, 112, dtype=torch.int64))
    with pytest.raises(HybridMaskInputError):
        d.as_image(torch.zeros(2, 10, 28, 28))


def test_other_face_sizes_and_train_stats():
    d = DCTDPDefense(u=1, seed=0)
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    out = d.query(x)
    assert out.shape == (3, 189, 4, 6)
    torch.testing.assert_close(d.coefficients(x), BlockDCT(1)(x)[:, [c for c in range(192) if c % 64]])
    e = DCTDPDefense(u=1, granularity="element", seed=0)
    with pytest.raises(HybridMaskInputError, match="112x112"):
        e.query(x)
    st = d.train_stats()
    assert st["eps_min"] == pytest.approx(4.0) and st["eps_max"] == pytest.approx(4.0)
    assert st["eps_sum_over_total"] == pytest.approx(1.0)
    assert st["noise_scale_mean"] == pytest.approx(1 / 127.5 / 4.0)
    assert st["epsilon_per_image"] == pytest.approx(4.0 * 189 * 196, rel=1e-5)


def test_load_defense_rebuilds_trained_budgets(tmp_path):
    from hybridmask.defenses import load_defense
    from hybridmask.defenses.io import build_defense, defense_record
    from hybridmask.utils import atomic_save
    d = DCTDPDefense(u=1, allocation="free", seed=0)
    with torch.no_grad():
        d.rho.copy_(torch.randn(d.rho.shape))
        d.loc.copy_(torch.randn(d.loc.shape))
    atomic_save({"format": "hybridmask.trainer", **defense_record(d)}, tmp_path / "last.pt")
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    atomic_save({"format": "hybridmask.trainer", **defense_record(d)}, tmp_path / "run" / "ckpt" / "last.pt")
    for spec in (tmp_path / "last.pt", tmp_path / "run"):   # a checkpoint, or a run folder holding one
        d2 = load_defense(spec, seed=0)
        torch.testing.assert_close(d2.rho, d.rho)
        torch.testing.assert_close(d2.loc, d.loc)
        assert d2.config == d.config
    # config + learned state rebuild it
    torch.testing.assert_close(build_defense(d2.config, d2.defense_state()).epsilon(), d.epsilon())
    with pytest.raises(ValueError, match="do not fit"):
        build_defense({**d.config, "granularity": "element"}, d.defense_state())
    with pytest.raises(ValueError, match="budget_mean"):   # learned values belong to the config they trained at
        load_defense(tmp_path / "last.pt", overrides={"budget_mean": 2.0})
    with pytest.raises(ValueError, match="no 'rho'"):
        DCTDPDefense().load_defense_state({"loc": d.loc.detach()})
    atomic_save({"format": "hybridmask.trainer", "defense": d.config}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="untrained"):   # no defense_state: refuse untrained budgets
        load_defense(tmp_path / "plain.pt")
    atomic_save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hybridmask"):
        load_defense(tmp_path / "other.pt")


def test_budget_floor_keeps_noise_finite_when_the_privacy_loss_pushes_a_budget_to_zero():
    """-log(mean noise scale) is unbounded below as one budget -> 0; the floor stops the collapse
    (a 400-step CelebA run without it released inf at step 204)."""
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    for alloc in ("softmax", "free"):
        d = create_defense("dctdp", allocation=alloc, seed=0)
        with torch.no_grad():
            d.rho[0] = -1e4                       # what a diverged optimiser leaves behind
        eps = d.epsilon().detach()
        assert float(eps.min()) == pytest.approx(0.01 * d.budget_mean)
        if alloc == "softmax":
            assert float(eps.sum()) == pytest.approx(d.total_budget, rel=1e-5)
        out, _ = d.release(x)
        assert torch.isfinite(out).all() and torch.isfinite(d.privacy_loss())
    d = create_defense("dctdp", min_budget_fraction=0.0, seed=0)
    with torch.no_grad():
        d.rho[0] = -1e4
    assert float(d.epsilon().detach().min()) == 0.0            # no floor: the collapse the default prevents
    with pytest.raises(ValueError, match="min_budget_fraction"):
        create_defense("dctdp", min_budget_fraction=1.5)
