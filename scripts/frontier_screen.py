#!/usr/bin/env python
"""Privacy screening of candidate query maskings (issue 14): how much identity the strongest query attacks of
the harness recover from each masking *before* any recognizer is trained for it.

The query attacks (``structure``, ``gram``, ``separate`` for query-time mixes, ``cgan``) read only the release and the public algorithm, so their
score does not depend on the server's recognizer: a masking that the strongest of them already re-identifies
cannot be made private by training, and only the survivors are worth a recognizer (a frontier point costs
~1 CPU-hour at the student budget). Every candidate is attacked by each of those attacks that declares itself
applicable (``Attack.applicable``), with the same victims (32 LFW identities, one query each; gallery: their
other photos + 64 distractor identities), the same attacker-public CelebA faces and the independent SFace judge
(no attack's loss uses it). The strongest attack is the one with the highest SFace rank-1 (ties: identity
similarity). A query-time MixUp candidate (``query_k``) draws its partners from a pool of the attacker's own
public faces (the attacker may own the pool).

    OMP_NUM_THREADS=1 python scripts/frontier_screen.py --data ../shared/data/faces --out docs/frontier_screen
    python scripts/frontier_screen.py --render-only docs/frontier_screen.json

Writes ``<out>.json`` (after every candidate; a rerun skips candidates already there with the same settings),
``<out>.md``, the full grids of every attack under ``--grids`` and, for the strongest attack of each candidate, a
small ``<out>/<candidate>_<attack>.png`` (original | masked view | reconstruction).
``--candidates`` takes ``label=name:key=value;key=value`` items separated by ``,`` (values are YAML; a list keeps its
commas: ``ladder=adaptive:policy_path=P;drop=low15;subset_by_k=[null,90,60]``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CANDIDATES = ",".join([
    "default=ppfrfd:",
    "low15=ppfrfd:drop=low15",
    "low15+subset87=ppfrfd:drop=low15;subset=87",
    "ortho=ppfrfd:mix=orthogonal",
    "ortho-key+subset95=ppfrfd:mix=orthogonal;shuffle=key;subset=95",
    "query_k2=ppfrfd:query_k=2",
    "query_k3+low15=ppfrfd:query_k=3;drop=low15",
])
#: (label, registered attack, its own parameters): separate reads a query-time mix (query_k >= 2) as a mixture;
#: structure_eigenface completes the dropped channels from the attacker's eigenfaces before the refinement
ATTACKS = (("structure", "structure", {}), ("structure_eigenface", "structure", {"fill": "eigenface"}),
           ("gram", "gram", {}), ("separate", "separate", {}), ("cgan", "cgan", {}), ("demix", "demix", {}),
           ("linkage", "linkage", {"front": "auto"}), ("linkage_student", "linkage", {"front": "none"}))


ATTACK_TEXT = {
    "structure": "`structure` ({refine} refinement epochs)",
    "structure_eigenface": "`structure_eigenface` (the same, its dropped channels completed from the attacker's "
                           "eigenfaces before the refinement)",
    "gram": "`gram` (Procrustes key estimate, pooled over 256 client queries where the masking has a client key)",
    "separate": "`separate` on query-time mixes (the dominant face)",
    "cgan": "white-box `cgan` (48x48, {cgan} epochs)",
    "demix": "`demix` (T queries of the same face under fresh secrets, decoded by that cgan's generator)",
    "linkage": "`linkage` (its own column: SFace matching of the structure attack's reconstructions to the "
               "victims' clean photos)",
    "linkage_student": "`linkage_student` (its own column: a student of SFace distilled on the attacker's own "
                       "releases reads the raw query, 150 steps of 32 faces)",
}


def parse_candidates(spec: str) -> List[Tuple[str, str, Dict[str, Any]]]:
    import yaml
    out = []
    # candidates are separated by commas outside brackets (a value may be a YAML list: subset_by_k=[null,90,60])
    for item in filter(None, (s.strip() for s in re.split(r",(?![^\[]*\])", spec))):
        label, eq, rest = item.partition("=")
        if not eq or not label:
            raise ValueError(f"a candidate is label=name:key=value;..., got {item!r}")
        name, _, args = rest.partition(":")
        kw = {}
        for kv in filter(None, args.split(";")):
            k, eq, v = kv.partition("=")
            if not eq:
                raise ValueError(f"candidate {label!r}: {kv!r} is not key=value")
            kw[k.strip()] = yaml.safe_load(v)
        out.append((label, name.strip(), kw))
    if not out:
        raise ValueError("--candidates is empty")
    if len({c[0] for c in out}) != len(out):
        raise ValueError("candidate labels must be unique")
    return out


def small_figure(src: Path, dst: Path, n: int = 6) -> None:
    """The first ``n`` columns of a harness grid (original | masked view | reconstruction), at half size:
    small enough for the repository (a full PNG grid is ~0.5 MB)."""
    from PIL import Image
    img = Image.open(src).convert("RGB")
    w = min(img.width, n * (img.width // 8))
    img = img.crop((0, 0, w, img.height)).resize((w // 2, img.height // 2), Image.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, optimize=True)


def summary(scores: Dict[str, Any]) -> Dict[str, float]:
    """Rank-1 / rank-5 and the mean SSIM / identity similarity of one :func:`image_scores` result."""
    return {"rank1": scores["rank1"], "rank5": scores["rank5"], "ssim": scores["ssim"]["mean"],
            "identity_similarity": scores["identity_similarity"]["mean"]}


def strongest(attacks: Dict[str, Dict[str, Any]]) -> str:
    return max(attacks, key=lambda n: (attacks[n]["rank1"], attacks[n]["identity_similarity"]))


def render(payload: Dict[str, Any], fig_dir: str = "") -> str:
    s = payload["settings"]
    lines = [
        "# Privacy screening of candidate query maskings (issue 14)",
        "",
        f"*Generated by `scripts/frontier_screen.py` (seed {s['seed']}, u={s['u']}).* Each candidate masking is "
        f"attacked before any recognizer is trained for it, by every applicable attack of this list: "
        + "; ".join(ATTACK_TEXT.get(a[0], a[0]) for a in s.get("attacks", [])).replace(
            "{refine}", str(s["structure_refine_epochs"])).replace("{cgan}", str(s["cgan_epochs"])) + ". "
        f"{s['n_victims']} LFW victims, one query each; gallery of their other photos and {s['n_distractors']} "
        f"distractor identities; {s['n_public']} attacker-public CelebA faces; judge SFace (no attack's loss "
        f"uses it). A query-time MixUp candidate draws its partners from a pool of {s['pool_size']} of the "
        f"attacker's own public faces. Rank-1: the reconstruction's SFace nearest gallery identity is the "
        f"victim's (chance {100.0 / (s['n_victims'] + s['n_distractors']):.1f} %).",
        "",
        "| candidate | masking | strongest attack | rank-1 | SSIM | identity sim. | every attack (rank-1 / SSIM) | "
        "linkage rank-1 / TAR@FAR=1e-3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in payload["candidates"]:
        att = c["attacks"]
        every = "; ".join(f"{n} {100 * v['rank1']:.1f} % / {v['ssim']:.3f}" for n, v in att.items())
        declined = "; ".join(f"{n}: declined ({why})" for n, why in c.get("declined", {}).items())
        masking = c["name"] + ("" if not c["args"] else " " + ", ".join(f"{k}={v}" for k, v in c["args"].items()))
        links = "; ".join(f"{n} {100 * v['rank1']:.1f} / {100 * (v['tar@far=0.001'] or 0):.1f} %"
                          for n, v in (c.get("linkage") or {}).items()) or "-"
        if att:
            top = strongest(att)
            a = att[top]
            head = f"{top} | {100 * a['rank1']:.1f} % | {a['ssim']:.3f} | {a['identity_similarity']:.3f}"
        else:                          # only linkage was run: no reconstruction to score
            head = "- (no reconstruction attack run) | - | - | -"
        lines.append(f"| {c['label']} | `{masking}` | {head} | {every or '-'}{'; ' + declined if declined else ''} "
                     f"| {links} |")
    if fig_dir and any(c["attacks"] for c in payload["candidates"]):
        from hybridmask.attacks.harness import slug
        lines += ["", "The strongest attack per candidate (original | masked view | reconstruction, first 6 victims):", ""]
        for c in payload["candidates"]:
            if c["attacks"]:
                top = strongest(c["attacks"])
                lines.append(f"![{c['label']}: {top}]({fig_dir}/{slug(c['label'])}_{slug(top)}.png)")
    lines += ["", "Wall time per candidate: " + ", ".join(f"{c['label']} {c['seconds']:.0f} s"
                                                        for c in payload["candidates"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", str(REPO.parent / "shared" / "data" / "faces")))
    p.add_argument("--out", default="docs/frontier_screen")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES)
    p.add_argument("--attacks", default=",".join(a for a, _, _ in ATTACKS),
                   help=f"comma-separated labels of the attacks to run (of {', '.join(a for a, _, _ in ATTACKS)})")
    p.add_argument("--u", type=int, default=1, help="the grid factor of every candidate (1: the 14x14 grid)")
    p.add_argument("--n-victims", type=int, default=32)
    p.add_argument("--n-distractors", type=int, default=64)
    p.add_argument("--n-public", type=int, default=1000)
    p.add_argument("--pool-size", type=int, default=256)
    p.add_argument("--grids", default="outputs/frontier_screen/grids",
                   help="where the harness writes every attack's full grid (the docs get the strongest, small)")
    p.add_argument("--pool-file", default="outputs/frontier_screen/pool.pt",
                   help="where the query-time MixUp pool (the first --pool-size public faces) is written")
    p.add_argument("--pool-only", action="store_true",
                   help="write the pool file and stop (the public pool of configs/frontier.yaml's query-mix variant: "
                        "--n-public 800 --pool-size 256)")
    p.add_argument("--structure-images", type=int, default=800)
    p.add_argument("--structure-refine-epochs", type=int, default=2)
    p.add_argument("--linkage-steps", type=int, default=None,
                   help="student steps of the linkage attacks (default: the attack's own, 150 for a release)")
    p.add_argument("--demix-T", type=int, default=8,
                   help="queries of each victim the multi-query demix attack sees (fresh secrets each)")
    p.add_argument("--gram-epochs", type=int, default=4)
    p.add_argument("--cgan-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defense-seed", type=int, default=12345, help="the victims' masking secrets (reproducible)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render-only", metavar="JSON")
    args = p.parse_args(argv)
    if args.render_only:
        from hybridmask.attacks.harness import write_markdown
        payload = json.loads(Path(args.render_only).read_text())
        out_md = Path(args.render_only).with_suffix(".md")
        write_markdown(out_md, render(payload, out_md.stem))
        print(f"wrote {out_md}")
        return 0

    from hybridmask.attacks import ATTACKS as REGISTRY, create_attack
    from hybridmask.attacks.data import build_attack_data
    from hybridmask.attacks.harness import (default_embedder, evaluate_defense, evaluate_linkage, slug, write_json,
                                            write_markdown)
    from hybridmask.defenses import create_defense

    torch.set_num_threads(args.threads)
    candidates = parse_candidates(args.candidates)
    out = Path(args.out)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    settings = {k: getattr(args, k) for k in ("u", "n_victims", "n_distractors", "n_public", "pool_size",
                                               "structure_images", "structure_refine_epochs", "gram_epochs",
                                               "cgan_epochs", "seed", "defense_seed")}
    if args.demix_T != 8:
        settings["demix_T"] = args.demix_T
    if args.linkage_steps is not None:      # recorded only when set, so earlier results stay valid
        settings["linkage_steps"] = args.linkage_steps
    chosen = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = sorted(set(chosen) - {a for a, _, _ in ATTACKS})
    if unknown or not chosen:
        raise SystemExit(f"--attacks: unknown {unknown}" if unknown else "--attacks is empty")
    attack_list = [t for t in ATTACKS if t[0] in chosen]
    settings["attacks"] = [[a, reg, own] for a, reg, own in attack_list]
    # a rerun keeps what was measured with the same settings and runs only the attacks a candidate lacks
    done: Dict[str, Dict[str, Any]] = {}
    known_attacks: List[List[Any]] = []
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        same = {k: v for k, v in old.get("settings", {}).items() if k != "attacks"} == \
            {k: v for k, v in settings.items() if k != "attacks"}
        if same:
            done = {c["label"]: c for c in old.get("candidates", [])}
            known_attacks = [t for t in old["settings"].get("attacks", []) if list(t) not in settings["attacks"]]
    settings["attacks"] = known_attacks + settings["attacks"]
    data = build_attack_data(args.data, "lfw", n_victims=args.n_victims, n_distractors=args.n_distractors,
                             n_public=args.n_public, seed=args.seed, progress=not args.quiet)
    pool = Path(args.pool_file)       # a file, so that every attack's own instance of the defense reads the same pool
    pool.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=pool.parent) as tmp:   # never a half-written pool; the same file name
        part = Path(tmp) / pool.name   # inside (torch names the archive after it), so the same faces give the same
        torch.save(data.public[:args.pool_size].clone(), part)   # bytes, hence the same SHA-256 the runs record
        part.replace(pool)
    if args.pool_only:
        from hybridmask.defenses.io import pool_fingerprint
        print(f"wrote {pool}: {min(args.pool_size, len(data.public))} public faces, SHA-256 {pool_fingerprint(pool)}")
        return 0
    embedder = default_embedder()        # the judge, loaded once (and the linkage attacks' public teacher)
    params = {"structure": {"n_images": args.structure_images, "refine_epochs": args.structure_refine_epochs},
              "gram": {"epochs": args.gram_epochs},
              "separate": {"n_images": args.structure_images, "refine_epochs": 0},
              "linkage": {"n_images": args.structure_images, "steps": args.linkage_steps},
              "demix": {"T": args.demix_T},
              "cgan": {"epochs": args.cgan_epochs, "n_images": args.n_public, "width": 16, "disc_width": 16,
                       "size": 48}}
    results = []
    others = [c for lab, c in done.items() if lab not in {c[0] for c in candidates}]   # kept, not rerun
    for label, name, kw in candidates:
        kw_shown = dict(kw)
        key = {"label": label, "name": name, "args": kw_shown}
        prev = done.get(label)
        if prev is not None and (prev["name"] != name or prev["args"] != kw_shown):
            prev = None
        have = set() if prev is None else set(prev["attacks"]) | set(prev.get("linkage") or {}) | set(prev["declined"])
        todo = [t for t in attack_list if t[0] not in have]
        names = {t[0] for t in todo}
        if "demix" in names:
            names.add("cgan")                  # demix decodes with the cgan fitted before it in the same run
        if not todo:
            results.append(prev)
            continue
        t0 = time.time()
        dkw = {"u": args.u, **kw, "seed": args.defense_seed}
        if int(kw.get("query_k", 1)) > 1:
            dkw["pool"] = str(pool)
        defense = create_defense(name, **dkw)
        attacks, declined = {}, {}
        for i, (a, reg, own) in enumerate(ATTACKS):        # the registry order: cgan before demix
            if a not in names:
                continue
            why = REGISTRY.get(reg).applicable(defense)
            if why:
                declined[a] = why
                continue
            extra = {}
            if reg == "demix" and defense.structure().k is None:   # a policy chooses k per face: demix assumes the
                ks = defense.structure().k_values                   # mean of its k values (the benchmark: the training mean)
                extra = {"k": max(1, round(sum(ks) / len(ks)))}
            attacks[a] = create_attack(reg, seed=args.seed + 1000 * (i + 1), progress=not args.quiet,
                                       **{**params[reg], **own, **extra})
        print(f"[{label}] attacks: {', '.join(attacks) or 'none'}"
              + (f"; declined: {', '.join(declined)}" if declined else ""), flush=True)
        linkers = {a: attacks.pop(a) for a in list(attacks) if attacks[a].kind == "linkage"}
        res = evaluate_defense(defense, attacks, data, embedder=embedder, grid_dir=Path(args.grids), label=label,
                               progress=not args.quiet) if attacks else {"attacks": {}}
        links = {}
        for a, atk in linkers.items():
            lk = evaluate_linkage(defense, atk, data, embedder=embedder)["linkage"]
            links[a] = {"rank1": lk["rank1"], "tar@far=0.001": lk.get("tar@far=0.001")}
        entry = {**key, "declined": declined, "seconds": round(time.time() - t0, 1),
                 "masked_view": summary(res["masked_view"]) if "masked_view" in res else None,
                 "attacks": {n: summary(r) for n, r in res["attacks"].items()}, "linkage": links}
        if prev is not None:                  # merge with what an earlier run measured
            entry = {**entry, "seconds": round(prev["seconds"] + entry["seconds"], 1),
                     "masked_view": entry["masked_view"] or prev.get("masked_view"),
                     "declined": {**prev["declined"], **declined}, "attacks": {**prev["attacks"], **entry["attacks"]},
                     "linkage": {**(prev.get("linkage") or {}), **links}}
        results.append(entry)
        top = strongest(entry["attacks"]) if entry["attacks"] else None
        if top is not None and top in (res.get("grids") or {}):   # the strongest attack's grid, small, into the docs
            small_figure(Path(res["grids"][top]), out / f"{slug(label)}_{slug(top)}.png")
        payload = {"settings": settings, "candidates": results + others}
        write_json(json_path, payload)          # after every candidate: an interrupted screen keeps its results
        write_markdown(md_path, render(payload, out.name))
        if top is not None:
            print(f"[{label}] strongest {top}: rank-1 {100 * entry['attacks'][top]['rank1']:.1f} %, "
                  f"SSIM {entry['attacks'][top]['ssim']:.3f} ({entry['seconds']:.0f} s)", flush=True)
    if not results:                             # nothing screened (the loop wrote the rest already)
        payload = {"settings": settings, "candidates": others}
        write_json(json_path, payload)
        write_markdown(md_path, render(payload, out.name))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
