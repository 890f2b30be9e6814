"""Reconstruction attack ``cgan``: a pix2pix-style conditional GAN from releases back to faces.

The attacker owns public faces (identities disjoint from the victims). It turns them into
(release -> face) training pairs with the defense (its own instance in white-box mode, the
victim's service in black-box mode), trains a U-Net-like generator with L1 + adversarial loss
against a PatchGAN discriminator (+ an optional feature loss through a face recognizer it owns),
and finally maps the victims' releases to faces.

* ``target="query"`` (default): the test-time release (k=1) - one face per release.
* ``target="release"``: the training-time release (mixed, k from the defense); the generator is
  trained to output the *anchor* face of each mix (the face whose row it is).

Releases are drawn afresh for every mini-batch, so the generator sees new secret draws
(permutations, partners, weights, signs) every epoch. Inputs are standardised per channel with
statistics of the attacker's own releases. For InstaHide in white-box mode the generator gets
``|release|`` (the attacker knows that the secret is a sign flip), see ``preprocess``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (FACE_SIZE, Attack, Param, batched, check_defense, check_faces, iterate_minibatches,
                   register_attack, resize, tqdm_or_none)
from .nets import PatchDiscriminator, UNetGenerator


def release_of(defense, images: torch.Tensor, target: str, k=None) -> torch.Tensor:
    """The representation the attacker sees for ``images``: ``query`` (k=1) or ``release`` (mixed)."""
    if target == "query":
        with torch.no_grad():
            return defense.query(images)
    out, _ = defense.release(images, k=k)
    return out.detach()


@register_attack("cgan")
class CGANAttack(Attack):
    """pix2pix reconstruction: U-Net generator + PatchGAN, L1 + adversarial (+ feature) loss."""

    name = "cgan"
    PARAMS = (
        Param("target", str, "query", choices=("query", "release"),
              doc="attack the test-time query (k=1) or the training-time mixed release"),
        Param("k", int, None, range=(1, 64), optional=True, doc="k for target='release' (None: the defense's own)"),
        Param("epochs", int, 4, range=(1, 10_000), doc="training epochs over the public faces"),
        Param("n_images", int, 1500, range=(2, None), optional=True, doc="public faces used (None: all)"),
        Param("batch_size", int, 16, range=(2, 4096), doc="mini-batch size (also the mixing batch for target='release')"),
        Param("size", int, 64, choices=(32, 48, 64, 96, 112), doc="internal face resolution of generator/discriminator"),
        Param("width", int, 32, range=(4, 512), doc="generator base width"),
        Param("disc_width", int, 32, range=(4, 512), doc="discriminator base width"),
        Param("depth", int, 4, range=(0, 6), doc="maximum number of U-Net down-sampling stages"),
        Param("lr", float, 2e-4, range=(1e-7, 1.0), doc="Adam learning rate (betas 0.5, 0.999)"),
        Param("l1_weight", float, 100.0, range=(0.0, None), doc="weight of the L1 loss (pix2pix: 100)"),
        Param("adv_weight", float, 1.0, range=(0.0, None), doc="weight of the adversarial loss (0: plain U-Net)"),
        Param("feature_weight", float, 0.0, range=(0.0, None), doc="weight of the feature loss (needs feature_model)"),
        Param("feature_model", "callable", None, optional=True,
              doc="differentiable face recognizer (B,3,112,112)->(B,D) owned by the attacker, for the feature loss"),
        Param("disc_input", str, "pair", choices=("pair", "face"),
              doc="PatchGAN sees (release-as-image, face) pairs or faces alone"),
        Param("stem", str, "auto", choices=("auto", "conv", "set"),
              doc="generator stem; set = channel-order invariant (auto: white-box vs a per-sample channel shuffle)"),
        Param("preprocess", str, "auto", choices=("auto", "none", "abs"),
              doc="abs: feed |release| (auto: only white-box against InstaHide's sign flip)"),
        Param("on_epoch", "callable", None, optional=True,
              doc="called as on_epoch(attack, epoch) after each epoch (generator in eval mode); a true return "
                  "stops training (e.g. a plateau rule on the attacker's own held-out faces)"),
    )

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["feature_weight"] > 0 and self.params["feature_model"] is None:
            raise ValueError("attack 'cgan': feature_weight > 0 needs a feature_model (a differentiable recognizer)")
        self.G: Optional[UNetGenerator] = None
        self.D: Optional[PatchDiscriminator] = None
        self.history = []

    # ---- representation handling ---------------------------------------------------------------
    def _use_abs(self, defense) -> bool:
        p = self.params["preprocess"]
        if p == "auto":
            return self.params["mode"] == "whitebox" and defense.structure().sign_flip
        return p == "abs"

    def _prep(self, rel: torch.Tensor) -> torch.Tensor:
        if self._abs:
            rel = rel.abs()
        return (rel.to(self.device) - self.mu) / self.sigma

    def _cond_image(self, rel: torch.Tensor) -> torch.Tensor:
        """Release as a 3-channel image at the internal size (what the PatchGAN is conditioned on)."""
        with torch.no_grad():
            img = self.defense.as_image(rel)
            if self._abs:
                img = img.abs()
        return resize(img.to(self.device), self.params["size"])

    def _release(self, images):
        return release_of(self.defense, images, self.params["target"], self.params["k"])

    # ---- fit -------------------------------------------------------------------------------------
    def fit(self, defense, public_images, public_labels=None):
        p = self.params
        imgs = self.begin_fit(defense, public_images)
        self._abs = self._use_abs(defense)
        n = imgs.shape[0]
        bs = min(p["batch_size"], n)
        if p["target"] == "release":
            kk = p["k"] if p["k"] is not None else int(defense.structure().k or 1)
            if kk > bs:
                raise ValueError(f"attack 'cgan': k={kk} needs a batch of at least {kk} faces, batch_size is {bs}")
        # input statistics from the attacker's own releases (per channel)
        probe = torch.cat([self._release(imgs[i:i + bs]) for i in range(0, min(n, 8 * bs), bs)])
        if probe.dim() != 4:
            raise ValueError(f"the defense released a {tuple(probe.shape)} tensor; expected (B, C, g, g)")
        probe = probe.abs() if self._abs else probe
        self.mu = probe.mean(dim=(0, 2, 3), keepdim=True).to(self.device)
        self.sigma = probe.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6).to(self.device)
        stem = p["stem"]
        if stem == "auto":
            stem = "set" if (p["mode"] == "whitebox" and defense.structure().shuffle == "sample") else "conv"
        self.stem_used = stem
        if stem == "set":
            # channel order is secret: one global scale keeps the statistics order-free
            self.mu = torch.zeros_like(self.mu)
            self.sigma = probe.std().clamp_min(1e-6).expand_as(self.sigma).clone().to(self.device)
        in_ch, grid = probe.shape[1], probe.shape[-1]
        with self.seeded():
            self.G = UNetGenerator(in_ch, grid, size=p["size"], width=p["width"], depth=p["depth"],
                                   stem=stem).to(self.device)
            d_in = 6 if p["disc_input"] == "pair" else 3
            self.D = PatchDiscriminator(d_in, width=p["disc_width"]).to(self.device)
        opt_g = torch.optim.Adam(self.G.parameters(), lr=p["lr"], betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.D.parameters(), lr=p["lr"], betas=(0.5, 0.999))
        targets_small = resize(imgs, p["size"])
        bce = nn.BCEWithLogitsLoss()
        steps = max(1, n // bs)
        bar = tqdm_or_none(range(p["epochs"] * steps), p["progress"], desc=f"cgan fit ({defense.name})",
                           leave=False)
        it = iter(bar)
        self.G.train(), self.D.train()
        for epoch in range(p["epochs"]):
            sums = {"l1": 0.0, "adv": 0.0, "d": 0.0, "feat": 0.0}
            for idx in iterate_minibatches(n, bs, self.generator):
                next(it, None)
                rel = self._release(imgs[idx])
                x = self._prep(rel)
                y = targets_small[idx].to(self.device)
                fake = self.G(x)
                cond = self._cond_image(rel) if p["disc_input"] == "pair" else None
                pair = (lambda img: torch.cat([cond, img], 1)) if cond is not None else (lambda img: img)
                if p["adv_weight"] > 0:
                    # discriminator step
                    opt_d.zero_grad(set_to_none=True)
                    d_real = self.D(pair(y))
                    d_fake = self.D(pair(fake.detach()))
                    loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake)))
                    loss_d.backward()
                    opt_d.step()
                    sums["d"] += float(loss_d.detach())
                opt_g.zero_grad(set_to_none=True)
                l1 = F.l1_loss(fake, y)
                loss = p["l1_weight"] * l1
                if p["adv_weight"] > 0:
                    g_fake = self.D(pair(fake))
                    adv = bce(g_fake, torch.ones_like(g_fake))
                    loss = loss + p["adv_weight"] * adv
                    sums["adv"] += float(adv.detach())
                if p["feature_weight"] > 0:
                    fm = p["feature_model"]
                    up_f, up_y = resize(fake, FACE_SIZE), resize(y, FACE_SIZE)
                    with torch.no_grad():
                        ey = fm(up_y)
                    feat = 1 - F.cosine_similarity(fm(up_f), ey, dim=1).mean()
                    loss = loss + p["feature_weight"] * feat
                    sums["feat"] += float(feat.detach())
                loss.backward()
                opt_g.step()
                sums["l1"] += float(l1.detach())
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(epoch=epoch + 1, l1=f"{float(l1.detach()):.3f}")
            self.history.append({k: v / steps for k, v in sums.items()} | {"epoch": epoch + 1})
            if p["on_epoch"] is not None:
                self.G.eval()
                self.fitted = True       # decode() works inside the callback
                stop = p["on_epoch"](self, epoch + 1)
                self.G.train()
                if stop:
                    break
        if hasattr(bar, "close"):
            bar.close()
        self.G.eval(), self.D.eval()
        self.fitted = True
        return self

    # ---- attack ----------------------------------------------------------------------------------
    def observe(self, defense, victim_images):
        """The victims' release: ``defense.query`` (k=1), or ``defense.release`` of the victims' own batch
        (mixed with each other, as in a private training batch) for ``target='release'``."""
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        if self.params["target"] == "query":
            return batched(defense.query, victim_images)
        return release_of(defense, victim_images, "release", self.params["k"])

    def decode(self, released: torch.Tensor) -> torch.Tensor:
        """Generator applied to releases: (B, C, g, g) -> (B, 3, 112, 112) in [-1, 1]."""
        self._require_fitted()
        if not isinstance(released, torch.Tensor) or released.dim() != 4:
            raise ValueError(f"releases must be a (B, C, g, g) tensor, got "
                             f"{tuple(released.shape) if isinstance(released, torch.Tensor) else type(released).__name__}")
        expect = (self.G.in_ch, self.G.grid)
        if (released.shape[1], released.shape[-1]) != expect:
            raise ValueError(f"cgan was trained on releases with {expect[0]} channels on a {expect[1]}x{expect[1]} grid, "
                             f"got {tuple(released.shape)}")
        if not torch.isfinite(released).all():
            raise ValueError("releases contain NaN or infinite values")
        self.G.eval()
        out = batched(lambda r: resize(self.G(self._prep(r)), FACE_SIZE).clamp(-1, 1), released)
        return out.cpu()

    def invert(self, observation):
        return self.decode(observation)
