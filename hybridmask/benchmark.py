"""``hybridmask benchmark``: the privacy-utility benchmark of every defense, under one protocol.

    hybridmask benchmark --config configs/benchmark.yaml --budget small --dry-run   # the plan only
    hybridmask benchmark --config configs/benchmark.yaml --budget small             # docs/results.md

For each defense of the benchmark config (one training config each) it

1. **trains** the recognizer with :func:`hybridmask.train.run_training` (``method: arl`` configs with
   :func:`hybridmask.defenses.arl.train_arl`) - or **reuses** a finished run: ``<runs_dir>/<run.name>/``
   is reused when its ``results.json`` (ARL: its ``arl.pt``) records the very config the benchmark would
   train, volatile keys (:data:`VOLATILE`) aside. A folder holding another config is never written to;
   the run then goes to ``<run.name>-<config hash>/``. A folder being written by another process
   (same config, no results yet, changed within ``--busy-seconds``) is waited for;
2. reads its **LFW and CFP-FP verification** from the run's ``results.json`` (ARL: computed here with
   the utility network's embeddings, cached);
3. runs the **attack harness** (:func:`hybridmask.attacks.harness.evaluate_defense`) against the
   trained defense - white-box and black-box ``cgan`` reconstruction, multi-encoding ``demix`` (for
   randomised releases) and ``embedding_inversion`` of the run's own recognizer - on LFW victims no
   model saw, with CelebA identities as the attacker's public faces, judged by SFace (results cached
   per run and attack settings in ``work_dir``);
4. writes the Markdown report (one table, the target checks, the literature comparison, an appendix
   with every config), ``results.json`` (resolved configs, seeds, timings), a privacy-utility scatter
   and one reconstruction grid per defense, all atomically.

``--budget`` picks a section of the benchmark config (``tiny`` smoke run, ``small`` CPU, ``full`` GPU):
where runs and outputs go, training overrides (for all runs, frequency or pixel defenses, ARL),
attack sizes, and the speed figures of the ``--dry-run`` estimate.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

BUDGETS = ("tiny", "small", "full")
ATTACKS = ("cgan_whitebox", "cgan_blackbox", "demix", "embedding_inversion")
#: attack name -> (registered attack, fixed parameters); cgan_* share the ``cgan`` parameter entry
ATTACK_SPECS = {"cgan_whitebox": ("cgan", {"mode": "whitebox"}), "cgan_blackbox": ("cgan", {"mode": "blackbox"}),
                "demix": ("demix", {"mode": "whitebox"}), "embedding_inversion": ("embedding_inversion", {"mode": "whitebox"})}
#: the harness fits attacks in this order (demix decodes with the last fitted cgan: the white-box one)
FIT_ORDER = ("cgan_blackbox", "cgan_whitebox", "demix", "embedding_inversion")
HEADLINE = "cgan_whitebox"
#: defenses whose release is a deterministic function of the face (T releases = one; demix is moot)
DETERMINISTIC = ("none", "freq_only", "arl")
#: config keys that do not change what a run computes (where it is written, how it reports)
VOLATILE = {
    "hybridmask": ("run.name", "run.out_dir", "run.resume", "run.progress", "run.threads", "run.device",
                   "data.num_workers", "data.cache", "train.log_every", "train.ckpt_every", "eval.batch_size"),
    "arl": ("output_dir", "progress", "threads", "device", "train.resume"),
}
TOP_KEYS = {"seed", "data_root", "defenses", "attacks", "budgets"}
BUDGET_KEYS = {"runs_dir", "work_dir", "markdown", "figures_dir", "overrides", "arl_eval", "attacks", "estimate"}
ATTACK_KEYS = {"victims", "n_victims", "n_distractors", "n_public", "defense_seed", "device", "run", "params"}
OVERRIDE_GROUPS = ("all", "freq", "pixel", "arl")
LITERATURE_SSIM = {"ppfrfd": ("PPFR-FD", 0.70), "dctdp": ("DCTDP", 0.66)}
CACHE_VERSION = 1


def _log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)


# ---- plain-data helpers ---------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
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


def fingerprint(cfg: Dict[str, Any], method: str) -> Dict[str, Any]:
    """The config a run's numbers depend on: JSON-normalised, ``_source_`` and :data:`VOLATILE` keys removed."""
    plain = _jsonable({k: v for k, v in cfg.items() if k != "_source_"})
    for dotted in VOLATILE[method]:
        node = plain
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
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


