"""The masking ladder (issue 14): the adaptive policy's level sets each face's k in training *and* how many
channels its query keeps (``AdaptiveMask(subset_by_k=...)``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from hybridmask.defenses import AdaptiveMask, create_defense
from hybridmask.models import create_head, create_model
from hybridmask.policy import LagrangianReward, Reinforce, StrategyNet
from hybridmask.train import AlternatingTrainer, PolicySetup, TrainOptions

LEVELS = [None, 90, 60]
K = [1, 2, 3]


def faces(n, seed=0, size=112):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 7, 7, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def ladder(seed=0, level=None, **kw):
    """A low15 ladder; ``level``: force the policy's choice to that index (greedy, biased output layer)."""
    pol = StrategyNet(k_values=K, hidden=8, seed=None if seed is None else seed + 1)
    greedy = level is not None
    if greedy:
        with torch.no_grad():
            pol.net[-1].bias.copy_(torch.tensor([5.0 if i == level else 0.0 for i in range(len(K))]))
    return AdaptiveMask(policy=pol, drop="low15", subset_by_k=LEVELS, greedy=greedy, seed=seed, **kw)


def kept_channels(d, released):
    """Channels with energy once the public neighbour mix is undone (what an attacker can count)."""
    z = d.mask.ppfrfd.unmix_channels(released.double())
    return (z.flatten(2).abs().amax(2) > 1e-6).sum(1)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_a_query_keeps_the_channels_of_its_level(level):
    d = ladder(level=level)
    q = d.query(faces(4))
    assert q.shape == (4, 147, 14, 14)
    want = 147 if LEVELS[level] is None else LEVELS[level]
    assert kept_channels(d, q).tolist() == [want] * 4
    # the query is k=1: no MixUp record, and the structure names the ladder for white-box attacks
    assert d.draw_query(faces(4)).mix is None
    st = d.structure()
    assert st.subset_levels == tuple(LEVELS) and st.k_values == tuple(K) and st.subset is None


def test_training_release_mixes_k_faces_each_at_its_level():
    d = ladder()
    x = faces(12, seed=1)
    k = torch.tensor([1, 2, 3] * 4)
    base = d.draw(x, 1)                          # the trainer's per-face half: every channel (level 1)
    assert base.subset is None
    enc = d.encode(x, base)
    assert kept_channels(d, enc).tolist() == [147] * 12
    released, rec = d.mix_for(x, base, enc, k)
    assert released.shape == (12, 147, 14, 14) and rec.k.tolist() == k.tolist()
    # each face keeps its own level's number of channels (fresh secret subsets)
    dr = d.draw_mix(x, base, k)
    assert dr.subset.sum(1).tolist() == [147, 90, 60] * 4
    # the policy's own release draws k and the matching subset sizes together
    own = d.draw(x)
    sizes = {1: 147, 2: 90, 3: 60}
    assert own.subset.sum(1).tolist() == [sizes[int(v)] for v in own.mix.k.tolist()]


def test_ladder_secrets_come_from_the_secure_generator():
    x = faces(4)
    a, b = ladder(seed=None, level=2), ladder(seed=None, level=2)
    assert not torch.equal(a.query(x), b.query(x))       # fresh OS-seeded subsets and permutations
    c, e = ladder(seed=7, level=2), ladder(seed=7, level=2)
    assert torch.equal(c.query(x), e.query(x))           # reproducible when seeded (tests)
    s1, s2 = c.draw_query(x).subset, c.draw_query(x).subset
    assert not torch.equal(s1, s2)                       # a fresh subset per query


def test_ladder_config_rebuilds_the_trained_defense():
    d = ladder(seed=3)
    with torch.no_grad():
        d.policy.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 6.0]))
    cfg = {k: v for k, v in d.config.items() if k != "name"}
    assert cfg["subset_by_k"] == LEVELS
    again = create_defense("adaptive", seed=4, **cfg)
    again.load_defense_state(d.defense_state())
    again.greedy = True
    assert kept_channels(again, again.query(faces(3))).tolist() == [60] * 3
    assert again.structure().subset_levels == tuple(LEVELS)


