"""Generative model inversion (GMI, Zhang et al., CVPR 2020), small version.

1. ``fit``: train a DCGAN (64x64) on the attacker's public faces (identities disjoint from the
   target classifier's training identities).
2. ``invert(labels)``: for each target identity ``y`` optimise latents ``z`` (several random
   starts) so that the target classifier, applied to ``query(upsample(G(z)))``, assigns ``y``,
   with the discriminator as a prior:
   ``L(z) = prior_weight * softplus(-D(G(z))) + id_weight * CE(classifier(query(G(z))), y)``.
   The start with the lowest identity loss wins. Gradients go through the attacker's own
   instance of the defense's query path (white-box), so the classifier must be a torch module.
3. The harness judges the results with an *independent* recognizer: attack accuracy = fraction
   of generated faces whose nearest gallery identity (SFace) is ``y``.

``classifier``: torch module mapping the defense's query output (B, C, g, g) to logits
(B, n_classes) - e.g. ``nn.Sequential(backbone, linear_head)`` or a backbone + margin head wrapped
to return cosine logits.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (FACE_SIZE, Attack, Param, batched, check_defense, check_faces, differentiable_query,
                   iterate_minibatches, register_attack, resize, tqdm_or_none)
from .nets import DCGANDiscriminator, DCGANGenerator

GAN_SIZE = 64


@register_attack("gmi")
class GMIAttack(Attack):
    """GMI: DCGAN prior on public faces + latent optimisation against a target classifier."""

    name = "gmi"
    kind = "class_inversion"
    PARAMS = (
        Param("classifier", "module", None, required=True,
              doc="target classifier: query output (B, C, g, g) -> logits (B, n_classes)"),
        Param("gan_epochs", int, 10, range=(1, 100_000), doc="DCGAN training epochs"),
        Param("n_images", int, 1500, range=(2, None), optional=True, doc="public faces for the GAN (None: all)"),
        Param("batch_size", int, 16, range=(2, 4096), doc="DCGAN mini-batch (small batches = more steps on a small set)"),
        Param("nz", int, 64, range=(2, 1024), doc="latent dimension"),
        Param("width", int, 16, range=(4, 256), doc="DCGAN base width"),
        Param("lr", float, 2e-4, range=(1e-7, 1.0), doc="DCGAN learning rate (Adam, betas 0.5, 0.999)"),
        Param("steps", int, 200, range=(1, 100_000), doc="latent optimisation steps"),
        Param("opt_lr", float, 0.02, range=(1e-7, 10.0), doc="latent optimisation learning rate"),
        Param("id_weight", float, 100.0, range=(0.0, None), doc="weight of the identity loss (GMI: 100)"),
        Param("prior_weight", float, 1.0, range=(0.0, None), doc="weight of the discriminator prior"),
        Param("n_candidates", int, 4, range=(1, 1024), doc="random starts per target identity"),
    )

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["mode"] == "blackbox":
            raise ValueError("attack 'gmi' is white-box (latent optimisation needs the classifier's gradients "
                             "through the query path); use mode='whitebox'")
        self.G: Optional[DCGANGenerator] = None
        self.D: Optional[DCGANDiscriminator] = None
        self.history = []

    def fit(self, defense, public_images, public_labels=None):
        imgs = self.begin_fit(defense, public_images)
        self.query_fn = differentiable_query(self.defense)
        self.train_gan(resize(imgs, GAN_SIZE))
        self.fitted = True
        return self

    def train_gan(self, faces64: torch.Tensor) -> None:
        p = self.params
        with self.seeded():
            self.G = DCGANGenerator(p["nz"], p["width"]).to(self.device)
            self.D = DCGANDiscriminator(p["width"]).to(self.device)
        og = torch.optim.Adam(self.G.parameters(), lr=p["lr"], betas=(0.5, 0.999))
        od = torch.optim.Adam(self.D.parameters(), lr=p["lr"], betas=(0.5, 0.999))
        n = faces64.shape[0]
        bs = min(p["batch_size"], n)
        bar = tqdm_or_none(range(p["gan_epochs"]), p["progress"], desc="gmi: DCGAN", leave=False)
        for epoch in bar:
            sd = sg = 0.0
            cnt = 0
            for idx in iterate_minibatches(n, bs, self.generator):
                real = faces64[idx].to(self.device)
                # horizontal flips double the small public set
                flip = torch.rand(real.shape[0], generator=self.generator) < 0.5
                real = torch.where(flip.view(-1, 1, 1, 1).to(real.device), real.flip(-1), real)
                z = torch.randn(real.shape[0], p["nz"], generator=self.generator).to(self.device)
                fake = self.G(z)
                ld = F.softplus(-self.D(real)).mean() + F.softplus(self.D(fake.detach())).mean()
                od.zero_grad(set_to_none=True)
                ld.backward()
                od.step()
                lg = F.softplus(-self.D(fake)).mean()
                og.zero_grad(set_to_none=True)
                lg.backward()
                og.step()
                sd += float(ld.detach())
                sg += float(lg.detach())
                cnt += 1
            self.history.append({"epoch": epoch + 1, "d": sd / max(cnt, 1), "g": sg / max(cnt, 1)})
        self.G.eval(), self.D.eval()

    def sample(self, n: int) -> torch.Tensor:
        """Random GAN faces at 112x112 (to look at the prior)."""
        self._require_fitted()
        with torch.no_grad():
            z = torch.randn(n, self.params["nz"], generator=self.generator).to(self.device)
            return resize(self.G(z), FACE_SIZE).clamp(-1, 1).cpu()

    def observe(self, defense, labels) -> torch.Tensor:
        """Class inversion observes nothing of the victims: the attacker picks target identities."""
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point():
            raise ValueError(f"gmi targets must be a non-empty 1-D integer tensor of class indices, got {labels!r}")
        return labels.long()

    def invert(self, labels) -> torch.Tensor:
        self._require_fitted()
        labels = self.observe(None, labels)
        p = self.params
        clf = p["classifier"]
        clf.eval()
        with torch.no_grad():
            probe = clf(self.query_fn(torch.zeros(1, 3, FACE_SIZE, FACE_SIZE, device=self.device)))
        n_classes = probe.shape[1]
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"target labels must be in [0, {n_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        saved = [(q, q.requires_grad) for m in (clf, self.G, self.D) for q in m.parameters()]
        for q, _ in saved:
            q.requires_grad_(False)
        try:
            return self._optimize(labels, clf)
        finally:
            for q, flag in saved:
                q.requires_grad_(flag)

    def _optimize(self, labels, clf) -> torch.Tensor:
        p = self.params
        c = p["n_candidates"]
        y = labels.repeat_interleave(c).to(self.device)
        z = torch.randn(y.shape[0], p["nz"], generator=self.generator).to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=p["opt_lr"])
        bar = tqdm_or_none(range(p["steps"]), p["progress"], desc="gmi: latent optimisation", leave=False)
        self.opt_history = []
        for _ in bar:
            img = self.G(z)
            logits = clf(self.query_fn(resize(img, FACE_SIZE)))
            ce = F.cross_entropy(logits, y)
            prior = F.softplus(-self.D(img)).mean()
            loss = p["id_weight"] * ce + p["prior_weight"] * prior
            self.opt_history.append({"ce": float(ce.detach()), "prior": float(prior.detach())})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(-3, 3)  # stay where the GAN was trained (GMI clips the latent too)
        with torch.no_grad():
            img = self.G(z)
            logits = clf(self.query_fn(resize(img, FACE_SIZE)))
            per = F.cross_entropy(logits, y, reduction="none").view(-1, c)
            best = per.argmin(1)
            img = img.view(-1, c, *img.shape[1:])[torch.arange(labels.shape[0]), best.cpu()]
            self.last_target_accuracy = float((logits.argmax(1) == y).float().view(-1, c)
                                              [torch.arange(labels.shape[0]), best.cpu()].mean())
            return resize(img, FACE_SIZE).clamp(-1, 1).cpu()

    def report(self):
        return {"target_classifier_accuracy_on_inversions": getattr(self, "last_target_accuracy", None)}


# ---- the target classifier ---------------------------------------------------------------------------
class HeadClassifier(nn.Module):
    """A recognizer and its margin head as a classifier: query output -> ``head.logits`` (the scaled
    cosine to every class centre, no margin)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.backbone(x))


