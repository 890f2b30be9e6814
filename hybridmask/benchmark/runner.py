"""The benchmark of every defense: plan (``--dry-run``), the four stages per defense, the outputs."""
from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import pipeline
from .attack_plan import attack_specs, display_order, plan_attacks
from .config import STRONGEST
from .estimate import estimate_training, fmt_minutes, measured_speeds
from .report import ATTACK_LIMIT_SECONDS
from .runs import Entry, config_hash, jsonable, place_run, resolve_entry, untrained_defense

#: bump when the attack stage's results change meaning (invalidates the attack caches)
CACHE_VERSION = 3


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
        self.specs = attack_specs(at)
        self.headline = str(at["headline"])
        self.defense_seed = args.defense_seed if args.defense_seed is not None else at.get("defense_seed")
        self.progress = not args.quiet
        self.timings: Dict[str, float] = {}
        self._data = self._embedder = None
        only = [x.strip() for x in (args.only or "").split(",") if x.strip()]
        keys = [d["key"] for d in bench["defenses"]]
        bad = [k for k in only if k not in keys]
        if bad:
            raise ValueError(f"--only: unknown defense key(s) {bad}; the benchmark has {', '.join(keys)}")
        # with --only, the other defenses too (not under --measured): their measured rows stay in the report (read,
        # never computed), so a run of one defense updates its row instead of writing a report of that row alone
        resolved = [resolve_entry(d, bench, self.seed, args.data, list(args.override or []))
                    for d in bench["defenses"] if not only or d["key"] in only or not self.measured_only]
        for e in resolved:
            place_run(e, args.busy_seconds)
        self.entries = [e for e in resolved if not only or e.key in only]
        self.rest: List[Entry] = [e for e in resolved if only and e.key not in only]
        #: --measured: the defenses left out because they are not measured yet (nothing is computed), and the
        #: earlier attack results that the kept ones are reported with (entry key -> reusable())
        self.not_measured: List[Dict[str, str]] = []
        self._earlier: Dict[str, Any] = {}
        if self.measured_only:
            self.entries = self.measured(self.entries)
            if not self.entries:
                raise ValueError(f"--measured: no selected defense is measured at the {bench['budget']} budget (a "
                                 f"finished run in {self.runs_dir}, verified and attacked); drop --measured to "
                                 f"compute them")

    @property
    def measured_only(self) -> bool:
        return bool(getattr(self.args, "measured", False))

    def measured(self, entries: List[Entry]) -> List[Entry]:
        """The entries that can be reported without computing anything; the others go to ``not_measured``
        with the reason."""
        kept = []
        for e in entries:
            why = self.unmeasured(e)
            if why:
                self.not_measured.append({"key": e.key, "label": e.label, "why": why})
            else:
                kept.append(e)
        return kept

    def unmeasured(self, e: Entry) -> Optional[str]:
        """Why ``e`` cannot be reported without computing anything (None: it can): its run has not finished, its
        verification or its attack results are not on disk (an earlier result that lacks only linkage attacks
        counts: the report names what did not run)."""
        if e.status != "reuse":
            return "no finished training run"
        if not self.verified(e):
            return "not verified"
        if not self.cached(e):
            self._earlier[e.key] = self.reusable(e)
            if self._earlier[e.key] is None:
                return "not attacked"
        return None

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f} s] {msg}", flush=True)

    # -- settings and caches -----------------------------------------------------------------------
    def attack_settings(self) -> Dict[str, Any]:
        at = self.attack_cfg
        return {"victims": at.get("victims", "lfw"), "n_victims": int(at.get("n_victims", 32)),
                "n_distractors": int(at.get("n_distractors", 64)), "n_public": int(at.get("n_public", 1500)),
                "run": display_order(self.specs, self.headline), "headline": self.headline,
                "attacks": {s.label: {"attack": s.attack, "kind": s.kind, "params": jsonable(s.params),
                                      "requires": s.requires} for s in self.specs},
                "text": {s.label: s.text for s in self.specs},
                "left_out": list(at.get("left_out") or []),
                "defense_seed": self.defense_seed, "seed": self.seed, "judge": "sface",
                "data_root": str(self.data_root), "device": str(at.get("device") or "cpu")}

    def attack_blob(self, e: Entry) -> Dict[str, Any]:
        """What an attack result depends on (its cache key, also written beside it as ``settings.json``)."""
        return jsonable({"v": CACHE_VERSION, "run": e.hash, "run_dir": str(e.run_dir),
                         "attacks": self.attack_settings()})

    def attack_cache(self, e: Entry) -> Path:
        return self.work_dir / "attacks" / f"{e.key}-{config_hash(self.attack_blob(e))}"

    def reusable(self, e: Entry):
        """An earlier attack result of ``e`` that differs from what this benchmark asks only by linkage attacks
        it lacks -> ``(its folder, its results, the missing labels)``, or None. Everything else must be equal:
        the run, the victims and public faces, the judge, seeds, every attack it has (same parameters, same
        place in the display order, hence the same seed) and no reconstruction attack missing (the
        reconstruction attacks are fitted together: demix decodes with the cgan)."""
        want = self.attack_blob(e)
        wa = want["attacks"]
        found = []
        for d in (self.work_dir / "attacks").glob(f"{e.key}-*"):
            old = _read_json(d / "settings.json")
            if not isinstance(old, dict):      # no settings.json (a cache older than it) or unreadable
                continue
            oa = old.get("attacks") or {}
            if {k: v for k, v in old.items() if k != "attacks"} != {k: v for k, v in want.items() if k != "attacks"}:
                continue
            if {k: v for k, v in oa.items() if k not in ("run", "attacks", "text")} != \
                    {k: v for k, v in wa.items() if k not in ("run", "attacks", "text")}:
                continue
            olds, news = oa.get("attacks") or {}, wa["attacks"]
            if any(news.get(lab) != spec for lab, spec in olds.items()):
                continue
            if any(wa["run"].index(lab) != i for i, lab in enumerate(oa.get("run") or []) if lab in wa["run"]):
                continue
            missing = [lab for lab in wa["run"] if lab not in olds]
            if not missing or any(news[lab]["kind"] != "linkage" for lab in missing):
                continue
            res = _read_json(d / "results.json")
            if not isinstance(res, dict):
                continue
            found.append((d.stat().st_mtime, d, res, missing))
        if not found:
            return None
        _, d, res, missing = max(found, key=lambda t: (-len(t[3]), t[0]))
        return d, res, missing

    def cached(self, e: Entry) -> bool:
        return (self.attack_cache(e) / "results.json").is_file() and not self.args.rerun_attacks

    def headline_text(self) -> str:
        if self.headline == STRONGEST:
            return ("per defense the strongest query-reconstruction attack (highest rank-1, ties: identity "
                    "similarity); training releases: the strongest release attack; linkage: its own column")
        return f"the {self.headline} attack for every defense"

    # -- plan ----------------------------------------------------------------------------------------
    def verified(self, e: Entry) -> bool:
        """Whether ``e``'s verification is known without the benchmark computing it: a reused run that
        reports it (or whose benchmark verification is cached), or a run to train whose config verifies
        at the end (``eval.final`` on ``eval.targets``)."""
        targets = list(self.b["verify"].get("targets") or ["lfw", "cfp_fp"])
        if e.status == "reuse":
            e.results = e.results or _read_json(e.run_dir / "results.json")
            return pipeline.reported_verification(e, targets) is not None or \
                pipeline.verification_cache(e, self.work_dir, self.b["verify"], self.data_root).is_file()
        ev = e.config.get("eval") if isinstance(e.config.get("eval"), dict) else {}
        return bool(ev.get("final", True)) and set(targets) <= set(ev.get("targets") or [])

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
                acc = _lfw(e)
                line += f"  (LFW {100 * acc:.1f} %)" if acc is not None else ""
            elif e.status == "wait":
                line += "  (being trained by another process: waits for it)"
            elif est:
                s, src = estimate_training(e, est, speeds)
                total_train += s if math.isfinite(s) else 0.0
                line += f"  ~{fmt_minutes(s)} ({src})"
            print(line)
            if e.detail:
                print(f"           {e.detail}")
        st = self.attack_settings()
        print(f"attacks: {st['n_victims']} {st['victims']} victims, {st['n_distractors']} distractor identities, "
              f"{st['n_public']} public CelebA faces, judge SFace; seed {self.seed}, victims' secrets "
              f"{'secure (OS)' if self.defense_seed is None else self.defense_seed}")
        print(f"  headline: {self.headline_text()}")
        total_att, need_setup, n_verify, slow = 0.0, False, 0, set()
        per_attack = dict((est or {}).get("attack_seconds") or {})
        for e in self.entries:
            run, skipped = plan_attacks(self.specs, untrained_defense(e.layout, e.config))
            labels = [a for a in display_order(self.specs, self.headline) if a in {s.label for s in run}]
            s = 0.0
            cached = self.cached(e)
            prev = None if cached or self.args.rerun_attacks else self.reusable(e)
            todo = labels if prev is None else [a for a in labels if a in prev[2]]   # what still has to run
            if est and not cached:
                s = sum(float(per_attack.get(a, 0)) for a in todo) + float(est.get("per_defense_seconds") or 0)
                need_setup = True
            total_att += s
            names = [f"{a} ~{fmt_minutes(float(per_attack[a]))}" if est and a in todo and not cached
                     and a in per_attack else a if a in todo or cached else f"{a} (reused from {prev[0].name})"
                     for a in labels]
            slow |= {a for a in labels if float(per_attack.get(a, 0)) > ATTACK_LIMIT_SECONDS} if est else set()
            extra = "; ".join(f"{a}: n/a ({why})" for a, why in skipped.items())
            print(f"  {e.label:<{w}}  {', '.join(names)}{' - ' + extra if extra else ''}"
                  f"{'  (cached)' if cached else (f'  (attacks ~{fmt_minutes(s)})' if est else '')}")
            n_verify += not self.verified(e)
        if est:
            print("  per attack and defense (budget estimate): "
                  + ", ".join(f"{a} ~{fmt_minutes(float(per_attack[a]))}" for a in display_order(self.specs, self.headline)
                              if a in per_attack)
                  + (f"; over the {ATTACK_LIMIT_SECONDS / 60:.0f}-minute limit: {', '.join(sorted(slow))}" if slow
                     else f"; none over the {ATTACK_LIMIT_SECONDS / 60:.0f}-minute limit"))
        if est:
            setup = float(est.get("setup_seconds") or 0) if need_setup else 0.0
            ver = float(est.get("verify_seconds") or 0) * n_verify
            total = total_train + total_att + setup + ver
            print(f"estimate (this machine's figures; waits not counted): training {fmt_minutes(total_train)}, "
                  f"attacks {fmt_minutes(total_att + setup)}, verification here {fmt_minutes(ver)} - "
                  f"total {fmt_minutes(total)}")
        else:
            print("estimate: none for this budget (meant for a GPU machine)")
        print(f"writes: {self.markdown}, {self.figures / 'results.json'}, {self.figures / 'privacy_utility.png'}, "
              f"{self.figures / 'grids'}/<defense>.png")

    # -- everything ----------------------------------------------------------------------------------
    def attack_data(self):
        if self._data is None:
            from ..attacks.data import build_attack_data
            from ..attacks.harness import default_embedder
            st = self.attack_settings()
            t = time.time()
            self.log(f"loading attack data: {st['n_victims']} {st['victims']} victims, gallery, {st['n_public']} "
                     f"public faces from {self.data_root}; SFace judge")
            self._data = build_attack_data(self.data_root, st["victims"], n_victims=st["n_victims"],
                                           n_distractors=st["n_distractors"], n_public=st["n_public"], seed=self.seed,
                                           progress=self.progress)
            self._embedder = default_embedder()
            self.timings["attack_setup"] = round(time.time() - t, 1)
        return self._data, self._embedder

    def evaluate(self, e: Entry, measured: bool = False) -> Dict[str, Any]:
        """Stages 2-4 of one trained run -> its report row (``measured``: read what is on disk, compute nothing;
        :meth:`unmeasured` has said it can)."""
        from ..utils.common import resolve_device
        victim: Optional[pipeline.Victim] = None

        def get_victim() -> pipeline.Victim:
            nonlocal victim
            if victim is None:
                victim = pipeline.load_victim(e, self.defense_seed)
            return victim
        ver = pipeline.verify(e, get_victim, self.b["verify"], self.data_root, self.work_dir, self.progress,
                              self.log, self.timings)
        cache = self.attack_cache(e)
        if self.cached(e):
            self.log(f"{e.label}: attack results cached in {cache}")
            att = _read_json(cache / "results.json")
        elif self.measured_only or measured:   # what was measured (unmeasured() said so), the missing attacks named
            old_dir, old, missing = self._earlier[e.key]
            self.log(f"{e.label}: --measured: the attack results of {old_dir.name}; not run: {', '.join(missing)}")
            return dict(self.row(e, ver, dict(old, not_run=list(missing))), attack_cache=str(old_dir))
        else:
            data, embedder = self.attack_data()
            t = time.time()
            device = str(resolve_device(self.attack_cfg.get("device") or "cpu"))
            prev = None if self.args.rerun_attacks else self.reusable(e)
            if prev is not None:       # only linkage attacks are new: the rest of an earlier result stands
                old_dir, old, missing = prev
                att = pipeline.add_linkage(e, get_victim(), self.specs, self.headline, missing, old, old_dir, data,
                                           embedder, cache, self.seed, device, self.progress, self.log)
            else:
                att = pipeline.attack(e, get_victim(), self.specs, self.headline, data, embedder, cache, self.seed,
                                      device, self.progress, self.log)
            from ..attacks.harness import write_json
            write_json(cache / "settings.json", self.attack_blob(e))
            self.timings[f"attacks/{e.key}"] = round(time.time() - t, 1)
        return self.row(e, ver, att)

    def run(self) -> Dict[str, Any]:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        order = sorted(self.entries, key=lambda e: {"reuse": 0, "train": 1, "resume": 1, "wait": 2}[e.status])
        self.log(f"benchmark ({self.b['budget']} budget, seed {self.seed}): {len(self.entries)} defenses; "
                 + ", ".join(f"{e.key}: {e.status}" for e in self.entries))
        for e in order:
            pipeline.train(e, self.progress, self.log, self.timings, self.args.busy_seconds, self.poll_seconds)
        rows = [self.evaluate(e) for e in self.entries] + self.rest_rows()
        pos = {d["key"]: i for i, d in enumerate(self.b["defenses"])}
        rows.sort(key=lambda r: pos.get(r["key"], len(pos)))
        payload = {
            "benchmark": {"budget": self.b["budget"], "config_file": self.b["path"], "seed": self.seed,
                          "command": self.command(), "started": started,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git": git_state(),
                          "data_root": str(self.data_root), "runs_dir": str(self.runs_dir),
                          "wall_seconds": round(time.time() - self.t0, 1), "python": sys.version.split()[0],
                          "torch": torch.__version__},
            "attack_settings": self.attack_settings(), "budget_overrides": self.b["overrides"],
            "targets": self.b["targets"], "defenses": rows, "timings": self.timings,
            "not_measured": self.not_measured,
        }
        self.write(payload)
        return payload

    def rest_rows(self) -> List[Dict[str, Any]]:
        """The measured rows of the defenses that ``--only`` left out (read from disk, as ``--measured`` reads
        them); the unmeasured ones are named in the report. Rows come back in the config's order."""
        rows = [self.evaluate(e, measured=True) for e in self.measured(self.rest)]
        if self.rest:
            self.log(f"--only: the report keeps {len(rows)} measured row(s) of the other defenses "
                     f"({len(self.rest) - len(rows)} not measured)")
        return rows

    def row(self, e: Entry, ver: Dict[str, Any], att: Dict[str, Any]) -> Dict[str, Any]:
        r = e.results or {}
        caps = (att.get("victim_defense") or {}).get("capabilities") or {}
        mask_seed = r.get("mask_seed")
        if mask_seed is None and caps.get("stochastic") is False:
            mask_seed = "n/a (deterministic release: no secrets)"
        return {"key": e.key, "label": e.label, "role": e.role, "method": e.method, "defense": e.defense_name,
                "input": e.input_kind, "config_file": e.config_path, "overrides": e.overrides, "run_dir": str(e.run_dir),
                "config_hash": e.hash, "status": e.status, "detail": e.detail, "note": e.note,
                "literature": e.literature, "config": jsonable(e.config), "mask_seed": mask_seed,
                "verification": jsonable(ver), "train_seconds": training_seconds(r),
                "wall_seconds": r.get("wall_seconds"), "images_per_second": r.get("images_per_second"),
                "images_seen": r.get("images_seen"), "k_hist": (r.get("train") or {}).get("k_hist"),
                "judge_note": (r.get("model_start") or {}).get("note"),
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
        if self.measured_only:
            parts.append("--measured")
        return " ".join(parts)

    def write(self, payload: Dict[str, Any]) -> None:
        from ..attacks.harness import write_json, write_markdown
        from .plot import privacy_utility_plot
        from .report import render_markdown
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
        self.log(f"wrote {self.markdown}, {self.figures / 'results.json'}, {plot} and {len(payload['defenses'])} grid(s)")


def training_seconds(results: Dict[str, Any]) -> Optional[float]:
    """The training loop's seconds as a run reports them (``fit_seconds``; ``train_time_s`` in ARL
    results written before ARL moved to :mod:`hybridmask.train`)."""
    return results.get("fit_seconds", results.get("train_time_s"))


def _read_json(path: Path) -> Any:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lfw(e: Entry) -> Optional[float]:
    try:
        return float((_read_json(e.run_dir / "results.json") or {})["verification"]["lfw"]["accuracy"])
    except (KeyError, TypeError, ValueError):
        return None


def _copy_atomic(src: Path, dst: Path) -> None:
    from ..utils import atomic_write
    with open(src, "rb") as fi, atomic_write(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo)


def git_state() -> Dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "configs", "hybridmask"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip() and not line.startswith("??"))
        return {"commit": head or "unknown", "uncommitted_changes": changed}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "uncommitted_changes": []}


__all__ = ["Benchmark", "git_state", "CACHE_VERSION"]
