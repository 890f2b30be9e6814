#!/usr/bin/env python
"""Accuracy per CPU-minute behind a mask (issue 13 item 3): scratch vs distilled vs initialised, per grid.

Every row trains the same defense (default: PPFR-FD as ``configs/celeba_ppfrfd.yaml`` has it, on CelebA)
with ``hybridmask train`` for the same number of steps, measuring LFW on ``--eval-pairs`` evenly spaced
pairs every ``--eval-every`` steps; the x axis is the training time the run itself measured (its logged
windows: masking + forward + backward + step, evaluation excluded) times the torch threads, in CPU-minutes.
One run of this script measures every row on the same machine, one row after another.

Starts (each overridable with ``--set START:KEY=VALUE``):

* ``scratch``: the config's own recognizer (MobileFaceNet, frequency stem) from fresh weights, its margin loss;
* ``distilled``: the same recognizer, plus the SFace teacher's cosine loss (``teacher.name=sface``);
* ``initialised``: the ``sface`` backbone (SFace's weights, first conv swapped for the release's stem),
  cosine loss to SFace's embeddings only (FaceLinkGen's recipe), AdamW at a fine-tuning learning rate;
* ``initialised-1x1``: the same with a 1x1 stem (``stem_kernel: 1``: at u=8 the 3x3 stem over 189 channels
  at 112x112 costs more than the rest of SFace).

Grids: ``--grids 1,2,4,8`` (the BDCT upsampling u: 14x14, 28x28, 56x56, 112x112 grids). Initialised rows enter
SFace where its own maps have the grid's size (``INIT_STEM_AT``: u=8 replaces the first conv, u=1 enters at
``conv_7_conv2d``, 14x14), so a small grid also skips SFace's high-resolution layers.

``--jobs 2 --threads 1`` trains two rows side by side (each its own CPU core: CPU-minutes stay comparable);
``--reuse`` keeps a row whose run folder holds a finished run with the same overrides (``row.json``), and the
previous table's rows that this invocation does not plan (``--grids 8 --starts initialised-1x1 --reuse`` adds
one row to the table).

    python scripts/accuracy_per_cpu_minute.py --grids 1,8 --steps 200 --batch-size 32 --eval-every 50

Writes ``<out>.json``, ``<out>.md`` (table: best LFW, CPU-minutes, accuracy at each evaluation) and
``<out>.png`` (accuracy vs CPU-minutes); prints one line per evaluation. ``--render-only`` redraws.
Models initialised from or distilled from SFace share weights with the privacy judge: the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTS = {
    "scratch": [],
    "distilled": ["teacher.name=sface", "teacher.weight=1.0", "teacher.margin=true"],
    "initialised": ["model.name=sface", "model.embedding_size=128", "model.args={}", "teacher.name=sface",
                    "teacher.weight=1.0", "teacher.margin=false", "optim.name=adamw", "optim.lr=0.0005",
                    "optim.weight_decay=0.0001", "optim.warmup_steps=10"],
}
# where the release enters SFace when initialised: the conv whose input maps have the grid's size (u=8: the
# first conv, 112x112; u=4: 56x56; u=2: 28x28; u=1: 14x14), so a smaller grid also skips SFace's costliest layers
INIT_STEM_AT = {1: "conv_7_conv2d", 2: "conv_5_conv2d", 4: "conv_3_conv2d", 8: None}
STARTS["initialised-1x1"] = STARTS["initialised"]     # the same with a 1x1 stem (STEM_KERNEL)
STEM_KERNEL = {"initialised-1x1": 1}
JUDGE_NOTE = {"distilled": "distilled from SFace (the privacy judge)",
              "initialised": "initialised from SFace (the privacy judge)",
              "initialised-1x1": "initialised from SFace (the privacy judge); 1x1 stem"}


def row_overrides(name: str, u: int, start: str, eval_every: int, args, extra=()) -> list:
    """The ``hybridmask train`` overrides of one measured row: run ``name`` under ``args.runs_dir``, grid ``u``,
    ``start`` (its recipe and, when initialised, where the release enters SFace), ``args.steps`` x
    ``args.batch_size`` faces, LFW on ``args.eval_pairs`` pairs every ``eval_every`` steps, then ``extra``."""
    model_args = {}
    if start.startswith("initialised") and INIT_STEM_AT[u]:
        model_args["stem_at"] = INIT_STEM_AT[u]
    if start in STEM_KERNEL:
        model_args["stem_kernel"] = STEM_KERNEL[start]
    grid_args = ["model.args={" + ", ".join(f"{k}: {v}" for k, v in model_args.items()) + "}"] if model_args else []
    return [f"run.name={name}", f"run.out_dir={args.runs_dir}", f"run.threads={args.threads}",
            "run.resume=null", "run.progress=false", f"defense.args.u={u}",
            f"data.train={Path(args.data) / 'celeba_112'}", f"eval.data_root={args.data}",
            f"data.batch_size={args.batch_size}", f"train.steps={args.steps}",
            f"eval.every={eval_every}", f"eval.pairs={args.eval_pairs}", "eval.targets=[lfw]",
            "eval.final=false", f"train.log_every={eval_every}", "train.ckpt_every=0",
            "train.utility_every=0"] + STARTS[start] + grid_args + list(extra)


def curve(results: dict, batch_size: int, threads: int):
    """[(cpu_minutes, lfw_accuracy, step)] from a run's logged history (training time only)."""
    pts, secs, prev = [], 0.0, 0
    for rec in results.get("history") or []:
        step = int(rec["step"])
        if rec.get("img_per_s"):
            secs += (step - prev) * batch_size * results.get("copies", 1) / float(rec["img_per_s"])
        prev = step
        acc = rec.get("eval/lfw_acc")
        if acc is not None and (not pts or pts[-1][2] != step):
            pts.append((secs * threads / 60.0, float(acc), step))
    return pts


