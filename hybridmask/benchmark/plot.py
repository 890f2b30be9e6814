"""The privacy-utility scatter of the benchmark (LFW accuracy against the headline attack: with
``headline: strongest``, each defense's strongest query attack, named in the legend) and the frontier
figure of ``hybridmask frontier`` (:func:`frontier_plot`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

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


def frontier_plot(points: List[Dict[str, Any]], path: Path, bench: Dict[str, Any],
                  chance: Optional[float] = None, target: Optional[Dict[str, float]] = None) -> bool:
    """The frontier figure (``hybridmask frontier``): one panel per utility axis (LFW, CFP-FP), x = its
    accuracy, y = the strongest query attack's rank-1 (lower is better), one marker per configuration
    (the benchmark's defenses: a shape each; sweep variants: circles, one colour per group), the Pareto
    front (``front_<axis>`` of the points) as a step line with its points labelled, chance rank-1 as a
    dashed line, the ``target`` region (accuracy at least ``target[axis]``, rank-1 at most ``target["rank1"]``)
    shaded green. ``points``: :func:`hybridmask.benchmark.frontier.frontier_points`. Written atomically;
    False when no point has both coordinates."""
    axes_spec = [(a, n) for a, n in (("lfw", "LFW"), ("cfp_fp", "CFP-FP"))
                 if any(p.get(a) is not None and p.get("rank1") is not None for p in points)]
    if not axes_spec:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from ..utils import atomic_write
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(7.5 * len(axes_spec), 6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shapes = "sD^vP*Xhp<>8H"
    groups = list(dict.fromkeys(p["group"] for p in points if p.get("kind") == "variant"))
    defenses = [p["key"] for p in points if p.get("kind") != "variant"]

    def style(p):
        if p.get("kind") == "variant":
            return "o", colors[(groups.index(p["group"]) + 1) % len(colors)], 40
        i = defenses.index(p["key"])
        return shapes[i % len(shapes)], "black" if i < len(shapes) else colors[i % len(colors)], 70
    handles = {}
    for ax, (axis, name) in zip(axes[0], axes_spec):
        shown = [p for p in points if p.get(axis) is not None and p.get("rank1") is not None]
        for p in shown:
            m, c, size = style(p)
            front = bool(p.get(f"front_{axis}"))
            ax.scatter(100 * p[axis], 100 * p["rank1"], s=size * (1.6 if front else 1.0), marker=m,
                       facecolor=c if p.get("kind") == "variant" else "white", edgecolors=c,
                       linewidths=1.8 if front else 1.0, zorder=3)
            lab = p["label"] if p.get("kind") != "variant" else (p.get("group_label") or p["group"]) + " variants"
            if lab not in handles:
                handles[lab] = Line2D([], [], ls="", marker=m, markersize=7, markeredgecolor=c,
                                      markerfacecolor=c if p.get("kind") == "variant" else "white", label=lab)
        front = sorted((p for p in shown if p.get(f"front_{axis}")), key=lambda p: (p[axis], p["rank1"]))
        if front:
            ax.step([100 * p[axis] for p in front], [100 * p["rank1"] for p in front], where="pre", color="tab:red",
                    lw=1.5, alpha=0.8, zorder=2)
            xs = [100 * p[axis] for p in shown]
            mid = (min(xs) + max(xs)) / 2
            for p in front:      # labels point inwards: none runs off the panel
                right = 100 * p[axis] > mid
                ax.annotate(f"{p['label']} ({p.get('attack') or '-'})", (100 * p[axis], 100 * p["rank1"]),
                            textcoords="offset points", xytext=(-6 if right else 6, 6), fontsize=7,
                            ha="right" if right else "left")
        if chance is not None:
            ax.axhline(100 * chance, color="grey", ls="--", lw=1)
        if target and axis in target and "rank1" in target:
            ax.fill_between([100 * target[axis], 100.0], -2, 100 * target["rank1"], color="tab:green", alpha=0.15,
                            lw=0, zorder=1)
        ax.set_xlabel(f"{name} verification accuracy (%)")
        ax.set_ylabel("re-identification rank-1 of queries, strongest attack (%)")
        ax.set_title(f"{name}: better is right and low", fontsize=10)
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="tab:red", lw=1.5, label="Pareto front (max accuracy, min rank-1)")]
    if chance is not None:
        extra.append(Line2D([], [], color="grey", ls="--", lw=1, label="chance rank-1"))
    if target and "rank1" in target:
        from matplotlib.patches import Patch
        extra.append(Patch(color="tab:green", alpha=0.15, label="target region"))
    fig.legend(handles=list(handles.values()) + extra, loc="lower center", ncol=min(4, len(handles) + len(extra)),
               fontsize=8, frameon=False)
    fig.suptitle(f"privacy-utility frontier ({bench.get('budget')} budget, seed {bench.get('seed')}): "
                 f"{len(points)} configurations; bold markers are on the front", fontsize=10)
    rows = math.ceil((len(handles) + len(extra)) / min(4, len(handles) + len(extra)))
    fig.tight_layout(rect=(0, 0.03 + 0.035 * rows, 1, 0.97))
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


__all__ = ["privacy_utility_plot", "frontier_plot"]
