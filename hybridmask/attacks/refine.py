"""What the structure-aware reconstructions share (``structure``, ``separate``): the public structure and
the attacker's priors learned from its own faces (:class:`BDCTReconstruction`), the planes <-> face
conversions (exact unmix, dropped-DC recovery, inverse BDCT), and the learned refinement (issue 12 item
5): a U-Net that corrects a rough reconstruction, ``clamp(rough + G(rough), -1, 1)``, trained with an L1
loss on pairs the attacker builds from its own faces (its own releases through the same pipeline -> its
own originals). It starts from the reconstruction, never from the raw release, and outputs 112x112."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import algebra
from .base import FACE_SIZE, Attack, Param, batched, iterate_minibatches
from .nets import UNetGenerator

#: the parameters every structure-aware reconstruction declares: dropped-DC handling and the refinement
RECONSTRUCTION_PARAMS = (
    Param("dc", str, "solve", choices=("solve", "prior", "zero"),
          doc="dropped block means: solved from edge continuity, the attacker's average, or zero"),
    Param("fill", str, "zero", choices=("zero", "eigenface"),
          doc="dropped AC channels: zero, or their conditional mean given the kept coefficients under a linear "
              "(eigenface) model of the attacker's own aligned faces; a dropped DC then comes from that model, "
              "re-solved from edge continuity of the completed blocks when dc='solve'"),
    Param("fill_components", int, 128, range=(1, 4096),
          doc="eigenfaces of the fill (at most the attacker's faces used to fit them, minus one)"),
    Param("refine_epochs", int, 0, range=(0, 1000), doc="epochs of the refinement U-Net (0: none)"),
    Param("refine_width", int, 16, range=(4, 256), doc="base width of the refinement U-Net"),
    Param("batch_size", int, 32, range=(2, 4096), doc="refinement mini-batch size"),
    Param("lr", float, 1e-3, range=(1e-7, 1.0), doc="refinement learning rate (Adam)"),
)


class Refiner:
    def __init__(self, width: int = 16, device: torch.device = torch.device("cpu")):
        self.net = UNetGenerator(3, FACE_SIZE, size=FACE_SIZE, width=width, depth=4).to(device)
        self.device = device

    def fit(self, rough: torch.Tensor, target: torch.Tensor, epochs: int, batch_size: int, lr: float,
            generator: torch.Generator) -> "Refiner":
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.9, 0.999))
        steps = max(1, epochs * max(1, rough.shape[0] // batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        self.net.train()
        for _ in range(epochs):
            for idx in iterate_minibatches(rough.shape[0], batch_size, generator):
                loss = F.l1_loss(self._forward(rough[idx].to(self.device)), target[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.net.eval()
        return self

    def _forward(self, rough: torch.Tensor) -> torch.Tensor:
        return (rough + self.net(rough)).clamp(-1, 1)

    def __call__(self, rough: torch.Tensor) -> torch.Tensor:
        return batched(lambda r: self._forward(r.to(self.device)), rough).cpu()


#: faces per chunk of the float64 plane pipeline (unmix, assignment, DC, inverse BDCT): a u=8 release is
#: 189 planes of 112x112, 19 MB per face in float64 and several temporaries of it per step
CHUNK_FACES = 8


def chunks(x: torch.Tensor, size: Optional[int] = None):
    """``x`` in slices of ``size`` (default :data:`CHUNK_FACES`) along the first dimension."""
    size = size or CHUNK_FACES
    return (x[i:i + size] for i in range(0, x.shape[0], size))


class BDCTReconstruction(Attack):
    """Base of the attacks that invert BDCT releases through their public structure."""

    def begin_structure(self, defense, public_images: torch.Tensor) -> None:
        """:meth:`begin_fit` + the public :class:`~hybridmask.defenses.base.Structure` and the attacker's
        priors from its own faces: the mean block DC per colour (``prior_dc``) and the mean energy of every
        kept channel (``prior_energy``), computed a chunk of faces at a time."""
        reason = self.applicable(defense)
        if reason:
            raise ValueError(f"attack {self.name!r}: {reason}")
        self.pool = self.begin_fit(defense, public_images)
        self.structure = self.defense.structure()
        self.kept = list(self.structure.kept)
        dc, energy = 0.0, 0.0
        with torch.no_grad():
            for x in chunks(self.pool):
                full = self.structure.bdct(x).double()                      # the attacker's own BDCT
                dc = dc + full[:, list(algebra.DC_CHANNELS)].sum(0)
                energy = energy + full[:, self.kept].pow(2).mean(dim=(2, 3)).sum(0)
        n = self.pool.shape[0]
        self.prior_dc = dc / n
        self.prior_energy = energy / n                                      # (C,) per kept channel
        self.dc_dropped = [c for c in algebra.DC_CHANNELS if c not in self.kept]
        self.dropped = [c for c in range(algebra.NUM_CHANNELS) if c not in self.kept]
        self.eigen = self._fit_eigenfaces() if self.params["fill"] == "eigenface" and self.dropped else None

    def _coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """The public BDCT of any (B, 3, H, W) float64 images (eigenfaces leave [-1, 1]; the BDCT is linear)."""
        scale = images.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        return torch.cat([self.structure.bdct(x) for x in chunks(images / scale)]) * scale

    def _fit_eigenfaces(self) -> dict:
        """A linear Gaussian model of the attacker's aligned faces, ``x = mean + E a``, ``a ~ N(0, I)``, fitted on
        all but a held-out fifth of its faces (at most 64), whose kept coefficients give the residual variance
        ``s2`` per coefficient the model leaves. A release's dropped coefficients are then the posterior mean
        ``D (K^T K + s2 I)^-1 K^T (k - K mean)`` (K / D: the eigenfaces' kept / dropped coefficients)."""
        faces = self.pool.double()
        n = faces.shape[0]
        held = min(64, max(1, n // 5))
        fit, val = faces[:n - held], faces[n - held:]
        if fit.shape[0] < 2:
            raise ValueError(f"attack {self.name!r}: fill='eigenface' needs at least 3 attacker faces, got {n}")
        flat = fit.reshape(fit.shape[0], -1)
        mean = flat.mean(0)
        _, sv, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        r = min(self.params["fill_components"], fit.shape[0] - 1)
        eig = (sv[:r, None] / math.sqrt(fit.shape[0])) * vh[:r]                # (r, D): a ~ N(0, I)
        coef = self._coefficients(torch.cat([mean.view(1, *faces.shape[1:]), eig.view(r, *faces.shape[1:])]))
        kept_c = coef[:, self.kept].reshape(r + 1, -1)
        m_k, e_k = kept_c[0], kept_c[1:]
        # the residual the r eigenfaces leave in the kept coefficients of faces they were not fitted on
        a = (val.reshape(held, -1) - mean) @ vh[:r].T / (sv[:r] / math.sqrt(fit.shape[0]))
        res = self._coefficients(val)[:, self.kept].reshape(held, -1) - m_k - a @ e_k
        s2 = float(res.pow(2).mean().clamp_min(1e-12))
        gram = e_k @ e_k.T + s2 * torch.eye(r, dtype=torch.float64)
        self.info["fill"] = {"components": r, "residual_variance": s2, "faces": int(fit.shape[0])}
        return {"mean_kept": m_k.float(), "kept": e_k.float(), "chol": torch.linalg.cholesky(gram),
                "mean_dropped": coef[0, self.dropped].float(), "dropped": coef[1:, self.dropped].float()}

    def _complete(self, full: torch.Tensor) -> torch.Tensor:
        """Fill the dropped channels of ``full`` (B, 192, h, w) with the eigenface posterior mean."""
        e = self.eigen
        b = full.shape[0]
        k = full[:, self.kept].reshape(b, -1).float() - e["mean_kept"]
        rhs = (e["kept"] @ k.T).double()                                       # (r, B)
        a = torch.cholesky_solve(rhs, e["chol"]).float()                      # (r, B) posterior means
        d = e["mean_dropped"].unsqueeze(0) + (a.T @ e["dropped"].reshape(a.shape[0], -1)).view(
            b, *e["mean_dropped"].shape)
        out = full.clone()
        out[:, self.dropped] = d.to(full.dtype)
        return out

    def own_plane_features(self) -> torch.Tensor:
        """:func:`~.assignment.plane_features` of the attacker's own kept planes in their true order
        (B, C, F), a chunk of faces at a time."""
        from .assignment import plane_features
        with torch.no_grad():
            return torch.cat([plane_features(self.structure.bdct(x)[:, self.kept]) for x in chunks(self.pool)])

    def planes(self, released: torch.Tensor) -> torch.Tensor:
        """Released coefficients -> the (permuted) BDCT planes: the public neighbour mix undone (float64)."""
        released = released.double()
        return algebra.unmix_neighbour(released) if self.structure.channel_mix == "neighbour" else released

    def to_faces(self, ordered: torch.Tensor) -> torch.Tensor:
        """Planes in kept-channel order -> faces: dropped channels zero (``fill="eigenface"``: their posterior mean
        under the attacker's eigenface model), dropped DC recovered (``dc``)."""
        full = algebra.release_planes(ordered, self.kept)
        if self.eigen is not None:
            full = self._complete(full)
        if self.dc_dropped:
            dc = self.params["dc"]
            if self.eigen is not None and dc != "solve":
                if dc == "zero":
                    full[:, self.dc_dropped] = 0
            elif dc == "solve":
                full = algebra.fill_dc(full, self.prior_dc)
            elif dc == "prior":
                full[:, self.dc_dropped] = self.prior_dc[[algebra.DC_CHANNELS.index(c)
                                                          for c in self.dc_dropped]].unsqueeze(0)
        return algebra.to_face(full.float(), self.structure.bdct)


__all__ = ["Refiner", "RECONSTRUCTION_PARAMS", "BDCTReconstruction"]
