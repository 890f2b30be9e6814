"""The benchmark report: ``templates/report.md.j2`` rendered with Jinja2, the target checks read from
the benchmark config's ``targets:`` section, and the small readers of a report row they share."""
from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .config import STRONGEST
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


#: an attack that takes longer than this per defense is flagged in the report and the dry run
ATTACK_LIMIT_SECONDS = 600.0


def attack_results(row: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """label -> scores of the reconstruction attacks that ran against the row's defense."""
    return ((row.get("attacks") or {}).get("attacks") or {})


def linkage_results(row: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """label -> scores of the linkage attacks that ran against the row's defense."""
    return ((row.get("attacks") or {}).get("linkage") or {})


def is_release(a: Dict[str, Any]) -> bool:
    """A release attack: scored on the victims' training-time mixes (the harness adds ``mixed``)."""
    return bool((a or {}).get("mixed"))


def _best(items, key) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The (label, scores) with the largest ``key``; the first in order wins a tie of every key."""
    best = None
    for name, a in items:
        k = key(a)
        if k is None:
            continue
        if best is None or k > best[0]:
            best = (k, name, a)
    return (best[1], best[2]) if best else (None, None)


def _score(*vals) -> Optional[Tuple[float, ...]]:
    if vals[0] is None:
        return None
    return tuple(float("-inf") if v is None else float(v) for v in vals)


def strongest_query(row: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The query-reconstruction attack with the highest rank-1 (ties: higher identity similarity; then the
    first in the config's order). Release attacks (results with a ``mixed`` entry) are not candidates."""
    return _best(((n, a) for n, a in attack_results(row).items() if a and not is_release(a)),
                 lambda a: _score(mean(a.get("rank1")), mean(a.get("identity_similarity"))))


def strongest_release(row: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The release attack with the highest rank-1 (dominant) on training-time mixes (ties: rank-1 (any),
    then identity similarity to the dominant face); (None, None) for a defense that does not mix."""
    def key(a):
        m = a.get("mixed") or {}
        return _score(m.get("rank1_dominant"), m.get("rank1_any"), mean(m.get("identity_similarity_dominant")))
    return _best(((n, a) for n, a in attack_results(row).items() if is_release(a)), key)


def strongest_linkage(row: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The linkage attack with the highest rank-1 (ties: TAR@FAR=1e-3)."""
    return _best(linkage_results(row).items(), lambda a: _score(a.get("rank1"), a.get("tar@far=0.001")))


def headline_label(row: Dict[str, Any], label: str) -> Optional[str]:
    """The attack whose scores fill the row's privacy columns: the fixed ``label``, or with ``strongest``
    the row's :func:`strongest_query`."""
    return strongest_query(row)[0] if label == STRONGEST else label


def headline(row: Dict[str, Any], label: str) -> Optional[Dict[str, Any]]:
    name = headline_label(row, label)
    return attack_results(row).get(name) if name else None


def lfw_accuracy(row: Dict[str, Any]) -> Optional[float]:
    return metric_value(row, "verification.lfw.accuracy", "")


def strongest_rank1(row: Dict[str, Any]) -> Tuple[Optional[float], str]:
    """The highest rank-1 over the masked view and every query attack (release attacks' rank-1 is not a
    query's: they are in the training-release column)."""
    att = row.get("attacks") or {}
    best, where = None, "-"
    for name, a in [("masked view", att.get("masked_view"))] + list((att.get("attacks") or {}).items()):
        if a and not is_release(a) and a.get("rank1") is not None and (best is None or a["rank1"] > best):
            best, where = float(a["rank1"]), name
    return best, where


def release_cell(row: Dict[str, Any]) -> str:
    """``dominant / any (attack)`` of the strongest release attack, ``-`` for a defense that does not mix."""
    name, a = strongest_release(row)
    if a is None:
        return "-"
    m = a["mixed"]
    return f"{pct(m.get('rank1_dominant'))} / {pct(m.get('rank1_any'))} ({name})"


def linkage_cell(row: Dict[str, Any], several: bool = False) -> str:
    """``rank-1 / TAR@FAR=1e-3`` of the strongest linkage attack (its label when ``several`` are configured)."""
    name, a = strongest_linkage(row)
    if a is None:
        return "-"
    return f"{pct(a.get('rank1'))} / {pct(a.get('tar@far=0.001'))}" + (f" ({name})" if several else "")


def attack_seconds(row: Dict[str, Any], label: str) -> Optional[float]:
    a = attack_results(row).get(label) or linkage_results(row).get(label) or {}
    return None if a.get("seconds") is None else float(a["seconds"])


def attack_times(rows: List[Dict[str, Any]], labels: List[str]) -> Tuple[List[Tuple[str, List[str]]],
                                                                           List[str]]:
    """The "Attack times" table (per row: one cell per attack label: minutes, n/a when skipped, ``-``
    when absent) and the attacks over :data:`ATTACK_LIMIT_SECONDS` ("<attack> on <defense> (<time>)")."""
    table, slow = [], []
    for r in rows:
        skipped = (r.get("attacks") or {}).get("skipped") or {}
        cells = []
        for lb in labels:
            sec = attack_seconds(r, lb)
            if sec is None:
                cells.append("n/a" if lb in skipped else "-")
            elif sec > ATTACK_LIMIT_SECONDS:
                cells.append(f"**{fmt_minutes(sec)}** (over 10 min)")
                slow.append(f"{lb} on {r['label']} ({fmt_minutes(sec)})")
            else:
                cells.append(fmt_minutes(sec))
        table.append((r["label"], cells))
    return table, slow


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
    """``verification.<set>.<field>``, ``attack.headline.<field>`` (the row's headline attack: the fixed
    label or, with ``strongest``, its strongest query attack), ``attack.release.<field>`` (the strongest
    release attack's ``mixed`` scores: rank1_dominant, rank1_any, ...) or ``attack.<label>.<field>`` (a
    reconstruction or linkage attack) of a row (means of summaries)."""
    parts = metric.split(".")
    if parts[0] == "attack" and len(parts) == 3:
        if parts[1] == "headline":
            a = headline(row, head)
        elif parts[1] == "release":
            a = (strongest_release(row)[1] or {}).get("mixed")
        else:
            a = attack_results(row).get(parts[1]) or linkage_results(row).get(parts[1])
        return mean((a or {}).get(parts[2]))
    return mean(get_dotted(row, metric))


def metric_name(metric: str, head: str, row: Optional[Dict[str, Any]] = None) -> str:
    parts = metric.split(".")
    if parts[0] == "verification":
        return f"{parts[1].upper().replace('_', '-')} {parts[-1]}"
    if parts[1] == "headline":
        who = (headline_label(row, head) if row is not None else None) or head
    elif parts[1] == "release":
        who = (strongest_release(row)[0] if row is not None else None) or "release"
    else:
        who = parts[1]
    return f"{who} {parts[-1]}"


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
        via = ""
        if metric.startswith("attack.headline.") and head == STRONGEST:
            via = f" ({headline_label(other, head)})"
        elif metric.startswith("attack.release."):
            via = f" ({strongest_release(other)[0]})"
        ref_txt = f"{other['label']} {fmt_metric(metric, ov)}{via}{off_txt}"
    else:
        ref = float(ref_spec)
        ref_txt = fmt_metric(metric, ref)
    if v is None:
        return None
    return _OPS[cmp](v, ref), f"{metric_name(metric, head, subject)} {fmt_metric(metric, v)} {cmp} {ref_txt}"


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
    same_query = {frozenset(g["labels"]) for g in query_groups(rows)}
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
            verdict = "met" if ok else "not met"
            # a query-attack comparison between two defenses with the same test-time query measures noise
            if (ok and other is not None and str(check.get("metric", "")).startswith("attack.")
                    and any({subject["label"], other["label"]} <= g for g in same_query)):
                verdict = ("met only by noise: both release the same test-time query, so the attack columns "
                           "cannot tell them apart")
            out.append(f"- {label}: {'; '.join(p[1] for p in parts)} - **{verdict}**.")
    return out


def query_groups(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Defenses whose test-time queries are the same masking function (same public structure at k=1: transform,
    grid, kept channels, shuffle, channel mix, sign flip, noise, channel subsets, query-time pool mixing), among which at least one mixes faces in
    training: MixUp and a policy act on training releases only, so those rows' query columns can differ only
    by noise. Built from each row's victim-defense record (the attacks' results); rows without one are left out."""
    from ..defenses.io import build_defense
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        rec = (r.get("attacks") or {}).get("victim_defense") or {}
        if not rec.get("config"):
            continue
        try:
            d = build_defense(rec["config"], None, seed=0, untrained=True)
            s = d.structure()
        except Exception:   # a defense this code cannot rebuild from its config alone: not grouped
            continue
        sig = (s.transform, getattr(s.bdct, "u", None), tuple(s.kept or ()), s.shuffle, s.channel_mix, s.sign_flip,
               s.noise, getattr(s, "subset", None), getattr(s, "subset_keys", None), getattr(s, "query_k", 1),
               getattr(s, "pool", None))
        groups.setdefault(sig, []).append({"label": r["label"], "mixes": bool(d.mixes), "name": d.name})
    return [{"labels": [m["label"] for m in g], "mixing": [m["label"] for m in g if m["mixes"]],
             "plain": [m["label"] for m in g if not m["mixes"]]}
            for g in groups.values() if len(g) >= 2 and any(m["mixes"] for m in g)]


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
    lit = [(r, r["literature"], headline(r, head), headline_label(r, head)) for r in rows
           if r.get("literature") and headline(r, head) is not None]
    n_link = sum(1 for a in st.get("attacks", {}).values() if a.get("kind") == "linkage")
    labels = list(st.get("run") or [])
    times, slow = attack_times(rows, labels)
    ctx = {
        "b": p["benchmark"], "st": st, "pairs_txt": pairs_text(rows), "rows": rows, "head": head, "proto": protocol(rows),
        "strongest_mode": head == STRONGEST,
        "headline": lambda r: headline(r, head) or {}, "headline_label": lambda r: headline_label(r, head) or "-",
        "strongest": strongest_rank1, "release_cell": release_cell,
        "linkage_cell": lambda r: linkage_cell(r, several=n_link > 1),
        "any_release": any(strongest_release(r)[1] is not None for r in rows),
        "linkage_rows": [(r, n, a) for r in rows for n, a in linkage_results(r).items()],
        "time_labels": labels, "times": times, "slow": slow, "limit_minutes": ATTACK_LIMIT_SECONDS / 60,
        "baselines": next(((r.get("attacks") or {}).get("baselines") for r in rows
                           if (r.get("attacks") or {}).get("baselines")), None),
        "plot": rel(p["plot"]) if p.get("plot") else None, "rel": rel,
        "targets": p.get("targets") or {}, "target_lines": target_checks(rows, p.get("targets") or {}, head),
        "literature": lit, "overrides": p.get("budget_overrides") or {},
        "results_json": rel(str(Path(p.get("plot") or md_path).parent / "results.json")),
        "query_groups": query_groups(rows), "not_measured": p.get("not_measured") or [],
    }
    return environment().get_template("report.md.j2").render(**ctx)


__all__ = ["render_markdown", "target_checks", "query_groups", "headline", "headline_label", "strongest_query", "strongest_release",
           "strongest_linkage", "strongest_rank1", "release_cell", "linkage_cell", "attack_times", "lfw_accuracy",
           "metric_value", "STRONGEST", "ATTACK_LIMIT_SECONDS"]
