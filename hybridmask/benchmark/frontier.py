"""``hybridmask frontier``: the privacy-utility frontier of a grid of masking configurations.

    hybridmask frontier --config configs/frontier.yaml --budget small --dry-run   # the plan, estimate
    hybridmask frontier --config configs/frontier.yaml --budget small             # docs/frontier.md + PNG

A frontier config (``configs/frontier.yaml``) names a base benchmark config (its methods, attacks and
budgets; its defenses are points of the plot too) and a ``sweep`` of masking variants: groups, each a
base training config plus dotted overrides, expanded as a cartesian ``grid`` and / or an explicit list
of ``variants``. Every variant becomes one more defense entry of that benchmark, with a key and a run
name derived from its overrides (stable: the same overrides always give the same run folder), so the
benchmark's own machinery trains, reuses, verifies and attacks it (:class:`Frontier` is a
:class:`~hybridmask.benchmark.runner.Benchmark` whose outputs are the frontier): finished runs are
reused when their ``results.json`` records the same config, attack results are cached per run and
attack settings in the budget's ``work_dir`` (shared with ``hybridmask benchmark``).

The outputs: a Markdown table (one row per configuration: label, overrides, LFW, CFP-FP, the strongest
query attack with its rank-1 and SSIM, linkage rank-1 / TAR@FAR=1e-3, on the Pareto front or not),
``frontier.json`` and ``frontier.png`` (x = LFW / CFP-FP accuracy, y = the strongest query attack's
rank-1, the Pareto front as a step line, chance rank-1 as a horizontal line). :func:`pareto_front` is
the front itself (maximise x, minimise y).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .runner import Benchmark

SWEEP_KEYS = {"benchmark", "defenses", "sweep", "outputs", "target"}
#: the target a point must meet (fractions): query rank-1 and SSIM at most, accuracies at least; linkage at most
TARGET_KEYS = {"rank1": "<=", "ssim": "<=", "lfw": ">=", "cfp_fp": ">=", "linkage": "<="}
GROUP_KEYS = {"key", "label", "config", "overrides", "grid", "variants"}
VARIANT_META = {"key", "label"}          # besides dotted overrides, in an explicit variant
OUTPUT_KEYS = {"markdown", "figures_dir"}
#: the y of a point whose query, read as an image, re-identifies more than every attack (e.g. unprotected pixels)
MASKED_VIEW = "masked view (the query itself)"
#: the figure and the JSON written into ``figures_dir``
FIGURE, JSON_FILE = "frontier.png", "frontier.json"


# ---- the Pareto front -------------------------------------------------------------------------------
def _finite(v: Any) -> Optional[float]:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def pareto_front(points: Sequence[Tuple[Any, Any]], maximize_x: bool = True, minimize_y: bool = True) -> List[int]:
    """Indices of the points no other point dominates, sorted by x (then y) ascending.

    ``points``: ``(x, y)`` pairs; x is maximised (utility), y minimised (the attack's rank-1) by default.
    A point dominates another when it is at least as good on both axes and strictly better on one, so
    equal points are all on the front. A point with a missing (None) or non-finite coordinate is
    skipped: it is neither on the front nor dominates any other."""
    sx = 1.0 if maximize_x else -1.0
    sy = -1.0 if minimize_y else 1.0
    valid = []
    for i, p in enumerate(points):
        x, y = (_finite(p[0]), _finite(p[1])) if p is not None and len(p) == 2 else (None, None)
        if x is not None and y is not None:
            valid.append((i, sx * x, sy * y, x, y))       # (index, larger-is-better x, larger-is-better y, raw)
    front = [v for v in valid
             if not any(o[1] >= v[1] and o[2] >= v[2] and (o[1] > v[1] or o[2] > v[2]) for o in valid)]
    return [v[0] for v in sorted(front, key=lambda v: (v[3], v[4], v[0]))]


# ---- the sweep config --------------------------------------------------------------------------------
def _fail(path: Path, msg: str) -> None:
    raise ValueError(f"{path}: {msg}")


def _value_slug(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_value_slug(x) for x in v)
    return re.sub(r"[^A-Za-z0-9.+]", "", str(v).lower()) or "x"


def slug(overrides: Mapping[str, Any]) -> str:
    """``{"defense.args.drop": "low6", "defense.args.shuffle": "keys:3"}`` -> ``drop_low6-shuffle_keys3``
    (the last part of each dotted key and its value, in key order)."""
    return "-".join(f"{k.rsplit('.', 1)[-1]}_{_value_slug(v)}" for k, v in sorted(overrides.items())) or "base"


def describe(overrides: Mapping[str, Any]) -> str:
    """``drop=low6, shuffle=keys:3`` (short keys, for labels)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in sorted(overrides.items()))


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def variant_run_name(base_name: str, config_name: str, overrides: Mapping[str, Any]) -> str:
    """The run folder of a variant: the base config's run name, the overrides' slug and a short hash of the
    overrides and the base config file (a stable, unique name: the same variant always lands in the same
    folder, whatever else the sweep holds)."""
    blob = json.dumps({"config": config_name, "overrides": {k: overrides[k] for k in sorted(overrides)}},
                      sort_keys=True, default=str)
    return f"{base_name}-{slug(overrides)[:80]}-{hashlib.sha256(blob.encode()).hexdigest()[:6]}"


