"""The benchmark of one defense as four stages: ``train -> load_defense -> verify -> attack``.

* :func:`train` - :func:`hybridmask.train.run_training` on the resolved training config (it dispatches
  on the config's ``method``), or reuse / wait for a finished run;
* :func:`load_victim` - the run's trained defense with :func:`hybridmask.defenses.io.load_defense`
  (fresh victim secrets) and its recognizer (:func:`run_recognizer`);
* :func:`verify` - LFW / CFP-FP as the run's ``results.json`` reports them; a run that reports no
  verification on the benchmark's targets is verified here with its recognizer (cached);
* :func:`attack` - the configured attacks that apply to the defense (:mod:`.attack_plan`), scored by
  :func:`hybridmask.attacks.harness.evaluate_defense` (reconstruction attacks) or
  :func:`hybridmask.attacks.harness.evaluate_linkage` (linkage attacks), cached per run and attack settings.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .attack_plan import AttackSpec, OnDevice, Recorded, build_attack, display_order, plan_attacks
from .runs import Entry, config_hash, jsonable, training_config, wait_for


@dataclass
class Victim:
    """What the attacks and the verification need of a trained run."""
    defense: Any                      # hybridmask.defenses.Defense, trained state, fresh secrets
    recognizer: torch.nn.Module       # defense.query(x) -> embeddings
    source: str                       # the file load_defense rebuilt the defense from
    facts: Dict[str, Any] = field(default_factory=dict)   # $-bindings for attack parameters


# ---- stage 1: train -------------------------------------------------------------------------------
def train(e: Entry, progress: bool, log: Callable[[str], None], timings: Dict[str, float],
          busy_seconds: float, poll_seconds: float) -> None:
    """Train (or resume) the entry's run, or reuse a finished one; loads ``e.results``."""
    if e.status == "wait":
        wait_for(e, busy_seconds, poll_seconds, log)
    if e.status == "reuse":
        log(f"{e.label}: reusing {e.run_dir} (config {e.hash})")
    else:
        from ..train import run_training
        log(f"{e.label}: {'resuming' if e.status == 'resume' else 'training'} {e.run_dir} (config {e.hash})")
        t = time.time()
        run_training(training_config(e, progress))
        timings[f"train/{e.key}"] = round(time.time() - t, 1)
        e.status = "trained" if e.status == "train" else "resumed"
    e.results = json.loads((e.run_dir / "results.json").read_text())


# ---- stage 2: load_defense ------------------------------------------------------------------------
def run_recognizer(run_dir: Path) -> torch.nn.Module:
    """The recognizer a run trained: ``model.pt`` (:func:`hybridmask.models.load_model`), which maps the
    defense's release to embeddings."""
    from ..models import load_model
    if not (run_dir / "model.pt").is_file():
        from .gaps import arl_run_outputs
        rec = (arl_run_outputs(run_dir, recognizer=True) or {}).get("recognizer")
        if rec is not None:
            return rec
    model, _, _ = load_model(run_dir / "model.pt")
    return model.eval()


def mean_k(results: Dict[str, Any]) -> Optional[int]:
    """The mean k of a run's training releases (its ``train.k_hist``), None when it records none."""
    kh = (results.get("train") or {}).get("k_hist") or {}
    tot = sum(float(v) for v in kh.values())
    if not kh or tot <= 0:
        return None
    return max(1, int(round(sum(int(k) * float(v) for k, v in kh.items()) / tot)))


def load_victim(e: Entry, defense_seed: Optional[int]) -> Victim:
    from ..defenses.io import load_defense, run_file
    key = Path(e.run_dir) / "client_key.pt"   # a keyed run: the victims query with the client's real key
    defense = load_defense(e.run_dir, seed=defense_seed, key=key if key.is_file() else None)
    return Victim(defense=defense, recognizer=run_recognizer(e.run_dir), source=str(run_file(e.run_dir)),
                  facts={"mean_k": mean_k(e.results or {})})


# ---- stage 3: verify ------------------------------------------------------------------------------
def verification_cache(e: Entry, work_dir: Path, settings: Dict[str, Any], data_root: Path) -> Path:
    blob = {"run": e.hash, "dir": str(e.run_dir), "settings": settings, "data": str(data_root)}
    return work_dir / "verification" / f"{e.key}-{config_hash(jsonable(blob))}.json"


