"""Embedding inversion: from a recognizer's embedding of a (masked) face back to the face.

The victim's face is queried through the defense (``defense.query``) and the recognizer; the
attacker gets the embedding (e.g. a leaked template database). Two methods:

* ``method="decoder"`` - a learned decoder (embedding -> face) trained on the attacker's public
  faces, whose embeddings it computes through the same query path (its own defense instance in
  white-box mode, the victim's service in black-box mode). Works with any recognizer, including
  non-differentiable ones (ONNX).
* ``method="optimize"`` - white-box optimisation: start from the mean public face (or the
  decoder's output, ``init="decoder"``) and optimise the pixels so that
  ``recognizer(query(x))`` matches the target embedding (cosine), with a total-variation prior.
  Gradients flow through the attacker's own instance of the query path (a fresh secret per step
  for per-sample masks, i.e. expectation over the secrets) and through the recognizer, which must
  therefore be a torch module.

``recognizer``: any module/callable mapping the defense's query output ``(B, C, g, g)`` to ``(B, D)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import (FACE_SIZE, Attack, Param, batched, check_defense, check_faces, differentiable_query,
                   iterate_minibatches, register_attack, resize, tqdm_or_none)
from .nets import EmbeddingDecoder


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@register_attack("embedding_inversion")
class EmbeddingInversion(Attack):
    """Invert recognizer embeddings of masked queries: learned decoder or white-box optimisation."""

    name = "embedding_inversion"
    PARAMS = (
        Param("recognizer", "callable", None, required=True,
              doc="module mapping the defense's query output (B, C, g, g) to embeddings (B, D)"),
        Param("method", str, "decoder", choices=("decoder", "optimize"), doc="learned decoder or white-box optimisation"),
        Param("epochs", int, 10, range=(1, 10_000), doc="decoder training epochs"),
        Param("n_images", int, 1500, range=(2, None), optional=True, doc="public faces used (None: all)"),
        Param("batch_size", int, 32, range=(2, 4096), doc="decoder mini-batch"),
        Param("size", int, 64, choices=(32, 64, 128), doc="decoder output resolution (up-sampled to 112)"),
        Param("width", int, 16, range=(4, 512), doc="decoder base width"),
        Param("lr", float, 1e-3, range=(1e-7, 10.0), doc="decoder learning rate (Adam)"),
        Param("opt_lr", float, 0.05, range=(1e-7, 10.0), doc="optimisation learning rate (Adam on tanh-space pixels)"),
        Param("steps", int, 200, range=(1, 100_000), doc="optimisation steps (method='optimize')"),
        Param("tv_weight", float, 0.05, range=(0.0, None), doc="total-variation prior weight"),
        Param("init", str, "mean", choices=("mean", "decoder"), doc="optimisation start: mean public face or decoder"),
        Param("opt_size", int, 56, choices=(28, 56, 112), doc="resolution of the optimised image (up-sampled to 112)"),
    )

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["method"] == "optimize" and self.params["mode"] == "blackbox":
            raise ValueError("attack 'embedding_inversion': method='optimize' is white-box (needs gradients of the "
                             "query path and the recognizer); use method='decoder' in black-box mode")
        if self.params["method"] == "optimize" and not isinstance(self.params["recognizer"], torch.nn.Module):
            raise TypeError("attack 'embedding_inversion': method='optimize' needs a differentiable torch.nn.Module "
                            "recognizer")
        self.decoder: Optional[EmbeddingDecoder] = None
        self.history = []

    def _embed(self, query_out: torch.Tensor) -> torch.Tensor:
        rec = self.params["recognizer"]
        e = rec(query_out)
        if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != query_out.shape[0]:
            raise ValueError(f"recognizer must return (B, D) embeddings, got "
                             f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
        return e

    def _set_eval(self):
        rec = self.params["recognizer"]
        if isinstance(rec, torch.nn.Module):
            rec.eval()

    def fit(self, defense, public_images, public_labels=None):
        p = self.params
        self._set_eval()
        imgs = self.begin_fit(defense, public_images)
        self.mean_face = imgs.mean(0, keepdim=True)
        if p["method"] == "optimize":
            self.query_fn = differentiable_query(self.defense)
        if p["method"] == "decoder" or p["init"] == "decoder":
            self._fit_decoder(imgs)
        self.fitted = True
        return self

    def _fit_decoder(self, imgs):
        p = self.params
        with torch.no_grad():
            emb = batched(lambda x: self._embed(self.defense.query(x)).float().cpu(), imgs)
        if not torch.isfinite(emb).all():
            raise ValueError("recognizer returned NaN or infinite embeddings")
        with self.seeded():
            self.decoder = EmbeddingDecoder(emb.shape[1], size=p["size"], width=p["width"]).to(self.device)
        opt = torch.optim.Adam(self.decoder.parameters(), lr=p["lr"], betas=(0.5, 0.999))
        targets = resize(imgs, p["size"])
        n = imgs.shape[0]
        bs = min(p["batch_size"], n)
        bar = tqdm_or_none(range(p["epochs"]), p["progress"], desc="embedding decoder", leave=False)
        self.decoder.train()
        for epoch in bar:
            tot, cnt = 0.0, 0
            for idx in iterate_minibatches(n, bs, self.generator):
                out = self.decoder(emb[idx].to(self.device))
                loss = F.l1_loss(out, targets[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach())
                cnt += 1
            self.history.append({"epoch": epoch + 1, "l1": tot / max(cnt, 1)})
        self.decoder.eval()

    def observe(self, defense, victim_images) -> torch.Tensor:
        """The victims' embeddings: ``recognizer(defense.query(victims))``."""
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        self._set_eval()
        with torch.no_grad():
            return batched(lambda x: self._embed(defense.query(x)).float().cpu(), victim_images)

    def decode(self, emb: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        if self.decoder is None:
            raise RuntimeError("no decoder was trained (method='optimize' with init='mean')")
        return batched(lambda e: resize(self.decoder(e.to(self.device)), FACE_SIZE).clamp(-1, 1).cpu(), emb)

    def invert(self, observation: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        if not isinstance(observation, torch.Tensor) or observation.dim() != 2:
            raise ValueError("embedding_inversion.invert expects (B, D) embeddings (from observe)")
        if not torch.isfinite(observation).all():
            raise ValueError("embeddings contain NaN or infinite values")
        if self.params["method"] == "decoder":
            return self.decode(observation)
        return self.optimize(observation)

    def optimize(self, target: torch.Tensor) -> torch.Tensor:
        """White-box optimisation of pixels (in tanh space) to match ``target`` embeddings."""
        p = self.params
        s = p["opt_size"]
        if p["init"] == "decoder":
            init = self.decode(target)
        else:
            init = self.mean_face.expand(target.shape[0], -1, -1, -1)
        init = resize(init, s).clamp(-0.999, 0.999)
        z = torch.atanh(init).clone().to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=p["opt_lr"])
        tgt = F.normalize(target.to(self.device).float(), dim=1)
        rec = p["recognizer"]
        saved = [(prm, prm.requires_grad) for prm in rec.parameters()]
        for prm, _ in saved:
            prm.requires_grad_(False)
        try:
            return self._optimize_loop(z, opt, tgt, rec)
        finally:
            for prm, flag in saved:
                prm.requires_grad_(flag)

    def _optimize_loop(self, z, opt, tgt, rec):
        p = self.params
        bar = tqdm_or_none(range(p["steps"]), p["progress"], desc="embedding optimisation", leave=False)
        self.opt_history = []
        for step in bar:
            x = resize(torch.tanh(z), FACE_SIZE)
            e = F.normalize(rec(self.query_fn(x)), dim=1)
            cos = (e * tgt).sum(1)
            loss = (1 - cos).mean() + p["tv_weight"] * total_variation(torch.tanh(z))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.opt_history.append(float(cos.mean().detach()))
        with torch.no_grad():
            return resize(torch.tanh(z), FACE_SIZE).clamp(-1, 1).cpu()