def _check_overrides(path: Path, where: str, ov: Any) -> Dict[str, Any]:
    if not isinstance(ov, Mapping):
        _fail(path, f"{where} must map dotted training-config keys to values, got {ov!r}")
    bad = [k for k in ov if not isinstance(k, str) or "." not in k]
    if bad:
        _fail(path, f"{where}: {bad} are not dotted training-config keys (e.g. defense.args.drop)")
    return dict(ov)


def expand_group(path: Path, group: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """A group's variants: the cartesian product of ``grid`` (key -> list of values, in the grid's key order)
    then the explicit ``variants`` (mappings of dotted keys, optionally with ``label`` / ``key``), each
    merged over the group's shared ``overrides``. -> ``[{key, label, own, overrides}]`` (``own``: the
    variant's own overrides, ``overrides``: shared + own)."""
    g = str(group["key"])
    shared = _check_overrides(path, f"sweep group {g!r} overrides", group.get("overrides") or {})
    grid = group.get("grid") or {}
    if not isinstance(grid, Mapping):
        _fail(path, f"sweep group {g!r}: grid must map dotted keys to lists of values")
    own_list: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []
    if grid:
        _check_overrides(path, f"sweep group {g!r} grid", grid)
        keys = list(grid)
        values = []
        for k in keys:
            v = grid[k]
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            if not v:
                _fail(path, f"sweep group {g!r}: grid.{k} has no values")
            values.append(v)
        own_list += [(dict(zip(keys, combo)), {}) for combo in itertools.product(*values)]
    variants = group.get("variants") or []
    if not isinstance(variants, list):
        _fail(path, f"sweep group {g!r}: variants must be a list of mappings of dotted keys")
    for i, v in enumerate(variants):
        if not isinstance(v, Mapping):
            _fail(path, f"sweep group {g!r}: variants[{i}] must be a mapping of dotted keys")
        meta = {k: v[k] for k in VARIANT_META if k in v}
        own_list.append((_check_overrides(path, f"sweep group {g!r} variants[{i}]",
                                          {k: x for k, x in v.items() if k not in VARIANT_META}), meta))
    if not own_list:
        _fail(path, f"sweep group {g!r} has neither a grid nor variants")
    out, seen = [], {}
    for own, meta in own_list:
        merged = {**shared, **own}
        canon = json.dumps(merged, sort_keys=True, default=str)
        if canon in seen:
            _fail(path, f"sweep group {g!r}: the variant {describe(merged)} appears twice")
        seen[canon] = True
        key = str(meta.get("key") or f"{g}-{slug(own)}")
        label = str(meta.get("label") or f"{group.get('label') or g} {describe(own)}".strip())
        out.append({"key": key, "label": label, "own": own, "overrides": merged})
    return out


def _validate_variant(path: Path, where: str, config: Path, layout: Dict[str, Any], overrides: Dict[str, Any],
                      memo: Dict[Tuple[str, str], Tuple[Optional[str], Optional[str]]]) -> Optional[str]:
    """The overrides apply to the base training config together (the schema of configs/base.yaml, and the
    defense's constructor for ``defense.args.*``); when they do not, each is tried on its own so that the
    error names the bad key or value (overrides that only make sense together, such as ``query_k`` and its
    ``pool``, are never checked alone). A public pool file that does not exist yet is not an error of the
    sweep: its message is returned, and :class:`Frontier` raises it only when that variant is run."""
    from ..defenses.io import PublicPoolMissing
    from ..train.config import load_config
    from .runs import override_args, untrained_defense

    def error(ovs: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
        """-> (why the overrides are refused, why they cannot run yet: a missing pool file)"""
        mk = (str(config), json.dumps(ovs, default=str, sort_keys=True))
        if mk not in memo:
            try:
                untrained_defense(layout, load_config(config, override_args(ovs)))
                memo[mk] = (None, None)
            except PublicPoolMissing as e:
                memo[mk] = (None, str(e))
            except (KeyError, ValueError, TypeError) as e:
                memo[mk] = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e), None)
        return memo[mk]

    msg, missing = error(dict(overrides))
    if msg is None:
        return missing
    if len(overrides) > 1:
        for k, v in overrides.items():
            alone = error({k: v})[0]
            if alone is not None:
                _fail(path, f"{where}: bad override {f'{k}: {_show(v)}'!r} (on {config.name}): {alone}")
        _fail(path, f"{where}: bad override combination {describe(overrides)} (on {config.name}): {msg}")
    k, v = next(iter(overrides.items()))
    _fail(path, f"{where}: bad override {f'{k}: {_show(v)}'!r} (on {config.name}): {msg}")


