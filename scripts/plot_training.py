#!/usr/bin/env python
"""Plot a training run from its TensorBoard event files: the k distribution over training
(stacked fractions of k per logging window) and the reward / mu / utility / FR-loss curves.

    python scripts/plot_training.py outputs/quickstart            # -> outputs/quickstart/training.png
    python scripts/plot_training.py outputs/celeba_freq_adaptive/tb -o docs/training.png
"""
from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

Series = Tuple[List[int], List[float]]


def read_scalars(log_dir: Path) -> Dict[str, Series]:
    """All scalar series of the event files under ``log_dir`` (later files win on equal steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file under {log_dir}")
    ea = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})
    ea.Reload()
    out: Dict[str, Series] = {}
    for tag in ea.Tags()["scalars"]:
        by_step = {}
        for ev in ea.Scalars(tag):
            by_step[ev.step] = ev.value
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out


def plot(scalars: Dict[str, Series], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from hybridmask.utils import atomic_write

    ktags = sorted((t for t in scalars if re.fullmatch(r"k/frac_k\d+", t)), key=lambda t: int(t.rsplit("k", 1)[1]))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110)
    ax = axes[0, 0]
    if ktags:
        steps = scalars[ktags[0]][0]
        ys = [scalars[t][1] for t in ktags]
        ax.stackplot(steps, ys, labels=[t.split("_")[-1].replace("k", "k=") for t in ktags], alpha=0.85)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8, ncol=len(ktags))
    else:
        ax.text(0.5, 0.5, "no k fractions logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("k chosen for the recognizer's batches")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of faces")

    def curve(ax, tag, label=None, **kw):
        if tag in scalars:
            s, v = scalars[tag]
            ax.plot(s, v, label=label or tag, **kw)
            return True
        return False

    ax = axes[0, 1]
    any_ = curve(ax, "policy/reward", "reward (mean)")
    any_ |= curve(ax, "policy/privacy_mean", "privacy term P", alpha=0.7)
    ax.set_title("policy reward")
    ax.set_xlabel("step")
    if any_:
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    any_ = curve(ax, "utility/identification", "U (held-out identification, k=1)", marker=".")
    for tag in sorted(t for t in scalars if t.startswith("eval/")):
        any_ |= curve(ax, tag, tag.split("/", 1)[1], marker="o")
    ax.set_title("utility")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if any_:
        ax.legend(fontsize=8)
    ax2 = ax.twinx()
    if curve(ax2, "policy/mu", "mu", color="tab:red", alpha=0.6):
        ax2.set_ylabel("multiplier mu", color="tab:red")
    ax = axes[1, 1]
    curve(ax, "train/fr_loss", "recognizer loss (mixed)")
    curve(ax, "policy/fr_loss", "loss in policy steps", alpha=0.7)
    ax.set_title("FR loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_write(out, "wb") as f:
        f.write(buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (outputs/<name>) or its tb/ folder")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: <run>/training.png)")
    args = p.parse_args(argv)
    run = Path(args.run)
    log_dir = run / "tb" if (run / "tb").is_dir() else run
    if not log_dir.is_dir():
        print(f"plot_training: error: folder not found: {log_dir}", file=sys.stderr)
        return 1
    try:
        scalars = read_scalars(log_dir)
    except FileNotFoundError as e:
        print(f"plot_training: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (log_dir.parent if log_dir.name == "tb" else log_dir) / "training.png"
    name = log_dir.parent.name if log_dir.name == "tb" else log_dir.name
    plot(scalars, out, f"training run {name}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
