"""Run folders of the benchmark: which training config a defense runs, its fingerprint, where its run
goes and whether a finished run can be reused.

A finished run is a folder whose ``results.json`` records the training ``config`` and which holds the
file :func:`hybridmask.defenses.io.load_defense` rebuilds its defense from (``defense.pt``,
``model.pt`` or ``ckpt/last.pt``) and every file its results name under ``paths``. Nothing here knows
a defense or a training method by name: where a method's config keeps its seed, run name and folder
is the benchmark config's ``methods:`` table.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

#: result paths that are folders or secrets, not the run's deliverables
_NOT_REQUIRED = {"dir", "checkpoint", "tensorboard", "policy_card"}


# ---- plain-data helpers ---------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings are kept as values)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def get_dotted(d: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = d
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def set_dotted(d: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def fingerprint(cfg: Dict[str, Any], volatile: List[str]) -> Dict[str, Any]:
    """The config a run's numbers depend on: JSON-normalised, ``_source_``, ``volatile`` keys and schema keys at
    their neutral value (:data:`hybridmask.train.config.NEUTRAL_DEFAULTS`) removed."""
    from ..train.config import without_neutral
    plain = without_neutral(jsonable({k: v for k, v in cfg.items() if k != "_source_"}))
    for dotted in volatile:
        parts = dotted.split(".")
        node = get_dotted(plain, ".".join(parts[:-1])) if len(parts) > 1 else plain
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return plain


def config_hash(fp: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def config_diff(want: Dict[str, Any], have: Dict[str, Any], limit: int = 4) -> str:
    a, b = flatten(want), flatten(have)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    parts = [f"{k}: {b.get(k, '<absent>')!r} -> {a.get(k, '<absent>')!r}" for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(parts) + more


def override_args(values: Dict[str, Any]) -> List[str]:
    """``{"train.steps": 4}`` -> ``["train.steps=4"]`` (JSON is valid YAML, so types survive)."""
    return [f"{k}={json.dumps(v)}" for k, v in (values or {}).items()]


# ---- one defense of the benchmark --------------------------------------------------------------------------
@dataclass
class Entry:
    key: str
    label: str
    config_path: str
    method: str                       # the training config's method (dispatched by run_training)
    layout: Dict[str, Any]            # the benchmark config's methods.<method>
    input_kind: str                   # what the defense releases (its capability)
    defense_name: str
    role: Optional[str]
    overrides: List[str]
    config: Dict[str, Any]            # resolved training config
    note: str = ""                    # the benchmark config's note for the report
    literature: Optional[Dict[str, Any]] = None
    fp: Dict[str, Any] = field(default_factory=dict)
    hash: str = ""
    run_dir: Path = Path(".")
    status: str = "train"             # reuse | train | resume | wait (then trained | resumed)
    detail: str = ""                  # why this folder / what is there
    results: Optional[Dict[str, Any]] = None


def untrained_defense(layout: Dict[str, Any], cfg: Dict[str, Any]):
    """The defense a training config describes, untrained, for its capabilities (input kind, stochastic); a
    defense that takes the trainer's policy gets the (untrained) policy of the config's ``policy:`` section."""
    from ..defenses import DEFENSES, create_defense
    from ..defenses.io import split_config
    from ..train.run import build_policy
    spec = layout["defense"]
    dcfg = dict(spec) if isinstance(spec, dict) else dict(get_dotted(cfg, spec) or {"name": "none"})
    name, args = split_config(dcfg, "training config defense section")
    if name in DEFENSES and getattr(DEFENSES.get(name), "takes_policy", False) and isinstance(cfg.get("policy"), dict):
        policy = build_policy(cfg["policy"], seed=0)
        if policy is not None:
            args["policy"] = policy
    return create_defense(name, **args)


def _applies(dotted: str, cfg: Dict[str, Any]) -> bool:
    parent = dotted.split("=", 1)[0].rsplit(".", 1)
    return len(parent) == 1 or isinstance(get_dotted(cfg, parent[0]), dict)


def resolve_entry(spec: Dict[str, Any], bench: Dict[str, Any], seed: int, data: Optional[str],
                  extra: List[str]) -> Entry:
    """The training config a benchmark defense runs: file + seed + budget overrides (by training method, then
    by input kind) + the defense's own overrides + ``--data`` + ``--override`` (``[GROUP:]KEY=VALUE``;
    ungrouped ones go to every config that has the key's section)."""
    from ..train.config import load_config
    path = Path(bench["dir"]) / spec["config"]
    if not path.is_file():
        raise FileNotFoundError(f"training config of defense {spec['key']!r} not found: {path}")
    plain = load_config(path)
    method = str(plain.get("method") or "hybridmask").lower()
    if method not in bench["methods"]:
        raise ValueError(f"defense {spec['key']!r}: its config's method {method!r} has no entry in the benchmark "
                         f"config's methods ({', '.join(bench['methods'])})")
    layout = bench["methods"][method]
    defense = untrained_defense(layout, plain)
    groups = (method, defense.input_kind)
    ovs = [f"{layout['seed']}={seed}"]
    for g in groups:
        ovs += override_args(bench["overrides"].get(g) or {})
    ovs += [str(x) for x in (spec.get("overrides") or [])]
    if data:
        ovs += [f"{k}={json.dumps(str(Path(data) / sub) if sub else str(data))}" for k, sub in layout["data"].items()]
    for o in extra:
        group, _, kv = o.partition(":") if ":" in o.split("=", 1)[0] else ("", "", o)
        if (group and group in groups) or (not group and _applies(kv, plain)):
            ovs.append(kv)
    cfg = load_config(path, ovs)
    cfg.pop("_source_", None)
    name = str(get_dotted(cfg, layout["name"]) or path.stem)
    fp = fingerprint(cfg, volatile_keys(layout))
    e = Entry(key=str(spec["key"]), label=str(spec.get("label") or spec["key"]), config_path=str(path),
              method=method, layout=layout, input_kind=defense.input_kind, defense_name=defense.name,
              role=spec.get("role"), overrides=ovs, config=cfg, note=str(spec.get("note") or ""),
              literature=spec.get("literature"), fp=fp, hash=config_hash(fp))
    e.run_dir = Path(bench["runs_dir"]) / name
    return e


