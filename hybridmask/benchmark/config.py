"""The benchmark config: schema, loading and the ``budgets`` fold-in.

A benchmark config (``configs/benchmark.yaml``) lists the defenses (one training config each), how the
benchmark writes into each training *method*'s config (``methods:``, plain data: which dotted key holds
the seed, the run folder, the data paths), the attacks to run (registered names from
:func:`hybridmask.attacks.list_attacks` with their parameters), the targets to check, and one section
per budget (``tiny`` / ``small`` / ``full``) that adds paths, training overrides, attack sizes and the
figures of the ``--dry-run`` estimate. :func:`load_benchmark` validates all of it and returns one
plain dict with the budget folded in (attack settings merged with :func:`deep_merge`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping

from ..utils import read_yaml_mapping
from ..utils.common import deep_merge

BUDGETS = ("tiny", "small", "student", "full")
TOP_KEYS = {"seed", "data_root", "methods", "defenses", "attacks", "targets", "budgets"}
BUDGET_KEYS = {"runs_dir", "work_dir", "markdown", "figures_dir", "overrides", "verify", "attacks", "estimate"}
DEFENSE_KEYS = {"key", "label", "config", "role", "overrides", "note", "literature"}
METHOD_KEYS = {"seed", "name", "out_dir", "run_dir", "progress", "data", "defense", "volatile"}
ATTACK_KEYS = {"victims", "n_victims", "n_distractors", "n_public", "defense_seed", "device", "headline", "run", "left_out",
               "params"}
RUN_KEYS = {"attack", "requires", "text"}       # besides the attack's own parameters
TARGET_KEYS = {"title", "subject", "checks"}
CHECK_KEYS = {"label", "metric", "comparison", "value", "role", "also"}
COMPARISONS = ("<", "<=", ">", ">=", "==")
#: attack kinds the benchmark runs: reconstructions (judged by SFace) and linkage (the attacker's own matching)
SCORED_KINDS = ("reconstruction", "linkage")
#: ``attacks.headline`` value: per defense, the query-reconstruction attack with the highest rank-1
STRONGEST = "strongest"


def _fail(path: Path, msg: str) -> None:
    raise ValueError(f"{path}: {msg}")


def _unknown(path: Path, have, known, where: str) -> None:
    bad = sorted(set(have) - set(known))
    if bad:
        _fail(path, f"unknown key(s) {bad}{' in ' + where if where else ''}; known: {sorted(known)}")


def check_methods(path: Path, methods: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    if not isinstance(methods, Mapping) or not methods:
        _fail(path, "'methods' must map each training method (a config's `method:`) to where its config keeps "
                    "the seed, the run name and the run folder")
    out = {}
    for name, m in methods.items():
        if not isinstance(m, Mapping):
            _fail(path, f"methods.{name} must be a mapping")
        _unknown(path, m, METHOD_KEYS, f"methods.{name}")
        for k in ("seed", "name", "progress"):
            if not m.get(k):
                _fail(path, f"methods.{name}.{k} is required (the dotted key of the training config)")
        if bool(m.get("out_dir")) == bool(m.get("run_dir")):
            _fail(path, f"methods.{name} needs exactly one of out_dir (key of the runs folder) and run_dir "
                        f"(key of the run's own folder)")
        if not isinstance(m.get("defense"), (str, Mapping)):
            _fail(path, f"methods.{name}.defense must be the dotted key of the defense section or a defense config")
        out[str(name).lower()] = {**dict(m), "data": dict(m.get("data") or {}), "volatile": list(m.get("volatile") or [])}
    return out


def budget_attacks(path: Path, budget: str, base: Mapping[str, Any], own: Mapping[str, Any]) -> Dict[str, Any]:
    """The attacks section a budget runs: its own ``attacks`` merged over the top-level one, where
    ``run.<label>: null`` leaves that attack out (and its shared ``params`` when no other label uses them); a
    null for a label the top level does not run is ignored."""
    base_run = dict(base.get("run") or {}) if isinstance(base.get("run"), Mapping) else {}
    own_run = own.get("run") if isinstance(own.get("run"), Mapping) else {}
    out = deep_merge(dict(base), dict(own))
    left_out = [lb for lb, v in own_run.items() if v is None and lb in base_run]   # a label not run: nothing to drop
    if isinstance(out.get("run"), Mapping):
        out["run"] = {lb: v for lb, v in out["run"].items() if not (v is None and lb in own_run)}
    if not left_out:
        return out
    out["left_out"] = sorted(left_out)
    run = dict(out["run"])
    used = {str(v.get("attack")) for v in run.values() if isinstance(v, Mapping)}
    gone = {str(base_run[lb].get("attack")) for lb in left_out if isinstance(base_run[lb], Mapping)} - used
    params = {k: v for k, v in (out.get("params") or {}).items() if k not in gone}
    return dict(out, run=run, params=params)


def check_attacks(path: Path, attacks: Mapping[str, Any]) -> Dict[str, Any]:
    """Every entry of ``attacks.run`` names a registered reconstruction or linkage attack; the rest is its
    parameters. ``attacks.headline``: ``strongest`` (the default) or the label of a reconstruction attack."""
    from ..attacks import ATTACKS
    _unknown(path, attacks, ATTACK_KEYS, "attacks")
    run = attacks.get("run") or {}
    if not isinstance(run, Mapping) or not run:
        _fail(path, "attacks.run must map a label to {attack: <registered name>, <parameters>}")
    for label, spec in run.items():
        if not isinstance(spec, Mapping) or not spec.get("attack"):
            _fail(path, f"attacks.run.{label} needs 'attack' (one of {', '.join(ATTACKS.names())})")
        name = str(spec["attack"])
        if name not in ATTACKS:
            _fail(path, f"unknown attack {name!r} in attacks.run.{label}; registered: {', '.join(ATTACKS.names())}")
        cls = ATTACKS.get(name)
        if cls.kind not in SCORED_KINDS:
            _fail(path, f"attacks.run.{label}: {name!r} is a {cls.kind} attack; the benchmark scores "
                        f"{' and '.join(SCORED_KINDS)} attacks")
        declared = {p.name for p in cls.all_params()}
        shared = dict((attacks.get("params") or {}).get(name) or {})
        _unknown(path, set(spec) - RUN_KEYS | set(shared), declared, f"the parameters of attacks.run.{label} "
                                                                          f"({name})")
        if not isinstance(spec.get("requires") or {}, Mapping):
            _fail(path, f"attacks.run.{label}.requires must map a defense capability to the value it needs")
    params = attacks.get("params") or {}
    bad = sorted(set(params) - {str(s["attack"]) for s in run.values()})
    if bad:
        _fail(path, f"attacks.params has entries {bad} for attacks that attacks.run does not use")
    head = attacks.get("headline", STRONGEST)
    queries = [lb for lb, sp in run.items() if ATTACKS.get(str(sp["attack"])).kind == "reconstruction"]
    if head != STRONGEST and head not in queries:
        _fail(path, f"attacks.headline must be {STRONGEST!r} (per defense, the reconstruction attack with the "
                    f"highest rank-1) or a reconstruction attack of attacks.run ({', '.join(queries)}), got {head!r}")
    attacks = dict(attacks, headline=head)
    return dict(attacks)


def check_targets(path: Path, targets: Any) -> Dict[str, Any]:
    if targets is None:
        return {"title": "Targets", "subject": None, "checks": []}
    if not isinstance(targets, Mapping):
        _fail(path, "'targets' must be a mapping {title, subject, checks}")
    _unknown(path, targets, TARGET_KEYS, "targets")
    checks = list(targets.get("checks") or [])
    for i, c in enumerate(checks):
        where = f"targets.checks[{i}]"
        if not isinstance(c, Mapping):
            _fail(path, f"{where} must be a mapping")
        for part in [c] + list(c.get("also") or []):
            _unknown(path, part, CHECK_KEYS, where)
            if not part.get("metric") or part.get("comparison") not in COMPARISONS:
                _fail(path, f"{where} needs a metric and a comparison (one of {', '.join(COMPARISONS)})")
            v = part.get("value")
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)) and not (isinstance(v, Mapping)
                                                                                     and v.get("role")):
                _fail(path, f"{where}: value must be a number or {{role: <role>, offset: <number>}}")
        if not c.get("label"):
            _fail(path, f"{where} needs a label (the sentence the report prints)")
    return {"title": str(targets.get("title") or "Targets"), "subject": targets.get("subject"), "checks": checks}


def check_defenses(path: Path, defenses: Any) -> List[Dict[str, Any]]:
    if not isinstance(defenses, list) or not defenses:
        _fail(path, "'defenses' must be a non-empty list of {key, label, config}")
    seen = set()
    for d in defenses:
        if not isinstance(d, dict) or not {"key", "config"} <= set(d):
            _fail(path, f"every defense needs a key and a config, got {d!r}")
        extra = sorted(set(d) - DEFENSE_KEYS)
        if extra:
            _fail(path, f"defense {d['key']!r} has unknown key(s) {extra}")
        if d["key"] in seen:
            _fail(path, f"defense key {d['key']!r} appears twice")
        seen.add(d["key"])
    return defenses


def load_benchmark(path: os.PathLike, budget: str) -> Dict[str, Any]:
    """Read the benchmark config and fold the ``budget`` section in; clear errors for unknown keys."""
    from ..defenses.base import INPUT_KINDS
    path = Path(path)
    raw = read_yaml_mapping(path, "benchmark config")
    _unknown(path, raw, TOP_KEYS, "")
    if budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    budgets = raw.get("budgets") or {}
    if budget not in budgets:
        _fail(path, f"has no budgets.{budget} section (it has: {', '.join(budgets) or 'none'})")
    b = dict(budgets[budget] or {})
    _unknown(path, b, BUDGET_KEYS, f"budgets.{budget}")
    for k in ("runs_dir", "work_dir", "markdown", "figures_dir"):
        if not b.get(k):
            _fail(path, f"budgets.{budget}.{k} is required")
    methods = check_methods(path, raw.get("methods"))
    groups = list(methods) + list(INPUT_KINDS)
    ov = dict(b.get("overrides") or {})
    bad = sorted(set(ov) - set(groups))
    if bad:
        _fail(path, f"budgets.{budget}.overrides takes a training method or an input kind "
                    f"({', '.join(groups)}), got {bad}")
    attacks = check_attacks(path, budget_attacks(path, budget, raw.get("attacks") or {}, b.get("attacks") or {}))
    return {"path": str(path), "dir": str(path.parent), "budget": budget, "seed": int(raw.get("seed") or 0),
            "data_root": raw.get("data_root"), "methods": methods, "defenses": check_defenses(path, raw.get("defenses")),
            "attacks": attacks, "targets": check_targets(path, raw.get("targets")),
            "runs_dir": str(b["runs_dir"]), "work_dir": str(b["work_dir"]), "markdown": str(b["markdown"]),
            "figures_dir": str(b["figures_dir"]), "overrides": {g: dict(v or {}) for g, v in ov.items()},
            "verify": dict(b.get("verify") or {}), "estimate": b.get("estimate")}


__all__ = ["BUDGETS", "COMPARISONS", "SCORED_KINDS", "STRONGEST", "load_benchmark"]
