#!/usr/bin/env python
"""The secrets trade-off (issue 13 item 4): shuffle mode x copies, on both axes, in one run.

Every row trains PPFR-FD's SFace student (the ``initialised`` start of ``accuracy_per_cpu_minute.py``:
SFace's weights, the release entering where SFace's maps have the grid's size, cosine loss to SFace's
embeddings of the clean faces) with one secret setting, then attacks that run's own defense:

* ``defense.args.shuffle``: ``sample`` (a fresh permutation per face: PPFR-FD's own), ``keys:R`` (one of R
  client keys per face), ``key`` (one client key);
* ``data.copies``: r independent maskings of each training face per step (PartialFace's ablation: more
  permutations cost accuracy, more copies win it back); CPU-minutes count every copy.

Utility: LFW on ``--eval-pairs`` evenly spaced pairs at the end, against the training CPU-minutes.
Privacy: the structure attack (``hybridmask attack --defense <run> --key <run>/client_key.pt``: the
victims are masked with the model's own secrets; a client key is assigned once from ``client_queries``
of the client's other queries, keys:R per query) with ``--attack-public`` public faces and no refinement
(the u=8 planes hold 112x112 maps: 300 public faces take > 16 GB), rank-1 of SFace on the reconstructions.

    python scripts/secrets_tradeoff.py --u 4 --modes sample,keys:4,key --copies 1,2 --jobs 2 --threads 1

Writes ``<out>.json`` and ``<out>.md``; ``--reuse`` keeps finished rows (same overrides); ``--render-only``
redraws. The students share weights with the judge (SFace): the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_per_cpu_minute import INIT_STEM_AT, curve, row_overrides  # noqa: E402


def row_name(mode: str, copies: int) -> str:
    return f"{mode.replace(':', '')}_r{copies}"


def train_overrides(args, mode: str, copies: int) -> list:
    return row_overrides(row_name(mode, copies), args.u, "initialised", args.steps, args,
                         [f"defense.args.shuffle={mode}", f"data.copies={copies}"])


def attack_command(args, run_dir: Path) -> list:
    cmd = [sys.executable, "-m", "hybridmask", "attack", "--defense", str(run_dir), "--attacks", "structure",
           "--attack-arg", f"structure.n_images={args.attack_public}", "--attack-arg", "structure.refine_epochs=0",
           "--data", args.data, "--n-victims", str(args.victims), "--n-distractors", "64",
           "--n-public", str(args.attack_public), "--out", str(run_dir / "attack"), "--threads", str(args.threads),
           "--seed", "0", "--quiet"]
    if (run_dir / "client_key.pt").is_file():
        cmd += ["--key", str(run_dir / "client_key.pt")]
    return cmd


def run_row(args, mode: str, copies: int) -> dict:
    name = row_name(mode, copies)
    run_dir = REPO / args.runs_dir / name
    overrides = train_overrides(args, mode, copies)
    same = [o for o in overrides if not o.startswith("run.threads=")]
    row = {"mode": mode, "copies": copies, "overrides": overrides, "threads": args.threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    marker = run_dir / "row.json"
    reused = (args.reuse and marker.is_file() and (run_dir / "attack" / "results.json").is_file()
              and json.loads(marker.read_text()).get("overrides_without_threads") == same)
    if not reused:
        for what, cmd in (("train", [sys.executable, "-m", "hybridmask", "train", "--config", args.config] + overrides),
                          ("attack", None)):
            cmd = cmd or attack_command(args, run_dir)
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            row[f"{what}_wall_seconds"] = time.time() - t0
            if proc.returncode != 0:
                row["error"] = f"{what}: " + ((proc.stderr.strip().splitlines() or ["failed"])[-1][:300])
                print(f"{name}: FAILED {row['error']}", flush=True)
                return row
        marker.write_text(json.dumps({"overrides_without_threads": same, "threads": args.threads}, indent=2))
    else:
        row["threads"] = json.loads(marker.read_text()).get("threads", args.threads)
    res = json.loads((run_dir / "results.json").read_text())
    pts = curve(res, args.batch_size, row["threads"])
    att = json.loads((run_dir / "attack" / "results.json").read_text())["attacks"]["structure"]
    row.update(lfw=pts[-1][1] if pts else None, cpu_minutes=pts[-1][0] if pts else None,
               rank1=att["rank1"], ssim=att["ssim"]["mean"], identity_similarity=att["identity_similarity"]["mean"],
               chance=att["chance"]["rank1"], reused=reused)
    print(f"{name}: LFW {100 * (row['lfw'] or 0):.2f} % at {row['cpu_minutes'] or 0:.1f} CPU-min; structure rank-1 "
          f"{100 * row['rank1']:.1f} %, SSIM {row['ssim']:.3f}", flush=True)
    return row


def render(out: Path) -> None:
    doc = json.loads(out.with_suffix(".json").read_text())
    a = doc["args"]
    lines = ["# Secrets the recognizer can learn through: shuffle mode x copies, utility and privacy", "",
             f"PPFR-FD at u={a['u']} ({14 * a['u']}x{14 * a['u']} grid); every row: SFace student (initialised, "
             f"release entering at `{INIT_STEM_AT[a['u']] or 'conv_1_conv2d'}`), {a['steps']} steps of "
             f"{a['batch_size']} CelebA faces (x copies), LFW on {a['eval_pairs']} evenly spaced pairs; privacy: "
             f"the structure attack against the run's own defense and secrets ({a['victims']} unseen LFW victims, "
             f"{a['attack_public']} attacker-public CelebA faces, no refinement, SFace rank-1 over 96 gallery "
             f"identities). Written by `scripts/secrets_tradeoff.py`. The students are initialised from SFace, "
             f"which is also the judge.", "",
             "| shuffle | copies | LFW | training CPU-min | structure rank-1 | SSIM | identity sim. |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r.get("error"):
            lines.append(f"| {r['mode']} | {r['copies']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['copies']} | {100 * r['lfw']:.2f} % | {r['cpu_minutes']:.1f} | "
                     f"{100 * r['rank1']:.1f} % | {r['ssim']:.3f} | {r['identity_similarity']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/celeba_ppfrfd.yaml")
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", "../shared/data/faces"))
    p.add_argument("--u", type=int, default=4, choices=sorted(INIT_STEM_AT))
    p.add_argument("--modes", default="sample,keys:4,key")
    p.add_argument("--copies", default="1,2", help="copies per face; rows beyond 1 only for --copies-modes")
    p.add_argument("--copies-modes", default="sample", help="the shuffle modes that also get the extra copies")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-pairs", type=int, default=1200)
    p.add_argument("--victims", type=int, default=32)
    p.add_argument("--attack-public", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs-dir", default="outputs/secrets_tradeoff")
    p.add_argument("--out", default="docs/secrets_tradeoff")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        render(out)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    copies = [int(c) for c in args.copies.split(",") if c.strip()]
    extra = {m.strip() for m in args.copies_modes.split(",")}
    plan = [(m, c) for m in modes for c in copies if c == 1 or m in extra]
    rows = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_row, args, m, c): (m, c) for m, c in plan}
        for fut in as_completed(futures):
            rows[futures[fut]] = fut.result()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(
                {"rows": [rows[k] for k in plan if k in rows], "args": vars(args)}, indent=2, default=str))
    render(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