def volatile_keys(layout: Dict[str, Any]) -> List[str]:
    """Keys that do not change what a run computes: where it is written, how it reports."""
    keys = [layout["name"], layout["progress"], layout.get("out_dir") or layout["run_dir"]]
    return keys + list(layout.get("volatile") or [])


# ---- run folders ------------------------------------------------------------------------------------------
def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for sub in (folder, folder / "ckpt", folder / "tb"):
        if sub.is_dir():
            for p in sub.iterdir():
                try:
                    newest = max(newest, p.stat().st_mtime)
                except OSError:
                    pass
    return newest


def recorded_config(folder: Path) -> Tuple[Optional[Dict[str, Any]], bool, str]:
    """(config the folder's run recorded, finished?, why not finished): ``results.json`` when the run
    finished, its ``config.yaml`` while it trains."""
    from ..defenses.io import RUN_FILES
    res = folder / "results.json"
    if res.is_file():
        try:
            r = json.loads(res.read_text())
        except (ValueError, OSError) as e:
            return None, False, f"unreadable results.json ({e})"
        cfg = r.get("config") if isinstance(r, dict) else None
        if not isinstance(cfg, dict):
            from .gaps import arl_run_outputs
            cfg = (arl_run_outputs(folder) or {}).get("config")
        if not isinstance(cfg, dict):
            return None, False, "results.json records no config"
        paths = r.get("paths") or {}     # recorded relative to the trainer's working directory: look in the folder
        missing = sorted(k for k, p in paths.items() if k not in _NOT_REQUIRED and isinstance(p, str)
                         and not (folder / Path(p).name).exists())
        if not any((folder / n).is_file() for n in RUN_FILES):
            missing.append(" or ".join(RUN_FILES))
        return cfg, not missing, f"missing {', '.join(missing)}" if missing else ""
    cy = folder / "config.yaml"
    if cy.is_file():
        import yaml
        try:
            cfg = yaml.safe_load(cy.read_text())
        except yaml.YAMLError:
            cfg = None
        return (cfg if isinstance(cfg, dict) else None), False, "not finished"
    return None, False, "no config recorded"