def load_sweep(path: os.PathLike, budget: str) -> Dict[str, Any]:
    """Read a frontier config: the base benchmark (loaded for ``budget``) with the sweep's variants added to its
    defenses (each with its run name override), which of its own defenses are points, and where the outputs go.
    Bad keys, duplicate variants and overrides the training config or the defense refuses are errors that name
    them."""
    from ..train.config import load_config
    from ..utils import read_yaml_mapping
    from .config import check_defenses, load_benchmark
    path = Path(path)
    raw = read_yaml_mapping(path, "frontier config")
    bad = sorted(set(raw) - SWEEP_KEYS)
    if bad:
        _fail(path, f"unknown key(s) {bad}; known: {sorted(SWEEP_KEYS)}")
    base_path = path.parent / str(raw.get("benchmark") or "benchmark.yaml")
    bench = load_benchmark(base_path, budget)
    keys = [d["key"] for d in bench["defenses"]]
    pick = raw.get("defenses", "all")
    if pick in (None, "all"):
        chosen = list(bench["defenses"])
    elif pick == "none":
        chosen = []
    elif isinstance(pick, list):
        unknown = [k for k in pick if k not in keys]
        if unknown:
            _fail(path, f"defenses: unknown key(s) {unknown}; {base_path.name} has {', '.join(keys)}")
        chosen = [d for d in bench["defenses"] if d["key"] in pick]
    else:
        _fail(path, f"defenses must be 'all', 'none' or a list of {base_path.name}'s defense keys, got {pick!r}")
    groups = raw.get("sweep") or []
    if not isinstance(groups, list):
        _fail(path, "sweep must be a list of groups {key, label, config, grid | variants, overrides}")
    specs, group_info, memo, not_ready = [], [], {}, {}
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping) or not g.get("key") or not g.get("config"):
            _fail(path, f"sweep[{i}] needs a key and a config (a training config), got {g!r}")
        extra = sorted(set(g) - GROUP_KEYS)
        if extra:
            _fail(path, f"sweep group {g['key']!r} has unknown key(s) {extra}; known: {sorted(GROUP_KEYS)}")
        cfg_path = (path.parent / str(g["config"])).resolve()
        if not cfg_path.is_file():
            _fail(path, f"sweep group {g['key']!r}: training config not found: {cfg_path}")
        plain = load_config(cfg_path)
        method = str(plain.get("method") or "hybridmask").lower()
        if method not in bench["methods"]:
            _fail(path, f"sweep group {g['key']!r}: its config's method {method!r} has no entry in "
                        f"{base_path.name}'s methods ({', '.join(bench['methods'])})")
        layout = bench["methods"][method]
        from .runs import get_dotted
        base_name = str(get_dotted(plain, layout["name"]) or cfg_path.stem)
        variants = expand_group(path, g)
        for v in variants:
            if layout["name"] in v["overrides"]:
                _fail(path, f"sweep group {g['key']!r}: {layout['name']} is the variant's run name (derived from its "
                            f"overrides); do not override it")
            why = _validate_variant(path, f"sweep group {g['key']!r}, variant {v['label']!r}", cfg_path, layout,
                                    v["overrides"], memo)
            if why is not None:
                not_ready[v["key"]] = (f"{path}: variant {v['key']!r}: {why} (write the pool first, as the config's "
                                       f"comment on the variant says, or leave the variant out with --only)")
            run_name = variant_run_name(base_name, cfg_path.name, v["overrides"])
            ovs = [f"{k}={json.dumps(x, default=str)}" for k, x in v["overrides"].items()]
            specs.append({"key": v["key"], "label": v["label"],
                          "config": os.path.relpath(cfg_path, Path(bench["dir"]).resolve()),
                          "overrides": ovs + [f"{layout['name']}={json.dumps(run_name)}"],
                          "_sweep": {"group": str(g["key"]), "group_label": str(g.get("label") or g["key"]),
                                     "overrides": v["overrides"], "own": v["own"], "run_name": run_name}})
        group_info.append({"key": str(g["key"]), "label": str(g.get("label") or g["key"]),
                           "config": str(g["config"]), "variants": len(variants)})
    if not chosen and not specs:
        _fail(path, "nothing to plot: no benchmark defenses and no sweep variants")
    sweep_of = {s["key"]: s.pop("_sweep") for s in specs}
    bench["defenses"] = check_defenses(path, chosen + specs)
    outputs = raw.get("outputs") or {}
    out = outputs.get(budget) if isinstance(outputs, Mapping) else None
    if out is not None:
        if not isinstance(out, Mapping) or set(out) - OUTPUT_KEYS or not all(out.get(k) for k in OUTPUT_KEYS):
            _fail(path, f"outputs.{budget} must be {{markdown: <file>, figures_dir: <folder>}}, got {out!r}")
        out = {k: str(out[k]) for k in OUTPUT_KEYS}
    return {"path": str(path), "benchmark": bench, "base_path": str(base_path), "groups": group_info,
            "variants": sweep_of, "library": [d["key"] for d in chosen], "outputs": out, "not_ready": not_ready,
            "target": _read_target(path, raw.get("target"))}


