"""``AlternatingTrainer``: one trainer for every defense, with or without an adaptive policy.

It wraps the user's own objects (Opacus style: you keep your model, head, optimizer and loader)::

    trainer = AlternatingTrainer(model, head, optimizer, loader, defense,
                                 policy=policy, policy_optim=Reinforce(policy), reward=LagrangianReward(),
                                 n_fr=4, n_pi=1, log_dir="outputs/run/tb", ckpt_dir="outputs/run/ckpt")
    trainer.fit(steps=2000)            # or: for batch in trainer.batches(): trainer.step(batch)

The alternation (DESIGN 1.1 step 5, "alternating projection"): every ``step(batch)`` is one
*recognizer* step - the frozen policy picks k per sample from the context of the masked batch,
the defense mixes with those k, and the recognizer minimises the mixed-label margin loss.
After every ``n_fr`` recognizer steps come ``n_pi`` *policy* steps on the same batch (no new data
is loaded): the recognizer is frozen (eval mode, no gradient), the policy samples k, the batch is
re-mixed with them, the per-sample FR losses give the Lagrangian reward and REINFORCE updates the
policy. Every ``utility_every`` steps the utility ``U`` (identification accuracy of the current
recognizer on held-out images of training identities, masked with k=1 through
``defense.query``) is measured and fed to ``reward.update_multiplier(U)``.

With ``policy=None`` (or a fixed / uniform policy) it is plain training of a defense: this is how
the baselines and the pixel model train.

Defenses with learnable parameters (e.g. DCTDP's per-channel noise budget; found by
:func:`learnable_defense_parameters`) train together with the recognizer: the release keeps its
graph, the loss is ``FR loss + privacy_weight * defense.privacy_loss()`` (when the defense has
one), their gradients are stepped by ``defense_optim`` (or by ``optimizer`` if you put them there),
and ``defense.project_()`` (when it has one) puts them back into their valid range after each
step. Their values and optimizer state are part of the checkpoint. Defenses without learnable
parameters release under ``no_grad`` as before.

Exact resume: ``save_checkpoint`` stores the model, head, optimizer, scheduler, policy, its
optimizer and baseline, the reward state, the data position (a seeded, step-indexed sampler),
torch / CUDA / Python / NumPy RNG states, the augmentation generator and the defense's secret
generator state (per rank), and a learnable defense's parameters with their optimizer and
scheduler. ``load_checkpoint`` + ``fit(steps=N)`` then produces the same
parameters as an uninterrupted run. The checkpoint holds the masking secrets: keep it private.

Distributed: under ``torchrun`` (``hybridmask.train.distributed.init_distributed()`` first) the
recognizer is wrapped in DistributedDataParallel, every rank reads its slice of each global batch,
the policy decision is made on the context gathered from all ranks with the policy's own
generator (kept identical on every rank), the masking secrets stay in each rank's own secure
generator, and logging, evaluation and checkpoint files are written by rank 0 only.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..defenses.adaptive import can_split, mix_encoded
from ..models import MixedMarginLoss
from ..utils import atomic_save, safe_torch_load
from ..utils.rng import generator_state, set_generator_state
from . import distributed as D
from .sampler import ResumableBatchSampler, epoch_seed

CKPT_FORMAT = "hybridmask.trainer"
CKPT_VERSION = 1
MAX_EVAL_BATCH = 128


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


class _FRLoss(nn.Module):
    """Recognizer + margin head -> per-sample mixed-label loss (the module DDP wraps)."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model = model
        self.loss = MixedMarginLoss(head, reduction="none")

    def forward(self, x, labels, weights):
        return self.loss(self.model(x), labels, weights)


def _numpy_state_to_plain(state) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_plain(d) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _secret_state(defense) -> Optional[Dict[str, torch.Tensor]]:
    mask = getattr(defense, "mask", None)
    if mask is not None and hasattr(mask, "secret_state"):
        return mask.secret_state()
    gen = getattr(defense, "generator", None)
    if isinstance(gen, torch.Generator):
        return {"generator": generator_state(gen)}
    return None


def _load_secret_state(defense, state) -> None:
    if state is None:
        return
    mask = getattr(defense, "mask", None)
    if mask is not None and hasattr(mask, "load_secret_state"):
        mask.load_secret_state(state)
    elif isinstance(getattr(defense, "generator", None), torch.Generator):
        set_generator_state(defense.generator, state["generator"])


def learnable_defense_parameters(defense, policy=None) -> List[nn.Parameter]:
    """The parameters of ``defense`` that train with the recognizer: those with ``requires_grad``,
    minus the parameters of a policy (the trainer's ``policy`` or the defense's own ``.policy``,
    which REINFORCE updates). Empty for a defense that is not an ``nn.Module``."""
    if not isinstance(defense, nn.Module):
        return []
    skip = set()
    for pol in (policy, getattr(defense, "policy", None)):
        if isinstance(pol, nn.Module):
            skip.update(id(p) for p in pol.parameters())
    return [p for p in defense.parameters() if p.requires_grad and id(p) not in skip]


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


