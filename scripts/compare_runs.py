#!/usr/bin/env python
"""Compare finished ``hybridmask train`` runs: one markdown table (defense, policy, k distribution,
held-out utility U, LFW / CFP-FP verification, training time) and a PNG of the k histograms.

    python scripts/compare_runs.py outputs/celeba_freq_adaptive outputs/celeba_fixed_k{2,3,4,5,6} \\
        --md docs/adaptive_vs_fixed.md --png docs/k_hist.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from hybridmask.train.card import format_accuracy, read_run_results, run_k_hist
from hybridmask.utils import atomic_write


def load(run: Path) -> Dict:
    try:
        return read_run_results(run)
    except ValueError as e:
        raise SystemExit(str(e))


def k_hist(res: Dict) -> Dict[int, float]:
    kh = run_k_hist(res)
    if kh:
        return kh
    k = (res.get("defense") or {}).get("k")
    return {int(k): 1.0} if isinstance(k, int) else {1: 1.0}


def table(results: List[Dict]) -> str:
    lines = ["| run | defense | policy | k histogram (training batches) | mean k | final U | LFW % | CFP-FP % | "
             "images seen | training time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        kh = k_hist(r)
        mean_k = sum(k * p for k, p in kh.items())
        kh_txt = " ".join(f"{k}:{100 * p:.0f}%" for k, p in sorted(kh.items()))
        u = (r.get("train") or {}).get("utility")
        lines.append(f"| {r['run']} | {(r.get('defense') or {}).get('name')} | {r.get('policy')} | {kh_txt} | {mean_k:.2f} | "
                     f"{'n/a' if u is None else f'{100 * float(u):.1f} %'} | {format_accuracy(r, 'lfw')} | {format_accuracy(r, 'cfp_fp')} | "
                     f"{r.get('images_seen')} | {r.get('fit_seconds', 0):.0f} s |")
    return "\n".join(lines) + "\n"


def plot(results: List[Dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted({k for r in results for k in k_hist(r)})
    n = len(results)
    fig, ax = plt.subplots(figsize=(4.2 + 1.1 * len(ks) + 0.3 * n, 3.4))
    width = 0.8 / n
    for i, r in enumerate(results):
        kh = k_hist(r)
        ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(ks))], [kh.get(k, 0.0) for k in ks], width,
               label=f"{r['run']} (LFW {format_accuracy(r, 'lfw').split(' ')[0]} %)")
    ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
    ax.set_ylabel("fraction of training faces")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title("k chosen per face during training")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (each holding results.json)")
    p.add_argument("--md", default=None, help="write the table to this markdown file")
    p.add_argument("--png", default=None, help="write the k histograms to this PNG")
    args = p.parse_args(argv)
    results = [load(Path(r)) for r in args.runs]
    md = table(results)
    print(md)
    if args.md:
        with atomic_write(Path(args.md), "w") as f:
            f.write(md)
    if args.png:
        plot(results, Path(args.png))
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
