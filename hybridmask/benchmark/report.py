"""The benchmark report: ``templates/report.md.j2`` rendered with Jinja2, the target checks read from
the benchmark config's ``targets:`` section, and the small readers of a report row they share."""
from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .estimate import fmt_minutes
from .runs import get_dotted

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}


# ---- readers of a row -------------------------------------------------------------------------------
def mean(d) -> Optional[float]:
    if d is None:
        return None
    v = d.get("mean") if isinstance(d, dict) else d
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def headline(row: Dict[str, Any], label: str) -> Optional[Dict[str, Any]]:
    return ((row.get("attacks") or {}).get("attacks") or {}).get(label)


def lfw_accuracy(row: Dict[str, Any]) -> Optional[float]:
    return metric_value(row, "verification.lfw.accuracy", "")


def strongest_rank1(row: Dict[str, Any]) -> Tuple[Optional[float], str]:
    att = row.get("attacks") or {}
    best, where = None, "-"
    for name, a in [("masked view", att.get("masked_view"))] + list((att.get("attacks") or {}).items()):
        if a and a.get("rank1") is not None and (best is None or a["rank1"] > best):
            best, where = float(a["rank1"]), name
    return best, where


def tar(v: Dict[str, Any], far: float = 1e-3) -> Optional[float]:
    for k, t in ((v or {}).get("tar_at_far") or {}).items():
        try:
            if abs(float(k) - far) < far * 1e-6:
                return float(t)
        except (TypeError, ValueError):
            continue
    return None