def _read_target(path: Path, t: Any) -> Optional[Dict[str, float]]:
    """The config's ``target`` (fractions in [0, 1] for the keys of :data:`TARGET_KEYS`), or None."""
    if t is None:
        return None
    if not isinstance(t, Mapping) or not t or set(t) - set(TARGET_KEYS):
        _fail(path, f"target must map some of {sorted(TARGET_KEYS)} to fractions, got {t!r}")
    out = {}
    for k, v in t.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            _fail(path, f"target.{k} must be a fraction in [0, 1], got {v!r}")
        out[k] = float(v)
    return out


# ---- the sweep as a benchmark ---------------------------------------------------------------------------
def same_training(e) -> str:
    """A hash of what an entry trains: its config fingerprint (:func:`~hybridmask.benchmark.runs.fingerprint`)
    with the defense section written as the defense's full constructor config (defaults included), so that
    ``defense.args.drop: dc`` on a config whose defense drops DC by default is the same training."""
    import copy

    from .runs import config_hash, get_dotted, jsonable, set_dotted, untrained_defense
    fp = copy.deepcopy(e.fp)
    spec = e.layout["defense"]
    if isinstance(spec, str):
        try:
            canon = dict(untrained_defense(e.layout, e.config).config)
        except (KeyError, ValueError, TypeError):
            return e.hash
        sec = dict(get_dotted(fp, spec) or {})
        sec.update(name=canon.pop("name", sec.get("name")), args=canon)
        set_dotted(fp, spec, sec)
    return config_hash(jsonable(fp))