def check_classifier_input(backbone: nn.Module, defense, what: str = "the classifier") -> None:
    """The classifier's backbone must take what the defense's query releases (kind, channels, grid)."""
    got = (getattr(backbone, "stem_kind", None), getattr(backbone, "in_chans", None), getattr(backbone, "input_size", None))
    want = (defense.input_kind, defense.in_channels, defense.grid)
    if got != want:
        raise ValueError(f"{what} takes {got[0]} inputs of {got[1]}x{got[2]}x{got[2]} but the defense "
                         f"{(getattr(defense, 'config', {}) or {}).get('name')!r} releases {want[0]} "
                         f"{want[1]}x{want[2]}x{want[2]}; attack the defense the classifier was trained with "
                         f"(e.g. --defense with the same checkpoint)")


def classifier_from_checkpoint(path, defense=None) -> Tuple[HeadClassifier, Dict]:
    """A recognizer checkpoint saved *with its head* (``hybridmask.models.save_model(path, model, head)``)
    as a GMI target classifier; checks it takes the defense's query output. Returns (classifier, meta)."""
    from ..models import load_model
    backbone, head, meta = load_model(path)
    if head is None:
        raise ValueError(f"{path} holds no classifier head; gmi needs the recognizer saved with its head "
                         f"(hybridmask.models.save_model(path, model, head))")
    if defense is not None:
        check_classifier_input(backbone, defense, f"the classifier in {path}")
    return HeadClassifier(backbone, head).eval(), meta


