"""The privacy-utility frontier (hybridmask frontier): the Pareto front, the sweep's expansion into benchmark
entries (cartesian and list forms, stable unique run names, one clear error for a bad override), the dry
run, the table / figure writer on a hand-made payload, and a tiny sweep end to end on a few real faces
(trained, attacked, written; a second invocation reuses every run and cached attack)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from hybridmask.benchmark import frontier as F
from hybridmask.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ---- the Pareto front -----------------------------------------------------------------------------------------
def test_pareto_front_excludes_dominated_points_keeps_ties_and_skips_missing():
    pts = [(0.60, 0.10),    # 0: on the front
           (0.70, 0.30),    # 1: on the front
           (0.55, 0.20),    # 2: dominated by 0
           (0.80, 0.90),    # 3: on the front (most useful)
           (0.70, 0.40),    # 4: same x as 1, worse y: dominated
           (0.60, 0.10),    # 5: equal to 0: both on the front
           (None, 0.0),     # 6: no utility: skipped
           (0.99, float("nan")),   # 7: no rank-1: skipped (would otherwise dominate 3)
           (0.50, 0.10)]    # 8: same y as 0, less utility: dominated
    assert F.pareto_front(pts) == [0, 5, 1, 3]          # sorted by x then y (then index)
    assert F.pareto_front([]) == [] and F.pareto_front([(None, None)]) == []
    assert F.pareto_front([(1, 1)]) == [0]
    # other directions: maximise both
    assert F.pareto_front([(1, 1), (2, 2), (3, 0)], minimize_y=False) == [1, 2]
    # exactly one strictly better coordinate is enough to dominate
    assert F.pareto_front([(0.5, 0.2), (0.5, 0.1)]) == [1]
    assert F.pareto_front([(0.5, 0.1), (0.6, 0.1)]) == [1]


# ---- the sweep config -----------------------------------------------------------------------------------------
def test_expand_group_cartesian_then_list_with_shared_overrides():
    g = {"key": "p", "label": "PPFR-FD", "config": "celeba_ppfrfd.yaml", "overrides": {"train.steps": 5},
         "grid": {"defense.args.drop": ["dc", "low6"], "defense.args.shuffle": ["sample", "keys:3"]},
         "variants": [{"defense.args.u": 2}, {"defense.args.drop": "chroma10", "label": "chroma", "key": "p-c"}]}
    vs = F.expand_group(Path("f.yaml"), g)
    assert [v["own"] for v in vs[:4]] == [
        {"defense.args.drop": "dc", "defense.args.shuffle": "sample"},
        {"defense.args.drop": "dc", "defense.args.shuffle": "keys:3"},
        {"defense.args.drop": "low6", "defense.args.shuffle": "sample"},
        {"defense.args.drop": "low6", "defense.args.shuffle": "keys:3"}]
    assert len(vs) == 6 and all(v["overrides"]["train.steps"] == 5 for v in vs)
    assert vs[1]["key"] == "p-drop_dc-shuffle_keys3" and vs[1]["label"] == "PPFR-FD drop=dc, shuffle=keys:3"
    assert vs[4]["key"] == "p-u_2" and vs[4]["label"] == "PPFR-FD u=2"
    assert (vs[5]["key"], vs[5]["label"]) == ("p-c", "chroma")
    assert len({v["key"] for v in vs}) == 6
    with pytest.raises(ValueError, match="appears twice"):
        F.expand_group(Path("f.yaml"), dict(g, variants=[{"defense.args.drop": "dc", "defense.args.shuffle": "sample"}]))
    with pytest.raises(ValueError, match="neither a grid nor variants"):
        F.expand_group(Path("f.yaml"), {"key": "p", "config": "x.yaml"})
    with pytest.raises(ValueError, match=r"\['drop'\] are not dotted"):
        F.expand_group(Path("f.yaml"), {"key": "p", "config": "x.yaml", "variants": [{"drop": "low6"}]})


def test_run_names_are_stable_unique_and_derived_from_the_overrides():
    a = F.variant_run_name("celeba_ppfrfd", "celeba_ppfrfd.yaml", {"defense.args.drop": "low6", "defense.args.u": 2})
    b = F.variant_run_name("celeba_ppfrfd", "celeba_ppfrfd.yaml", {"defense.args.u": 2, "defense.args.drop": "low6"})
    assert a == b and a.startswith("celeba_ppfrfd-drop_low6-u_2-")           # key order does not matter
    names = {F.variant_run_name("celeba_ppfrfd", "celeba_ppfrfd.yaml", ov) for ov in
             ({"defense.args.shuffle": "keys:3"}, {"defense.args.shuffle": "keys3"}, {"defense.args.u": 2},
              {"defense.args.u": "2"}, {"defense.args.drop": [0, 1]}, {"defense.args.drop": "low6"})}
    assert len(names) == 6                                                     # same slug, different hash
    assert F.variant_run_name("celeba_fixed_k2", "celeba_fixed_k2.yaml", {"defense.args.u": 2}) != \
        F.variant_run_name("celeba_ppfrfd", "celeba_ppfrfd.yaml", {"defense.args.u": 2})


def _sweep_file(tmp_path: Path, sweep, defenses="all", bench=None, name="f.yaml", **extra) -> Path:
    groups = [dict(g, config=str(CONFIGS / g["config"])) for g in sweep]
    d = {"benchmark": str(bench or CONFIGS / "benchmark.yaml"), "defenses": defenses, "sweep": groups,
         "outputs": {"tiny": {"markdown": str(tmp_path / "o" / "frontier.md"), "figures_dir": str(tmp_path / "o" / "f")}},
         **extra}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_load_sweep_adds_variants_to_the_benchmark_and_names_a_bad_override(tmp_path):
    p = _sweep_file(tmp_path, [{"key": "p", "label": "PPFR-FD", "config": "celeba_ppfrfd.yaml",
                                "grid": {"defense.args.drop": ["dc", "low6"]}}], defenses=["ppfrfd", "dctdp"])
    sw = F.load_sweep(p, "tiny")
    defs = sw["benchmark"]["defenses"]
    assert [d["key"] for d in defs] == ["ppfrfd", "dctdp", "p-drop_dc", "p-drop_low6"]
    assert sw["library"] == ["ppfrfd", "dctdp"] and set(sw["variants"]) == {"p-drop_dc", "p-drop_low6"}
    low6 = defs[3]
    assert 'defense.args.drop="low6"' in low6["overrides"]
    assert any(o.startswith("run.name=") and "celeba_ppfrfd-drop_low6-" in o for o in low6["overrides"])
    assert (Path(sw["benchmark"]["dir"]) / low6["config"]).resolve() == (CONFIGS / "celeba_ppfrfd.yaml").resolve()
    # the committed frontier config loads for every budget
    for budget in ("tiny", "small", "full"):
        sw = F.load_sweep(CONFIGS / "frontier.yaml", budget)
        assert len(sw["variants"]) >= 5 and sw["outputs"]["markdown"]
    assert F.load_sweep(CONFIGS / "frontier.yaml", "small")["outputs"] == {"markdown": "docs/frontier.md",
                                                                            "figures_dir": "docs/frontier"}

    def bad(group, match, **kw):
        with pytest.raises(ValueError, match=match):
            F.load_sweep(_sweep_file(tmp_path, [group], name="bad.yaml", **kw), "tiny")
    base = {"key": "p", "label": "PPFR-FD", "config": "celeba_ppfrfd.yaml"}
    # a key the defense does not take, a key the schema does not have, a value the defense refuses
    bad(dict(base, grid={"defense.args.drop": ["dc", "low6"], "defense.args.dropp": ["x"]}),
        r"bad override 'defense.args.dropp: x'.*unexpected keyword argument 'dropp'")
    bad(dict(base, variants=[{"trian.steps": 3}]), r"bad override 'trian.steps: 3'.*unknown config key 'trian'")
    bad(dict(base, variants=[{"train.stepz": 3}]), r"bad override 'train.stepz: 3'.*did you mean train.steps")
    bad(dict(base, variants=[{"defense.args.drop": "low99"}]), r"bad override 'defense.args.drop: low99'.*1..64")
    bad(dict(base, variants=[{"run.name": "x"}]), "run.name is the variant's run name")
    bad(dict(base, variants=[{"defense.args.u": 2}], gird={}), r"unknown key\(s\) \['gird'\]")
    bad(dict(base, variants=[{"defense.args.u": 2}]), r"defenses: unknown key\(s\) \['nope'\]", defenses=["nope"])
    with pytest.raises(ValueError, match="appears twice"):                  # a variant key equal to a defense key
        F.load_sweep(_sweep_file(tmp_path, [dict(base, variants=[{"defense.args.u": 2, "key": "ppfrfd"}])],
                                 name="dup.yaml"), "tiny")


def test_a_query_mix_variant_is_checked_with_its_pool_and_runs_only_once_the_pool_exists(tmp_path, capsys):
    import torch
    base = {"key": "p", "label": "PPFR-FD", "config": "celeba_ppfrfd.yaml"}
    pool = tmp_path / "pool.pt"
    variant = {"defense.args.query_k": 2, "defense.args.pool": str(pool), "key": "p-qk2"}
    # query_k needs its pool: alone it is refused, with the reason; the pair is checked together
    with pytest.raises(ValueError, match=r"bad override 'defense.args.query_k: 2'.*needs pool"):
        F.load_sweep(_sweep_file(tmp_path, [dict(base, variants=[{"defense.args.query_k": 2}])], name="b.yaml"),
                     "tiny")
    # the pool file does not exist yet: the sweep loads, other variants run, this one says what is missing
    p = _sweep_file(tmp_path, [dict(base, variants=[variant, {"defense.args.drop": "low15"}])], defenses=["ppfrfd"])
    sw = F.load_sweep(p, "tiny")
    assert set(sw["not_ready"]) == {"p-qk2"} and "not found" in sw["not_ready"]["p-qk2"]
    args = ["frontier", "--config", str(p), "--budget", "tiny", "--dry-run", "--out-dir", str(tmp_path / "o")]
    assert cli_main(args + ["--only", "p-drop_low15"]) == 0
    capsys.readouterr()
    assert cli_main(args + ["--only", "p-qk2"]) == 1
    assert f"variant 'p-qk2': public pool {pool} not found" in capsys.readouterr().err
    # once it exists, the variant is an ordinary one, with the pool's fingerprint in its run
    torch.save(torch.zeros(4, 3, 112, 112, dtype=torch.uint8), pool)
    sw = F.load_sweep(p, "tiny")
    assert sw["not_ready"] == {}
    assert cli_main(args + ["--only", "p-qk2"]) == 0
    assert "1 variant(s)" in capsys.readouterr().out.splitlines()[0]


def test_dry_run_prints_every_variant_and_writes_nothing(tmp_path, capsys):
    p = _sweep_file(tmp_path, [{"key": "p", "label": "PPFR-FD", "config": "celeba_ppfrfd.yaml",
                                "grid": {"defense.args.drop": ["dc", "low6"], "defense.args.shuffle": ["sample", "keys:3"]}},
                               {"key": "k2", "label": "k=2", "config": "celeba_fixed_k2.yaml",
                                "variants": [{"defense.args.u": 2}]}])
    out = tmp_path / "out"
    assert cli_main(["frontier", "--config", str(p), "--budget", "tiny", "--dry-run", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hybridmask frontier - sweep" in text and "10 benchmark defense(s)" in text and "4 variant(s)" in text
    for label in ("PPFR-FD drop=dc, shuffle=keys:3", "PPFR-FD drop=low6, shuffle=sample",
                  "PPFR-FD drop=low6, shuffle=keys:3", "k=2 u=2", "adaptive hybrid masking", "ARL (identity)"):
        assert f"] {label} " in text                                         # a plan line (status, label, folder)
    # the grid's default point trains what the benchmark's PPFR-FD trains: one run, one point
    assert "PPFR-FD drop=dc, shuffle=sample: the same training as PPFR-FD" in text
    assert "] PPFR-FD drop=dc, shuffle=sample " not in text
    assert text.count("[train ]") == 10 + 4 and "estimate" in text and "total" in text
    assert f"writes: {out / 'frontier.md'}, {out / 'frontier' / 'frontier.png'}" in text
    assert "results.md" not in text and not out.exists()


# ---- the writer on a hand-made payload -------------------------------------------------------------------------
def _row(key, label, lfw, cfp, attacks, linkage=None):
    att = {n: {"rank1": r, "identity_similarity": {"mean": s}, "ssim": {"mean": ss}} for n, (r, s, ss) in attacks.items()}
    return {"key": key, "label": label, "config_file": f"configs/{key}.yaml", "run_dir": f"runs/{key}",
            "status": "reuse", "verification": {"lfw": {"accuracy": lfw}, "cfp_fp": {"accuracy": cfp}},
            "attacks": {"attacks": att, "linkage": linkage or {},
                        "baselines": {"chance": {"rank1": 1 / 96}}}}


def test_table_and_figure_from_a_handmade_payload(tmp_path):
    from PIL import Image

    from hybridmask.benchmark.plot import frontier_plot
    lk = {"linkage": {"rank1": 0.5, "tar@far=0.001": 0.25}}
    rows = [_row("unprotected", "unprotected (pixels)", 0.80, 0.63, {"cgan_whitebox": (1.0, 0.7, 0.72)}),
            _row("ppfrfd", "PPFR-FD", 0.64, 0.58, {"cgan_whitebox": (0.0, 0.1, 0.28), "structure": (0.97, 0.7, 0.75)},
                 linkage=lk),
            _row("dctdp", "DCTDP", 0.68, 0.54, {"cgan_whitebox": (0.03, 0.1, 0.17)}),
            _row("p-low6", "PPFR-FD drop=low6", 0.60, 0.59, {"cgan_whitebox": (0.0, 0.1, 0.2), "structure": (0.5, 0.4, 0.5)}),
            _row("p-u2", "PPFR-FD u=2", 0.66, None, {"cgan_whitebox": (0.9, 0.3, 0.4), "structure": (0.9, 0.6, 0.7)}),
            _row("broken", "no attacks", 0.7, 0.6, {})]
    rows[-1]["note"] = "a benchmark note,\n  folded"                     # marked * in the table, printed below it
    sweep = {"variants": {"p-low6": {"group": "p", "group_label": "PPFR-FD", "overrides": {"defense.args.drop": "low6"}},
                          "p-u2": {"group": "p", "group_label": "PPFR-FD", "overrides": {"defense.args.u": 2}}}}
    payload = {"benchmark": {"budget": "tiny", "seed": 0, "command": "hybridmask frontier --budget tiny",
                             "finished": "now", "wall_seconds": 60, "git": {"commit": "abc"}},
               "attack_settings": {"headline": "strongest", "n_victims": 8, "victims": "lfw"},
               "defenses": rows}
    pts = F.frontier_points(payload, sweep)
    by = {p["key"]: p for p in pts}
    assert math.isclose(payload["chance_rank1"], 1 / 96)
    assert by["ppfrfd"]["attack"] == "structure" and by["ppfrfd"]["rank1"] == 0.97       # the strongest query attack
    assert by["ppfrfd"]["linkage_rank1"] == 0.5 and by["ppfrfd"]["linkage_tar"] == 0.25
    assert by["p-low6"]["kind"] == "variant" and by["dctdp"]["kind"] == "defense"
    # LFW front: p-low6 (60, 50) is dominated by DCTDP (68, 3); PPFR-FD (64, 97) by DCTDP; u=2 (66, 90) by DCTDP
    assert {k for k, p in by.items() if p["front_lfw"]} == {"dctdp", "unprotected"}
    assert by["broken"]["front_lfw"] is None and by["broken"]["attack"] is None
    # CFP-FP front: p-low6 has the best CFP-FP (59 %) at rank-1 50 %: on it; u=2 has no CFP-FP
    assert {k for k, p in by.items() if p["front_cfp_fp"]} == {"dctdp", "p-low6", "unprotected"}
    assert by["p-u2"]["front_cfp_fp"] is None
    fig = tmp_path / "f" / F.FIGURE
    assert frontier_plot(pts, fig, payload["benchmark"], payload["chance_rank1"])
    assert Image.open(fig).size[0] >= 1200                                  # two panels
    payload.update(points=pts, plot=str(fig), json=str(tmp_path / "f" / F.JSON_FILE),
                   sweep={"config_file": "configs/frontier.yaml", "benchmark_config": "configs/benchmark.yaml",
                          "aliases": {"PPFR-FD drop=dc": "PPFR-FD"}})
    md = F.frontier_markdown(payload, tmp_path / "frontier.md")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| configuration |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["configuration", "overrides", "LFW %", "CFP-FP %", "strongest query attack", "rank-1 %", "SSIM",
                    "strongest linkage rank-1 / TAR@FAR=1e-3 (%)", "front (LFW)", "front (CFP-FP)"]

    def cells(label):
        return [c.strip() for c in next(line for line in lines if line.startswith(f"| {label} |")).strip("|").split("|")]
    assert cells("PPFR-FD") == ["PPFR-FD", "benchmark defense (`ppfrfd.yaml`)", "64.0", "58.0", "structure", "97.0",
                                "0.750", "50.0 / 25.0 (linkage)", "no", "no"]
    assert cells("PPFR-FD drop=low6") == ["PPFR-FD drop=low6", "`defense.args.drop: low6`", "60.0", "59.0", "structure",
                                          "50.0", "0.500", "-", "no", "**yes**"]
    assert cells("DCTDP")[-2:] == ["**yes**", "**yes**"] and cells("PPFR-FD u=2")[3] == "-"
    assert "![privacy-utility frontier](f/frontier.png)" in md and "[`f/frontier.json`](f/frontier.json)" in md
    assert "chance 1.0 %" in md and "PPFR-FD drop=dc = PPFR-FD" in md and "Not on the plot" in md
    assert "| no attacks * |" in md and "\\* no attacks: a benchmark note, folded" in md
    assert "**Front (LFW against rank-1)**, from most private to most useful: DCTDP (68.0 %, rank-1 3.0 %, " \
           "cgan_whitebox); unprotected (pixels) (80.0 %, rank-1 100.0 %, cgan_whitebox)." in md
    assert not frontier_plot([dict(p, lfw=None, cfp_fp=None) for p in pts], tmp_path / "none.png", payload["benchmark"])


def test_a_query_readable_as_it_is_scores_its_masked_view_not_the_weaker_attack():
    """Unprotected pixels: the query is the face, so its y is the masked view's 100 %, not the 75 % of the best
    reconstruction attack; a masked query whose view re-identifies less keeps its strongest attack."""
    rows = [_row("unprotected", "unprotected (pixels)", 0.99, 0.93, {"cgan_whitebox": (0.75, 0.6, 0.55)}),
            _row("ppfrfd", "PPFR-FD", 0.96, 0.82, {"structure": (0.9, 0.7, 0.65)})]
    rows[0]["attacks"]["masked_view"] = {"rank1": 1.0, "identity_similarity": {"mean": 1.0}, "ssim": {"mean": 1.0}}
    rows[1]["attacks"]["masked_view"] = {"rank1": 0.03, "identity_similarity": {"mean": 0.05}, "ssim": {"mean": 0.01}}
    payload = {"attack_settings": {"headline": "strongest"}, "defenses": rows}
    by = {p["key"]: p for p in F.frontier_points(payload, {"variants": {}})}
    assert by["unprotected"]["attack"] == F.MASKED_VIEW and by["unprotected"]["rank1"] == 1.0
    assert by["unprotected"]["ssim"] == 1.0
    assert by["ppfrfd"]["attack"] == "structure" and by["ppfrfd"]["rank1"] == 0.9
    # a tie keeps the attack (it says more than "the query itself")
    rows[1]["attacks"]["masked_view"]["rank1"] = 0.9
    tie = F.frontier_points({"attack_settings": {"headline": "strongest"}, "defenses": rows[1:]}, {"variants": {}})
    assert tie[0]["attack"] == "structure"
    # a fixed headline attack is what the user asked for: the masked view does not replace it
    fixed = F.frontier_points({"attack_settings": {"headline": "cgan_whitebox"}, "defenses": rows[:1]}, {"variants": {}})
    assert fixed[0]["attack"] == "cgan_whitebox" and fixed[0]["rank1"] == 0.75


# ---- a tiny sweep end to end (real faces) ------------------------------------------------------------------------
def test_tiny_sweep_end_to_end_and_a_second_invocation_reuses_everything(small_faces_root, tmp_path, capsys):
    # a base benchmark with fewer attacks (the pipeline is the benchmark's: tested there with all of them)
    bench = yaml.safe_load((CONFIGS / "benchmark.yaml").read_text())
    for d in bench["defenses"]:
        d["config"] = str(CONFIGS / d["config"])
    keep = ("cgan_whitebox", "structure", "linkage")
    bench["attacks"]["run"] = {k: v for k, v in bench["attacks"]["run"].items() if k in keep}
    for sec in (bench["attacks"], bench["budgets"]["tiny"]["attacks"]):
        sec["params"] = {k: v for k, v in sec["params"].items() if k in ("cgan", "structure", "linkage")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench, sort_keys=False))
    p = _sweep_file(tmp_path, [{"key": "p", "label": "PPFR-FD", "config": "celeba_ppfrfd.yaml",
                                "variants": [{"defense.args.drop": "low5"}, {"defense.args.drop": "dc"}]}],
                    defenses=["ppfrfd"], bench=tmp_path / "bench.yaml")
    root = small_faces_root
    out = tmp_path / "out"
    argv = ["frontier", "--config", str(p), "--budget", "tiny", "--data", str(root), "--out-dir", str(out),
            "--defense-seed", "3", "--override", "run.mask_seed=1", "--quiet", "--threads", "1"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    # PPFR-FD and drop=low5 (177 kept channels: odd, as the structure attack needs); drop=dc is PPFR-FD's run
    assert text.count(": training ") == 2
    md = (out / "frontier.md").read_text()
    payload = json.loads((out / "frontier" / F.JSON_FILE).read_text())
    pts = {p["key"]: p for p in payload["points"]}
    assert set(pts) == {"ppfrfd", "p-drop_low5"}
    assert payload["sweep"]["aliases"] == {"PPFR-FD drop=dc": "PPFR-FD"}
    low5 = pts["p-drop_low5"]
    assert Path(low5["run_dir"]).name.startswith("celeba_ppfrfd-drop_low5-")
    assert json.loads(Path(low5["run_dir"], "results.json").read_text())["config"]["defense"]["args"]["drop"] == "low5"
    for p_ in pts.values():
        assert 0.0 <= p_["lfw"] <= 1.0 and 0.0 <= p_["cfp_fp"] <= 1.0 and 0.0 <= p_["rank1"] <= 1.0
        assert p_["attack"] in ("cgan_whitebox", "structure") and p_["linkage_rank1"] is not None
        assert isinstance(p_["front_lfw"], bool)
        assert f"| {p_['label']} |" in md
    assert any(p_["front_lfw"] for p_ in pts.values())
    assert (out / "frontier" / F.FIGURE).is_file() and "![privacy-utility frontier](frontier/frontier.png)" in md
    assert payload["benchmark"]["command"].startswith("hybridmask frontier --config")
    # a second invocation: every run reused, every attack cached, the same points
    runs = out / "runs"
    before = {q: q.stat().st_mtime_ns for q in runs.glob("*/*") if q.is_file()}
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert ": training " not in text and text.count(": reusing ") == 2 and text.count("attack results cached") == 2
    assert {q: q.stat().st_mtime_ns for q in runs.glob("*/*") if q.is_file()} == before
    again = json.loads((out / "frontier" / F.JSON_FILE).read_text())["points"]
    assert [(q["key"], q["lfw"], q["rank1"]) for q in again] == [(q["key"], q["lfw"], q["rank1"]) for q in payload["points"]]
    # --only one point: the page keeps the other measured point (read, not recomputed), the alias plotted once
    assert cli_main(argv + ["--only", "p-drop_low5"]) == 0
    text = capsys.readouterr().out
    assert "the report keeps 1 measured row(s) of the other defenses" in text and ": training " not in text
    kept = json.loads((out / "frontier" / F.JSON_FILE).read_text())["points"]
    assert sorted(q["key"] for q in kept) == ["p-drop_low5", "ppfrfd"]
    assert {q: q.stat().st_mtime_ns for q in runs.glob("*/*") if q.is_file()} == before


def test_target_assessment_is_computed_from_the_points(tmp_path):
    """The 'what is achieved' paragraph: which points meet the target's halves, linkage, and each adaptive point
    against the fixed configurations at equal or higher accuracy; a bad target is refused by name."""
    lk = {"linkage": {"rank1": 0.5, "tar@far=0.001": 0.2}}
    rows = [_row("unprotected", "unprotected (pixels)", 0.993, 0.93, {"cgan_whitebox": (1.0, 0.7, 0.72)}),
            _row("good", "good masking", 0.985, 0.91, {"demix": (0.05, 0.1, 0.30)}, linkage=lk),
            _row("mid", "mid masking", 0.97, 0.85, {"demix": (0.30, 0.1, 0.31)}),
            _row("adapt", "adaptive", 0.96, 0.80, {"cgan_whitebox": (0.40, 0.1, 0.37)})]
    rows[-1]["defense"] = "adaptive"
    payload = {"attack_settings": {"headline": "strongest"}, "defenses": rows}
    pts = F.frontier_points(payload, {"variants": {}})
    target = {"rank1": 0.10, "ssim": 0.40, "lfw": 0.98, "cfp_fp": 0.90, "linkage": 0.10}
    text = "\n".join(F.target_assessment(pts, target))
    assert "query rank-1 <= 10 %; SSIM <= 0.4; LFW >= 98 %; CFP-FP >= 90 %; linkage rank-1 <= 10 %" in text
    assert "**Met** (privacy and utility) by: good masking (LFW 98.5 %" in text
    assert "With linkage too: **none**" in text
    assert "Most private configuration that keeps the utility half: good masking" in text
    assert "Adaptive policy **below the front of the fixed configurations**: adaptive (LFW 96.0 %" in text
    assert "dominated by good masking" in text and "and 1 other(s)" in text   # the most private dominator; mid too
    # nothing meets it: said plainly
    text = "\n".join(F.target_assessment([p for p in pts if p["key"] != "good"], target))
    assert "**Not met by any of the 3 measured configurations.**" in text
    assert "Most useful configuration that keeps the privacy half: none keeps it" in text
    for bad in ({"rank1": 10}, {"accuracy": 0.9}, {"lfw": "high"}, []):
        p = _sweep_file(tmp_path, [{"key": "p", "label": "P", "config": "celeba_ppfrfd.yaml",
                                    "variants": [{"defense.args.u": 2}]}], name="t.yaml", target=bad)
        with pytest.raises(ValueError, match="target"):
            F.load_sweep(p, "tiny")
    from hybridmask.benchmark.plot import frontier_plot
    assert frontier_plot(pts, tmp_path / "t.png", {"budget": "tiny", "seed": 0}, None, target)   # the target region