def _override_args(values: Dict[str, Any]) -> List[str]:
    """``{"train.steps": 4}`` -> ``["train.steps=4"]`` (JSON is valid YAML, so types survive)."""
    return [f"{k}={json.dumps(v)}" for k, v in (values or {}).items()]


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# ---- the benchmark config ---------------------------------------------------------------------------------
def load_benchmark(path: os.PathLike, budget: str) -> Dict[str, Any]:
    """Read the benchmark config and fold the ``budget`` section in; clear errors for unknown keys."""
    from .utils import read_yaml_mapping
    path = Path(path)
    raw = read_yaml_mapping(path, "benchmark config")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    if budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    budgets = raw.get("budgets") or {}
    if budget not in budgets:
        raise ValueError(f"{path} has no budgets.{budget} section (it has: {', '.join(budgets) or 'none'})")
    b = dict(budgets[budget] or {})
    unknown = sorted(set(b) - BUDGET_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} in budgets.{budget}; known: {sorted(BUDGET_KEYS)}")
    for k in ("runs_dir", "work_dir", "markdown", "figures_dir"):
        if not b.get(k):
            raise ValueError(f"{path}: budgets.{budget}.{k} is required")
    ov = dict(b.get("overrides") or {})
    bad = sorted(set(ov) - set(OVERRIDE_GROUPS))
    if bad:
        raise ValueError(f"{path}: budgets.{budget}.overrides takes {', '.join(OVERRIDE_GROUPS)}, got {bad}")
    attacks = _merge(raw.get("attacks") or {}, b.get("attacks") or {})
    unknown = sorted(set(attacks) - ATTACK_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown attack setting(s) {unknown}; known: {sorted(ATTACK_KEYS)}")
    run_list = list(attacks.get("run") or [])
    bad = [a for a in run_list if a not in ATTACKS]
    if bad:
        raise ValueError(f"{path}: unknown attack(s) {bad} in attacks.run; available: {', '.join(ATTACKS)}")
    defenses = raw.get("defenses") or []
    if not isinstance(defenses, list) or not defenses:
        raise ValueError(f"{path}: 'defenses' must be a non-empty list of {{key, label, config}}")
    seen = set()
    for d in defenses:
        if not isinstance(d, dict) or not {"key", "config"} <= set(d):
            raise ValueError(f"{path}: every defense needs a key and a config, got {d!r}")
        extra = sorted(set(d) - {"key", "label", "config", "role", "overrides"})
        if extra:
            raise ValueError(f"{path}: defense {d['key']!r} has unknown key(s) {extra}")
        if d["key"] in seen:
            raise ValueError(f"{path}: defense key {d['key']!r} appears twice")
        seen.add(d["key"])
    return {"path": str(path), "dir": str(path.parent), "budget": budget, "seed": int(raw.get("seed") or 0),
            "data_root": raw.get("data_root"), "defenses": defenses, "attacks": attacks,
            "runs_dir": str(b["runs_dir"]), "work_dir": str(b["work_dir"]), "markdown": str(b["markdown"]),
            "figures_dir": str(b["figures_dir"]), "overrides": {g: dict(ov.get(g) or {}) for g in OVERRIDE_GROUPS},
            "arl_eval": dict(b.get("arl_eval") or {}), "estimate": b.get("estimate")}


# ---- one defense of the benchmark --------------------------------------------------------------------------
@dataclass
class Entry:
    key: str
    label: str
    config_path: str
    method: str                       # hybridmask | arl
    kind: str                         # freq | pixel | feature (ARL)
    defense_name: str
    role: Optional[str]
    overrides: List[str]
    config: Dict[str, Any]            # resolved training config (ARL: merged with its defaults)
    fp: Dict[str, Any] = field(default_factory=dict)
    hash: str = ""
    run_dir: Path = Path(".")
    status: str = "train"             # reuse | train | resume | wait
    note: str = ""
    results: Optional[Dict[str, Any]] = None


def _input_kind(defense_name: str) -> str:
    from .defenses import DEFENSES
    return getattr(DEFENSES.get(defense_name), "input_kind", "pixel")


def resolve_entry(spec: Dict[str, Any], bench: Dict[str, Any], seed: int, data: Optional[str],
                  extra: List[str]) -> Entry:
    """The training config a benchmark defense runs: file + seed + budget overrides (+ ``--data``, ``--override``)."""
    from .train.config import load_config
    path = Path(bench["dir"]) / spec["config"]
    if not path.is_file():
        raise FileNotFoundError(f"training config of defense {spec['key']!r} not found: {path}")
    own = [str(x) for x in (spec.get("overrides") or [])]
    plain = load_config(path)
    method = str(plain.get("method") or "hybridmask").lower()
    ov = bench["overrides"]
    if method == "arl":
        from .defenses.arl import merge_config
        ovs = [f"seed={seed}"] + _override_args(ov["arl"]) + own
        if data:
            ovs.append(f"data.root={json.dumps(str(data))}")
        cfg = merge_config({k: v for k, v in load_config(path, ovs).items() if k != "_source_"})
        name, kind, dname = str(cfg["name"]), "feature", "arl"
    else:
        dname = str((plain.get("defense") or {}).get("name") or "none").lower()
        kind = _input_kind(dname)
        ovs = [f"run.seed={seed}"] + _override_args(ov["all"]) + _override_args(ov["freq" if kind == "freq" else "pixel"])
        if data:
            ovs += [f"data.train={json.dumps(str(Path(data) / 'celeba_112'))}", f"eval.data_root={json.dumps(str(data))}"]
        ovs += own + list(extra)
        cfg = load_config(path, ovs)
        cfg.pop("_source_", None)
        name = str(cfg["run"].get("name") or path.stem)
    fp = fingerprint(cfg, method)
    e = Entry(key=str(spec["key"]), label=str(spec.get("label") or spec["key"]), config_path=str(path), method=method,
              kind=kind, defense_name=dname, role=spec.get("role"), overrides=ovs, config=cfg, fp=fp,
              hash=config_hash(fp))
    e.run_dir = Path(bench["runs_dir"]) / name
    return e


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


def _recorded_config(folder: Path, method: str) -> Tuple[Optional[Dict[str, Any]], bool, str]:
    """(config the folder's run recorded, finished?, why not finished)."""
    from .utils import safe_torch_load
    res = folder / "results.json"
    if method == "arl":
        ck = folder / "arl.pt"
        if not ck.is_file():
            return None, False, "no arl.pt"
        try:
            blob = safe_torch_load(ck)
        except (ValueError, OSError, RuntimeError) as e:
            return None, False, f"unreadable arl.pt ({e})"
        cfg = blob.get("config") if isinstance(blob, dict) else None
        if not isinstance(cfg, dict):
            return None, False, "arl.pt records no config"
        total = int(cfg.get("train", {}).get("warmup_epochs", 0)) + int(cfg.get("train", {}).get("epochs", 0))
        done = res.is_file() and int(blob.get("epoch", -1)) >= total
        return cfg, done, "" if done else "not finished"
    if res.is_file():
        try:
            r = json.loads(res.read_text())
        except (ValueError, OSError) as e:
            return None, False, f"unreadable results.json ({e})"
        cfg = r.get("config") if isinstance(r, dict) else None
        if not isinstance(cfg, dict):
            return None, False, "results.json records no config"
        paths = r.get("paths") or {}     # recorded relative to the trainer's working directory: look in the folder
        missing = [k for k in ("model", "policy") if (k == "model" or paths.get(k))
                   and not (folder / Path(paths.get(k) or "model.pt").name).is_file()]
        return cfg, not missing, f"missing {', '.join(sorted(set(missing)))}" if missing else ""
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
    cfg, finished, why = _recorded_config(folder, e.method)
    if cfg is None:
        return "other", why
    have = fingerprint(cfg, e.method)
    if have != e.fp:
        return "other", config_diff(e.fp, have)
    if finished:
        return "finished", ""
    if why != "not finished":
        return "other", why          # same config but broken (e.g. model.pt gone): never overwrite it
    age = time.time() - _newest_mtime(folder)
    return ("busy" if age < busy_seconds else "partial"), f"last written {age:.0f} s ago"


def place_run(e: Entry, busy_seconds: float) -> None:
    """Choose the run folder and what to do there (sets ``run_dir``, ``status``, ``note``)."""
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
    e.run_dir = base
    e.status = {"missing": "train", "finished": "reuse", "partial": "resume", "busy": "wait"}[state]
    e.note = "; ".join(x for x in (note, detail) if x)
    if e.method == "arl":
        e.config["output_dir"] = str(base)
    else:
        e.config["run"]["name"] = base.name
        e.config["run"]["out_dir"] = str(base.parent)


# ---- estimate ----------------------------------------------------------------------------------------------
VERIFY_IMAGES = {"lfw": 7701, "cfp_fp": 5901, "cfp_ff": 5000}


def measured_speeds(runs_dir: Path) -> Dict[Tuple, List[float]]:
    """(model, stem, grid) -> [images/s] of the finished hybridmask runs under ``runs_dir`` (for the estimate);
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
    if e.kind != "freq":
        return 112
    u = int((e.config.get("defense", {}).get("args") or {}).get("u", 1))
    return 112 * u // 8


def estimate_training(e: Entry, est: Dict[str, Any], speeds: Dict[Tuple, List[float]]) -> Tuple[float, str]:
    if e.method == "arl":
        return float(est.get("arl_seconds") or 0), "budget estimate"
    steps = e.config["train"].get("steps")
    if steps is None:
        return float("nan"), "train.epochs given (no step count)"
    imgs = int(steps) * int(e.config["data"]["batch_size"])
    stem = "pixel" if e.kind == "pixel" else "freq"
    meas = speeds.get((e.config["model"]["name"], stem, _grid_of(e)))
    ips = statistics.median(meas) if meas else float(est["train_images_per_second"][stem])
    src = f"{ips:.0f} img/s {'measured by finished runs' if meas else 'assumed'}"
    ev = e.config.get("eval") or {}
    n_eval = 0
    if ev.get("final", True):
        for t in ev.get("targets") or []:
            n_eval += (4 * int(ev["final_pairs"])) if ev.get("final_pairs") else VERIFY_IMAGES.get(str(t), 5000)
    emeas = speeds.get(("eval", stem))
    eips = statistics.median(emeas) if emeas else float(est["eval_images_per_second"][stem])
    return imgs / ips + n_eval / eips, src


def _fmt_minutes(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


# ---- victims' defense and recognizer of a run ------------------------------------------------------------------
class ARLEmbedding(torch.nn.Module):
    """Identity embeddings of an ARL model from its release z (its utility network without the head)."""

    def __init__(self, utility: torch.nn.Module):
        super().__init__()
        self.utility = utility.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        e = self.utility.embed(z)
        return e.flatten(1) if e.dim() > 2 else e


class OnDevice(torch.nn.Module):
    """Runs ``model`` on ``device`` for inputs and outputs that live on the CPU (the defenses run there)."""

    def __init__(self, model: torch.nn.Module, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.model = model.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).cpu()


def mean_k(results: Dict[str, Any]) -> Optional[int]:
    kh = (results.get("train") or {}).get("k_hist") or {}
    tot = sum(float(v) for v in kh.values())
    if not kh or tot <= 0:
        return None
    return max(1, int(round(sum(int(k) * float(v) for k, v in kh.items()) / tot)))


def victim_defense(e: Entry, defense_seed: Optional[int]):
    """(defense with the run's trained state, its recognizer, the defense arguments used)."""
    from .defenses import create_defense
    if e.method == "arl":
        from .defenses.arl import load_arl
        ckpt = str(e.run_dir / "arl.pt")
        net, _ = load_arl(ckpt)
        return create_defense("arl", checkpoint=ckpt), ARLEmbedding(net.utility).eval(), {"checkpoint": ckpt}
    from .models import load_model
    dcfg = e.config.get("defense") or {}
    args = dict(dcfg.get("args") or {})
    if e.defense_name == "dctdp":
        args["state_path"] = str(e.run_dir / "model.pt")      # the trained budgets
    if e.defense_name == "adaptive":
        pol = e.run_dir / "policy.pt"
        if pol.is_file():
            args["policy_path"] = str(pol)
            args.pop("k_values", None)
        if defense_seed is not None:
            args["policy_seed"] = int(defense_seed) + 1
    defense = create_defense(e.defense_name, seed=defense_seed, **args)
    model, _, _ = load_model(e.run_dir / "model.pt")
    return defense, model.eval(), {k: v for k, v in args.items() if k != "policy_seed"}


def applicable_attacks(e: Entry, wanted: Iterable[str]) -> Tuple[List[str], Dict[str, str]]:
    run, skipped = [], {}
    for a in wanted:
        if a == "demix" and e.defense_name in DETERMINISTIC:
            skipped[a] = "deterministic release: T encodings equal one"
            continue
        run.append(a)
    return run, skipped


def _resolve_device(spec: str) -> str:
    spec = str(spec or "cpu")
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


# ---- the benchmark -------------------------------------------------------------------------------------------
class Benchmark:
    poll_seconds = 30.0      # how often a folder another process is writing is looked at again

    def __init__(self, bench: Dict[str, Any], args: argparse.Namespace):
        self.b = bench
        self.args = args
        self.t0 = time.time()
        self.seed = int(args.seed if args.seed is not None else bench["seed"])
        out = Path(args.out_dir) if args.out_dir else None
        self.runs_dir = out / "runs" if out else Path(bench["runs_dir"])
        self.b["runs_dir"] = str(self.runs_dir)
        self.work_dir = out / "work" if out else Path(bench["work_dir"])
        self.markdown = out / "results.md" if out else Path(bench["markdown"])
        self.figures = out / "results" if out else Path(bench["figures_dir"])
        self.data_root = Path(args.data or bench["data_root"] or "../shared/data/faces")
        at = bench["attacks"]
        self.attack_cfg = at
        self.defense_seed = args.defense_seed if args.defense_seed is not None else at.get("defense_seed")
        self.progress = not args.quiet
        self.timings: Dict[str, float] = {}
        self._data = None
        self._embedder = None
        only = [x.strip() for x in (args.only or "").split(",") if x.strip()]
        keys = [d["key"] for d in bench["defenses"]]
        bad = [k for k in only if k not in keys]
        if bad:
            raise ValueError(f"--only: unknown defense key(s) {bad}; the benchmark has {', '.join(keys)}")
        self.entries = [resolve_entry(d, bench, self.seed, args.data, list(args.override or []))
                        for d in bench["defenses"] if not only or d["key"] in only]
        for e in self.entries:
            place_run(e, args.busy_seconds)

    # -- plan ----------------------------------------------------------------------------------------
    def attack_settings(self) -> Dict[str, Any]:
        at = self.attack_cfg
        return {"victims": at.get("victims", "lfw"), "n_victims": int(at.get("n_victims", 32)),
                "n_distractors": int(at.get("n_distractors", 64)), "n_public": int(at.get("n_public", 1500)),
                "run": list(at.get("run") or ATTACKS), "params": _jsonable(at.get("params") or {}),
                "defense_seed": self.defense_seed, "seed": self.seed, "judge": "sface",
                "data_root": str(self.data_root)}

    def attack_key(self, e: Entry) -> str:
        blob = {"v": CACHE_VERSION, "run": e.hash, "run_dir": str(e.run_dir), "attacks": self.attack_settings(),
                "defense": e.defense_name}
        return f"{e.key}-{config_hash(_jsonable(blob))}"

    def attack_cache(self, e: Entry) -> Path:
        return self.work_dir / "attacks" / self.attack_key(e)

    def print_plan(self) -> None:
        est = self.b.get("estimate")
        speeds = measured_speeds(self.runs_dir)
        print(f"hybridmask benchmark - budget {self.b['budget']}, seed {self.seed}, config {self.b['path']}")
        print(f"runs in {self.runs_dir}/ (reused when results.json records the same config):")
        total_train = 0.0
        w = max(len(e.label) for e in self.entries)
        for e in self.entries:
            line = f"  [{e.status:6s}] {e.label:<{w}}  {e.run_dir}  config {e.hash}"
            if e.status == "reuse":
                acc = self._lfw(e)
                line += f"  (LFW {100 * acc:.1f} %)" if acc is not None else ""
            elif est:
                s, src = estimate_training(e, est, speeds)
                if e.status == "wait":
                    line += "  (being trained by another process: waits for it)"
                else:
                    total_train += s if math.isfinite(s) else 0.0
                    line += f"  ~{_fmt_minutes(s)} ({src})"
            print(line)
            if e.note:
                print(f"           {e.note}")
        st = self.attack_settings()
        print(f"attacks: {st['n_victims']} {st['victims']} victims, {st['n_distractors']} distractor identities, "
              f"{st['n_public']} public CelebA faces, judge SFace; seed {self.seed}, victims' secrets "
              f"{'secure (OS)' if self.defense_seed is None else self.defense_seed}")
        total_att, need_setup = 0.0, False
        for e in self.entries:
            run, skipped = applicable_attacks(e, st["run"])
            cached = (self.attack_cache(e) / "results.json").is_file() and not self.args.rerun_attacks
            s = 0.0
            if est and not cached:
                s = sum(float(est["attack_seconds"].get(a, 0)) for a in run) + float(est.get("per_defense_seconds") or 0)
                need_setup = True
            total_att += s
            extra = "; ".join(f"{a}: n/a ({why})" for a, why in skipped.items())
            print(f"  {e.label:<{w}}  {', '.join(run)}{' - ' + extra if extra else ''}"
                  f"{'  (cached)' if cached else (f'  ~{_fmt_minutes(s)}' if est else '')}")
        if est:
            setup = float(est.get("setup_seconds") or 0) if need_setup else 0.0
            arl_eval = [e for e in self.entries if e.method == "arl" and not self._arl_verification_cached(e)]
            ver = 60.0 * len(arl_eval) if self.b["budget"] != "tiny" else 2.0 * len(arl_eval)
            total = total_train + total_att + setup + ver
            print(f"estimate (this machine's figures; waits not counted): training {_fmt_minutes(total_train)}, "
                  f"attacks {_fmt_minutes(total_att + setup)}, ARL verification {_fmt_minutes(ver)} - "
                  f"total {_fmt_minutes(total)}")
        else:
            print("estimate: none for this budget (meant for a GPU machine)")
        print(f"writes: {self.markdown}, {self.figures / 'results.json'}, {self.figures / 'privacy_utility.png'}, "
              f"{self.figures / 'grids'}/<defense>.png")

    # -- stages ----------------------------------------------------------------------------------------
    def _lfw(self, e: Entry) -> Optional[float]:
        try:
            r = json.loads((e.run_dir / "results.json").read_text())
            return float(r["verification"]["lfw"]["accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def train(self, e: Entry) -> None:
        if e.status == "wait":
            self._wait(e)
        if e.status == "reuse":
            _log(f"{e.label}: reusing {e.run_dir} (config {e.hash})", self.t0)
        else:
            verb = "resuming" if e.status == "resume" else "training"
            _log(f"{e.label}: {verb} {e.run_dir} (config {e.hash})", self.t0)
            t = time.time()
            if e.method == "arl":
                from .defenses.arl import train_arl
                cfg = dict(e.config, progress=self.progress)
                train_arl(cfg)
            else:
                from .train import run_training
                cfg = copy.deepcopy(e.config)
                cfg["run"]["progress"] = self.progress
                run_training(cfg)
            self.timings[f"train/{e.key}"] = round(time.time() - t, 1)
            e.status = "trained" if e.status == "train" else "resumed"
        e.results = json.loads((e.run_dir / "results.json").read_text())

    def _wait(self, e: Entry) -> None:
        _log(f"{e.label}: {e.run_dir} is being written by another process (same config); waiting", self.t0)
        while True:
            time.sleep(self.poll_seconds)
            state, detail = inspect_folder(e.run_dir, e, self.args.busy_seconds)
            if state == "finished":
                e.status = "reuse"
                return
            if state == "partial":
                _log(f"{e.label}: {e.run_dir} went quiet ({detail}); resuming it here", self.t0)
                e.status = "resume"
                return
            if state != "busy":
                raise ValueError(f"{e.run_dir} changed to another config while waiting ({detail})")

    def _arl_verification_path(self, e: Entry) -> Path:
        pairs = self.b["arl_eval"].get("pairs")
        blob = {"run": e.hash, "dir": str(e.run_dir), "pairs": pairs, "data": str(self.data_root)}
        return self.work_dir / "verification" / f"{e.key}-{config_hash(blob)}.json"

    def _arl_verification_cached(self, e: Entry) -> bool:
        return e.status == "reuse" and self._arl_verification_path(e).is_file()

    def verification(self, e: Entry) -> Dict[str, Any]:
        """LFW / CFP-FP of the run: from results.json; ARL: its utility network's embeddings (cached)."""
        if e.method != "arl":
            return dict((e.results or {}).get("verification") or {})
        path = self._arl_verification_path(e)
        if path.is_file() and e.status == "reuse":
            return json.loads(path.read_text())
        from .train.evaluation import brief, build_sets, verify
        from .utils import atomic_write
        t = time.time()
        defense, emb, _ = victim_defense(e, None)
        sets = build_sets({"targets": ["lfw", "cfp_fp"], "data_root": str(self.data_root)})
        out = {}
        for name, vs in sets.items():
            m = verify(emb, defense.query, vs, pairs=self.b["arl_eval"].get("pairs"), progress=self.progress)
            out[name] = brief(m)
            _log(f"{e.label}: verification {name} {100 * m['accuracy']:.2f} % ({m['pairs']} pairs)", self.t0)
        with atomic_write(path, "w") as f:
            json.dump(_jsonable(out), f, indent=1)
        self.timings[f"verify/{e.key}"] = round(time.time() - t, 1)
        return out

    def _attack_data(self):
        if self._data is None:
            from .attacks.data import build_attack_data
            from .attacks.harness import default_embedder
            st = self.attack_settings()
            t = time.time()
            _log(f"loading attack data: {st['n_victims']} {st['victims']} victims, gallery, {st['n_public']} public "
                 f"faces from {self.data_root}; SFace judge", self.t0)
            self._data = build_attack_data(self.data_root, st["victims"], n_victims=st["n_victims"],
                                           n_distractors=st["n_distractors"], n_public=st["n_public"], seed=self.seed,
                                           progress=self.progress)
            self._embedder = default_embedder()
            self.timings["attack_setup"] = round(time.time() - t, 1)
        return self._data, self._embedder

    def attack(self, e: Entry) -> Dict[str, Any]:
        cache = self.attack_cache(e)
        if (cache / "results.json").is_file() and not self.args.rerun_attacks:
            _log(f"{e.label}: attack results cached in {cache}", self.t0)
            return json.loads((cache / "results.json").read_text())
        from .attacks import create_attack
        from .attacks.harness import evaluate_defense, save_grid, write_json
        data, embedder = self._attack_data()
        st = self.attack_settings()
        run, skipped = applicable_attacks(e, st["run"])
        defense, recognizer, dargs = victim_defense(e, self.defense_seed)
        device = _resolve_device(self.attack_cfg.get("device", "cpu"))
        params = st["params"]
        attacks = {}
        for name in [a for a in FIT_ORDER if a in run]:
            kind, fixed = ATTACK_SPECS[name]
            kw = dict(params.get(kind) or {})
            kw.update(fixed)
            kw.update(seed=self.seed + 1000 * (ATTACKS.index(name) + 1), progress=self.progress, device=device)
            if name == "demix" and kw.get("k") is None and e.defense_name == "adaptive":
                kw["k"] = mean_k(e.results or {}) or 4     # the policy's mean k in training (for the de-biasing)
            if name == "embedding_inversion":
                kw["recognizer"] = recognizer if device == "cpu" else OnDevice(recognizer, device)
            attacks[name] = create_attack(kind, **kw)
        recons: Dict[str, torch.Tensor] = {}
        for name, atk in attacks.items():
            inv = atk.invert

            def capture(obs, _inv=inv, _name=name):
                r = _inv(obs)
                recons[_name] = r
                return r
            atk.invert = capture
        _log(f"{e.label}: attacks {', '.join(attacks)} against {e.run_dir}", self.t0)
        t = time.time()
        res = evaluate_defense(defense, attacks, data, embedder=embedder, grid_dir=None, label=e.key,
                               progress=self.progress)
        res["skipped"] = skipped
        res["defense_args"] = _jsonable(dargs)
        res["attack_order"] = list(attacks)
        for name, a in res["attacks"].items():
            _log(f"   {name}: SSIM {a['ssim']['mean']:.3f} PSNR {a['psnr']['mean']:.2f} id-sim "
                 f"{a['identity_similarity']['mean']:.3f} rank-1 {a['rank1']:.2f} Score_pp {a['score_pp']:.3f} "
                 f"({a['seconds']:.0f} s)", self.t0)
        n = min(8, data.victims.shape[0])
        with torch.no_grad():
            view = defense.as_image(defense.query(data.victims[:n])).clamp(-1, 1).cpu()
        rows = [data.victims[:n], view] + [recons[a][:n] for a in ATTACKS if a in recons]
        names = ["original", "masked view"] + [a for a in ATTACKS if a in recons]
        save_grid(cache / "grid.png", rows, row_names=names)
        write_json(cache / "results.json", res)
        self.timings[f"attacks/{e.key}"] = round(time.time() - t, 1)
        return res

    # -- everything ----------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        order = sorted(self.entries, key=lambda e: {"reuse": 0, "train": 1, "resume": 1, "wait": 2}[e.status])
        _log(f"benchmark ({self.b['budget']} budget, seed {self.seed}): {len(self.entries)} defenses; "
             + ", ".join(f"{e.key}: {e.status}" for e in self.entries), self.t0)
        for e in order:
            self.train(e)
        rows = []
        for e in self.entries:
            ver = self.verification(e)
            att = self.attack(e)
            rows.append(self.row(e, ver, att))
        payload = {
            "benchmark": {"budget": self.b["budget"], "config_file": self.b["path"], "seed": self.seed,
                          "command": self.command(), "started": started,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git": git_state(),
                          "data_root": str(self.data_root), "runs_dir": str(self.runs_dir),
                          "wall_seconds": round(time.time() - self.t0, 1), "python": sys.version.split()[0],
                          "torch": _torch_version()},
            "attack_settings": self.attack_settings(), "budget_overrides": self.b["overrides"],
            "defenses": rows, "timings": self.timings,
        }
        self.write(payload)
        return payload

    def row(self, e: Entry, ver: Dict[str, Any], att: Dict[str, Any]) -> Dict[str, Any]:
        r = e.results or {}
        if e.method == "arl":
            train_s = r.get("train_time_s")
            ips = None
        else:
            train_s = r.get("fit_seconds")
            ips = r.get("images_per_second")
        return {"key": e.key, "label": e.label, "role": e.role, "method": e.method, "defense": e.defense_name,
                "input": e.kind, "config_file": e.config_path, "overrides": e.overrides, "run_dir": str(e.run_dir),
                "config_hash": e.hash, "status": e.status, "note": e.note, "config": _jsonable(e.config),
                "mask_seed": r.get("mask_seed", "n/a (ARL draws no secrets)" if e.method == "arl" else None),
                "verification": _jsonable(ver), "train_seconds": train_s, "wall_seconds": r.get("wall_seconds"),
                "images_per_second": ips, "images_seen": r.get("images_seen"),
                "k_hist": (r.get("train") or {}).get("k_hist") if e.method != "arl" else None,
                "attacks": att, "attack_cache": str(self.attack_cache(e))}

    def command(self) -> str:
        a = self.args
        parts = ["hybridmask benchmark", f"--config {a.config}", f"--budget {a.budget}"]
        for flag, val in (("--seed", a.seed), ("--data", a.data), ("--only", a.only), ("--out-dir", a.out_dir),
                          ("--defense-seed", a.defense_seed)):
            if val is not None:
                parts.append(f"{flag} {val}")
        parts += [f"--override {o}" for o in (a.override or [])]
        if a.rerun_attacks:
            parts.append("--rerun-attacks")
        return " ".join(parts)

    def write(self, payload: Dict[str, Any]) -> None:
        from .attacks.harness import write_json, write_markdown
        grids = self.figures / "grids"
        for row in payload["defenses"]:
            src = Path(row["attack_cache"]) / "grid.png"
            if src.is_file():
                dst = grids / f"{row['key']}.png"
                _copy_atomic(src, dst)
                row["grid"] = str(dst)
        plot = self.figures / "privacy_utility.png"
        if privacy_utility_plot(payload, plot):
            payload["plot"] = str(plot)
        write_json(self.figures / "results.json", payload)
        write_markdown(self.markdown, render_markdown(payload, self.markdown))
        _log(f"wrote {self.markdown}, {self.figures / 'results.json'}, {plot} and {len(payload['defenses'])} grid(s)",
             self.t0)


def _copy_atomic(src: Path, dst: Path) -> None:
    from .utils import atomic_write
    with open(src, "rb") as fi, atomic_write(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo)


def _torch_version() -> str:
    return torch.__version__


def git_state() -> Dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "configs", "hybridmask"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip() and not line.startswith("??"))
        return {"commit": head or "unknown", "uncommitted_changes": changed}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "uncommitted_changes": []}


# ---- report --------------------------------------------------------------------------------------------------
def _tar(v: Dict[str, Any], far: float = 1e-3) -> Optional[float]:
    for k, t in (v.get("tar_at_far") or {}).items():
        try:
            if abs(float(k) - far) < far * 1e-6:
                return float(t)
        except (TypeError, ValueError):
            continue
    return None


def _pct(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None else f"{100 * float(x):.{nd}f}"


def _num(x: Optional[float], nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "inf" if not math.isfinite(float(x)) else f"{float(x):.{nd}f}"


def _mean(d) -> Optional[float]:
    if d is None:
        return None
    v = d.get("mean") if isinstance(d, dict) else d
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def headline(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return (row.get("attacks") or {}).get("attacks", {}).get(HEADLINE)


def strongest_rank1(row: Dict[str, Any]) -> Tuple[Optional[float], str]:
    att = row.get("attacks") or {}
    best, where = None, "-"
    cands = [("masked view", att.get("masked_view"))] + list((att.get("attacks") or {}).items())
    for name, a in cands:
        if a and a.get("rank1") is not None and (best is None or a["rank1"] > best):
            best, where = float(a["rank1"]), name
    return best, where


def _acc(row: Dict[str, Any], target: str = "lfw") -> Optional[float]:
    v = (row.get("verification") or {}).get(target)
    return float(v["accuracy"]) if v and v.get("accuracy") is not None else None


def privacy_utility_plot(payload: Dict[str, Any], path: Path) -> bool:
    """x: LFW accuracy; y: rank-1 re-identification and Score_pp of the white-box cgan. Written atomically."""
    pts = []
    for row in payload["defenses"]:
        a, h = _acc(row), headline(row)
        if a is not None and h is not None:
            pts.append((row["label"], 100 * a, 100 * float(h["rank1"]), float(h["score_pp"])))
    if not pts:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .utils import atomic_write
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    chance = None
    for row in payload["defenses"]:
        ch = ((row.get("attacks") or {}).get("baselines") or {}).get("chance") or {}
        if ch.get("rank1") is not None:
            chance = 100 * float(ch["rank1"])
            break
    markers = "osD^vP*Xhp<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, idx, ylab in ((axes[0], 2, "re-identification rank-1, white-box cgan (%)"),
                          (axes[1], 3, "Score_pp, white-box cgan (higher = more private)")):
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


def target_checks(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets, computed from the rows with roles (``unprotected``, ``adaptive``, ``ppfrfd``, ``fixed_k``)."""
    by_role: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get("role"):
            by_role.setdefault(r["role"], []).append(r)
    ada = (by_role.get("adaptive") or [None])[0]
    if ada is None:
        return ["No defense has role `adaptive`: no target checks."]
    out = []
    ok = lambda c: "**met**" if c else "**not met**"  # noqa: E731
    a_acc, h = _acc(ada), headline(ada)
    unp = (by_role.get("unprotected") or [None])[0]
    if unp is not None and a_acc is not None and _acc(unp) is not None:
        gap = 100 * (_acc(unp) - a_acc)
        out.append(f"- Adaptive hybrid masking within 2 points of the unprotected model's LFW accuracy: "
                   f"{100 * a_acc:.2f} % vs {100 * _acc(unp):.2f} % (gap {gap:+.2f} points) - {ok(gap <= 2.0)}.")
    if h is not None:
        out.append(f"- White-box cgan re-identifies the victim (SFace rank-1) in under 5 % of cases: "
                   f"{100 * h['rank1']:.1f} % - {ok(h['rank1'] < 0.05)}.")
        out.append(f"- White-box cgan SSIM below 0.4: {_mean(h['ssim']):.3f} - {ok(_mean(h['ssim']) < 0.4)}.")
        for r in by_role.get("ppfrfd", []) + by_role.get("fixed_k", []):
            hr, acc = headline(r), _acc(r)
            if hr is None or acc is None or a_acc is None:
                continue
            better = h["score_pp"] > hr["score_pp"]
            equal_acc = a_acc >= acc
            out.append(f"- Strictly better Score_pp than {r['label']} at equal or better accuracy: Score_pp "
                       f"{h['score_pp']:.3f} vs {hr['score_pp']:.3f}, LFW {100 * a_acc:.2f} % vs {100 * acc:.2f} % "
                       f"- {ok(better and equal_acc)}.")
    return out


ATTACK_TEXT = {
    "cgan_whitebox": "pix2pix reconstruction from the test-time query; the attacker runs its own instance of the "
                     "trained defense: same config and trained state, its own secrets",
    "cgan_blackbox": "the same reconstruction, but the attacker may only query the victims' defense as a service",
    "demix": "multi-encoding demixing: T training-time releases of each victim with fresh partners/secrets, "
             "true grouping, decoded by the white-box cgan generator",
    "embedding_inversion": "embedding inversion: a learned decoder from the run's own recognizer's embeddings "
                           "of the masked query back to the face",
}


def render_markdown(p: Dict[str, Any], md_path: Path) -> str:
    b, st, rows = p["benchmark"], p["attack_settings"], p["defenses"]
    base = md_path.parent

    def rel(path: str) -> str:
        return os.path.relpath(path, base)
    git = b.get("git") or {}
    dirty = git.get("uncommitted_changes") or []
    lines = [f"# Privacy-utility benchmark ({b['budget']} budget)", "",
             f"Generated by `{b['command']}` (commit `{git.get('commit', 'unknown')}`"
             + (f", with uncommitted changes to {', '.join(f'`{d}`' for d in dirty)}" if dirty else "")
             + f"), {b['finished']}; {b['wall_seconds'] / 60:.1f} min wall for this invocation (reused runs "
               f"and cached attacks cost nothing). Seed {b['seed']}. Python {b['python']}, torch {b['torch']}.", ""]
    hm = next((r for r in rows if r["method"] == "hybridmask"), None)
    if hm is not None:
        c = hm["config"]
        ver = hm.get("verification") or {}
        pairs_txt = " and ".join(f"{n} ({ver[t]['pairs']:,} pairs)" for t, n in (("lfw", "LFW"), ("cfp_fp", "CFP-FP"))
                                 if (ver.get(t) or {}).get("pairs")) or "none"
        lines += [f"**Protocol.** Every defense trains the same recognizer (`{c['model']['name']}`, "
                  f"{c['model']['embedding_size']}-d, {c['head']['name']} s={c['head']['s']} m={c['head']['m']}) "
                  f"with the same budget ({c['train']['steps']} steps x {c['data']['batch_size']} faces, "
                  f"{c['optim']['name']} lr {c['optim']['lr']}) on `{c['data']['train']}` - except ARL, which "
                  f"trains its own encoder/utility network (see the notes). Verification: {pairs_txt}, 10 folds, "
                  f"flip-sum embeddings, queries masked with k=1. Attacks: {st['n_victims']} {st['victims']} victims no "
                  f"model saw (one image each; gallery: their other images + {st['n_distractors']} distractor "
                  f"identities), an attacker owning {st['n_public']} CelebA faces (identities disjoint from the "
                  f"victims), judged by the independent SFace recognizer; victims' masking secrets "
                  f"{'secure (OS)' if st['defense_seed'] is None else 'seed ' + str(st['defense_seed'])}.", ""]
    lines += ["| defense | LFW acc. (%) | CFP-FP acc. (%) | TAR@FAR=1e-3 LFW / CFP-FP (%) | SSIM | PSNR (dB) | "
              "identity sim. | rank-1 (%) | Score_pp | Score_cls | strongest rank-1 (%) | training time |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("verification") or {}
        lfw, cfp = v.get("lfw") or {}, v.get("cfp_fp") or {}
        h = headline(r) or {}
        sr, where = strongest_rank1(r)
        t = r.get("train_seconds")
        acc_txt = (f"{_pct(lfw.get('accuracy'), 2)} +- {_pct(lfw.get('accuracy_std'), 2)}" if lfw else "-")
        cfp_txt = (f"{_pct(cfp.get('accuracy'), 2)} +- {_pct(cfp.get('accuracy_std'), 2)}" if cfp else "-")
        lines.append(
            f"| {r['label']}{' *' if r['method'] == 'arl' else ''} | {acc_txt} | {cfp_txt} | "
            f"{_pct(_tar(lfw)) if lfw else '-'} / {_pct(_tar(cfp)) if cfp else '-'} | {_num(_mean(h.get('ssim')))} | "
            f"{_num(_mean(h.get('psnr')), 2)} | {_num(_mean(h.get('identity_similarity')))} | "
            f"{_pct(h.get('rank1'))} | {_num(h.get('score_pp'))} | "
            f"{_num(lfw.get('accuracy')) if lfw else '-'} | {_pct(sr)} ({where}) | "
            f"{_fmt_minutes(float(t)) if t is not None else '-'} |")
    ch = next(((r.get("attacks") or {}).get("baselines") for r in rows if (r.get("attacks") or {}).get("baselines")), None)
    lines += ["", f"SSIM, PSNR, identity similarity, rank-1 and Score_pp: the **{HEADLINE}** attack "
                  f"({ATTACK_TEXT[HEADLINE]}); Score_pp = 0.4 (S1+S2)/2 + 0.6 (S3+S4)/2 (higher = more "
                  f"private), Score_cls = LFW accuracy; *strongest rank-1*: the highest re-identification rate "
                  f"over the masked view and every attack. Training time: the recognizer's training loop "
                  f"(ARL: its whole training)."]
    if ch:
        d = ch["different_person"]
        lines += ["", f"Reference levels on the same victims: a different person's face gives SSIM "
                      f"{_num(_mean(d['ssim']))}, PSNR {_num(_mean(d['psnr']), 2)} dB, identity similarity "
                      f"{_num(_mean(d['identity_similarity']))}, rank-1 {_pct(d['rank1'])} %; the original face is "
                      f"re-identified at rank-1 {_pct(ch['original_face']['rank1'])} %; chance rank-1 "
                      f"{_pct(ch['chance']['rank1'])} %."]
    if p.get("plot"):
        lines += ["", f"![privacy-utility]({rel(p['plot'])})"]
    lines += ["", "## Every attack", "",
              "| defense | attack | SSIM | PSNR (dB) | identity sim. | rank-1 (%) | rank-5 (%) | Score_pp | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        att = r.get("attacks") or {}
        mv = att.get("masked_view")
        if mv:
            lines.append(f"| {r['label']} | (masked view) | {_num(_mean(mv['ssim']))} | {_num(_mean(mv['psnr']), 2)} | "
                         f"{_num(_mean(mv['identity_similarity']))} | {_pct(mv['rank1'])} | {_pct(mv['rank5'])} | | |")
        for name in ATTACKS:
            a = (att.get("attacks") or {}).get(name)
            if a is None:
                why = (att.get("skipped") or {}).get(name)
                if why:
                    lines.append(f"| {r['label']} | {name} | n/a ({why}) | | | | | | |")
                continue
            lines.append(f"| {r['label']} | {name} | {_num(_mean(a['ssim']))} | {_num(_mean(a['psnr']), 2)} | "
                         f"{_num(_mean(a['identity_similarity']))} | {_pct(a['rank1'])} | {_pct(a['rank5'])} | "
                         f"{_num(a['score_pp'])} | {a.get('seconds', '-')} |")
    lines += ["", "Attacks: " + "; ".join(f"**{k}**: {v}" for k, v in ATTACK_TEXT.items() if k in st["run"]) + ". "
              f"Parameters: `{json.dumps(st['params'], sort_keys=True)}`.", ""]
    lines += ["## Targets (issue 7), computed from this table", ""] + target_checks(rows) + [""]
    lit = []
    for r in rows:
        if r["defense"] in LITERATURE_SSIM and headline(r):
            name, s = LITERATURE_SSIM[r["defense"]]
            lit.append(f"{name}: SSIM {s:.2f} in the literature vs {_mean(headline(r)['ssim']):.3f} here")
    lines += ["## Literature", "",
              "The literature's U-Net reconstruction attacks report SSIM 0.70 against PPFR-FD, 0.66 against DCTDP "
              "and 0.50 against MinusFace (not implemented here). "
              + ("Measured here (white-box cgan): " + "; ".join(lit) + ". " if lit else "")
              + "Attack strength, image size, training data and what the attacker knows differ between those "
                "papers and this harness, so only the ordering is comparable.", ""]
    notes = []
    if any(r["method"] == "arl" for r in rows):
        notes.append("\\* ARL does not use the shared recognizer: its encoder (ResNet cut at a feature layer) and "
                     "utility network train with `train_arl` on their own schedule (see its config); its LFW / "
                     "CFP-FP numbers are the utility network's embeddings of z, computed by the benchmark; the "
                     "embedding inversion attacks those embeddings. Its release is deterministic (no demix); its "
                     "masked view is its own decoder's output.")
    if any(r["defense"] == "adaptive" for r in rows):
        notes.append("The adaptive defense is attacked with its trained policy (`policy.pt`); demix assumes the "
                     "policy's mean k from training for its de-biasing.")
    if any(r["defense"] == "dctdp" for r in rows):
        notes.append("DCTDP is attacked with its trained noise budgets (`state_path=<run>/model.pt`).")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Reconstruction grids", "",
              "Rows: original victim, masked view, then each attack's reconstruction."]
    for r in rows:
        if r.get("grid"):
            lines += ["", f"**{r['label']}**", "", f"![{r['label']}]({rel(r['grid'])})"]
    lines += ["", "## Appendix: runs, configs and seeds", "",
              "| defense | training config | run folder | config hash | status | masking seed | images seen | img/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | `{r['config_file']}` | `{r['run_dir']}` | `{r['config_hash']}` | {r['status']} | "
                     f"{r.get('mask_seed') if r.get('mask_seed') is not None else '-'} | {r.get('images_seen') or '-'} | "
                     f"{_num(r.get('images_per_second'), 1) if r.get('images_per_second') else '-'} |")
    ov = p.get("budget_overrides") or {}
    lines += ["", f"Benchmark seed {b['seed']} (every run's `run.seed`, the data split and the attackers); "
                  f"budget overrides on top of the configs: `{json.dumps(ov, sort_keys=True)}`. "
                  f"The resolved config of every run (and each run's overrides) is in "
                  f"[`{rel(str(Path(p.get('plot') or md_path).parent / 'results.json'))}`]"
                  f"({rel(str(Path(p.get('plot') or md_path).parent / 'results.json'))}). "
                  f"Reproduce: `{b['command']}` (finished runs and attack results are reused; "
                  f"`--rerun-attacks` repeats the attacks with fresh secrets).", ""]
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/benchmark.yaml", help="benchmark config (defenses, attacks, budgets)")
    p.add_argument("--budget", default="small", choices=BUDGETS,
                   help="tiny: smoke run; small: CPU (the committed configs); full: GPU (IResNet-50, u=8)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (reuse / train, attacks, estimate) and exit")
    p.add_argument("--seed", type=int, default=None, help="benchmark seed (default: the config's)")
    p.add_argument("--data", default=None, help="folder holding lfw_112/, cfp_112/, celeba_112/ (overrides the "
                                                "training configs' data paths: their runs are then new runs)")
    p.add_argument("--only", default=None, help="comma-separated defense keys to run (default: all)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override for every hybridmask training config (repeatable), e.g. run.device=cpu")
    p.add_argument("--out-dir", default=None,
                   help="put runs, caches and the report under this folder instead of the budget's paths")
    p.add_argument("--defense-seed", type=int, default=None,
                   help="seed of the victims' masking secrets in the attacks (default: secure OS seed)")
    p.add_argument("--rerun-attacks", action="store_true", help="ignore cached attack results")
    p.add_argument("--busy-seconds", type=float, default=300.0,
                   help="an unfinished run folder written within this many seconds is another process's: wait")
    p.add_argument("--threads", type=int, default=2, help="torch threads for verification and attacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars (stage lines still print)")


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.busy_seconds < 0:
        raise ValueError(f"--busy-seconds must be >= 0, got {args.busy_seconds}")
    bench = load_benchmark(args.config, args.budget)
    bm = Benchmark(bench, args)
    if args.dry_run:
        bm.print_plan()
        return 0
    torch.set_num_threads(args.threads)
    bm.run()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import main as cli_main
    return cli_main(["benchmark"] + list(sys.argv[1:] if argv is None else argv))


__all__ = ["Benchmark", "load_benchmark", "resolve_entry", "place_run", "inspect_folder", "fingerprint",
           "config_hash", "config_diff", "target_checks", "render_markdown", "privacy_utility_plot", "add_arguments",
           "run", "main"]