def pct(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None else f"{100 * float(x):.{nd}f}"


def num(x: Optional[float], nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "inf" if not math.isfinite(float(x)) else f"{float(x):.{nd}f}"


# ---- targets ------------------------------------------------------------------------------------------
def metric_value(row: Dict[str, Any], metric: str, head: str) -> Optional[float]:
    """``verification.<set>.<field>`` or ``attack.<label|headline>.<field>`` of a row (means of summaries)."""
    parts = metric.split(".")
    if parts[0] == "attack" and len(parts) == 3:
        a = headline(row, head if parts[1] == "headline" else parts[1])
        return mean((a or {}).get(parts[2]))
    return mean(get_dotted(row, metric))


def metric_name(metric: str, head: str) -> str:
    parts = metric.split(".")
    if parts[0] == "verification":
        return f"{parts[1].upper().replace('_', '-')} {parts[-1]}"
    return f"{head if parts[1] == 'headline' else parts[1]} {parts[-1]}"


def fmt_metric(metric: str, v: float) -> str:
    field = metric.rsplit(".", 1)[-1]
    if field.startswith("accuracy") or field.startswith("tar"):
        return f"{100 * v:.2f} %"
    if field in ("rank1", "rank5"):
        return f"{100 * v:.1f} %"
    return f"{v:.3f}"


def _condition(subject: Dict[str, Any], cond: Dict[str, Any], other: Optional[Dict[str, Any]], head: str
               ) -> Optional[Tuple[bool, str]]:
    metric, cmp = cond["metric"], cond["comparison"]
    v = metric_value(subject, metric, head)
    ref_spec = cond["value"]
    if isinstance(ref_spec, dict):
        ov = metric_value(other, metric, head) if other is not None else None
        if ov is None:
            return None
        off = float(ref_spec.get("offset") or 0.0)
        ref = ov + off
        pct_metric = fmt_metric(metric, 1.0).endswith("%")
        off_txt = "" if not off else (f" {'+' if off > 0 else '-'} {abs(100 * off if pct_metric else off):.2f}"
                                      f"{' points' if pct_metric else ''}")
        ref_txt = f"{other['label']} {fmt_metric(metric, ov)}{off_txt}"
    else:
        ref = float(ref_spec)
        ref_txt = fmt_metric(metric, ref)
    if v is None:
        return None
    return _OPS[cmp](v, ref), f"{metric_name(metric, head)} {fmt_metric(metric, v)} {cmp} {ref_txt}"


def target_checks(rows: List[Dict[str, Any]], targets: Dict[str, Any], head: str) -> List[str]:
    """One line per check of the benchmark config's ``targets`` (a check whose ``value`` names a role
    is made once per row of that role; ``{other}`` in its label is that row's label)."""
    by_role: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get("role"):
            by_role.setdefault(r["role"], []).append(r)
    subj_role = targets.get("subject")
    subject = (by_role.get(subj_role) or [None])[0] if subj_role else None
    if subject is None:
        return [f"No defense has role `{subj_role}`: no target checks."]
    out = []
    for check in targets.get("checks") or []:
        ref = check["value"]
        others = by_role.get(ref["role"], []) if isinstance(ref, dict) else [None]
        for other in others:
            parts = [_condition(subject, c, other, head) for c in [check] + list(check.get("also") or [])]
            if any(p is None for p in parts):
                continue
            ok = all(p[0] for p in parts)
            label = check["label"].replace("{other}", other["label"] if other else "")
            out.append(f"- {label}: {'; '.join(p[1] for p in parts)} - **{'met' if ok else 'not met'}**.")
    return out


# ---- the report ---------------------------------------------------------------------------------------
def protocol(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The shared recognizer set-up: from the first row whose training config describes one."""
    for r in rows:
        c = r.get("config") or {}
        keys = ("model.name", "model.embedding_size", "head.name", "train.steps", "data.batch_size", "optim.name")
        if all(get_dotted(c, k) is not None for k in keys):
            return c
    return None


def pairs_text(rows: List[Dict[str, Any]]) -> str:
    ver = next((r["verification"] for r in rows if r.get("verification")), {})
    parts = [f"{n} ({ver[t]['pairs']:,} pairs)" for t, n in (("lfw", "LFW"), ("cfp_fp", "CFP-FP"))
             if (ver.get(t) or {}).get("pairs")]
    return " and ".join(parts) or "none"


def environment():
    import jinja2

    def lenient(fn):   # a missing value (undefined in the template) reads as None
        return lambda x, *a: fn(None if isinstance(x, jinja2.Undefined) else x, *a)
    env = jinja2.Environment(loader=jinja2.PackageLoader("hybridmask.benchmark", "templates"),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(pct=lenient(pct), num=lenient(num), mean=lenient(mean), tar=lenient(tar),
                       minutes=lenient(lambda s: "-" if s is None else fmt_minutes(float(s))),
                       tojson_sorted=lambda x: json.dumps(x, sort_keys=True))
    return env


def render_markdown(p: Dict[str, Any], md_path: Path) -> str:
    """The Markdown report of a benchmark payload (``md_path``: where it goes, for relative links)."""
    st, rows = p["attack_settings"], p["defenses"]
    head = st["headline"]
    base = md_path.parent

    def rel(path: str) -> str:
        return os.path.relpath(path, base)
    lit = [(r, r["literature"], headline(r, head)) for r in rows
           if r.get("literature") and headline(r, head) is not None]
    ctx = {
        "b": p["benchmark"], "st": st, "pairs_txt": pairs_text(rows), "rows": rows, "head": head, "proto": protocol(rows),
        "headline": lambda r: headline(r, head) or {}, "strongest": strongest_rank1,
        "baselines": next(((r.get("attacks") or {}).get("baselines") for r in rows
                           if (r.get("attacks") or {}).get("baselines")), None),
        "plot": rel(p["plot"]) if p.get("plot") else None, "rel": rel,
        "targets": p.get("targets") or {}, "target_lines": target_checks(rows, p.get("targets") or {}, head),
        "literature": lit, "overrides": p.get("budget_overrides") or {},
        "results_json": rel(str(Path(p.get("plot") or md_path).parent / "results.json")),
    }
    return environment().get_template("report.md.j2").render(**ctx)


__all__ = ["render_markdown", "target_checks", "headline", "strongest_rank1", "lfw_accuracy", "metric_value"]
