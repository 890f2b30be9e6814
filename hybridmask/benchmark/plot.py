"""The privacy-utility scatter of the benchmark (LFW accuracy against the headline attack: with
``headline: strongest``, each defense's strongest query attack, named in the legend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from .config import STRONGEST
from .report import headline, headline_label, lfw_accuracy


def privacy_utility_plot(payload: Dict[str, Any], path: Path) -> bool:
    """x: LFW accuracy; y: rank-1 re-identification and Score_pp of the headline attack. Written atomically."""
    head = payload["attack_settings"]["headline"]
    pts = []
    for row in payload["defenses"]:
        a, h = lfw_accuracy(row), headline(row, head)
        if a is not None and h is not None:
            name = f"{row['label']} ({headline_label(row, head)})" if head == STRONGEST else row["label"]
            pts.append((name, 100 * a, 100 * float(h["rank1"]), float(h["score_pp"])))
    if not pts:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    chance = None
    for row in payload["defenses"]:
        ch = ((row.get("attacks") or {}).get("baselines") or {}).get("chance") or {}
        if ch.get("rank1") is not None:
            chance = 100 * float(ch["rank1"])
            break
    markers = "osD^vP*Xhp<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    who = "strongest attack" if head == STRONGEST else head
    for ax, idx, ylab in ((axes[0], 2, f"re-identification rank-1, {who} (%)"),
                          (axes[1], 3, f"Score_pp, {who} (higher = more private)")):
        for i, p in enumerate(pts):
            ax.scatter(p[1], p[idx], s=55, marker=markers[i % len(markers)], color=colors[i % len(colors)],
                       label=p[0], edgecolors="black", linewidths=0.5)
        ax.set_xlabel("LFW verification accuracy (%)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    if chance is not None:
        line = axes[0].axhline(chance, color="grey", ls="--", lw=1, label="chance rank-1")
        axes[0].legend(handles=[line], loc="best", fontsize=8, frameon=False)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    b = payload["benchmark"]
    fig.suptitle(f"privacy-utility ({b['budget']} budget, seed {b['seed']}): better is right and low (left), "
                 f"right and high (right)", fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


__all__ = ["privacy_utility_plot"]
