"""Callbacks of :class:`~hybridmask.train.AlternatingTrainer` (arcface_torch's ``train_v2.py`` callbacks,
Lightning's hook names): everything around the recognizer / policy step.

Per ``fit`` step the trainer calls, on every callback in ascending ``order``:

* ``on_step_end(trainer, out)`` after ``step()``: ``out`` holds the step's ``loss``, ``k``, ``images``,
  ``seconds`` (and policy / privacy numbers); measuring callbacks add theirs (``utility``, ``eval/...``)
  for the later ones to log;
* ``on_epoch_end(trainer, summary)`` when the step finished an epoch;
* ``on_batch_end(trainer)`` last: the trainer is at a resume point (checkpoints are written here).

and ``on_train_start`` / ``on_train_end`` around the loop, ``teardown`` always (also on an error or
Ctrl-C), ``close`` from ``trainer.close()``. Every rank runs every callback (utility, logging and
checkpoints are collective under DDP); files are written by rank 0. A callback with state of its own
returns it from ``state_dict`` (stored in the trainer checkpoint under its class name).

Built in, in their order: :class:`Utility` (10), :class:`Verification` (20), :class:`Logging` (50),
:class:`ProgressBar` (60), :class:`Checkpoint` (90).
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as D


class Callback:
    """Base class: every hook is a no-op."""
    order = 50

    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, out: Dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, trainer, summary: Dict[str, Any]) -> None:
        pass

    def on_batch_end(self, trainer) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def teardown(self, trainer) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _every(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return n


def _as_tensors(data, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) tensors from a tuple of tensors or a map-style dataset of (image, label)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    else:
        n = len(data) if limit is None else min(len(data), limit)
        items = [data[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    y = torch.as_tensor(y).long()
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"utility data must be (N, 3, H, W) images with N labels, got {tuple(x.shape)} / {tuple(y.shape)}")
    return x, y


class Utility(Callback):
    """Every ``every`` steps: the utility U (top-1 identification accuracy of k=1 queries,
    ``defense.query``, against the margin head's class centres, or the teacher's when distilling without
    the margin loss) on held-out ``data`` of *training*
    identities (tensors or a dataset, at most ``limit`` images), measured on rank 0 and broadcast, fed
    to ``trainer.reward.update_multiplier(U)``. ``data=None``: the current training batch (not held out;
    a warning)."""
    order = 10

    def __init__(self, data=None, every: int = 50, limit: int = 512, batch_size: int = 128):
        self.every = _every(every, "utility every")
        self.batch_size = int(batch_size)
        self.x = self.y = None
        if data is not None:
            self.x, self.y = _as_tensors(data, limit)
        self._warned = False

    def on_step_end(self, trainer, out):
        if self.every and trainer.global_step % self.every == 0:
            out["utility"] = self.measure(trainer)

    def measure(self, trainer) -> float:
        from .evaluation import identification_accuracy
        if self.x is None:
            if trainer.batch is None:
                raise ValueError("no utility data: pass Utility(data=...)")
            if not self._warned and trainer.main:
                warnings.warn("no held-out utility data given: U is measured on the first training batch "
                              "(not held out); pass Utility(data=...) for a proper utility constraint")
            self._warned = True
            self.x, self.y = (t.detach().cpu() for t in trainer.batch)
        d = trainer.distill    # distillation without the margin loss: the head is untrained, the teacher's
        centres = d.centres if d is not None else None                      # class centres stand in for it
        u = identification_accuracy(trainer.model, trainer.head, trainer.defense.query, self.x, self.y,
                                    trainer.device, self.batch_size, centres=centres,
                                    projection=None if centres is None else d.projection) if trainer.main else None
        u = float(D.broadcast_object(u))
        trainer.last_utility = u
        if trainer.reward is not None:
            trainer.reward.update_multiplier(u)
        return u


class Verification(Callback):
    """Every ``every`` steps (rank 0): ``eval_fn(model, defense) -> {name: value}`` (e.g. LFW
    verification on a few hundred pairs, :func:`hybridmask.train.evaluation.make_eval_fn`)."""
    order = 20

    def __init__(self, eval_fn: Callable, every: int):
        self.eval_fn, self.every = eval_fn, _every(every, "eval every")

    def on_step_end(self, trainer, out):
        if not (self.every and trainer.global_step % self.every == 0):
            return
        if trainer.main:
            res = {k: float(v) for k, v in (self.eval_fn(trainer.model, trainer.defense) or {}).items()}
            trainer.last_eval = res
            out.update({f"eval/{k}": v for k, v in res.items()})
        trainer.model.train()


class Logging(Callback):
    """Every ``every`` steps: one record of the window's mean loss, LR, throughput, k fractions, policy
    and defense numbers, utility, multiplier and evaluation appended to ``trainer.history`` (every rank;
    the loss is averaged over ranks) and written to TensorBoard under ``log_dir`` (rank 0; None: no
    TensorBoard), with the k histogram. A resumed or restarted run in the same folder replaces the old
    curve from its first step on (``purge_step``)."""
    order = 50

    def __init__(self, log_dir: Optional[Union[str, os.PathLike]] = None, every: int = 10):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.every = _every(every, "log every")
        self._writer = None
        self._reset()

    def writer(self, trainer):
        if self._writer is None and trainer.main and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=int(trainer.resumed_at or 0))
        return self._writer

    def _reset(self) -> None:
        self._loss, self._n, self._time, self._imgs = 0.0, 0, 0.0, 0
        self._k: List[torch.Tensor] = []
        self._policy: List[Dict[str, float]] = []
        self._privacy: List[float] = []

    def on_train_start(self, trainer):
        self._reset()

    def on_step_end(self, trainer, out):
        w, s = self.writer(trainer), trainer.global_step
        if w is not None:
            if "utility" in out:
                w.add_scalar("utility/identification", out["utility"], s)
                if trainer.reward is not None:
                    w.add_scalar("policy/mu", trainer.reward.mu, s)
            for k, v in out.items():
                if k.startswith("eval/"):
                    w.add_scalar(k, v, s)
        self._loss += out["loss"]
        self._n += 1
        self._time += out["seconds"]
        self._imgs += out["images"]
        self._k.append(out["k"])
        if any(k.startswith("policy/") for k in out):
            self._policy.append({k: v for k, v in out.items() if k.startswith("policy/")})
        if "privacy_loss" in out:
            self._privacy.append(out["privacy_loss"])
        if self.every and s % self.every == 0:
            self.log(trainer)

    def on_epoch_end(self, trainer, summary):
        w = self.writer(trainer)
        if w is not None:
            w.add_scalar("train/epoch_loss", summary["loss"], trainer.global_step)

    def on_train_end(self, trainer):
        if self._n and self.every:
            self.log(trainer)
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def log(self, trainer) -> None:
        loss = D.all_reduce_mean(self._loss / max(1, self._n))
        rec: Dict[str, float] = {"step": float(trainer.global_step), "epoch": float(trainer.epoch), "loss": loss,
                                 "lr": trainer.lr(), "img_per_s": self._imgs / max(self._time, 1e-9)}
        ks = torch.cat(self._k) if self._k else torch.zeros(0, dtype=torch.long)
        for kv in sorted(set(ks.tolist())):
            rec[f"frac_k{kv}"] = float((ks == kv).double().mean())
        if ks.numel():
            rec["k_mean"] = float(ks.double().mean())
        if self._policy:
            for key in self._policy[-1]:
                rec[key] = float(np.mean([s[key] for s in self._policy if key in s]))
        if trainer.last_utility is not None:
            rec["utility"] = trainer.last_utility
        if trainer.reward is not None:
            rec["mu"] = float(trainer.reward.mu)
        rec.update({f"eval/{k}": v for k, v in trainer.last_eval.items()})
        if trainer.learn_defense:
            if self._privacy:
                rec["defense/privacy_loss"] = float(np.mean(self._privacy))
            rec.update({f"defense/{k}": float(v) for k, v in trainer.defense.train_stats().items()})
        trainer.history.append(rec)
        self._write(trainer, rec, ks)
        self._reset()

    def _write(self, trainer, rec, ks) -> None:
        w = self.writer(trainer)
        if w is None:
            return
        s = trainer.global_step
        w.add_scalar("train/fr_loss", rec["loss"], s)
        w.add_scalar("train/lr", rec["lr"], s)
        w.add_scalar("train/throughput_img_s", rec["img_per_s"], s)
        w.add_scalar("train/epoch", trainer.epoch, s)
        if ks.numel():
            w.add_histogram("k/hist", ks.float(), s, bins=np.arange(0.5, max(ks.max().item(), 6) + 1.5))
            w.add_scalar("k/mean", rec["k_mean"], s)
            kvals = trainer.policy.k_values if trainer.policy is not None else sorted(set(ks.tolist()))
            for kv in kvals:
                w.add_scalar(f"k/frac_k{kv}", float((ks == kv).double().mean()), s)
        for key, v in rec.items():
            if key.startswith("policy/") and key != "policy/mu":
                w.add_scalar(key, v, s)
        if "policy/reward_mean" in rec:
            w.add_scalar("policy/reward", rec["policy/reward_mean"], s)
        if trainer.reward is not None:
            w.add_scalar("policy/mu", rec["mu"], s)
        if trainer.last_utility is not None:
            w.add_scalar("utility/identification_last", trainer.last_utility, s)
        for key, v in rec.items():
            if key.startswith("defense/"):
                w.add_scalar(key, v, s)


class ProgressBar(Callback):
    """A tqdm bar on rank 0 (running loss, U, mu, policy reward) and one line per epoch
    (loss, k histogram, utility, seconds)."""
    order = 60

    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer):
        steps = trainer.target_steps or 0
        self.bar = tqdm(total=steps, initial=min(trainer.global_step, steps), desc="train", unit="step",
                        disable=not trainer.main, dynamic_ncols=True)

    def on_step_end(self, trainer, out):
        post = OrderedDict(loss=f"{trainer.running_loss:.3f}")
        if trainer.last_utility is not None:
            post["U"] = f"{trainer.last_utility:.2f}"
        if trainer.reward is not None:
            post["mu"] = f"{trainer.reward.mu:.2f}"
        if "policy/reward_mean" in out:
            post["R"] = f"{out['policy/reward_mean']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def on_epoch_end(self, trainer, summary):
        if trainer.main:
            kh = " ".join(f"k{k}:{100 * v:.0f}%" for k, v in summary["k_hist"].items())
            u = "n/a" if summary["utility"] is None else f"{100 * summary['utility']:.1f}%"
            tqdm.write(f"epoch {summary['epoch'] + 1}: loss {summary['loss']:.3f} | k-hist {kh} | utility {u} | "
                       f"{summary['seconds']:.0f}s")

    def teardown(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _GracefulStop:
    """While training, the first Ctrl-C (SIGINT) only sets a flag so the trainer can finish the
    step and write a clean checkpoint; a second one interrupts at once."""

    def __init__(self, enabled: bool):
        import signal
        import threading
        self.requested = False
        self._old = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._signal = signal
            self._old = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._old is not None:
            self._signal.signal(self._signal.SIGINT, self._old)
            self._old = None


class Checkpoint(Callback):
    """The full trainer state (:meth:`AlternatingTrainer.save_checkpoint`) in ``directory/last.pt``
    every ``every`` steps (0: only at the end of ``fit``) and at the end. ``graceful``: the first
    Ctrl-C finishes the step, writes the checkpoint and then stops (single process only)."""
    order = 90

    def __init__(self, directory: Union[str, os.PathLike], every: int = 0, graceful: bool = True):
        self.directory = Path(directory)
        self.every = _every(every, "checkpoint every")
        self.graceful = bool(graceful)
        self._stop: Optional[_GracefulStop] = None

    def on_train_start(self, trainer):
        self._stop = _GracefulStop(enabled=self.graceful and not D.is_dist())

    def on_batch_end(self, trainer):
        if self.every and trainer.global_step % self.every == 0:
            trainer.save_checkpoint(self.directory / "last.pt")
        if self._stop is not None and self._stop.requested:   # Ctrl-C: a clean checkpoint, then stop
            path = trainer.save_checkpoint(self.directory / "last.pt")
            tqdm.write(f"interrupted at step {trainer.global_step}: state saved to {path}")
            raise KeyboardInterrupt

    def on_train_end(self, trainer):
        trainer.save_checkpoint(self.directory / "last.pt")

    def teardown(self, trainer):
        if self._stop is not None:
            self._stop.restore()
            self._stop = None


__all__ = ["Callback", "Utility", "Verification", "Logging", "ProgressBar", "Checkpoint"]
