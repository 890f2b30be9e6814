"""Build everything a config describes and train it: ``run_training(config) -> results``.

Output folder ``<run.out_dir>/<run.name>/``::

    config.yaml     the resolved config            tb/          TensorBoard event files
    ckpt/last.pt    full trainer state (secret!)   model.pt     the recognizer (hybridmask.models.load_model)
    policy.pt       the trained policy (no secrets) + policy.md, its model card
    results.json    final verification, k histogram, utility, timings, history
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..utils import atomic_write
from . import distributed as D
from .config import dump_config


def _device(spec: str) -> torch.device:
    spec = str(spec or "auto")
    if spec == "auto":
        return D.local_device()
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={spec} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and D.is_dist():
        dev = D.local_device()
    return dev


def make_optimizer(params, cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    name = str(cfg.get("name", "sgd")).lower()
    lr, wd = float(cfg["lr"]), float(cfg.get("weight_decay") or 0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum") or 0.0), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(float(cfg.get("momentum") or 0.9), 0.999), weight_decay=wd)
    raise ValueError(f"unknown optim.name {name!r}; use sgd or adamw")


def make_scheduler(optimizer, cfg: Dict[str, Any], total: int):
    kind = str(cfg.get("scheduler", "cosine")).lower()
    warm = int(cfg.get("warmup_steps") or 0)
    total = max(int(total), 1)
    if kind not in ("cosine", "step", "constant"):
        raise ValueError(f"unknown optim.scheduler {kind!r}; use cosine, step or constant")
    miles = [float(m) * total for m in (cfg.get("step_milestones") or [])]
    gamma = float(cfg.get("step_gamma", 0.1))

    def factor(step: int) -> float:   # LambdaLR calls it with the number of finished steps
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            t = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if kind == "step":
            return gamma ** sum(step >= m for m in miles)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_policy(pcfg: Dict[str, Any], seed: int):
    from ..policy import FixedKPolicy, StrategyNet, UniformPolicy
    name = str(pcfg.get("name") or "none").lower()
    ks = list(pcfg.get("k_values") or (2, 3, 4, 5, 6))
    if name in ("none", "null"):
        return None
    if name == "adaptive":
        return StrategyNet(k_values=ks, hidden=int(pcfg.get("hidden") or 64), seed=seed)
    if name == "uniform":
        return UniformPolicy(ks, seed=seed)
    if name == "fixed":
        return FixedKPolicy(int(pcfg["k"]), seed=seed)
    raise ValueError(f"unknown policy.name {name!r}; use adaptive, uniform, fixed or none")


def build_defense(dcfg: Dict[str, Any], policy, mask_seed):
    from ..defenses import AdaptiveMask, create_defense
    name = str(dcfg.get("name") or "none").lower()
    args = dict(dcfg.get("args") or {})
    if "seed" in args:
        raise ValueError("set the masking seed with run.mask_seed, not defense.args.seed")
    if name == "adaptive":
        if policy is not None:
            args.pop("k_values", None)
            return AdaptiveMask(policy=policy, k_values=policy.k_values, seed=mask_seed, **args)
        return AdaptiveMask(seed=mask_seed, **args)
    try:
        return create_defense(name, seed=mask_seed, **args)
    except TypeError as e:
        raise ValueError(f"defense {name!r} does not take these defense.args {sorted(args)}: {e}") from e


def run_training(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Train what ``cfg`` (a loaded config, see :func:`hybridmask.train.config.load_config`)
    describes; returns the results dict (also written to ``results.json``)."""
    method = str(cfg.get("method") or "hybridmask").lower()
    if method == "arl":
        from ..defenses.arl import train_arl
        return train_arl({k: v for k, v in cfg.items() if k != "_source_"})
    if method != "hybridmask":
        raise ValueError(f"unknown method {method!r}; use hybridmask or arl")
    from ..defenses.adaptive import save_policy
    from ..models import create_head, create_model, save_model
    from ..policy import LagrangianReward, Reinforce
    from .card import write_policy_card
    from .data import holdout_split, load_training_set
    from .evaluation import brief, build_sets, make_eval_fn, verify
    from .trainer import AlternatingTrainer, learnable_defense_parameters

    t_start = time.time()
    rc, dc, mc, tc, pc, ec = (cfg[k] for k in ("run", "data", "model", "train", "policy", "eval"))
    D.init_distributed()
    rank, world, main = D.rank(), D.world_size(), D.is_main()
    torch.set_num_threads(int(rc.get("threads") or 2))
    device = _device(rc.get("device"))
    progress = bool(rc.get("progress", True))
    name = rc.get("name") or Path(cfg.get("_source_", "run")).stem
    out_root = Path(os.path.expanduser(str(rc.get("out_dir") or "outputs")))
    out = out_root / str(name)
    seed = int(rc.get("seed") or 0)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "config.yaml", "w") as f:
            f.write(dump_config(cfg))

    # --- data: decoded once (rank 0 fills the cache, the others read it)
    faces = load_training_set(dc, cache_dir=out_root / "cache", progress=progress) if main else None
    D.barrier()
    if not main:
        faces = load_training_set(dc, cache_dir=out_root / "cache", progress=False)
    train_idx, held_idx = holdout_split(faces.labels.tolist(), int(dc.get("holdout_per_identity") or 0),
                                        dc.get("holdout_identities"), seed)
    train_set = faces.subset(train_idx)
    utility = faces.tensors(held_idx) if held_idx else None
    bs = int(dc["batch_size"])
    bpe = len(train_set) // (bs * world)
    if bpe == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {bs} x {world} process(es)")
    total = int(tc["steps"]) if tc.get("steps") is not None else int(tc["epochs"]) * bpe

    # --- objects (same seed on every rank: identical initial weights; DDP also broadcasts them)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    policy = build_policy(pc, seed=seed + 17)
    mseed = rc.get("mask_seed")
    mask_seed = None if mseed is None else int(mseed) + 7919 * rank   # every rank has its own secrets
    defense = build_defense(cfg["defense"], policy, mask_seed)
    size = int(faces.images.shape[-1])
    mask = getattr(defense, "mask", None)
    bdct = getattr(defense, "bdct", None)   # a frequency defense without a HybridMask (dctdp)
    grid = defense.grid if size == 112 else (mask.grid(size) if mask is not None else
                                             bdct.grid(size) if bdct is not None else size)
    model = create_model(mc["name"], stem=defense.input_kind, in_chans=defense.in_channels, grid=grid,
                         embedding_size=int(mc["embedding_size"]), dropout=float(mc.get("dropout") or 0.0),
                         **dict(mc.get("args") or {}))
    hc = cfg["head"]
    head = create_head(hc["name"], int(mc["embedding_size"]), faces.num_classes, s=float(hc.get("s") or 64.0),
                       m=hc.get("m"))
    oc = cfg["optim"]
    optimizer = make_optimizer(list(model.parameters()) + list(head.parameters()), oc)
    scheduler = make_scheduler(optimizer, oc, total)
    reinforce = reward = None
    if policy is not None and policy.trainable:
        reinforce = Reinforce(policy, lr=float(pc["lr"]), baseline=pc["baseline"], ema=float(pc["ema"]),
                              entropy_coef=float(pc["entropy_coef"]), grad_clip=pc.get("grad_clip"))
        rw = dict(cfg["reward"])
        reward = LagrangianReward(policy.k_values, **rw)
    # a defense with learnable parameters (DCTDP's noise budget) trains with its own Adam on the same LR schedule
    # (optim.defense_lr); train.privacy_weight weighs its privacy_loss()
    learned = learnable_defense_parameters(defense, policy)
    defense_optim = torch.optim.Adam(learned, lr=float(oc.get("defense_lr", 0.01))) if learned else None
    defense_sched = make_scheduler(defense_optim, oc, total) if learned else None
    sets = build_sets(ec, dc.get("synthetic")) if main and (ec.get("every") or ec.get("final", True)) else {}
    eval_fn = make_eval_fn(sets, ec.get("pairs"), int(ec.get("batch_size") or 128)) if ec.get("every") else None

    trainer = AlternatingTrainer(
        model, head, optimizer, train_set, defense, policy=policy, policy_optim=reinforce, reward=reward,
        n_fr=int(tc["n_fr"]), n_pi=int(tc["n_pi"]), scheduler=scheduler, eval_fn=eval_fn,
        utility_data=utility, utility_every=int(tc["utility_every"]), eval_every=int(ec.get("every") or 0),
        log_dir=out / "tb", ckpt_dir=out / "ckpt", ckpt_every=int(tc["ckpt_every"]), device=device, seed=seed,
        batch_size=bs, num_workers=int(dc.get("num_workers") or 0), log_every=int(tc["log_every"]),
        grad_clip=oc.get("grad_clip"), hflip=bool(dc.get("hflip")), progress=progress,
        calibrate_policy=bool(pc.get("calibrate", True)), total_steps=total, defense_optim=defense_optim,
        defense_scheduler=defense_sched, privacy_weight=float(tc.get("privacy_weight", 1.0)))
    resume = rc.get("resume")
    ckpt = None
    if resume == "auto":
        ckpt = out / "ckpt" / "last.pt" if (out / "ckpt" / "last.pt").is_file() else None
    elif resume:
        ckpt = Path(os.path.expanduser(str(resume)))
        if not ckpt.is_file():
            raise FileNotFoundError(f"run.resume checkpoint not found: {ckpt}")
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        if main and progress:
            print(f"resumed from {ckpt} at step {trainer.global_step}/{total}")
    if main and progress:
        print(f"run {name}: {len(train_set)} training images of {faces.num_classes} identities "
              f"({len(held_idx)} held out for U), defense {defense.name} -> {defense.input_kind} "
              f"{defense.in_channels}x{grid}x{grid}, model {mc['name']}, "
              f"policy {pc.get('name')}, {total} steps x {bs} x {world} process(es)")
    t_fit = time.time()
    summary = trainer.fit(steps=total)
    fit_seconds = time.time() - t_fit

    results: Dict[str, Any] = {}
    if main:
        masking = getattr(getattr(defense, "mask", None), "config", None)
        extra = {"defense": _plain(defense.config), "run": str(name), "steps": trainer.global_step}
        if learned:   # the trained budgets: create_defense("dctdp", state_path="<run>/model.pt") rebuilds them
            extra["defense_state"] = {k: v.detach().cpu() for k, v in defense.state_dict().items()}
        save_model(out / "model.pt", model, head, masking=masking, extra=extra)
        verification = {}
        if ec.get("final", True):
            for tname, vs in sets.items():
                m = verify(model, defense.query, vs, pairs=ec.get("final_pairs"),
                           batch_size=int(ec.get("batch_size") or 128), progress=progress)
                verification[tname] = brief(m)
                if progress:
                    print(f"verification {tname}: {100 * m['accuracy']:.2f} +- {100 * m['accuracy_std']:.2f} % "
                          f"({m['pairs']} pairs, AUC {m.get('auc') or float('nan'):.4f})")
        paths = {"dir": str(out), "model": str(out / "model.pt"), "checkpoint": str(out / "ckpt" / "last.pt"),
                 "tensorboard": str(out / "tb")}
        results = {
            "run": str(name), "method": "hybridmask", "config": _plain({k: v for k, v in cfg.items() if k != "_source_"}),
            "defense": _plain(defense.config), "model": _plain(model.config), "policy": pc.get("name"),
            "world_size": world, "device": str(device), "train": _plain(summary),
            "images_seen": trainer.global_step * bs * world, "train_images": len(train_set),
            "identities": faces.num_classes, "heldout_images": len(held_idx),
            "verification": verification, "epochs": _plain(trainer.epochs), "history": _plain(trainer.history),
            "fit_seconds": fit_seconds, "wall_seconds": time.time() - t_start,
            "images_per_second": trainer.global_step * bs * world / max(fit_seconds, 1e-9),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "mask_seed": "secure (OS)" if mseed is None else int(mseed), "paths": paths,
        }
        if learned and callable(getattr(defense, "train_stats", None)):
            results["defense_stats"] = _plain(defense.train_stats())
        if policy is not None and policy.trainable:
            context = {"running_loss": float(trainer.running_loss or 0.0), "progress": 1.0}
            save_policy(out / "policy.pt", policy, masking=masking, context=context,
                        extra={"run": str(name), "k_hist": _plain(summary["k_hist"]), "utility": summary["utility"],
                               "mu": summary["mu"], "verification": {k: v.get("accuracy") for k, v in verification.items()}})
            paths["policy"] = str(out / "policy.pt")
            paths["policy_card"] = str(out / "policy.md")
            write_policy_card(out / "policy.md", results, policy, reward)
        with atomic_write(out / "results.json", "w") as f:
            json.dump(results, f, indent=2, default=str)
        if progress:
            print(f"results: {out / 'results.json'}")
    trainer.close()
    D.barrier()
    return results


def _plain(obj):
    """JSON/checkpoint-friendly copy (tuples -> lists, numbers and strings kept, the rest -> str)."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