def reported_verification(e: Entry, targets: List[str]) -> Optional[Dict[str, Any]]:
    """The run's own verification (``results.json``) when it covers every target."""
    ver = dict((e.results or {}).get("verification") or {})
    return ver if ver and all(t in ver for t in targets) else None


def verify(e: Entry, victim_fn: Callable[[], Victim], settings: Dict[str, Any], data_root: Path, work_dir: Path,
           progress: bool, log: Callable[[str], None], timings: Dict[str, float]) -> Dict[str, Any]:
    """LFW / CFP-FP of the run (``settings``: the budget's ``verify`` section: targets, pairs)."""
    targets = list(settings.get("targets") or ["lfw", "cfp_fp"])
    ver = reported_verification(e, targets)
    if ver is not None:
        return ver
    path = verification_cache(e, work_dir, settings, data_root)
    if path.is_file() and e.status == "reuse":
        return json.loads(path.read_text())
    from ..train.evaluation import brief, build_sets
    from ..train.evaluation import verify as verify_set
    from ..utils import atomic_write
    t = time.time()
    victim = victim_fn()
    sets = build_sets({"targets": targets, "data_root": str(data_root)})
    out = {}
    for name, vs in sets.items():
        m = verify_set(victim.recognizer, victim.defense.query, vs, pairs=settings.get("pairs"), progress=progress)
        out[name] = brief(m)
        log(f"{e.label}: verification {name} {100 * m['accuracy']:.2f} % ({m['pairs']} pairs)")
    with atomic_write(path, "w") as f:
        json.dump(jsonable(out), f, indent=1)
    timings[f"verify/{e.key}"] = round(time.time() - t, 1)
    return out


# ---- stage 4: attack ------------------------------------------------------------------------------
def run_linkage(defense, attack, data, embedder) -> Dict[str, Any]:
    """One linkage attack, scored by :func:`hybridmask.attacks.harness.evaluate_linkage` (the teacher is
    the harness's SFace when the attack brings none): its ``linkage`` scores (rank-1 / rank-5, TAR@FAR),
    the ``clean_faces`` reference level and ``seconds`` (fit + link + scoring, what the attack cost)."""
    from ..attacks.harness import evaluate_linkage
    t = time.time()
    r = evaluate_linkage(defense, attack, data, embedder=embedder)
    out = dict(r["linkage"])
    out.pop("per_image", None)
    out.update(attack=r.get("attack"), clean_faces=r.get("clean_faces"), seconds=round(time.time() - t, 1),
               link_seconds=r["linkage"].get("seconds"))
    return out


def _known(victim: Victim, device: str) -> Dict[str, Any]:
    """What the attacks' ``$name`` parameters are bound to: the run's recognizer (on ``device``) and its facts."""
    recognizer = victim.recognizer if device == "cpu" else OnDevice(victim.recognizer, device)
    return {"recognizer": recognizer, **victim.facts}


def attack_seed(seed: int, order: List[str], label: str) -> int:
    """An attack's seed: the benchmark's seed and the attack's place in the display order."""
    return seed + 1000 * (order.index(label) + 1)


def add_linkage(e: Entry, victim: Victim, specs: List[AttackSpec], headline: str, new: List[str], old: Dict[str, Any],
                old_dir: Path, data, embedder, cache: Path, seed: int, device: str, progress: bool,
                log: Callable[[str], None]) -> Dict[str, Any]:
    """An earlier attack result of the same run and settings (``old``, from ``old_dir``) plus the linkage attacks
    ``new`` it lacks: linkage attacks neither feed nor read the reconstruction attacks, and keep the seeds a full
    run would give them, so the result equals a full rerun. Writes ``cache`` (``results.json``, the old
    ``grid.png``)."""
    import copy

    from ..attacks.harness import write_json
    order = display_order(specs, headline)
    res = copy.deepcopy(old)
    wanted = [s for s in specs if s.label in new]
    run, skipped = plan_attacks(wanted, victim.defense)
    res.setdefault("skipped", {}).update(skipped)
    res.setdefault("linkage", {})
    known = _known(victim, device)
    log(f"{e.label}: attack results of {old_dir.name} reused; adding {', '.join(new)}")
    t = time.time()
    for s in run:
        lk = run_linkage(victim.defense, build_attack(s, known, attack_seed(seed, order, s.label), progress, device),
                         data, embedder)
        res["linkage"][s.label] = lk
        log(f"   {s.label} (linkage): rank-1 {lk['rank1']:.2f} TAR@FAR=1e-3 {lk.get('tar@far=0.001', float('nan')):.2f}"
            f" ({lk['seconds']:.0f} s)")
    res["reused_from"] = old_dir.name
    res["seconds_total"] = round(float(old.get("seconds_total") or 0.0) + time.time() - t, 1)
    cache.mkdir(parents=True, exist_ok=True)
    if (old_dir / "grid.png").is_file():
        shutil.copyfile(old_dir / "grid.png", cache / "grid.png")
    write_json(cache / "results.json", res)
    return res