class AlternatingTrainer:
    """Alternating recognizer / policy training of a defense (see the module doc).

    Args:
        model: the recognizer backbone (input: what ``defense`` releases).
        head: its margin head (``hybridmask.models.create_head``); the loss is
            :class:`~hybridmask.models.MixedMarginLoss` on the mixed labels.
        optimizer: optimizer over the model's and head's parameters.
        loader: a ``DataLoader`` (rebuilt around a seeded, resumable batch sampler with the same
            dataset, batch size, workers and collate function) or a map-style ``Dataset`` of
            ``(image, label)`` (then ``batch_size`` is required). The last incomplete batch is dropped.
        defense: a :mod:`hybridmask.defenses` defense.
        policy: a :mod:`hybridmask.policy` policy choosing k per sample, or None (the defense's
            own k). Taken from ``policy_optim.policy`` when omitted.
        policy_optim: a :class:`~hybridmask.policy.Reinforce` updater (None: the policy is frozen).
        reward: a :class:`~hybridmask.policy.LagrangianReward` (default one when a trainable policy
            is given).
        n_fr, n_pi: recognizer steps per cycle and policy steps after each cycle.
        scheduler: LR scheduler, stepped after every recognizer step.
        eval_fn: ``eval_fn(model, defense) -> {name: value}`` called every ``eval_every`` steps on
            rank 0 (e.g. LFW verification on a few hundred pairs).
        utility_data: held-out ``(images, labels)`` of *training* identities (tensors or a
            dataset) for the utility U; None: the first training batch (not held out; a warning).
        utility_every: steps between utility measurements (0: never).
        log_dir: TensorBoard directory (None: no TensorBoard); ckpt_dir: checkpoint directory.
        ckpt_every: steps between checkpoints (0: only at the end of ``fit``).
        device: where the recognizer runs (default: the model's device).
        seed: seed of the data order and the augmentation generator (not of the masking secrets).
        hflip: random horizontal flips of the faces (drawn from a checkpointed generator).
        grad_clip: max gradient norm of the recognizer (None: no clipping).
        calibrate_policy: standardise the policy's inputs with the first batch's context.
        total_steps: planned number of steps (for the ``progress`` context feature; set by ``fit``).
        bn_warmup: BatchNorm running statistics are exact averages over the first ``1/momentum``
            batches (instead of an EMA from running_var = 1), so eval-mode embeddings are right
            after a short run.
        defense_optim: optimizer over the defense's learnable parameters (e.g. ``Adam(
            learnable_defense_parameters(defense), lr=...)``; not needed when ``optimizer`` already
            holds them). Every learnable parameter must be in one of the two optimizers.
        defense_scheduler: LR scheduler of ``defense_optim``, stepped after every recognizer step.
        privacy_weight: weight of ``defense.privacy_loss()`` in the recognizer step's loss (only
            for a defense with learnable parameters and a ``privacy_loss`` method).
    """

    def __init__(self, model: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer, loader, defense,
                 policy=None, policy_optim=None, reward=None, n_fr: int = 4, n_pi: int = 1, scheduler=None,
                 eval_fn: Optional[Callable] = None, utility_data=None, utility_every: int = 50,
                 eval_every: int = 0, log_dir: Optional[Union[str, os.PathLike]] = None,
                 ckpt_dir: Optional[Union[str, os.PathLike]] = None, ckpt_every: int = 0,
                 device: Optional[Union[str, torch.device]] = None, seed: int = 0,
                 batch_size: Optional[int] = None, num_workers: int = 0, log_every: int = 10,
                 grad_clip: Optional[float] = None, hflip: bool = False, progress: bool = True,
                 calibrate_policy: bool = True, total_steps: Optional[int] = None,
                 running_loss_momentum: float = 0.9, utility_limit: int = 512, bn_warmup: bool = True,
                 defense_optim: Optional[torch.optim.Optimizer] = None, defense_scheduler=None,
                 privacy_weight: float = 1.0):
        for name, v in (("n_fr", n_fr), ("n_pi", n_pi), ("utility_every", utility_every), ("eval_every", eval_every),
                        ("ckpt_every", ckpt_every), ("log_every", log_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if n_fr < 1:
            raise ValueError(f"n_fr must be >= 1, got {n_fr}")
        if policy is None and policy_optim is not None:
            policy = policy_optim.policy
        if policy is not None and policy_optim is not None and policy_optim.policy is not policy:
            raise ValueError("policy_optim updates a different policy object than the one given as policy")
        self.model, self.head, self.optimizer, self.defense = model, head, optimizer, defense
        self.policy, self.policy_optim, self.scheduler = policy, policy_optim, scheduler
        self.learn_policy = bool(policy is not None and policy_optim is not None and policy.trainable and n_pi > 0)
        if self.learn_policy and reward is None:
            from ..policy import LagrangianReward
            reward = LagrangianReward(policy.k_values)
        self.reward = reward
        self._setup_learnable_defense(defense, policy, optimizer, defense_optim, defense_scheduler, privacy_weight)
        self.n_fr, self.n_pi = int(n_fr), int(n_pi)
        self.eval_fn, self.eval_every = eval_fn, int(eval_every)
        self.utility_every, self.log_every, self.ckpt_every = int(utility_every), int(log_every), int(ckpt_every)
        self.grad_clip = grad_clip
        self.hflip = bool(hflip)
        self.progress = bool(progress)
        self.calibrate_policy = bool(calibrate_policy)
        self.total_steps = total_steps
        self.seed = int(seed)
        self.momentum = float(running_loss_momentum)
        self.rank, self.world = D.rank(), D.world_size()
        self.main = self.rank == 0
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.head.to(self.device)
        self.defense.to(self.device) if isinstance(defense, nn.Module) else None
        if policy is not None:
            self.policy.to(self.device)
        self.loss_fn = MixedMarginLoss(head, reduction="none")
        self.net: nn.Module = _FRLoss(model, head)
        if D.is_dist():
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.net, device_ids=ids)
            if policy is not None:   # one policy (weights + sampling generator) on every rank
                self.policy.load_state_dict(D.broadcast_object(self.policy.state_dict()))
        self.fast = policy is not None and can_split(defense)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        # data
        self.sampler: Optional[ResumableBatchSampler] = None
        self.loader = self._wrap_loader(loader, batch_size, num_workers)
        self.batches_per_epoch = self.sampler.batches_per_epoch if self.sampler is not None else None
        self._check_batch_vs_k()
        # utility split
        self.utility_x = self.utility_y = None
        if utility_data is not None:
            self.utility_x, self.utility_y = _as_tensors(utility_data, utility_limit)
        self._warned_utility = False
        # state
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.running_loss: Optional[float] = None
        self.aug_gen = torch.Generator()
        self.aug_gen.manual_seed(epoch_seed(self.seed, 1_000_003 + self.rank))
        self.k_counts: Dict[int, int] = {}
        self.history: List[Dict[str, float]] = []
        self.epochs: List[Dict[str, Any]] = []
        self.last_utility: Optional[float] = None
        self.last_eval: Dict[str, float] = {}
        self.last_policy_stats: Dict[str, float] = {}
        self._calibrated = False
        self.bn_warmup = bool(bn_warmup)
        self._bn_modules = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._writer = None
        self._resumed_at: Optional[int] = None
        self._reset_window()
        self._reset_epoch_stats()

    def _setup_learnable_defense(self, defense, policy, optimizer, defense_optim, defense_scheduler,
                                 privacy_weight) -> None:
        self.defense_params = learnable_defense_parameters(defense, policy)
        self.learn_defense = bool(self.defense_params)
        self.defense_optim, self.defense_scheduler = defense_optim, defense_scheduler
        if isinstance(privacy_weight, bool) or not isinstance(privacy_weight, (int, float)) \
                or not math.isfinite(privacy_weight) or privacy_weight < 0:
            raise ValueError(f"privacy_weight must be a non-negative number, got {privacy_weight!r}")
        self.privacy_weight = float(privacy_weight)
        if not self.learn_defense:
            if defense_optim is not None or defense_scheduler is not None:
                raise ValueError(f"defense_optim/defense_scheduler given, but the defense "
                                 f"{getattr(defense, 'name', type(defense).__name__)!r} has no learnable parameters")
            return
        if policy is not None:
            raise ValueError("a defense with learnable parameters trains without a policy (policy=None)")
        if defense_scheduler is not None and defense_optim is None:
            raise ValueError("defense_scheduler needs defense_optim")
        covered = {id(p) for opt in (optimizer, defense_optim) if opt is not None
                   for g in opt.param_groups for p in g["params"]}
        names = {id(p): n for n, p in defense.named_parameters()}
        missing = [names.get(id(p), "?") for p in self.defense_params if id(p) not in covered]
        if missing:
            raise ValueError(f"the defense's learnable parameters {missing} are in no optimizer: pass "
                             f"defense_optim=torch.optim.Adam(learnable_defense_parameters(defense), lr=...) "
                             f"or add them to the optimizer")

    # ------------------------------------------------------------------ data
    def _wrap_loader(self, loader, batch_size, num_workers):
        if isinstance(loader, DataLoader):
            dataset = loader.dataset
            bs = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
            if bs is None:
                raise ValueError("cannot tell the DataLoader's batch size; pass a DataLoader with batch_size=")
            kw = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, timeout=loader.timeout)
            if loader.num_workers > 0:
                kw.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
        elif isinstance(loader, Dataset):
            dataset = loader
            if batch_size is None:
                raise ValueError("batch_size is required when a Dataset (not a DataLoader) is given")
            bs = int(batch_size)
            kw = dict(num_workers=int(num_workers))
        elif loader is None:
            return None
        else:
            warnings.warn("loader is neither a DataLoader nor a Dataset: it is iterated as given, so the data "
                          "order cannot be restored exactly on resume")
            return loader
        self.sampler = ResumableBatchSampler(len(dataset), int(bs), seed=self.seed, rank=D.rank(),
                                             world_size=D.world_size())
        self._loader_gen = torch.Generator()
        self.batch_size = int(bs)
        return DataLoader(dataset, batch_sampler=self.sampler, generator=self._loader_gen, **kw)

    def _check_batch_vs_k(self) -> None:
        """Partners come from the (per-process) batch: the largest k must fit in it."""
        bs = getattr(self, "batch_size", None)
        if bs is None or getattr(getattr(self.defense, "mask", None), "pool", None) is not None:
            return
        ks = list(self.policy.k_values) if self.policy is not None else []
        k_def = getattr(getattr(getattr(self.defense, "mask", None), "mixup", None), "k", None)
        if isinstance(k_def, int):
            ks.append(k_def)
        if isinstance(getattr(self.defense, "k", None), int):
            ks.append(self.defense.k)
        if ks and max(ks) > bs:
            raise ValueError(f"the batch size per process ({bs}) must be at least the largest k ({max(ks)}): "
                             f"MixUp partners come from the same batch")

    def batches(self) -> Iterator:
        """Endless iterator over the training batches, starting at the current position (epoch,
        batch) - exactly where an uninterrupted run would be."""
        if self.loader is None:
            raise ValueError("no loader was given")
        if self.sampler is None:
            while True:
                yield from self.loader
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            self._loader_gen.manual_seed(epoch_seed(self.seed + 7, self.epoch))  # workers' base seed
            if len(self.sampler) == 0:   # resumed exactly at an epoch end
                self._end_epoch()
                continue
            yield from self.loader

    # ------------------------------------------------------------------ masking with a policy
    def _progress(self) -> float:
        if not self.total_steps:
            return 0.0
        return min(max(self.global_step / float(self.total_steps), 0.0), 1.0)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self.defense.mask.encode(images)
        return self.defense.query(images)

    def _context(self, encoded: torch.Tensor) -> torch.Tensor:
        from ..policy import context_features
        if self.policy is None or not self.policy.trainable and self.policy.context_dim is None:
            return encoded.new_zeros(encoded.shape[0], 1)   # fixed / uniform policies ignore the context
        rl = 0.0 if self.running_loss is None else self.running_loss
        return context_features(encoded, rl, self._progress())

    def _local(self, t: torch.Tensor, b: int) -> torch.Tensor:
        return t[self.rank * b:(self.rank + 1) * b]

    def _mix(self, images, encoded, k_local):
        if self.fast:
            return mix_encoded(self.defense, encoded, k_local.cpu())
        return self.defense.release(images, k=k_local.cpu())

    @torch.no_grad()
    def _release(self, images: torch.Tensor):
        """Mask a batch for a recognizer step -> (masked, record, k_global or None, cache)."""
        if self.policy is None:
            masked, rec = self.defense.release(images)
            return masked, rec, None, None
        b = images.shape[0]
        encoded = self._encode(images)
        ctx = D.all_gather_cat(self._context(encoded))
        if self.calibrate_policy and not self._calibrated and hasattr(self.policy, "calibrate") \
                and self.global_step == 0 and ctx.shape[0] >= 2:
            self.policy.calibrate(ctx)
        self._calibrated = True
        k_all, _, _ = self.policy.act(ctx)
        masked, rec = self._mix(images, encoded, self._local(k_all, b))
        return masked, rec, k_all, (encoded, ctx)

    @staticmethod
    def _labels(rec, labels: torch.Tensor):
        if rec is None:
            return labels.unsqueeze(1), torch.ones(labels.shape[0], 1, dtype=torch.float32, device=labels.device)
        return rec.mixed_labels(labels), rec.label_weights.to(labels.device).float()

    # ------------------------------------------------------------------ one step
    def _prepare(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("a training batch must be (images, labels)")
        images, labels = batch[0], batch[1]
        images = images.to(self.device, non_blocking=True).float()
        labels = torch.as_tensor(labels).to(self.device).long()
        if self.hflip:
            flip = (torch.rand(images.shape[0], generator=self.aug_gen) < 0.5).to(self.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
        return images, labels

    def step(self, batch) -> Dict[str, float]:
        """One recognizer step on ``batch`` = ``(images, labels)`` (and, at the end of a cycle of
        ``n_fr`` recognizer steps, ``n_pi`` policy steps on the same batch). Also measures the
        utility, evaluates, logs and checkpoints when their interval is reached."""
        t0 = time.perf_counter()
        images, labels = self._prepare(batch)
        privacy = None
        if self.learn_defense:   # the release keeps its graph: the loss reaches the defense's parameters
            masked, rec = self.defense.release(images)
            k_all = cache = None
        else:
            masked, rec, k_all, cache = self._release(images)
        y, w = self._labels(rec, labels)
        self.net.train()
        with self._bn_warmup():
            loss_vec = self.net(masked, y, w)
        loss = loss_vec.mean()
        self.optimizer.zero_grad(set_to_none=True)
        if self.learn_defense:
            privacy = self._defense_backward(loss)
        else:
            loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.learn_defense:
            self._defense_step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"the recognizer loss became {lv} at step {self.global_step + 1} "
                                     f"(lower optim.lr or set train.grad_clip)")
        self.running_loss = lv if self.running_loss is None else self.momentum * self.running_loss + (1 - self.momentum) * lv
        ks = (k_all if k_all is not None else (rec.k if rec is not None else torch.ones(images.shape[0]))).long().cpu()
        self.global_step += 1
        out = {"loss": lv}
        if self.learn_defense and privacy is not None:
            out["privacy_loss"] = privacy
            self._win_privacy.append(privacy)
        # --- policy steps (recognizer frozen)
        if self.learn_policy and self.global_step % self.n_fr == 0:
            out.update(self._policy_steps(images, labels, cache))
        # --- bookkeeping
        self._account(lv, ks, images.shape[0], time.perf_counter() - t0)
        if self.utility_every and self.global_step % self.utility_every == 0:
            out["utility"] = self.measure_utility(images, labels)
        if self.eval_fn is not None and self.eval_every and self.global_step % self.eval_every == 0:
            self.run_eval()
        if self.log_every and self.global_step % self.log_every == 0:
            self._log()
        self.batch_in_epoch += 1
        if self.batches_per_epoch and self.batch_in_epoch >= self.batches_per_epoch:
            self._end_epoch()
        if self.ckpt_every and self.ckpt_dir is not None and self.global_step % self.ckpt_every == 0:
            self.save_checkpoint()
        return out

    def _defense_backward(self, loss: torch.Tensor) -> Optional[float]:
        """Backward of ``loss + privacy_weight * defense.privacy_loss()`` (learnable defense);
        under DDP the defense's gradients are averaged over the ranks. Returns the privacy loss."""
        if self.defense_optim is not None:
            self.defense_optim.zero_grad(set_to_none=True)
        privacy = None
        total = loss
        privacy_fn = getattr(self.defense, "privacy_loss", None)
        if callable(privacy_fn):
            pl = privacy_fn()
            privacy = float(pl.detach())
            if not math.isfinite(privacy):
                raise FloatingPointError(f"the defense's privacy loss became {privacy} at step {self.global_step + 1} "
                                         f"(lower optim.defense_lr or train.privacy_weight)")
            total = loss + self.privacy_weight * pl
        total.backward()
        if D.is_dist():
            import torch.distributed as dist
            for p in self.defense_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)
        return privacy

    def _defense_step(self) -> None:
        if self.defense_optim is not None:
            self.defense_optim.step()
        if self.defense_scheduler is not None:
            self.defense_scheduler.step()
        project = getattr(self.defense, "project_", None)
        if callable(project):
            project()

    @contextlib.contextmanager
    def _bn_warmup(self):
        """BatchNorm running statistics start as exact averages of the batches seen (factor 1/n)
        until the EMA factor takes over (n >= 1/momentum), instead of an EMA from the initial
        running_var = 1. Short runs (and the input BN of the frequency stem, whose channels have
        variances far below 1) would otherwise carry the initial value into eval mode and
        collapse every embedding to one point. The model's momentum is restored after the step."""
        if not self.bn_warmup:
            yield
            return
        saved = []
        for m in self._bn_modules:
            mom = m.momentum
            if mom is not None and m.training and m.track_running_stats:
                n = int(m.num_batches_tracked)
                if n + 1 < 1.0 / mom:
                    saved.append((m, mom))
                    m.momentum = 1.0 / (n + 1)
        try:
            yield
        finally:
            for m, mom in saved:
                m.momentum = mom

    def _policy_steps(self, images, labels, cache) -> Dict[str, float]:
        encoded, ctx = cache
        b = images.shape[0]
        self.model.eval()
        self.head.eval()
        stats: Dict[str, float] = {}
        try:
            for _ in range(self.n_pi):
                k_all, a_all, logp = self.policy.act(ctx)
                with torch.no_grad():
                    masked, rec = self._mix(images, encoded, self._local(k_all, b))
                    y, w = self._labels(rec, labels)
                    fr = self.loss_fn(self.model(masked), y, w)
                fr_all = D.all_gather_cat(fr.detach().float())
                r = self.reward(fr_all.cpu().double(), k_all.cpu())
                ent = self.policy.dist(ctx).entropy()
                st = self.policy_optim.update(logp, r.to(logp.device, logp.dtype), entropy=ent)
                if D.is_dist():  # identical inputs give identical updates; re-sync anyway (tiny)
                    for p in self.policy.parameters():
                        D.broadcast_(p.data)
                stats = {f"policy/{k}": float(v) for k, v in st.items()}
                stats["policy/fr_loss"] = float(fr_all.mean())
                with torch.no_grad():
                    probs = self.policy.probs(ctx).mean(0)
                for kv, p in zip(self.policy.k_values, probs.tolist()):
                    stats[f"policy/prob_k{kv}"] = p
        finally:
            self.model.train()
            self.head.train()
        rs = self.reward.stats()
        for key in ("mu", "privacy_mean", "cost_mean"):
            stats[f"policy/{key}"] = float(rs[key])
        self.last_policy_stats = stats
        self._win_policy.append(stats)
        return stats

    # ------------------------------------------------------------------ utility and evaluation
    @torch.no_grad()
    def identification_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 identification accuracy: k=1 query masking -> embedding -> nearest class centre
        of the margin head."""
        was = self.model.training, self.head.training
        self.model.eval()
        self.head.eval()
        correct = 0
        try:
            for i in range(0, images.shape[0], MAX_EVAL_BATCH):
                x = images[i:i + MAX_EVAL_BATCH].to(self.device).float()
                emb = self.model(self.defense.query(x))
                pred = self.head.cosine(emb).argmax(1).cpu()
                correct += int((pred == labels[i:i + MAX_EVAL_BATCH].cpu()).sum())
        finally:
            self.model.train(was[0])
            self.head.train(was[1])
        return correct / max(1, images.shape[0])

    def measure_utility(self, images=None, labels=None) -> float:
        """Measure U on the held-out split (rank 0, broadcast) and update the reward's multiplier."""
        if self.utility_x is None:
            if images is None:
                raise ValueError("no utility data: pass utility_data= to the trainer")
            if not self._warned_utility and self.main:
                warnings.warn("no held-out utility data given: U is measured on the first training batch "
                              "(not held out); pass utility_data= for a proper utility constraint")
            self._warned_utility = True
            self.utility_x, self.utility_y = images.detach().cpu(), labels.detach().cpu()
        u = self.identification_accuracy(self.utility_x, self.utility_y) if self.main else None
        u = float(D.broadcast_object(u))
        self.last_utility = u
        if self.reward is not None:
            self.reward.update_multiplier(u)
        if self.main and self.writer is not None:
            self.writer.add_scalar("utility/identification", u, self.global_step)
            if self.reward is not None:
                self.writer.add_scalar("policy/mu", self.reward.mu, self.global_step)
        return u

    def run_eval(self) -> Dict[str, float]:
        res: Dict[str, float] = {}
        if self.main and self.eval_fn is not None:
            res = {k: float(v) for k, v in (self.eval_fn(self.model, self.defense) or {}).items()}
            self.last_eval = res
            if self.writer is not None:
                for k, v in res.items():
                    self.writer.add_scalar(f"eval/{k}", v, self.global_step)
        self.model.train()
        return res

    # ------------------------------------------------------------------ logging
    @property
    def writer(self):
        if self._writer is None and self.main and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step: TensorBoard drops events of an earlier (interrupted or restarted) run in
            # this folder from this step on, so a resumed or restarted run shows one clean curve
            self._writer = SummaryWriter(str(self.log_dir), purge_step=int(self._resumed_at or 0))
        return self._writer

    def _reset_window(self) -> None:
        self._win_loss, self._win_n, self._win_time, self._win_imgs = 0.0, 0, 0.0, 0
        self._win_k: List[torch.Tensor] = []
        self._win_policy: List[Dict[str, float]] = []
        self._win_privacy: List[float] = []

    def _reset_epoch_stats(self) -> None:
        self._ep_loss, self._ep_n, self._ep_k, self._ep_t0 = 0.0, 0, {}, time.perf_counter()

    def _account(self, loss: float, ks: torch.Tensor, b: int, dt: float) -> None:
        self._win_loss += loss
        self._win_n += 1
        self._win_time += dt
        self._win_imgs += b * self.world
        self._win_k.append(ks)
        self._ep_loss += loss
        self._ep_n += 1
        for kv, c in zip(*torch.unique(ks, return_counts=True)):
            self.k_counts[int(kv)] = self.k_counts.get(int(kv), 0) + int(c)
            self._ep_k[int(kv)] = self._ep_k.get(int(kv), 0) + int(c)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log(self) -> None:
        loss = D.all_reduce_mean(self._win_loss / max(1, self._win_n))
        rec: Dict[str, float] = {"step": float(self.global_step), "epoch": float(self.epoch), "loss": loss,
                                 "lr": self.lr(), "img_per_s": self._win_imgs / max(self._win_time, 1e-9)}
        ks = torch.cat(self._win_k) if self._win_k else torch.zeros(0, dtype=torch.long)
        for kv in sorted(set(ks.tolist())):
            rec[f"frac_k{kv}"] = float((ks == kv).double().mean())
        if ks.numel():
            rec["k_mean"] = float(ks.double().mean())
        if self._win_policy:
            for key in self._win_policy[-1]:
                vals = [s[key] for s in self._win_policy if key in s]
                rec[key] = float(np.mean(vals))
        if self.last_utility is not None:
            rec["utility"] = self.last_utility
        if self.reward is not None:
            rec["mu"] = float(self.reward.mu)
        rec.update({f"eval/{k}": v for k, v in self.last_eval.items()})
        if self.learn_defense:
            if self._win_privacy:
                rec["defense/privacy_loss"] = float(np.mean(self._win_privacy))
            stats_fn = getattr(self.defense, "train_stats", None)
            if callable(stats_fn):
                rec.update({f"defense/{k}": float(v) for k, v in stats_fn().items()})
        self.history.append(rec)
        w = self.writer
        if w is not None:
            s = self.global_step
            w.add_scalar("train/fr_loss", loss, s)
            w.add_scalar("train/lr", rec["lr"], s)
            w.add_scalar("train/throughput_img_s", rec["img_per_s"], s)
            w.add_scalar("train/epoch", self.epoch, s)
            if ks.numel():
                w.add_histogram("k/hist", ks.float(), s, bins=np.arange(0.5, max(ks.max().item(), 6) + 1.5))
                w.add_scalar("k/mean", rec["k_mean"], s)
                kvals = self.policy.k_values if self.policy is not None else sorted(set(ks.tolist()))
                for kv in kvals:
                    w.add_scalar(f"k/frac_k{kv}", float((ks == kv).double().mean()), s)
            for key, v in rec.items():
                if key.startswith("policy/") and key != "policy/mu":
                    w.add_scalar(key, v, s)
            if "policy/reward_mean" in rec:
                w.add_scalar("policy/reward", rec["policy/reward_mean"], s)
            if self.reward is not None:
                w.add_scalar("policy/mu", rec["mu"], s)
            if self.last_utility is not None:
                w.add_scalar("utility/identification_last", self.last_utility, s)
            for key, v in rec.items():
                if key.startswith("defense/"):
                    w.add_scalar(key, v, s)
        self._reset_window()

    def _end_epoch(self) -> None:
        n = max(1, sum(self._ep_k.values()))
        summary = {"epoch": self.epoch, "step": self.global_step, "loss": self._ep_loss / max(1, self._ep_n),
                   "k_hist": {int(k): c / n for k, c in sorted(self._ep_k.items())},
                   "utility": self.last_utility, "seconds": time.perf_counter() - self._ep_t0}
        if self._ep_n:
            self.epochs.append(summary)
            if self.main and self.progress:
                kh = " ".join(f"k{k}:{100 * v:.0f}%" for k, v in summary["k_hist"].items())
                u = "n/a" if summary["utility"] is None else f"{100 * summary['utility']:.1f}%"
                tqdm.write(f"epoch {self.epoch + 1}: loss {summary['loss']:.3f} | k-hist {kh} | utility {u} | "
                           f"{summary['seconds']:.0f}s")
            if self.writer is not None:
                self.writer.add_scalar("train/epoch_loss", summary["loss"], self.global_step)
        self.epoch += 1
        self.batch_in_epoch = 0
        self._reset_epoch_stats()

    # ------------------------------------------------------------------ fit
    def fit(self, steps: Optional[int] = None, epochs: Optional[int] = None) -> Dict[str, Any]:
        """Train until ``global_step == steps`` (absolute, so a resumed trainer continues to the
        same end) or for ``epochs`` epochs in total. Writes a final checkpoint. The planned length
        (``total_steps``, which the policy sees as training progress) is kept if it is longer,
        so ``fit(steps=N // 2)`` on a trainer built with ``total_steps=N`` is the first half of
        the N-step run."""
        if (steps is None) == (epochs is None):
            raise ValueError("give exactly one of steps= or epochs=")
        if epochs is not None:
            if not self.batches_per_epoch:
                raise ValueError("epochs= needs a DataLoader or Dataset loader (with a known length)")
            steps = int(epochs) * self.batches_per_epoch
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not self.total_steps or self.total_steps < steps:
            self.total_steps = steps   # the plan (progress feature); kept when a longer run was planned
        it = self.batches()
        bar = tqdm(total=steps, initial=min(self.global_step, steps), desc="train", unit="step",
                   disable=not (self.main and self.progress), dynamic_ncols=True)
        stop = _GracefulStop(enabled=self.ckpt_dir is not None and not D.is_dist())
        try:
            while self.global_step < steps:
                out = self.step(next(it))
                if stop.requested:   # Ctrl-C: finish the step, save a clean checkpoint, then stop
                    path = self.save_checkpoint()
                    tqdm.write(f"interrupted at step {self.global_step}: state saved to {path}")
                    raise KeyboardInterrupt
                post = OrderedDict(loss=f"{self.running_loss:.3f}")
                if self.last_utility is not None:
                    post["U"] = f"{self.last_utility:.2f}"
                if self.reward is not None:
                    post["mu"] = f"{self.reward.mu:.2f}"
                if "policy/reward_mean" in out:
                    post["R"] = f"{out['policy/reward_mean']:.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        finally:
            stop.restore()
            bar.close()
        if self._win_n and self.log_every:
            self._log()
        if self.ckpt_dir is not None:
            self.save_checkpoint()
        if self._writer is not None:
            self._writer.flush()
        return self.summary()

    def summary(self) -> Dict[str, Any]:
        n = max(1, sum(self.k_counts.values()))
        return {"steps": self.global_step, "epochs": self.epoch, "running_loss": self.running_loss,
                "utility": self.last_utility, "mu": None if self.reward is None else float(self.reward.mu),
                "k_hist": {int(k): c / n for k, c in sorted(self.k_counts.items())},
                "eval": dict(self.last_eval)}

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> Dict[str, Any]:
        st = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": _numpy_state_to_plain(np.random.get_state()),
              "aug": generator_state(self.aug_gen), "defense": _secret_state(self.defense),
              "running_loss": self.running_loss,
              # consistency fingerprints: identical on every rank when DDP keeps the replicas in sync
              "model_checksum": float(sum(p.detach().double().sum() for p in self.model.parameters())),
              "policy_checksum": None if self.policy is None else
              float(sum(p.detach().double().sum() for p in self.policy.parameters()))}
        if self.learn_defense:   # the learnable defense's parameters (gradients averaged over the ranks)
            st["defense_checksum"] = float(sum(p.detach().double().sum() for p in self.defense_params))
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def state_dict(self) -> Dict[str, Any]:
        """The full training state (collective under DDP: every rank must call it)."""
        ranks = D.all_gather_object(self._rank_state())
        st = {
            "format": CKPT_FORMAT, "format_version": CKPT_VERSION,
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps, "seed": self.seed, "world_size": self.world,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "model": self.model.state_dict(), "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "policy_optim": self.policy_optim.state_dict() if self.policy_optim is not None else None,
            "reward": self.reward.state_dict() if self.reward is not None else None,
            "calibrated": self._calibrated, "k_counts": dict(self.k_counts), "history": list(self.history),
            "epochs": [{**e, "k_hist": dict(e["k_hist"])} for e in self.epochs],
            "last_utility": self.last_utility, "last_eval": dict(self.last_eval), "ranks": ranks,
        }
        if self.learn_defense:   # (absent for defenses without learnable parameters)
            st.update(self._defense_state())
        return st

    def _defense_state(self) -> Dict[str, Any]:
        return {"defense_state": {k: v.detach().clone() for k, v in self.defense.state_dict().items()},
                "defense_optim": self.defense_optim.state_dict() if self.defense_optim is not None else None,
                "defense_scheduler": self.defense_scheduler.state_dict() if self.defense_scheduler is not None else None}

    def _check_defense_state(self, state: Dict[str, Any]) -> None:
        has = state.get("defense_state") is not None
        if has != self.learn_defense:
            raise ValueError(f"checkpoint and trainer disagree on the defense: the checkpoint "
                             f"{'has' if has else 'has no'} learned defense parameters")
        for what, obj, key in (("defense optimizer", self.defense_optim, "defense_optim"),
                               ("defense scheduler", self.defense_scheduler, "defense_scheduler")):
            if has and (obj is None) != (state.get(key) is None):
                raise ValueError(f"checkpoint and trainer disagree on the {what}: the checkpoint "
                                 f"{'has' if state.get(key) is not None else 'has no'} {what} state")

    def _load_defense_state(self, state: Dict[str, Any]) -> None:
        if not self.learn_defense:
            return
        try:
            self.defense.load_state_dict(state["defense_state"])
            if self.defense_optim is not None:
                self.defense_optim.load_state_dict(state["defense_optim"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the checkpoint does not fit this defense ({first}); start a fresh run") from e
        if self.defense_scheduler is not None:
            self.defense_scheduler.load_state_dict(state["defense_scheduler"])

    def save_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
        """Write the full state atomically to ``path`` (default ``ckpt_dir/last.pt``); rank 0
        writes, every rank must call it. Returns the path (None on other ranks)."""
        state = self.state_dict()
        if path is None:
            if self.ckpt_dir is None:
                raise ValueError("no ckpt_dir: pass a path")
            path = self.ckpt_dir / "last.pt"
        path = Path(path)
        if self.main:
            atomic_save(state, path)
        D.barrier()
        return path if self.main else None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise ValueError("not a hybridmask trainer checkpoint (no format='hybridmask.trainer' entry)")
        if state.get("format_version", 0) > CKPT_VERSION:
            raise ValueError(f"trainer checkpoint version {state.get('format_version')} is newer than this hybridmask")
        for what, obj, key in (("policy", self.policy, "policy"), ("policy optimizer", self.policy_optim, "policy_optim"),
                               ("reward", self.reward, "reward"), ("scheduler", self.scheduler, "scheduler")):
            if (obj is None) != (state.get(key) is None):
                raise ValueError(f"checkpoint and trainer disagree on the {what}: the checkpoint "
                                 f"{'has' if state.get(key) is not None else 'has no'} {what} state")
        self._check_defense_state(state)
        try:
            self.model.load_state_dict(state["model"])
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the checkpoint does not fit this model/head/optimizer ({first}); start a fresh "
                             f"run (another run.name, or run.resume=null)") from e
        self._load_defense_state(state)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.policy_optim is not None:
            self.policy_optim.load_state_dict(state["policy_optim"])
        elif self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        if self.reward is not None:
            self.reward.load_state_dict(state["reward"])
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.total_steps = state.get("total_steps")
        self._calibrated = bool(state.get("calibrated", False))
        self.k_counts = {int(k): int(v) for k, v in state["k_counts"].items()}
        self.history = list(state.get("history", []))
        self.epochs = list(state.get("epochs", []))
        self.last_utility = state.get("last_utility")
        self.last_eval = dict(state.get("last_eval") or {})
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"checkpoint was trained with seed {state['seed']}, this trainer has seed {self.seed}: "
                          "the data order will differ from the original run")
        ranks = state.get("ranks") or []
        if len(ranks) == self.world:
            rs = ranks[self.rank]
            torch.set_rng_state(rs["torch"])
            random.setstate(tuple(rs["python"]) if not isinstance(rs["python"], tuple) else rs["python"])
            np.random.set_state(_numpy_state_from_plain(rs["numpy"]))
            set_generator_state(self.aug_gen, rs["aug"])
            _load_secret_state(self.defense, rs["defense"])
            self.running_loss = rs.get("running_loss")
            if "cuda" in rs and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rs["cuda"])
        else:
            warnings.warn(f"checkpoint was written by {len(ranks)} process(es), this run has {self.world}: "
                          "RNG and masking-secret states are not restored (training continues, not bit-exactly)")
            self.running_loss = ranks[0].get("running_loss") if ranks else None
        if self.sampler is not None and state.get("sampler") and int(state["sampler"]["world_size"]) != self.world:
            warnings.warn("the number of processes changed: the data order continues from the same global "
                          "batch position but with a different split over ranks")
        self._resumed_at = self.global_step
        self._reset_window()
        self._reset_epoch_stats()

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Restore the full state written by :meth:`save_checkpoint` (call on every rank)."""
        self.load_state_dict(safe_torch_load(path, map_location="cpu"))
