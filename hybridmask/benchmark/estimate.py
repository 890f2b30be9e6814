"""The ``--dry-run`` time estimate: training from the speeds finished runs measured (or the budget's
assumed figures), attacks and verification from the budget's ``estimate`` section."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .runs import Entry, get_dotted

#: images of each verification protocol (a full run of it)
VERIFY_IMAGES = {"lfw": 7701, "cfp_fp": 5901, "cfp_ff": 5000}


def measured_speeds(runs_dir: Path) -> Dict[Tuple, List[float]]:
    """(model, stem, grid) -> [images/s] of the finished runs under ``runs_dir`` that report a speed;
    ("eval", stem) -> [verification images/s]."""
    out: Dict[Tuple, List[float]] = {}
    if not runs_dir.is_dir():
        return out
    for res in sorted(runs_dir.glob("*/results.json")):
        try:
            r = json.loads(res.read_text())
            m = r.get("model") or {}
            key = (m.get("name"), m.get("stem"), m.get("grid"))
            if r.get("images_per_second"):
                out.setdefault(key, []).append(float(r["images_per_second"]))
            for v in (r.get("verification") or {}).values():
                if v.get("images_per_second"):
                    out.setdefault(("eval", m.get("stem")), []).append(float(v["images_per_second"]))
        except (ValueError, OSError, AttributeError, TypeError):
            continue
    return out


def _grid_of(e: Entry) -> int:
    from ..defenses.base import Defense
    from .runs import untrained_defense
    try:
        d = untrained_defense(e.layout, e.config)
    except (ValueError, TypeError, KeyError):
        return 112
    return int(d.grid) if isinstance(d, Defense) else 112


def estimate_training(e: Entry, est: Dict[str, Any], speeds: Dict[Tuple, List[float]]) -> Tuple[float, str]:
    """Seconds to train ``e`` and where the speed came from. A config that gives no step count
    (``train.steps`` x ``data.batch_size``) gets the budget's ``train_seconds_without_steps``."""
    steps, bs = get_dotted(e.config, "train.steps"), get_dotted(e.config, "data.batch_size")
    if steps is None or bs is None:
        return float(est.get("train_seconds_without_steps") or float("nan")), "budget estimate"
    stem = e.input_kind
    ips_table = est["train_images_per_second"]
    if stem not in ips_table:
        return float("nan"), f"no assumed speed for {stem} input"
    meas = speeds.get((get_dotted(e.config, "model.name"), stem, _grid_of(e)))
    ips = statistics.median(meas) if meas else float(ips_table[stem])
    src = f"{ips:.0f} img/s {'measured by finished runs' if meas else 'assumed'}"
    ev = e.config.get("eval") or {}
    n_eval = 0
    if ev.get("final", True):
        for t in ev.get("targets") or []:
            n_eval += (4 * int(ev["final_pairs"])) if ev.get("final_pairs") else VERIFY_IMAGES.get(str(t), 5000)
    emeas = speeds.get(("eval", stem))
    eips = statistics.median(emeas) if emeas else float(est["eval_images_per_second"][stem])
    return int(steps) * int(bs) / ips + n_eval / eips, src


def fmt_minutes(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


__all__ = ["measured_speeds", "estimate_training", "fmt_minutes", "VERIFY_IMAGES"]