def attack(e: Entry, victim: Victim, specs: List[AttackSpec], headline: str, data, embedder, cache: Path,
           seed: int, device: str, progress: bool, log: Callable[[str], None]) -> Dict[str, Any]:
    """Fit every applicable attack on the public faces, attack the victims, score; writes ``cache``
    (``results.json`` and ``grid.png``: original, masked view, one row per reconstruction attack).
    Reconstruction attacks go through :func:`hybridmask.attacks.harness.evaluate_defense` (``attacks``),
    linkage attacks through :func:`run_linkage` (``linkage``: label -> scores)."""
    from ..attacks.harness import evaluate_defense, save_grid, write_json
    order = display_order(specs, headline)
    run, skipped = plan_attacks(specs, victim.defense)
    known = _known(victim, device)

    def build(s: AttackSpec):
        return build_attack(s, known, attack_seed(seed, order, s.label), progress, device)
    attacks = {s.label: Recorded(build(s)) for s in run if s.kind == "reconstruction"}
    linkers = [s for s in run if s.kind == "linkage"]
    log(f"{e.label}: attacks {', '.join([*attacks, *(s.label for s in linkers)])} against {e.run_dir}")
    t = time.time()
    res = evaluate_defense(victim.defense, attacks, data, embedder=embedder, grid_dir=None, label=e.key,
                           progress=progress)
    res["skipped"] = skipped
    res["victim_defense"] = {"file": victim.source, "config": jsonable(victim.defense.config),
                             "state": sorted((victim.defense.defense_state() or {}).keys()),
                             "capabilities": victim.defense.capabilities()}
    res["attack_order"] = list(attacks)
    for name, a in res["attacks"].items():
        mixed = a.get("mixed")
        log(f"   {name}: SSIM {a['ssim']['mean']:.3f} PSNR {a['psnr']['mean']:.2f} id-sim "
            f"{a['identity_similarity']['mean']:.3f} rank-1 {a['rank1']:.2f} Score_pp {a['score_pp']:.3f}"
            + (f"; training releases rank-1 dominant {mixed['rank1_dominant']:.2f} any {mixed['rank1_any']:.2f}"
               if mixed else "") + f" ({a['seconds']:.0f} s)")
    res["linkage"] = {}
    for s in linkers:
        lk = run_linkage(victim.defense, build(s), data, embedder)
        res["linkage"][s.label] = lk
        log(f"   {s.label} (linkage): rank-1 {lk['rank1']:.2f} TAR@FAR=1e-3 {lk.get('tar@far=0.001', float('nan')):.2f}"
            f" ({lk['seconds']:.0f} s)")
    n = min(8, data.victims.shape[0])
    with torch.no_grad():
        view = victim.defense.as_image(victim.defense.query(data.victims[:n])).clamp(-1, 1).cpu()
    shown = [a for a in order if a in attacks and attacks[a].last is not None]
    save_grid(cache / "grid.png", [data.victims[:n], view] + [attacks[a].last[:n] for a in shown],
              row_names=["original", "masked view"] + shown)
    res["seconds_total"] = round(time.time() - t, 1)
    write_json(cache / "results.json", res)
    return res


__all__ = ["Victim", "train", "load_victim", "run_recognizer", "verify", "attack", "add_linkage", "attack_seed",
           "run_linkage", "mean_k"]