class Frontier(Benchmark):
    """The benchmark of the library's defenses and the sweep's variants, written as a frontier."""

    def __init__(self, sweep: Dict[str, Any], args: argparse.Namespace):
        self.sweep = sweep
        super().__init__(sweep["benchmark"], args)
        for e in self.entries:     # a variant whose public pool file is missing runs only once it exists
            if e.key in sweep.get("not_ready", {}):
                raise ValueError(sweep["not_ready"][e.key])
        out = Path(args.out_dir) if args.out_dir else None
        if out is not None:
            self.markdown, self.figures = out / "frontier.md", out / "frontier"
        elif sweep["outputs"]:
            self.markdown, self.figures = Path(sweep["outputs"]["markdown"]), Path(sweep["outputs"]["figures_dir"])
        else:
            raise ValueError(f"{sweep['path']}: no outputs.{self.b['budget']} section (where the table and the figure "
                             f"go); add one or pass --out-dir")
        # a variant that trains what another entry trains (e.g. the grid's default point = a benchmark defense,
        # its defaults spelled out) is the same configuration: one run, plotted once under the first entry
        self.aliases: Dict[str, str] = {}
        first: Dict[str, Any] = {}

        def once(entries, record: bool):
            kept = []
            for e in entries:
                ident = same_training(e)
                if ident not in first:
                    first[ident] = e
                    kept.append(e)
                elif record:
                    self.aliases[e.label] = first[ident].label
            return kept
        self.entries = once(self.entries, True)
        self.rest = once(self.rest, False)     # --only: the other points of the page, once each

    def print_plan(self) -> None:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            super().print_plan()
        sw = self.sweep
        keys = {e.key for e in self.entries}
        n_lib = sum(1 for k in sw["library"] if k in keys)
        n_var = sum(1 for k in sw["variants"] if k in keys)
        print(f"hybridmask frontier - sweep {sw['path']}: {n_lib} benchmark defense(s) of {sw['base_path']} + "
              f"{n_var} variant(s) in {len(sw['groups'])} group(s)")
        for g in sw["groups"]:
            print(f"  group {g['key']} ({g['config']}): {g['variants']} variant(s)")
        for dup, same in self.aliases.items():
            print(f"  {dup}: the same training as {same} (one run, one point)")
        for line in buf.getvalue().splitlines():
            if not line.startswith("writes: "):
                print(line)
        print(f"writes: {self.markdown}, {self.figures / FIGURE}, {self.figures / JSON_FILE}")

    def command(self) -> str:
        return super().command().replace("hybridmask benchmark", "hybridmask frontier", 1)

    def write(self, payload: Dict[str, Any]) -> None:
        from ..attacks.harness import write_json, write_markdown
        from .plot import frontier_plot
        points = frontier_points(payload, self.sweep)
        payload["sweep"] = {"config_file": self.sweep["path"], "benchmark_config": self.sweep["base_path"],
                            "groups": self.sweep["groups"], "aliases": self.aliases}
        payload["points"] = points
        payload["target"] = self.sweep.get("target")
        fig = self.figures / FIGURE
        payload["json"] = str(self.figures / JSON_FILE)
        if frontier_plot(points, fig, payload["benchmark"], payload.get("chance_rank1"), payload["target"]):
            payload["plot"] = str(fig)
        write_json(self.figures / JSON_FILE, payload)
        write_markdown(self.markdown, frontier_markdown(payload, self.markdown))
        self.log(f"wrote {self.markdown}, {self.figures / JSON_FILE} and {fig}")


