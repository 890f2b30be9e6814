"""scripts/frontier_screen.py: the table (a candidate screened by linkage alone still gets its row) and the
public pool of the frontier's query-mix variant (written atomically, byte for byte the same from the same
faces, so the SHA-256 a trained run recorded can be reproduced)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _screen():
    spec = importlib.util.spec_from_file_location("_frontier_screen", REPO / "scripts" / "frontier_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _payload():
    settings = {"u": 8, "n_victims": 32, "n_distractors": 64, "n_public": 400, "pool_size": 256,
                "structure_refine_epochs": 2, "cgan_epochs": 2, "seed": 0,
                "attacks": [["cgan", "cgan", {}], ["linkage_student", "linkage", {"front": "none"}]]}
    score = {"rank1": 0.25, "rank5": 0.5, "ssim": 0.3, "identity_similarity": 0.28}
    return {"settings": settings, "candidates": [
        {"label": "a", "name": "ppfrfd", "args": {"drop": "low15"}, "seconds": 10.0,
         "attacks": {"cgan": score, "demix": dict(score, rank1=0.5)}, "linkage": {}},
        {"label": "b", "name": "ppfrfd", "args": {"drop": "low15", "subset": 87}, "seconds": 20.0,
         "attacks": {}, "linkage": {"linkage_student": {"rank1": 0.71875, "tar@far=0.001": 0.5}}}]}


def test_every_candidate_has_a_row_and_the_strongest_attack_is_named():
    text = _screen().render(_payload())
    rows = [line for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 2
    assert "| demix | 50.0 % |" in rows[0] and "cgan 25.0 % / 0.300; demix 50.0 % / 0.300" in rows[0]
    assert "no reconstruction attack run" in rows[1] and "linkage_student 71.9 / 50.0 %" in rows[1]
    assert "Wall time per candidate: a 10 s, b 20 s." in text
    assert "The strongest attack per candidate" not in _screen().render(
        dict(_payload(), candidates=_payload()["candidates"][1:]), "figs")   # no grid without an attack


def test_pool_only_writes_the_same_bytes_twice(tmp_path, faces_root):
    from hybridmask.defenses.io import pool_fingerprint, read_pool
    mod = _screen()
    shas = []
    for name in ("one", "two"):
        pool = tmp_path / name / "pool.pt"
        assert mod.main(["--pool-only", "--data", str(faces_root), "--n-public", "12", "--pool-size", "5",
                         "--n-victims", "4", "--n-distractors", "4", "--pool-file", str(pool), "--quiet"]) == 0
        assert sorted(p.name for p in pool.parent.iterdir()) == ["pool.pt"]       # nothing half-written left
        faces, fp = read_pool(pool)
        assert faces.shape == (5, 3, 112, 112) and fp == pool_fingerprint(pool)
        shas.append(fp)
    assert shas[0] == shas[1]
    assert torch.equal(read_pool(tmp_path / "one" / "pool.pt")[0], read_pool(tmp_path / "two" / "pool.pt")[0])


def test_candidates_split_on_commas_outside_lists():
    parse = _screen().parse_candidates
    got = parse("low15=ppfrfd:drop=low15,ladder=adaptive:drop=low15;subset_by_k=[null,90,60];u=8")
    assert got == [("low15", "ppfrfd", {"drop": "low15"}),
                   ("ladder", "adaptive", {"drop": "low15", "subset_by_k": [None, 90, 60], "u": 8})]


def test_perface_attackability_reads_per_victim_scores(tmp_path):
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("_perface", REPO / "scripts" / "perface_attackability.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = tmp_path / "low15-abc"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"attacks": {"demix": {"per_image": {
        "rank": [1, 3, 1, 2], "identity_similarity": [0.9, 0.2, 0.8, 0.3]}}}}))
    hit, sim = mod.per_victim(str(tmp_path), "low15", "demix")
    assert hit.tolist() == [True, False, True, False] and sim.tolist() == [0.9, 0.2, 0.8, 0.3]
    assert mod.per_victim(str(tmp_path), "low15", "cgan") is None and mod.per_victim(str(tmp_path), "x", "demix") is None
    assert abs(mod.corr(sim, sim) - 1.0) < 1e-12 and mod.corr(sim, sim * 0 + 1) != mod.corr(sim, sim * 0 + 1)   # nan