def minutes_to(pts, level: float) -> str:
    """CPU-minutes of the first evaluation at or above ``level`` (linear between evaluations)."""
    prev = (0.0, 0.5)
    for m, acc, _ in pts:
        if acc >= level:
            t = prev[0] + (m - prev[0]) * (level - prev[1]) / max(acc - prev[1], 1e-12) if prev[1] < level else m
            return f"{t:.1f}"
        prev = (m, acc)
    return "not reached"


def render(out: Path) -> None:
    doc = json.loads(out.with_suffix(".json").read_text())
    rows, a = doc["rows"], doc["args"]
    lines = ["# Accuracy per CPU-minute behind the mask: scratch vs distilled vs initialised, per grid", "",
             f"Defense: `{a['config']}`{' with ' + ', '.join(a['set_all']) if a['set_all'] else ''}; {a['steps']} steps of "
             f"{a['batch_size']} CelebA faces per row; LFW on {a['eval_pairs']} evenly spaced pairs every "
             f"{a['eval_every']} steps; CPU-minutes = the run's own training time (evaluation excluded) x "
             f"its torch threads (column `thr.`; rows with 1 thread ran two side by side, one core each). Written by `scripts/accuracy_per_cpu_minute.py`; teacher's own LFW "
             f"(SFace, full protocol): 99.40 %.", "",
             "| grid (u) | start | best LFW | at CPU-min | CPU-min to 95 % | CPU-min to 98 % | final LFW | CPU-min total | thr. | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pts = r["curve"]
        if not pts:
            lines.append(f"| {r['grid']} (u={r['u']}) | {r['start']} | failed: {r.get('error', 'no evaluation')} | | | | | | |")
            continue
        best = max(pts, key=lambda p: p[1])
        lines.append(f"| {r['grid']} (u={r['u']}) | {r['start']} | {100 * best[1]:.2f} % | {best[0]:.1f} | "
                     f"{minutes_to(pts, 0.95)} | {minutes_to(pts, 0.98)} | {100 * pts[-1][1]:.2f} % | {pts[-1][0]:.1f} | "
                     f"{r.get('threads', a['threads'])} | {JUDGE_NOTE.get(r['start'], '')} |")
    lines += ["", "Initialised rows enter SFace where its maps have the grid's size: " + ", ".join(
        f"u={u}: {c or 'the first conv (conv_1_conv2d)'}" for u, c in INIT_STEM_AT.items()) + ".",
              "", "Curves (CPU-minutes: LFW %):", ""]
    for r in rows:
        lines.append(f"- u={r['u']} {r['start']}: " + ", ".join(f"{p[0]:.1f}: {100 * p[1]:.1f}" for p in r["curve"]))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = {"scratch": ":", "distilled": "--", "initialised": "-", "initialised-1x1": "-."}
        for r in rows:
            if r["curve"]:
                xs, ys = [0.0] + [p[0] for p in r["curve"]], [0.5] + [p[1] for p in r["curve"]]
                ax.plot(xs, [100 * y for y in ys], styles.get(r["start"], "-"), marker="o", ms=3,
                        label=f"u={r['u']} {r['start']}")
        ax.axhline(99.40, color="grey", lw=0.8)
        ax.text(0, 99.5, "SFace teacher 99.40 %", fontsize=8, color="grey")
        ax.set_xlabel("training CPU-minutes")
        ax.set_ylabel(f"LFW accuracy (%), {a['eval_pairs']} pairs")
        ax.set_title("Accuracy per CPU-minute behind PPFR-FD")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        plt.close(fig)
    except ImportError:
        pass
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/celeba_ppfrfd.yaml")
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", "../shared/data/faces"))
    p.add_argument("--grids", default="1,2,4,8", help="comma-separated u values")
    p.add_argument("--starts", default="scratch,distilled,initialised")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-pairs", type=int, default=1200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="[START:]KEY=VALUE",
                   help="extra training override for every row, or only for START")
    p.add_argument("--runs-dir", default="outputs/accuracy_per_cpu_minute")
    p.add_argument("--out", default="docs/accuracy_per_cpu_minute")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="rows trained side by side (give each --threads 1)")
    p.add_argument("--reuse", action="store_true", help="keep finished rows trained with the same overrides")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        render(out)
        return 0
    us = [int(u) for u in args.grids.split(",") if u.strip()]
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    bad = [u for u in us if u not in (1, 2, 4, 8)] + [s for s in starts if s not in STARTS]
    if bad:
        p.error(f"unknown grid(s)/start(s) {bad}: grids are u in 1, 2, 4, 8; starts are {', '.join(STARTS)}")
    per_start = {s: [] for s in STARTS}
    set_all = []
    for item in args.set:
        head, sep, rest = item.partition(":")
        if sep and head in STARTS and "=" in rest:
            per_start[head].append(rest)
        else:
            set_all.append(item)
    plan = []
    for u in us:
        for start in starts:
            name = f"u{u}_{start}"
            plan.append((u, start, name, row_overrides(name, u, start, args.eval_every, args,
                                                       set_all + per_start[start])))
    results = {}

    def run_row(item):
        u, start, name, overrides = item
        run_dir = REPO / args.runs_dir / name
        res_path, row_path = run_dir / "results.json", run_dir / "row.json"
        # threads do not change what a row computes, only its speed (recorded per row below)
        same = [o for o in overrides if not o.startswith("run.threads=")]
        row = {"u": u, "grid": 14 * u, "start": start, "overrides": overrides, "threads": args.threads}
        reused = (args.reuse and res_path.is_file() and row_path.is_file()
                  and json.loads(row_path.read_text()).get("overrides_without_threads") == same)
        if reused:
            row.update(json.loads(row_path.read_text()).get("row", {}), reused=True)
            print(f"u={u} {start}: reused {run_dir}", flush=True)
        else:
            cmd = [sys.executable, "-m", "hybridmask", "train", "--config", args.config] + overrides
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            row["wall_seconds"] = time.time() - t0
            if proc.returncode != 0 or not res_path.is_file():
                row.update(curve=[], error=(proc.stderr.strip().splitlines() or ["no results.json"])[-1][:300])
                print(f"u={u} {start}: FAILED {row['error']}", flush=True)
                return row
        res = json.loads(res_path.read_text())
        row.update(curve=curve(res, args.batch_size, row["threads"]), images_per_second=res.get("images_per_second"),
                   model_start=res.get("model_start"), teacher=(res.get("teacher") or {}).get("spec"))
        if not reused:
            row_path.write_text(json.dumps({"overrides_without_threads": same, "row": {
                "threads": args.threads, "wall_seconds": row["wall_seconds"]}}, indent=2))
        for cpu_min, acc, step in row["curve"]:
            print(f"u={u} {start:11s} step {step:5d}: LFW {100 * acc:6.2f} % at {cpu_min:5.1f} CPU-min", flush=True)
        return row

    # --reuse also keeps the rows of the previous table that this invocation does not plan (one table
    # grows over several invocations: e.g. a new start measured at one grid only)
    kept = []
    if args.reuse and out.with_suffix(".json").is_file():
        planned = {item[2] for item in plan}
        kept = [r for r in json.loads(out.with_suffix(".json").read_text()).get("rows", [])
                if f"u{r['u']}_{r['start']}" not in planned]
    order = {s: i for i, s in enumerate(STARTS)}

    def write():
        rows = kept + [results[item[2]] for item in plan if item[2] in results]
        rows.sort(key=lambda r: (r["u"], order.get(r["start"], len(order))))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"rows": rows, "args": {**vars(args), "set_all": set_all}},
                                                       indent=2, default=str))

    from concurrent.futures import ThreadPoolExecutor, as_completed
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_row, item): item[2] for item in plan}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            write()
    render(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