# ---- points, table ---------------------------------------------------------------------------------------
def frontier_points(payload: Dict[str, Any], sweep: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One point per benchmark row: utility (LFW, CFP-FP), the headline (strongest query) attack with its rank-1
    and SSIM (with ``headline: strongest``, the query's own masked view when it re-identifies more: an adversary
    needs no attack to read an unprotected face), the strongest linkage attack, and whether the point is on the Pareto front (LFW / CFP-FP against
    rank-1). Sets ``payload["chance_rank1"]``."""
    from .report import (STRONGEST, headline, headline_label, mean, metric_value, strongest_linkage,
                         strongest_rank1)
    head = payload["attack_settings"]["headline"]
    points, chance = [], None
    for row in payload["defenses"]:
        v = sweep["variants"].get(row["key"])
        h = headline(row, head) or {}
        name = headline_label(row, head) if h else None
        best, where = strongest_rank1(row) if head == STRONGEST else (None, None)
        if where == "masked view" and (mean(h.get("rank1")) is None or best > mean(h.get("rank1"))):
            # the query itself, read as an image, beats every attack (unprotected pixels: it is the face);
            # on a tie the attack keeps the point
            h, name = row["attacks"]["masked_view"], MASKED_VIEW
        lk_name, lk = strongest_linkage(row)
        ch = (((row.get("attacks") or {}).get("baselines") or {}).get("chance") or {}).get("rank1")
        if chance is None and ch is not None:
            chance = float(ch)
        points.append({
            "key": row["key"], "label": row["label"], "kind": "variant" if v else "defense",
            "group": v["group"] if v else None, "group_label": v["group_label"] if v else None,
            "overrides": (v or {}).get("overrides") or {}, "config_file": row.get("config_file"),
            "run_dir": row.get("run_dir"), "status": row.get("status"), "defense": row.get("defense"),
            "note": row.get("note"),
            "lfw": metric_value(row, "verification.lfw.accuracy", head),
            "cfp_fp": metric_value(row, "verification.cfp_fp.accuracy", head),
            "attack": name,
            "rank1": mean(h.get("rank1")), "ssim": mean(h.get("ssim")),
            "linkage_attack": lk_name, "linkage_rank1": mean((lk or {}).get("rank1")),
            "linkage_tar": mean((lk or {}).get("tar@far=0.001")),
        })
    for axis in ("lfw", "cfp_fp"):
        on = set(pareto_front([(p[axis], p["rank1"]) for p in points]))
        for i, p in enumerate(points):
            p[f"front_{axis}"] = i in on if p[axis] is not None and p["rank1"] is not None else None
    payload["chance_rank1"] = chance
    return points


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}"


def _yes(v: Optional[bool]) -> str:
    return "-" if v is None else ("**yes**" if v else "no")


def frontier_markdown(payload: Dict[str, Any], md_path: Path) -> str:
    """The frontier page: how it was made, the figure, the table (one row per configuration), the front."""
    b, st, pts = payload["benchmark"], payload["attack_settings"], payload["points"]
    sw = payload.get("sweep") or {}
    head = st.get("headline")
    who = ("the strongest query-reconstruction attack (highest rank-1; the query itself read as an image when that "
           "re-identifies more, as for unprotected pixels)") if head == "strongest" else f"the {head} attack"
    chance = payload.get("chance_rank1")
    lines = [
        "# Privacy-utility frontier", "",
        f"*Generated by `{b.get('command', 'hybridmask frontier')}` ({b.get('budget')} budget, seed {b.get('seed')}, "
        f"git {(b.get('git') or {}).get('commit', '?')}, finished {b.get('finished', '?')}, "
        f"{(b.get('wall_seconds') or 0) / 60:.1f} min). Do not edit: rerun the command.*", "",
        f"One point per training configuration: the defenses of `{sw.get('benchmark_config', b.get('config_file'))}` "
        f"and the masking variants of `{sw.get('config_file', '?')}`, each trained, verified and attacked by the "
        f"benchmark's pipeline (same recognizer, budget, victims and attacks). **x**: LFW (left) / CFP-FP (right) "
        f"verification accuracy; **y**: rank-1 re-identification of the victims' test-time queries by {who}, "
        f"judged by SFace on {st.get('n_victims')} {st.get('victims')} victims (lower is better"
        + (f"; chance {_pct(chance)} %" if chance is not None else "") + "). "
        "The Pareto front (no other configuration has both higher-or-equal accuracy and lower-or-equal rank-1, "
        "one of them strictly) is the step line. The linkage attack (its own SFace matching of masked queries to "
        "clean photos) is the column beside it, not on the plot.", "",
    ]
    if payload.get("plot"):
        lines += [f"![privacy-utility frontier]({os.path.relpath(payload['plot'], md_path.parent)})", ""]
    lines += ["| configuration | overrides | LFW % | CFP-FP % | strongest query attack | rank-1 % | SSIM | "
              "strongest linkage rank-1 / TAR@FAR=1e-3 (%) | front (LFW) | front (CFP-FP) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        ov = ", ".join(f"`{k}: {_show(v)}`" for k, v in p["overrides"].items()) if p["overrides"] else \
            f"benchmark defense (`{Path(p['config_file'] or '?').name}`)"
        lk = "-" if p["linkage_rank1"] is None else \
            f"{_pct(p['linkage_rank1'])} / {_pct(p['linkage_tar'])} ({p.get('linkage_attack') or '?'})"
        ssim = "-" if p["ssim"] is None else f"{p['ssim']:.3f}"
        lines.append(f"| {p['label']}{' *' if p.get('note') else ''} | {ov} | {_pct(p['lfw'])} | {_pct(p['cfp_fp'])} | {p['attack'] or '-'} | "
                     f"{_pct(p['rank1'])} | {ssim} | {lk} | "
                     f"{_yes(p.get('front_lfw'))} | {_yes(p.get('front_cfp_fp'))} |")
    lines.append("")
    for p in pts:
        if p.get("note"):
            lines += [f"\\* {p['label']}: {' '.join(str(p['note']).split())}", ""]
    for axis, name in (("lfw", "LFW"), ("cfp_fp", "CFP-FP")):
        front = sorted((p for p in pts if p.get(f"front_{axis}")), key=lambda p: (p[axis], p["rank1"]))
        if front:
            lines.append(f"**Front ({name} against rank-1)**, from most private to most useful: "
                         + "; ".join(f"{p['label']} ({_pct(p[axis])} %, rank-1 {_pct(p['rank1'])} %, {p['attack']})"
                                     for p in front) + ".")
            lines.append("")
    if sw.get("aliases"):
        lines += ["Variants whose resolved training config equals another configuration's (one run, one point): "
                  + "; ".join(f"{a} = {b_}" for a, b_ in sw["aliases"].items()) + ".", ""]
    if payload.get("target"):
        lines += target_assessment(pts, payload["target"])
    if payload.get("not_measured"):
        lines += ["Not measured yet at this budget (`--measured` reports what is on disk and computes nothing): "
                  + "; ".join(f"{d['label']} (`{d['key']}`: {d['why']})" for d in payload["not_measured"]) + ".", ""]
    partial = [r for r in payload["defenses"] if (r.get("attacks") or {}).get("not_run")]
    if partial:
        lines += ["Attacks of this budget not run yet on some points (`--measured`; their columns are the strongest of "
                  "the attacks that ran): " + "; ".join(f"{r['label']}: {', '.join(r['attacks']['not_run'])}"
                                                        for r in partial) + ".", ""]
    missing = [p["label"] for p in pts if p["lfw"] is None or p["rank1"] is None]
    if missing:
        lines += [f"Not on the plot (no LFW accuracy or no query attack): {', '.join(missing)}.", ""]
    if payload.get("json"):
        rel = os.path.relpath(payload["json"], md_path.parent)
        lines += [f"Runs, configs, config hashes and every attack's scores: [`{rel}`]({rel}) (the benchmark's "
                  f"payload plus these points).", ""]
    return "\n".join(lines)


def _meets(p: Dict[str, Any], key: str, target: Dict[str, float]) -> Optional[bool]:
    """Whether point ``p`` meets ``target[key]`` (None: the point has no such value)."""
    v = p.get("linkage_rank1" if key == "linkage" else key)
    if v is None:
        return None
    return float(v) <= target[key] + 1e-12 if TARGET_KEYS[key] == "<=" else float(v) >= target[key] - 1e-12


def _point_text(p: Dict[str, Any]) -> str:
    lk = "" if p.get("linkage_rank1") is None else f", linkage {_pct(p['linkage_rank1'])} %"
    ssim = "" if p.get("ssim") is None else f", SSIM {p['ssim']:.3f}"
    return (f"{p['label']} (LFW {_pct(p.get('lfw'))} %, CFP-FP {_pct(p.get('cfp_fp'))} %, rank-1 {_pct(p.get('rank1'))} % "
            f"by {p.get('attack') or '-'}{ssim}{lk})")


def target_assessment(points: List[Dict[str, Any]], target: Dict[str, float]) -> List[str]:
    """What is and is not achieved, computed from the points: which meet the privacy half (rank-1, SSIM), the
    utility half (LFW, CFP-FP), both, and linkage too; the most private point that keeps the utility half and the
    most useful one that keeps the privacy half; each adaptive-policy point against the fixed configurations
    at equal or higher accuracy."""
    names = {"rank1": "query rank-1", "ssim": "SSIM", "lfw": "LFW", "cfp_fp": "CFP-FP", "linkage": "linkage rank-1"}
    spec = "; ".join(f"{names[k]} {TARGET_KEYS[k]} {100 * v:g} %" if k != "ssim" else f"SSIM {TARGET_KEYS[k]} {v:g}"
                     for k, v in target.items())
    priv = [k for k in ("rank1", "ssim") if k in target]
    util = [k for k in ("lfw", "cfp_fp") if k in target]
    pts = [p for p in points if p.get("rank1") is not None]

    def ok(p, keys):
        return all(_meets(p, k, target) for k in keys)
    both = [p for p in pts if ok(p, priv + util)]
    lines = ["## What is and is not achieved", "",
             f"Target (the config's `target`): {spec}. Computed from the table above on every run; nothing here is "
             f"written by hand.", ""]
    if both:
        lines.append("- **Met** (privacy and utility) by: " + "; ".join(_point_text(p) for p in both) + ".")
        if "linkage" in target:
            full = [p for p in both if _meets(p, "linkage", target)]
            lines.append("- With linkage too: " + ("; ".join(_point_text(p) for p in full) if full else
                                                    "**none** (what the server links, an attacker with its recipe links)")
                         + ".")
    else:
        lines.append(f"- **Not met by any of the {len(pts)} measured configurations.**")
    useful = sorted((p for p in pts if util and ok(p, util)), key=lambda p: (p["rank1"], -(p.get("lfw") or 0)))
    private = sorted((p for p in pts if priv and ok(p, priv)), key=lambda p: (-(p.get("lfw") or 0), p["rank1"]))
    if util:
        lines.append("- Most private configuration that keeps the utility half: "
                     + (_point_text(useful[0]) if useful else "none keeps it") + ".")
    if priv:
        lines.append("- Most useful configuration that keeps the privacy half: "
                     + (_point_text(private[0]) if private else "none keeps it") + ".")
    for p in (q for q in pts if q.get("defense") == "adaptive" and q.get("lfw") is not None):
        fixed = [q for q in pts if q.get("defense") != "adaptive" and q.get("lfw") is not None
                 and q["lfw"] >= p["lfw"] and q["rank1"] <= p["rank1"] and (q["lfw"], q["rank1"]) != (p["lfw"], p["rank1"])]
        if fixed:
            best = min(fixed, key=lambda q: (q["rank1"], -q["lfw"]))
            lines.append(f"- Adaptive policy **below the front of the fixed configurations**: {_point_text(p)} is "
                         f"dominated by {_point_text(best)}" + (f" and {len(fixed) - 1} other(s)" if len(fixed) > 1 else "")
                         + ".")
        else:
            lines.append(f"- Adaptive policy on or above the fixed configurations' front (LFW): {_point_text(p)}.")
    lines.append("")
    return lines


# ---- command line -----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_arguments as bench_arguments
    bench_arguments(p, config="configs/frontier.yaml",
                    config_help="frontier config: the base benchmark config and the sweep of masking variants")


def run(args: argparse.Namespace) -> int:
    from .cli import execute
    t = time.time()
    fr = execute(lambda: Frontier(load_sweep(args.config, args.budget), args), args)
    if fr is not None:
        fr.log(f"frontier done in {(time.time() - t) / 60:.1f} min")
    return 0


__all__ = ["pareto_front", "load_sweep", "expand_group", "variant_run_name", "slug", "Frontier", "frontier_points",
           "frontier_markdown", "target_assessment", "TARGET_KEYS", "add_arguments", "run", "FIGURE", "JSON_FILE"]