def classifier_accuracy(classifier: nn.Module, defense, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``classifier`` on ``defense.query(images)``."""
    classifier.eval()
    pred = batched(lambda x: classifier(defense.query(x)).argmax(1), images)
    return float((pred == labels).float().mean())


def train_target_classifier(defense, images: torch.Tensor, labels: torch.Tensor, epochs: int = 30, lr: float = 3e-3,
                            batch_size: int = 32, embedding_size: int = 64, seed: int = 0,
                            progress: bool = True) -> nn.Module:
    """The victim's side, for experiments without a trained classifier: a small ``tiny_test`` backbone
    + linear head trained (Adam, horizontal flips) on ``defense.query`` of the private faces. Seeded;
    the global RNG is left as it was."""
    from ..models import create_model
    check_defense(defense)
    check_faces(images, "classifier training faces", min_count=2)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be a ({images.shape[0]},) integer tensor, got {tuple(labels.shape)} {labels.dtype}")
    n_classes = int(labels.max()) + 1
    if int(labels.min()) < 0 or n_classes < 2:
        raise ValueError(f"labels must be class indices 0..C-1 with C >= 2, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("embedding_size", embedding_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    n = images.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model("tiny_test", stem=defense.input_kind, in_chans=defense.in_channels, grid=defense.grid,
                           embedding_size=embedding_size)
        clf = nn.Sequential(net, nn.Linear(embedding_size, n_classes))
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        clf.train()
        for _ in tqdm_or_none(range(epochs), progress, desc="gmi: target classifier", leave=False):
            perm = torch.randperm(n)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                if idx.numel() < 2:
                    continue   # BatchNorm needs two samples
                x = images[idx]
                x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(-1), x)
                with torch.no_grad():
                    q = defense.query(x)
                loss = F.cross_entropy(clf(q), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return clf.eval()
