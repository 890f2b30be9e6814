"""``AlternatingTrainer``: one trainer for every defense, with or without an adaptive policy.

It wraps the user's own objects (Opacus style: you keep your model, head, optimizer and data) and
runs a flat loop; measuring, evaluating, logging and checkpointing are callbacks (arcface_torch's
``train_v2.py`` pattern)::

    from hybridmask.train import AlternatingTrainer, PolicySetup, TrainOptions
    from hybridmask.train.callbacks import Checkpoint, Logging, ProgressBar, Utility, Verification
    trainer = AlternatingTrainer(
        model, head, optimizer, loader, defense, scheduler=scheduler,
        policy=PolicySetup(policy, reinforce=Reinforce(policy), reward=LagrangianReward(), n_fr=4, n_pi=1),
        callbacks=[Utility(heldout, every=50), Verification(eval_fn, every=500), Logging("outputs/run/tb"),
                   ProgressBar(), Checkpoint("outputs/run/ckpt", every=200)],
        options=TrainOptions(seed=0, hflip=True))
    trainer.fit(steps=2000)            # or: for batch in trainer.batches(): trainer.step(batch)

The alternation (DESIGN 1.1 step 5, "alternating projection"): every ``step(batch)`` is one
*recognizer* step - the frozen policy picks k per sample from the context of the encoded batch
(``defense.draw(x, 1)`` -> ``defense.encode``), the defense mixes with those k
(``defense.draw_mix`` -> ``defense.mix``), and the recognizer minimises the mixed-label margin loss.
After every ``n_fr`` recognizer steps come ``n_pi`` *policy* steps on the same batch (no new data is
loaded): the recognizer is frozen (eval mode, no gradient), the policy samples k, the encoded batch is
re-mixed with them, the per-sample FR losses give the Lagrangian reward and REINFORCE updates the
policy. With an attacker in the loop (``LagrangianReward(attacker=DecoderAttacker(...), attacker_weight=a)``)
each policy step's releases are first scored by the attacker against their dominant clean faces (the
per-sample reconstruction error enters the reward's privacy term), then the attacker trains on them with
its own optimizer (the recognizer is untouched). The :class:`~hybridmask.train.callbacks.Utility` callback measures the utility ``U``
(identification accuracy of k=1 queries on held-out images of training identities) and feeds it to
``reward.update_multiplier(U)``.

With ``policy=None`` it is plain training of a defense: this is how the baselines and the pixel
model train. Only a defense that mixes (``defense.mixes``) takes a policy.

A defense with ``trainable=True`` (DCTDP's per-channel noise budget) trains together with the
recognizer: its release keeps its graph, the loss is ``FR loss + privacy_weight *
defense.privacy_loss()``, ``defense.trainable_parameters()`` are stepped by
``DefenseOptim.optimizer`` (or by ``optimizer`` if you put them there) and ``defense.project_()``
puts them back into their valid range after each step. Other defenses release under ``no_grad``.

Exact resume: ``save_checkpoint`` stores the model, head, optimizer, scheduler, policy, its optimizer
and baseline, the reward state, the data position (a seeded, step-indexed sampler), torch / CUDA /
Python / NumPy RNG states, the augmentation generator, the defense record (``defense_record``: config
+ learned state), ``defense.secret_state()`` per rank, the defense optimizer and scheduler and the
callbacks' state. ``load_checkpoint`` + ``fit(steps=N)`` then produces the same parameters as an
uninterrupted run. The checkpoint holds the masking secrets: keep it private.

Distributed: under ``torchrun`` (``hybridmask.train.distributed.init_distributed()`` first) the
recognizer is wrapped in DistributedDataParallel, every rank reads its slice of each global batch,
the policy decision is made on the context gathered from all ranks with the policy's own generator
(kept identical on every rank), the masking secrets stay in each rank's own secure generator, and
logging, evaluation and checkpoint files are written by rank 0 only (every rank runs the callbacks:
some of them are collective).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..models import MixedMarginLoss
from . import distributed as D
from .checkpointing import CheckpointMixin
from .sampler import ResumableBatchSampler, epoch_seed


def _check_count(name: str, v, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


@dataclass
class PolicySetup:
    """The masking policy that picks k per face, and how it trains.

    policy: a :mod:`hybridmask.policy` policy. reinforce: its :class:`~hybridmask.policy.Reinforce`
    updater (None: the policy is frozen). reward: a :class:`~hybridmask.policy.LagrangianReward`
    (default one when a trainable policy is updated). n_fr, n_pi: recognizer steps per cycle and policy
    steps after each cycle. calibrate: standardise the policy's inputs with the first batch's context."""
    policy: Any
    reinforce: Any = None
    reward: Any = None
    n_fr: int = 4
    n_pi: int = 1
    calibrate: bool = True

    def __post_init__(self):
        _check_count("n_fr", self.n_fr, 1)
        _check_count("n_pi", self.n_pi)
        if self.policy is None:
            raise ValueError("PolicySetup needs a policy (use policy=None on the trainer for none)")
        if self.reinforce is not None and self.reinforce.policy is not self.policy:
            raise ValueError("the REINFORCE updater updates a different policy object than the one given as policy")

    @property
    def learns(self) -> bool:
        return bool(self.reinforce is not None and self.policy.trainable and self.n_pi > 0)


@dataclass
class DefenseOptim:
    """How a trainable defense trains: its optimizer (None: its parameters are in the recognizer's
    optimizer), LR scheduler, and the weight of ``defense.privacy_loss()`` in the loss."""
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    privacy_weight: float = 1.0

    def __post_init__(self):
        w = self.privacy_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"privacy_weight must be a non-negative number, got {w!r}")
        if self.scheduler is not None and self.optimizer is None:
            raise ValueError("a defense scheduler needs the defense optimizer")


@dataclass
class TrainOptions:
    """seed: data order and augmentation (not the masking secrets). batch_size / num_workers: when a
    ``Dataset`` is given. device: where the recognizer runs (default: the model's device). hflip: random
    horizontal flips (a checkpointed generator). grad_clip: max gradient norm of the recognizer.
    bn_warmup: BatchNorm running statistics are exact averages over the first ``1/momentum`` batches.
    total_steps: planned length (the policy's ``progress`` feature; ``fit`` sets it).
    running_loss_momentum: EMA factor of the running loss (a policy context feature).
    copies: each face of a batch enters the step ``copies`` times, each copy with its own flip and its own
    masking draw (PartialFace's repeated masked copies: the recognizer sees one face through several secrets
    in one step; a step then costs ``copies`` times as much)."""
    seed: int = 0
    batch_size: Optional[int] = None
    num_workers: int = 0
    device: Optional[Union[str, torch.device]] = None
    hflip: bool = False
    grad_clip: Optional[float] = None
    bn_warmup: bool = True
    total_steps: Optional[int] = None
    running_loss_momentum: float = 0.9
    copies: int = 1


class _FRLoss(nn.Module):
    """Recognizer + margin head (+ the distillation projection) -> per-sample loss (the module DDP wraps).

    Without a target: the mixed-label margin loss. With a distillation ``target``: ``(margin loss if
    margin) + weight * (1 - cos(proj(model(x)), target))``; returns ``(loss, distillation term)``."""

    def __init__(self, model: nn.Module, head: nn.Module, distill=None):
        super().__init__()
        self.model = model
        self.loss = MixedMarginLoss(head, reduction="none")
        self.margin = distill is None or distill.margin
        self.weight = 0.0 if distill is None else distill.weight
        self.projection = None if distill is None else distill.projection

    def forward(self, x, labels, weights, target=None):
        emb = self.model(x)
        if target is None:
            return self.loss(emb, labels, weights)
        from ..models.teacher import distillation_loss
        dist = distillation_loss(emb, target, weight=1.0, projection=self.projection)
        total = self.weight * dist
        if self.margin:
            total = total + self.loss(emb, labels, weights)
        return total, dist


class AlternatingTrainer(CheckpointMixin):
    """Alternating recognizer / policy training of a defense (see the module doc).

    Args:
        model: the recognizer backbone (input: what ``defense`` releases).
        head: its margin head (``hybridmask.models.create_head``).
        optimizer: optimizer over the model's and head's parameters.
        data: a ``DataLoader`` (rebuilt around a seeded, resumable batch sampler with the same dataset,
            batch size, workers and collate function) or a map-style ``Dataset`` of ``(image, label)``
            (then ``options.batch_size`` is required). The last incomplete batch is dropped.
        defense: a :mod:`hybridmask.defenses` defense.
        scheduler: LR scheduler of ``optimizer``, stepped after every recognizer step.
        policy: a :class:`PolicySetup` (or a bare policy: frozen), or None (the defense's own k).
        defense_optim: a :class:`DefenseOptim` (or a bare optimizer) for a ``trainable`` defense.
        callbacks: :class:`~hybridmask.train.callbacks.Callback` objects, run in their ``order``.
        options: :class:`TrainOptions`.
    """

    def __init__(self, model: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer, data, defense, *,
                 scheduler=None, policy: Union[PolicySetup, Any, None] = None,
                 defense_optim: Union[DefenseOptim, torch.optim.Optimizer, None] = None,
                 callbacks: Sequence = (), options: Optional[TrainOptions] = None, distill=None):
        opts = options or TrainOptions()
        if policy is not None and not isinstance(policy, PolicySetup):
            policy = PolicySetup(policy)
        if isinstance(defense_optim, torch.optim.Optimizer):
            defense_optim = DefenseOptim(defense_optim)
        self.options = opts
        self.model, self.head, self.optimizer, self.defense, self.scheduler = model, head, optimizer, defense, scheduler
        self.policy_setup = policy
        self.distill = distill
        if distill is not None and not callable(getattr(distill, "target", None)):
            raise TypeError("distill must be a hybridmask.train.distill.Distillation")
        if distill is not None and defense.public_pool() is not None and distill.pool_emb is None:
            raise ValueError("the defense mixes partners from a public pool: give Distillation(pool_emb=...) the "
                             "teacher's embeddings of the pool's faces (e.g. load_teacher(spec)(pool)), so a "
                             "mix's target includes its pool partners")
        self.policy = policy.policy if policy else None
        self.policy_optim = policy.reinforce if policy else None
        self.n_fr, self.n_pi = (policy.n_fr, policy.n_pi) if policy else (1, 0)
        self.learn_policy = bool(policy and policy.learns)
        self.reward = policy.reward if policy else None
        if self.learn_policy and self.reward is None:
            from ..policy import LagrangianReward
            self.reward = LagrangianReward(self.policy.k_values)
        self._setup_defense_training(defense_optim or DefenseOptim())
        self.seed = int(opts.seed)
        self.hflip, self.grad_clip = bool(opts.hflip), opts.grad_clip
        if isinstance(opts.copies, bool) or not isinstance(opts.copies, int) or opts.copies < 1:
            raise ValueError(f"copies must be a positive int (masked copies of each face per step), got {opts.copies!r}")
        self.copies = int(opts.copies)
        self.total_steps = opts.total_steps
        self.momentum = float(opts.running_loss_momentum)
        self.rank, self.world = D.rank(), D.world_size()
        self.main = self.rank == 0
        self.device = torch.device(opts.device) if opts.device is not None else next(model.parameters()).device
        self.projection = distill.projection if distill is not None else None
        for m in (model, head, defense) + tuple(x for x in (self.policy, self.projection) if x is not None):
            m.to(self.device)
        self.attacker = getattr(self.reward, "attacker", None) if self.learn_policy else None
        if self.learn_policy and self.attacker is None and float(getattr(self.reward, "attacker_weight", 0.0)) > 0:
            raise ValueError("the reward weighs an attacker term (attacker_weight > 0) but has no attacker: "
                             "give LagrangianReward(attacker=DecoderAttacker(defense.in_channels), ...)")
        if self.attacker is not None:
            self.attacker.to(self.device)
        if self.projection is not None:
            covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if any(id(p) not in covered for p in self.projection.parameters()):
                raise ValueError("the distillation projection's parameters are not in the optimizer")
        self.loss_fn = MixedMarginLoss(head, reduction="none")
        self.net: nn.Module = _FRLoss(model, head, distill)
        if D.is_dist():
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            unused = distill is not None and not distill.margin   # the head gets no gradient
            self.net = DDP(self.net, device_ids=ids, find_unused_parameters=unused)
            if self.policy is not None:   # one policy (weights + sampling generator) on every rank
                self.policy.load_state_dict(D.broadcast_object(self.policy.state_dict()))
            if self.attacker is not None:   # one attacker on every rank (its gradients are averaged)
                self.attacker.load_state_dict(D.broadcast_object(self.attacker.state_dict()))
        # data
        self.sampler: Optional[ResumableBatchSampler] = None
        self.batch_size: Optional[int] = None
        self.loader = self._wrap_loader(data, opts.batch_size, opts.num_workers)
        self.batches_per_epoch = self.sampler.batches_per_epoch if self.sampler is not None else None
        self._check_batch_vs_k()
        # state
        self.global_step = self.epoch = self.batch_in_epoch = 0
        self.running_loss: Optional[float] = None
        self.aug_gen = torch.Generator()
        self.aug_gen.manual_seed(epoch_seed(self.seed, 1_000_003 + self.rank))
        self.k_counts: Dict[int, int] = {}
        self.history: List[Dict[str, float]] = []        # written by the Logging callback
        self.epochs: List[Dict[str, Any]] = []           # epoch summaries
        self.last_utility: Optional[float] = None        # written by the Utility callback
        self.last_eval: Dict[str, float] = {}            # written by the Verification callback
        self.last_policy_stats: Dict[str, float] = {}
        self.batch = None                                # the current (images, labels), after flips
        self.batch_indices: Optional[torch.Tensor] = None  # dataset indices of the current batch (distillation)
        self.batch_flipped: Optional[torch.Tensor] = None  # which of its faces were flipped (None: no flips)
        self.target_steps: Optional[int] = None          # where the running fit() stops
        self.resumed_at: Optional[int] = None
        self._calibrated = False
        self.bn_warmup = bool(opts.bn_warmup)
        self._bn_modules = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.callbacks = sorted(callbacks, key=lambda cb: getattr(cb, "order", 50))
        self._reset_epoch_stats()

    def _setup_defense_training(self, dopt: DefenseOptim) -> None:
        defense = self.defense
        self.defense_params = list(defense.trainable_parameters()) if defense.trainable else []
        self.learn_defense = bool(self.defense_params)
        self.defense_optim, self.defense_scheduler = dopt.optimizer, dopt.scheduler
        self.privacy_weight = float(dopt.privacy_weight)
        if self.policy is not None and self.learn_defense:
            raise ValueError("a defense with learnable parameters trains without a policy (policy=None)")
        if self.policy is not None and not defense.mixes:
            raise ValueError(f"defense {defense.name!r} does not mix faces: a policy has no k to choose, it trains "
                             f"without a policy (policy=None)")
        if not self.learn_defense:
            if dopt.optimizer is not None or dopt.scheduler is not None:
                raise ValueError(f"defense_optim given, but the defense {defense.name!r} has no learnable parameters")
            return
        covered = {id(p) for opt in (self.optimizer, dopt.optimizer) if opt is not None
                   for g in opt.param_groups for p in g["params"]}
        names = {id(p): n for n, p in defense.named_parameters()}
        missing = [names.get(id(p), "?") for p in self.defense_params if id(p) not in covered]
        if missing:
            raise ValueError(f"the defense's learnable parameters {missing} are in no optimizer: pass "
                             f"defense_optim=DefenseOptim(torch.optim.Adam(defense.trainable_parameters(), lr=...)) "
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
            if self.distill is not None:   # the batch also carries the faces' dataset indices
                from .distill import IndexedDataset
                dataset = IndexedDataset(dataset)
        elif isinstance(loader, Dataset):
            dataset = loader
            if self.distill is not None:
                from .distill import IndexedDataset
                dataset = IndexedDataset(dataset)
            if batch_size is None:
                raise ValueError("batch_size is required when a Dataset (not a DataLoader) is given "
                                 "(TrainOptions(batch_size=...))")
            bs = int(batch_size)
            kw = dict(num_workers=int(num_workers))
        elif loader is None:
            return None
        else:
            if self.distill is not None:
                raise ValueError("distillation needs a DataLoader or a Dataset (the faces' indices into the teacher "
                                 "cache come from the trainer's sampler)")
            warnings.warn("data is neither a DataLoader nor a Dataset: it is iterated as given, so the data "
                          "order cannot be restored exactly on resume")
            return loader
        self.sampler = ResumableBatchSampler(len(dataset), int(bs), seed=self.seed, rank=D.rank(),
                                             world_size=D.world_size())
        self._loader_gen = torch.Generator()
        self.batch_size = int(bs)
        return DataLoader(dataset, batch_sampler=self.sampler, generator=self._loader_gen, **kw)

    def _check_batch_vs_k(self) -> None:
        """Partners come from the (per-process) batch: the largest k must fit in it (not when they come from a
        public pool)."""
        if self.batch_size is None or self.defense.public_pool() is not None:
            return
        ks = [int(self.defense.max_k)] + (list(self.policy.k_values) if self.policy is not None else [])
        if max(ks) > self.batch_size:
            raise ValueError(f"the batch size per process ({self.batch_size}) must be at least the largest k "
                             f"({max(ks)}): MixUp partners come from the same batch")

    def batches(self) -> Iterator:
        """Endless iterator over the training batches, starting at the current position (epoch,
        batch) - exactly where an uninterrupted run would be."""
        if self.loader is None:
            raise ValueError("no data was given")
        if self.sampler is None:
            while True:
                yield from self.loader
        while True:
            if self.batches_per_epoch and self.batch_in_epoch >= self.batches_per_epoch:
                self.end_epoch()   # step() was driven by hand (fit() closes epochs itself)
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            self._loader_gen.manual_seed(epoch_seed(self.seed + 7, self.epoch))  # workers' base seed
            if len(self.sampler) == 0:   # resumed exactly at an epoch end
                self.end_epoch()
                continue
            yield from self.loader

    # ------------------------------------------------------------------ masking with a policy
    def progress(self) -> float:
        """Training progress in [0, 1] (a policy context feature)."""
        if not self.total_steps:
            return 0.0
        return min(max(self.global_step / float(self.total_steps), 0.0), 1.0)

    def _context(self, encoded: torch.Tensor) -> torch.Tensor:
        from ..policy import context_features
        if not self.policy.trainable and self.policy.context_dim is None:
            return encoded.new_zeros(encoded.shape[0], 1)   # fixed / uniform policies ignore the context
        rl = 0.0 if self.running_loss is None else self.running_loss
        return context_features(encoded, rl, self.progress())

    def _mix(self, images, base, encoded, k_all):
        """Re-draw the MixUp of ``base`` for this rank's slice of ``k_all`` and mix ``encoded``."""
        b = images.shape[0]
        k_local = k_all[self.rank * b:(self.rank + 1) * b].cpu()
        return self.defense.mix_for(images, base, encoded, k_local)

    @torch.no_grad()
    def _release_with_policy(self, images: torch.Tensor):
        """The policy picks k from the encoded batch (context gathered from every rank), the defense
        mixes with them -> (masked, record, k of the global batch, what the policy steps reuse)."""
        base = self.defense.draw(images, 1)            # per-face secrets (its k=1 MixUp is redrawn below)
        encoded = self.defense.encode(images, base)
        ctx = D.all_gather_cat(self._context(encoded))
        if self.policy_setup.calibrate and not self._calibrated and hasattr(self.policy, "calibrate") \
                and self.global_step == 0 and ctx.shape[0] >= 2:
            self.policy.calibrate(ctx)
        self._calibrated = True
        k_all, _, _ = self.policy.act(ctx)
        masked, rec = self._mix(images, base, encoded, k_all)
        return masked, rec, k_all, (base, encoded, ctx)

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
        self.batch_flipped = None
        self.batch_indices = torch.as_tensor(batch[2]).long() if self.distill is not None and len(batch) >= 3 else None
        if self.distill is not None and self.batch_indices is None:
            raise ValueError("distillation needs (images, labels, dataset indices) batches")
        if self.copies > 1:   # r copies of the batch, each masked (and flipped) independently
            images, labels = images.repeat(self.copies, 1, 1, 1), labels.repeat(self.copies)
            if self.batch_indices is not None:
                self.batch_indices = self.batch_indices.repeat(self.copies)
        if self.hflip:
            flip = (torch.rand(images.shape[0], generator=self.aug_gen) < 0.5).to(self.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
            self.batch_flipped = flip.cpu()
        return images, labels

    def step(self, batch) -> Dict[str, Any]:
        """One recognizer step on ``batch`` = ``(images, labels)`` and, at the end of a cycle of ``n_fr``
        recognizer steps, ``n_pi`` policy steps on the same batch. Returns ``{"loss", "k" (the k of every
        face of the global batch), "images" (global batch size), "seconds", "privacy_loss"?, "policy/..."?}``;
        the callbacks add what they measure to it."""
        t0 = time.perf_counter()
        images, labels = self._prepare(batch)
        self.batch = (images, labels)
        k_all = cache = None
        if self.learn_defense:   # the release keeps its graph: the loss reaches the defense's parameters
            masked, rec = self.defense.release(images)
        elif self.policy is not None:
            masked, rec, k_all, cache = self._release_with_policy(images)
        else:
            with torch.no_grad():
                masked, rec = self.defense.release(images)
        y, w = self._labels(rec, labels)
        self.net.train()
        dist_vec = None
        if self.distill is not None:
            target = self.distill.target(self.batch_indices, self.batch_flipped, rec).to(self.device)
            with self._bn_warmup():
                loss_vec, dist_vec = self.net(masked, y, w, target)
        else:
            with self._bn_warmup():
                loss_vec = self.net(masked, y, w)
        loss = loss_vec.mean()
        self.optimizer.zero_grad(set_to_none=True)
        privacy = self._backward(loss)
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
        out: Dict[str, Any] = {"loss": lv}
        if privacy is not None:
            out["privacy_loss"] = privacy
        if dist_vec is not None:
            out["distill_loss"] = float(dist_vec.detach().mean())   # mean 1 - cos to the teacher (unweighted)
        if self.learn_policy and self.global_step % self.n_fr == 0:
            out.update(self._policy_steps(images, labels, cache))
        self._account(lv, ks)
        self.batch_in_epoch += 1
        out.update(k=ks, images=images.shape[0] * self.world, seconds=time.perf_counter() - t0)
        return out

    def _backward(self, loss: torch.Tensor) -> Optional[float]:
        """Backward of the loss (+ ``privacy_weight * defense.privacy_loss()`` for a trainable defense,
        whose gradients are averaged over the ranks under DDP). Returns the privacy loss."""
        if not self.learn_defense:
            loss.backward()
            return None
        if self.defense_optim is not None:
            self.defense_optim.zero_grad(set_to_none=True)
        privacy = None
        pl = self.defense.privacy_loss()
        if pl is not None:
            privacy = float(pl.detach())
            if not math.isfinite(privacy):
                raise FloatingPointError(f"the defense's privacy loss became {privacy} at step {self.global_step + 1} "
                                         f"(lower optim.defense_lr or train.privacy_weight)")
            loss = loss + self.privacy_weight * pl
        loss.backward()
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
        self.defense.project_()

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

    def _fr_loss(self, masked, y, w, rec) -> torch.Tensor:
        """Per-sample FR loss of the policy's reward: the loss the recognizer minimises on these releases (with
        distillation: the cosine term to the mix's teacher target, plus the margin loss when it is kept; a
        margin head that distillation leaves untrained would only give noise)."""
        if self.distill is None:
            return self.loss_fn(self.model(masked), y, w)
        target = self.distill.target(self.batch_indices, self.batch_flipped, rec).to(self.device)
        net = getattr(self.net, "module", self.net)      # the plain module (no DDP hooks under no_grad)
        return net(masked, y, w, target)[0]

    def _policy_steps(self, images, labels, cache) -> Dict[str, float]:
        base, encoded, ctx = cache
        self.model.eval()
        self.head.eval()
        stats: Dict[str, float] = {}
        try:
            for _ in range(self.n_pi):
                k_all, _, logp = self.policy.act(ctx)
                with torch.no_grad():
                    masked, rec = self._mix(images, base, encoded, k_all)
                    y, w = self._labels(rec, labels)
                    fr = self._fr_loss(masked, y, w, rec)
                fr_all = D.all_gather_cat(fr.detach().float())
                if self.attacker is None:
                    r = self.reward(fr_all.cpu().double(), k_all.cpu())
                else:   # scored before it trains on these releases (out of sample), then trained on them
                    from ..policy.attacker import dominant_faces
                    err = self.attacker.step(masked, dominant_faces(images, rec))
                    err_all = D.all_gather_cat(err.detach().float())
                    r = self.reward(fr_all.cpu().double(), k_all.cpu(), attack_error=err_all.cpu().double())
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
        if self.attacker is not None:
            for key in ("attack_error_mean", "attack_term_mean", "fr_privacy_mean"):
                stats[f"policy/{key}"] = float(rs[key])
            stats["policy/attacker_train_loss"] = float(self.attacker.last["train_loss"])
        self.last_policy_stats = stats
        return stats

    # ------------------------------------------------------------------ bookkeeping
    def _reset_epoch_stats(self) -> None:
        self._ep_loss, self._ep_n, self._ep_k, self._ep_t0 = 0.0, 0, {}, time.perf_counter()

    def _account(self, loss: float, ks: torch.Tensor) -> None:
        self._ep_loss += loss
        self._ep_n += 1
        for kv, c in zip(*torch.unique(ks, return_counts=True)):
            self.k_counts[int(kv)] = self.k_counts.get(int(kv), 0) + int(c)
            self._ep_k[int(kv)] = self._ep_k.get(int(kv), 0) + int(c)

    def end_epoch(self) -> None:
        """Close the current epoch: its summary (loss, k histogram, utility, seconds) goes to ``epochs``
        and to the callbacks' ``on_epoch_end``."""
        n = max(1, sum(self._ep_k.values()))
        summary = {"epoch": self.epoch, "step": self.global_step, "loss": self._ep_loss / max(1, self._ep_n),
                   "k_hist": {int(k): c / n for k, c in sorted(self._ep_k.items())},
                   "utility": self.last_utility, "seconds": time.perf_counter() - self._ep_t0}
        if self._ep_n:
            self.epochs.append(summary)
            self._emit("on_epoch_end", summary)
        self.epoch += 1
        self.batch_in_epoch = 0
        self._reset_epoch_stats()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ the loop
    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def fit(self, steps: Optional[int] = None, epochs: Optional[int] = None) -> Dict[str, Any]:
        """Train until ``global_step == steps`` (absolute, so a resumed trainer continues to the same
        end) or for ``epochs`` epochs in total. The planned length (``total_steps``, which the policy
        sees as training progress) is kept if it is longer, so ``fit(steps=N // 2)`` on a trainer
        planned for N steps is the first half of the N-step run. Per step: ``step(batch)``, the
        callbacks' ``on_step_end``, the epoch end (``on_epoch_end``), then ``on_batch_end`` (a resume point)."""
        if (steps is None) == (epochs is None):
            raise ValueError("give exactly one of steps= or epochs=")
        if epochs is not None:
            if not self.batches_per_epoch:
                raise ValueError("epochs= needs a DataLoader or Dataset (with a known length)")
            steps = int(epochs) * self.batches_per_epoch
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not self.total_steps or self.total_steps < steps:
            self.total_steps = steps   # the plan (progress feature); kept when a longer run was planned
        self.target_steps = steps
        it = self.batches()
        self._emit("on_train_start")
        try:
            while self.global_step < steps:
                out = self.step(next(it))
                self._emit("on_step_end", out)
                if self.batches_per_epoch and self.batch_in_epoch >= self.batches_per_epoch:
                    self.end_epoch()
                self._emit("on_batch_end")
            self._emit("on_train_end")
        finally:
            self._emit("teardown")
        return self.summary()

    def summary(self) -> Dict[str, Any]:
        n = max(1, sum(self.k_counts.values()))
        return {"steps": self.global_step, "epochs": self.epoch, "running_loss": self.running_loss,
                "utility": self.last_utility, "mu": None if self.reward is None else float(self.reward.mu),
                "k_hist": {int(k): c / n for k, c in sorted(self.k_counts.items())},
                "eval": dict(self.last_eval)}

    def close(self) -> None:
        """Release what the callbacks hold open (TensorBoard writer)."""
        for cb in self.callbacks:
            cb.close()