@pytest.mark.parametrize("kwargs, match", [
    ({"subset_by_k": [None, 90]}, "one entry"),
    ({"subset_by_k": "90"}, "one entry"),
    ({"subset_by_k": [None, 90, 0]}, "1..147"),
    ({"subset_by_k": [None, 90, 200]}, "1..147"),
    ({"subset_by_k": [None, 90, 60.0]}, "1..147"),
    ({"subset_by_k": [30, 90, 60]}, "k=1 is the face alone"),
    ({"subset_by_k": LEVELS, "subset": 60}, "cannot be combined"),
    ({"subset_by_k": LEVELS, "order": "mix_mask"}, "order='mask_mix'"),
])
def test_bad_ladders_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveMask(policy_config={"name": "adaptive", "k_values": K}, drop="low15", seed=0, **kwargs)
    d = ladder()
    with pytest.raises(ValueError, match="not levels"):
        d.draw_mix(faces(2), d.draw(faces(2), 1), torch.tensor([2, 5]))


def test_trainer_learns_a_ladder_policy(one_thread):
    """The alternating trainer releases every face at its policy level (k and subset) and updates the policy."""
    torch.manual_seed(0)
    x, labels = faces(32, seed=2, size=56), torch.arange(4).repeat(8)
    pol = StrategyNet(k_values=K, hidden=8, seed=5)
    d = AdaptiveMask(policy=pol, drop="low15", subset_by_k=LEVELS, seed=3)
    seen = []
    real = d.mix_for

    def spy(images, base, encoded, k):
        out = real(images, base, encoded, k)
        seen.append((k.clone(), kept_channels(d, d.encode(images, d.draw_mix(images, base, k)))))
        return out
    d.mix_for = spy
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=7, embedding_size=16)
    head = create_head("cosface", 16, 4, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05)
    setup = PolicySetup(pol, Reinforce(pol, lr=1e-2), LagrangianReward(K, utility_target=0.5), n_fr=1, n_pi=1)
    before = [p.detach().clone() for p in pol.parameters()]
    tr = AlternatingTrainer(model, head, opt, TensorDataset(x, labels), d, policy=setup,
                            options=TrainOptions(batch_size=8, seed=1, total_steps=3))
    tr.fit(steps=3)
    assert seen and set(tr.k_counts) <= set(K)
    sizes = {1: 147, 2: 90, 3: 60}
    for k, kept in seen:
        assert kept.tolist() == [sizes[int(v)] for v in k.tolist()]
    assert any(not torch.equal(p, q) for p, q in zip(before, pol.parameters()))


def test_attacker_term_moves_the_ladder_level(one_thread):
    """Toy case: levels 1, 2, 3 have the same FR loss; the linear cost (mu = 1) prefers level 1, an attacker whose
    error grows with the level (fewer channels, more faces) moves the policy to level 3."""
    def play(a, seed=0, steps=200, batch=32):
        g = torch.Generator().manual_seed(seed)
        pol = StrategyNet(context_dim=2, k_values=K, hidden=16, seed=seed + 1)
        rl = Reinforce(pol, lr=3e-3, entropy_coef=0.05)
        rw = LagrangianReward(K, utility_target=0.0, mu_init=1.0, mu_lr=0.0, mu_kp=0.0, attacker_weight=a)
        for _ in range(steps):
            ctx = torch.randn(batch, 2, generator=g)
            k, _, lp = pol.act(ctx)
            fr = 2.0 + 0.1 * torch.randn(batch, generator=g, dtype=torch.float64)
            err = k.double() + 0.1 * torch.randn(batch, generator=g, dtype=torch.float64)
            rl.update(lp, rw(fr, k, attack_error=err), entropy=pol.dist(ctx).entropy())
        return pol.probs(torch.randn(256, 2, generator=g)).mean(0)
    p0, p1 = play(0.0), play(0.8)
    assert int(p0.argmax()) == 0, p0
    assert int(p1.argmax()) == 2 and p1[2] > 0.6, p1


def test_policy_card_names_the_ladder():
    from hybridmask.train.card import policy_card
    pol = StrategyNet(k_values=K, hidden=8, seed=0)
    card = policy_card({"run": "r", "defense": {"name": "adaptive", "subset_by_k": LEVELS}, "config": {}}, pol)
    assert "masking ladder" in card and "all, 90, 60" in card and "each at the level the policy chose" in card
    plain = policy_card({"run": "r", "defense": {"name": "adaptive"}, "config": {}}, StrategyNet(hidden=8, seed=0))
    assert "masking ladder" not in plain and "k=1 masked queries" in plain


def test_a_published_ladder_policy_rebuilds_its_ladder(tmp_path):
    from hybridmask.defenses import load_defense, save_policy
    d = ladder(seed=3, level=2)
    path = tmp_path / "policy.pt"
    save_policy(path, d.policy, masking=d.config)
    again = load_defense(str(path))
    assert again.subset_by_k == tuple(LEVELS) and again.policy.k_values == tuple(K)
    again.greedy = True
    assert kept_channels(again, again.query(faces(3))).tolist() == [60] * 3
