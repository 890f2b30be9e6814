"""Mixture separation of training-time MixUp releases (issue 12, item 4) and the harness's scoring of mixed
releases (rank-1 of the dominant identity, rank-1 of any identity of the mix)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridmask.attacks import create_attack
from hybridmask.attacks.harness import mixed_scores
from hybridmask.defenses import create_defense
from hybridmask.freq import MixRecord


def test_params_are_validated():
    with pytest.raises(ValueError, match="coherence"):
        create_attack("separate", coherence=-1.0)
    with pytest.raises(ValueError, match="whitebox"):
        create_attack("separate", mode="blackbox")
    with pytest.raises(TypeError, match="k"):
        create_attack("separate", k=2.5)
    with pytest.raises(ValueError, match="scale"):
        create_attack("separate", scale="oracle")
    with pytest.raises(ValueError, match="unknown"):
        create_attack("separate", partners=3)
    atk = create_attack("separate")
    assert atk.applicable(create_defense("freq_mixup", k=2, seed=0)) is None
    assert atk.applicable(create_defense("adaptive", seed=0)) is None
    assert "mixes" in atk.applicable(create_defense("ppfrfd", seed=0))             # nothing is mixed
    assert atk.applicable(create_defense("instahide", seed=0)) is not None          # pixels, no BDCT
    assert "order" in atk.applicable(create_defense("freq_mixup", k=2, order="mix_mask", seed=0))
    with pytest.raises(ValueError, match="separate"):
        atk.fit(create_defense("ppfrfd", seed=0), torch.zeros(8, 3, 112, 112))


class _OneHot:
    """A stand-in judge: the embedding of a picture is its constant value's one-hot code."""

    def __call__(self, x):
        return F.one_hot(((x[:, 0, 0, 0] + 1) * 2).round().long().clamp(0, 4), 5).float()


def test_mixed_scoring_counts_dominant_and_any_hits():
    # identities 0..4 are pictures of constant value v/2 - 1; the gallery holds one picture of each
    vals = torch.arange(5).float() / 2 - 1
    pics = vals.view(5, 1, 1, 1).expand(5, 3, 112, 112).clone()
    labels = [f"id{i}" for i in range(5)]
    rec = MixRecord(indices=torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]]),
                    weights=torch.tensor([[0.6, 0.4], [0.45, 0.55], [0.6, 0.4], [0.5, 0.0]]),
                    label_weights=torch.tensor([[0.6, 0.4], [0.45, 0.55], [0.6, 0.4], [1.0, 0.0]]),
                    k=torch.tensor([2, 2, 2, 1]))
    # row 0 looks like 0 (dominant), row 1 like 1 (in the mix, not dominant: 2 is), row 2 like 4 (not
    # in the mix), row 3 like 4 (a zero-weight padding column: not in the mix)
    recon = pics[[0, 1, 4, 4]]
    out = mixed_scores(recon, rec, pics, labels, _OneHot()(pics), labels, _OneHot())
    assert out["per_image"]["dominant"] == [0, 2, 2, 3]
    assert out["per_image"]["dominant_hit"] == [True, False, False, False]
    assert out["per_image"]["any_hit"] == [True, True, False, False]
    assert out["rank1_dominant"] == pytest.approx(0.25) and out["rank1_any"] == pytest.approx(0.5)
    assert out["ssim_dominant"]["mean"] < 1.0


@pytest.fixture(scope="module")
def real(faces_root):
    from hybridmask.data import load_image
    celeba = sorted((faces_root / "celeba_112").glob("*/*.jpg"))[::7][:256]
    lfw = sorted((faces_root / "lfw_112").glob("*/*.jpg"))[::97][:16]
    return torch.stack([load_image(f) for f in celeba]), torch.stack([load_image(f) for f in lfw])


@pytest.mark.realdata
def test_separated_dominant_face_beats_the_zero_filled_view(real):
    from hybridmask.attacks.metrics import ssim
    public, victims = real
    d = create_defense("freq_mixup", k=2, seed=11)
    atk = create_attack("separate", n_images=256, classifier_epochs=4, seed=0, progress=False).fit(d, public)
    obs = atk.observe(d, victims)
    rec = atk.invert(obs)
    assert rec.shape == victims.shape and atk.last_faces[0].shape == (2, 3, 112, 112)
    record = obs["record"]
    dom = record.indices.gather(1, record.weights.argmax(1, keepdim=True)).squeeze(1)
    s = float(ssim(rec, victims[dom]).mean())
    zero_filled = float(ssim(d.as_image(obs["released"]), victims[dom]).mean())
    assert s > zero_filled + 0.1, (s, zero_filled)