def inspect_folder(folder: Path, e: Entry, busy_seconds: float) -> Tuple[str, str]:
    """-> (state, detail): missing | finished | partial | busy | other (another or an unknown config)."""
    if not folder.exists():
        return "missing", ""
    if not folder.is_dir():
        return "other", "not a folder"
    cfg, finished, why = recorded_config(folder)
    if cfg is None:
        return "other", why
    have = fingerprint(cfg, volatile_keys(e.layout))
    if have != e.fp:
        return "other", config_diff(e.fp, have)
    if finished:
        return "finished", ""
    if why != "not finished":
        return "other", why          # same config but broken (e.g. model.pt gone): never overwrite it
    age = time.time() - _newest_mtime(folder)
    return ("busy" if age < busy_seconds else "partial"), f"last written {age:.0f} s ago"


def point_config_at(e: Entry, folder: Path) -> None:
    """Write the run folder into the training config (by the method's layout)."""
    e.run_dir = folder
    set_dotted(e.config, e.layout["name"], folder.name)
    if e.layout.get("out_dir"):
        set_dotted(e.config, e.layout["out_dir"], str(folder.parent))
    else:
        set_dotted(e.config, e.layout["run_dir"], str(folder))


def place_run(e: Entry, busy_seconds: float) -> None:
    """Choose the run folder and what to do there (sets ``run_dir``, ``status``, ``detail``)."""
    base = e.run_dir
    alt = base.parent / f"{base.name}-{e.hash[:8]}"
    state, detail = inspect_folder(base, e, busy_seconds)
    note = ""
    if state == "other":
        note = f"{base} holds another config ({detail})"
        state, detail = inspect_folder(alt, e, busy_seconds)
        if state == "other":
            raise ValueError(f"defense {e.key!r}: neither {base} nor {alt} can take this run ({detail}); "
                             f"move one of them away")
        base = alt
    point_config_at(e, base)
    e.status = {"missing": "train", "finished": "reuse", "partial": "resume", "busy": "wait"}[state]
    e.detail = "; ".join(x for x in (note, detail) if x)


def wait_for(e: Entry, busy_seconds: float, poll_seconds: float, log: Callable[[str], None]) -> None:
    """Wait for a folder another process is writing (same config): reuse it when it finishes, resume it
    when it goes quiet; a change to another config is an error."""
    log(f"{e.label}: {e.run_dir} is being written by another process (same config); waiting")
    while True:
        time.sleep(poll_seconds)
        state, detail = inspect_folder(e.run_dir, e, busy_seconds)
        if state == "finished":
            e.status = "reuse"
            return
        if state == "partial":
            log(f"{e.label}: {e.run_dir} went quiet ({detail}); resuming it here")
            e.status = "resume"
            return
        if state != "busy":
            raise ValueError(f"{e.run_dir} changed to another config while waiting ({detail})")


def training_config(e: Entry, progress: bool) -> Dict[str, Any]:
    cfg = copy.deepcopy(e.config)
    set_dotted(cfg, e.layout["progress"], bool(progress))
    return cfg


__all__ = ["Entry", "resolve_entry", "place_run", "inspect_folder", "recorded_config", "wait_for", "fingerprint",
           "config_hash", "config_diff", "flatten", "get_dotted", "jsonable", "training_config"]
