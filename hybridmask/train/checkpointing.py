"""The trainer's full state (``format="hybridmask.trainer"``): what :class:`AlternatingTrainer` saves and
restores for an exact resume. Top level: positions, the model / head / optimizer / scheduler, the policy,
its optimizer and the reward, the defense record (``defense``: config, ``defense_state``: learned values,
as every hybridmask file records a defense), the trainable defense's optimizer and scheduler, the
callbacks' state and the run's bookkeeping (k counts, history, epoch summaries, last utility and
evaluation). ``ranks``: per process, the torch / CUDA / Python / NumPy RNG states, the augmentation
generator and ``defense.secret_state()`` (the masking secrets: keep the checkpoint private)."""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..defenses.io import TRAINER_FORMAT, defense_record
from ..utils import atomic_save, safe_torch_load
from ..utils.rng import generator_state, set_generator_state
from . import distributed as D

CKPT_FORMAT = TRAINER_FORMAT
CKPT_VERSION = 2   # 2: the defense record (defense + defense_state) and callbacks; 1 still loads


def _numpy_state_to_plain(state) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_plain(d) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _checksum(params) -> float:
    return float(sum(p.detach().double().sum() for p in params))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class CheckpointMixin:
    """State dict / checkpoint files of :class:`~hybridmask.train.trainer.AlternatingTrainer`."""

    @property
    def ckpt_dir(self) -> Optional[Path]:
        """The directory of the :class:`~hybridmask.train.callbacks.Checkpoint` callback (None: none)."""
        for cb in self.callbacks:
            if getattr(cb, "directory", None) is not None:
                return Path(cb.directory)
        return None

    def _rank_state(self) -> Dict[str, Any]:
        st = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": _numpy_state_to_plain(np.random.get_state()),
              "aug": generator_state(self.aug_gen), "defense": self.defense.secret_state(),
              "running_loss": self.running_loss,
              # consistency fingerprints: identical on every rank when DDP keeps the replicas in sync
              "model_checksum": _checksum(self.model.parameters()),
              "policy_checksum": None if self.policy is None else _checksum(self.policy.parameters())}
        if self.learn_defense:   # the trainable defense's parameters (gradients averaged over the ranks)
            st["defense_checksum"] = _checksum(self.defense_params)
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def state_dict(self) -> Dict[str, Any]:
        """The full training state (collective under DDP: every rank must call it)."""
        ranks = D.all_gather_object(self._rank_state())
        opt_state = lambda obj: obj.state_dict() if obj is not None else None  # noqa: E731
        return {
            "format": CKPT_FORMAT, "format_version": CKPT_VERSION,
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps, "seed": self.seed, "world_size": self.world,
            "sampler": opt_state(self.sampler),
            "model": self.model.state_dict(), "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": opt_state(self.scheduler),
            "policy": opt_state(self.policy), "policy_optim": opt_state(self.policy_optim),
            "reward": opt_state(self.reward),
            "distill": None if getattr(self, "distill", None) is None else {
                "weight": self.distill.weight, "margin": self.distill.margin,
                "projection": opt_state(self.distill.projection)},
            **defense_record(self.defense), "defense_learned": self.learn_defense,
            "defense_optim": opt_state(self.defense_optim) if self.learn_defense else None,
            "defense_scheduler": opt_state(self.defense_scheduler) if self.learn_defense else None,
            "callbacks": {name: st for name, st in ((type(cb).__name__, cb.state_dict()) for cb in self.callbacks)
                          if st is not None},
            "calibrated": self._calibrated, "k_counts": dict(self.k_counts), "history": list(self.history),
            "epochs": [{**e, "k_hist": dict(e["k_hist"])} for e in self.epochs],
            "last_utility": self.last_utility, "last_eval": dict(self.last_eval), "ranks": ranks,
        }

    def save_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
        """Write the full state atomically to ``path`` (default ``<checkpoint dir>/last.pt``); rank 0
        writes, every rank must call it. Returns the path (None on other ranks)."""
        state = self.state_dict()
        if path is None:
            if self.ckpt_dir is None:
                raise ValueError("no Checkpoint callback with a directory: pass a path")
            path = self.ckpt_dir / "last.pt"
        path = Path(path)
        if self.main:
            atomic_save(state, path, private=True)   # it holds the masking secrets
        D.barrier()
        return path if self.main else None

    def _check_parts(self, state: Dict[str, Any]) -> None:
        for what, obj, key in (("policy", self.policy, "policy"), ("policy optimizer", self.policy_optim, "policy_optim"),
                               ("reward", self.reward, "reward"), ("scheduler", self.scheduler, "scheduler")):
            if (obj is None) != (state.get(key) is None):
                raise ValueError(f"checkpoint and trainer disagree on the {what}: the checkpoint "
                                 f"{'has' if state.get(key) is not None else 'has no'} {what} state")
        dist, ours = state.get("distill"), getattr(self, "distill", None)
        if (dist is None) != (ours is None):
            raise ValueError(f"checkpoint and trainer disagree on distillation: the checkpoint was trained "
                             f"{'with' if dist is not None else 'without'} a teacher")
        if dist is not None and (dist.get("projection") is None) != (ours.projection is None):
            raise ValueError("checkpoint and trainer disagree on the distillation projection (the student's and the "
                             "teacher's embedding sizes)")
        learned = bool(state.get("defense_learned", state.get("defense_optim") is not None
                                 or state.get("defense_state") is not None))
        if learned != self.learn_defense:
            raise ValueError(f"checkpoint and trainer disagree on the defense: the checkpoint "
                             f"{'has' if learned else 'has no'} learned defense parameters")
        recorded = (state.get("defense") or {}).get("name")
        if recorded is not None and recorded != self.defense.name:
            raise ValueError(f"checkpoint and trainer disagree on the defense: the checkpoint was trained behind "
                             f"{recorded!r}, this trainer has {self.defense.name!r}")
        for what, obj, key in (("defense optimizer", self.defense_optim, "defense_optim"),
                               ("defense scheduler", self.defense_scheduler, "defense_scheduler")):
            if learned and (obj is None) != (state.get(key) is None):
                raise ValueError(f"checkpoint and trainer disagree on the {what}: the checkpoint "
                                 f"{'has' if state.get(key) is not None else 'has no'} {what} state")

    def _load_modules(self, state: Dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.head.load_state_dict(state["head"])
            if (state.get("distill") or {}).get("projection") is not None:
                self.distill.projection.load_state_dict(state["distill"]["projection"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"the checkpoint does not fit this model/head/optimizer ({_first_line(e)}); start a "
                             f"fresh run (another run.name, or run.resume=null)") from e
        try:
            self.defense.load_defense_state(state.get("defense_state"))
            if self.learn_defense and self.defense_optim is not None:
                self.defense_optim.load_state_dict(state["defense_optim"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"the checkpoint does not fit this defense ({_first_line(e)}); start a fresh run") from e
        if self.learn_defense and self.defense_scheduler is not None:
            self.defense_scheduler.load_state_dict(state["defense_scheduler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.policy_optim is not None:
            self.policy_optim.load_state_dict(state["policy_optim"])
        elif self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        if self.reward is not None:
            self.reward.load_state_dict(state["reward"])

    def _load_ranks(self, ranks) -> None:
        if len(ranks) == self.world:
            rs = ranks[self.rank]
            torch.set_rng_state(rs["torch"])
            random.setstate(tuple(rs["python"]) if not isinstance(rs["python"], tuple) else rs["python"])
            np.random.set_state(_numpy_state_from_plain(rs["numpy"]))
            set_generator_state(self.aug_gen, rs["aug"])
            self.defense.load_secret_state(rs["defense"])
            self.running_loss = rs.get("running_loss")
            if "cuda" in rs and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rs["cuda"])
        else:
            warnings.warn(f"checkpoint was written by {len(ranks)} process(es), this run has {self.world}: "
                          "RNG and masking-secret states are not restored (training continues, not bit-exactly)")
            self.running_loss = ranks[0].get("running_loss") if ranks else None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise ValueError(f"not a hybridmask trainer checkpoint (no format={CKPT_FORMAT!r} entry)")
        if state.get("format_version", 0) > CKPT_VERSION:
            raise ValueError(f"trainer checkpoint version {state.get('format_version')} is newer than this hybridmask")
        self._check_parts(state)
        self._load_modules(state)
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.total_steps = state.get("total_steps")
        self._calibrated = bool(state.get("calibrated", False))
        self.k_counts = {int(k): int(v) for k, v in state["k_counts"].items()}
        self.history = list(state.get("history", []))
        self.epochs = list(state.get("epochs", []))
        self.last_utility = state.get("last_utility")
        self.last_eval = dict(state.get("last_eval") or {})
        saved = state.get("callbacks") or {}
        for cb in self.callbacks:
            if type(cb).__name__ in saved:
                cb.load_state_dict(saved[type(cb).__name__])
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"checkpoint was trained with seed {state['seed']}, this trainer has seed {self.seed}: "
                          "the data order will differ from the original run")
        self._load_ranks(state.get("ranks") or [])
        if self.sampler is not None and state.get("sampler") and int(state["sampler"]["world_size"]) != self.world:
            warnings.warn("the number of processes changed: the data order continues from the same global "
                          "batch position but with a different split over ranks")
        self.resumed_at = self.global_step
        self._reset_epoch_stats()

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Restore the full state written by :meth:`save_checkpoint` (call on every rank)."""
        self.load_state_dict(safe_torch_load(path, map_location="cpu"))
