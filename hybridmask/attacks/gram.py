"""Key-invariant Gram attack (``gram``, issue 14): decode a face from what an orthogonal key cannot hide.

Threat model: white-box (the public :class:`~hybridmask.defenses.base.Structure`: block DCT ``u``, the
kept channels, the shuffle and mix *modes*), one query per victim, no secrets, no recognizer.

A PPFR-FD-style release of one face is ``Y = M P X``: ``X`` the ``(C, N)`` matrix of kept BDCT
coefficients (``N = g*g`` block positions), ``P`` a secret channel permutation (per face or a client
key), ``M`` the channel mix. For an orthogonal ``M`` (the secret ``mix="orthogonal"`` key, or no mix),
the Gram matrix across block positions does not depend on the secrets::

    Y^T Y = X^T P^T M^T M P X = X^T X          (N x N)

For the public neighbour mix the attacker first undoes ``M`` exactly (:func:`.algebra.unmix_neighbour`,
the same Gram as the whitening ``Y^T (M M^T)^-1 Y``). So the per-block AC energy (a g x g "edge energy"
picture of the face), the inner products between blocks, and the Gram's principal planes (its top
eigenvectors, the right singular vectors of ``Y``, scaled by the singular values; sign fixed by their
third moment) are released in the clear, whatever the key. ``X`` is determined by ``X^T X`` up to an
orthogonal transform of the channel space, so a decoder from these features to the face, trained only
on the attacker's own releases, needs no key and no channel assignment.

Features per release (:func:`gram_features`), ``(F, g, g)``:

* ``energy``: ``sqrt(G_nn)``, the norm of every block's released coefficients;
* ``cos(dy, dx)``: ``G_{n, n+d} / (|x_n| |x_{n+d}|)`` for every offset ``d`` with ``max(|dy|, |dx|) <=
  radius`` (8 maps at radius 1), zero where ``n + d`` leaves the grid;
* ``pc_i`` (``principal`` of them): ``s_i v_i`` as a g x g map, ``v_i`` the i-th eigenvector of ``G``.

Per-face channel subsets (``subset=m``): still applicable. The Gram of what is released is
``X^T D X`` with ``D`` the face's (secret) 0/1 subset, still independent of the permutation and the
orthogonal key; the decoder learns from the attacker's own releases, which draw their own subsets, to
decode from the partial Gram. What the subset removes is simply absent from the features.

Declined: non-BDCT releases, and the neighbour mix of an even number of channels (singular, so the
exact inverse and the whitening do not exist and the Gram is no longer key-invariant).

Decoder: :class:`~.nets.UNetGenerator` from the standardised ``(F, g, g)`` features to a 112x112 face,
L1 loss, trained on the attacker's own public faces released by its own defense instance; with a
client key (``shuffle="key"``/``"keys:R"``, ``mix="orthogonal"``, ``subset_keys``) every batch of
training faces is released under a freshly drawn key (``fresh_key``), so the decoder cannot learn one
key.

Key estimate (``project="procrustes"``, the default): the decoder's face is only a prediction ``X_pred``
(its BDCT at the kept channels). The release ``Z = K X`` (``K`` = the unknown orthogonal key times the
permutation) is turned back by the orthogonal ``R = polar(X_pred Z^T)`` that maps it closest to the
prediction (orthogonal Procrustes, one C x C SVD per face). For ``X_pred = X``, ``R = K^T`` exactly
(``X X^T`` is positive definite); for a rough prediction ``R Z`` still has exactly the released Gram
(the released coefficients, rotated), so the face's own detail comes from the release, not the decoder.
The dropped block means are then solved from edge continuity (:func:`.algebra.fill_dc`) with a weak
pull (``dc_weight``) towards the decoder's. No step uses the judge (SFace) or any face recognizer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import algebra
from .base import (FACE_SIZE, Attack, Param, batched, check_defense, check_faces, iterate_minibatches,
                   register_attack, tqdm_or_none)
from .nets import UNetGenerator


def offsets(radius: int) -> List[Tuple[int, int]]:
    """Block offsets ``(dy, dx)`` with ``max(|dy|, |dx|) <= radius``, (0, 0) excluded, in raster order."""
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]


def feature_names(radius: int, principal: int) -> List[str]:
    return ["energy"] + [f"cos{d}" for d in offsets(radius)] + [f"pc{i}" for i in range(principal)]


def _shift(z: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., i, j] = z[..., i + dy, j + dx]`` (zero outside the grid)."""
    h, w = z.shape[-2:]
    out = torch.zeros_like(z)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = z[..., ys, xs]
    return out


def gram_features(planes: torch.Tensor, radius: int = 1, principal: int = 16, eps: float = 1e-12) -> torch.Tensor:
    """Key-invariant maps of released planes ``(B, C, g, g)`` (after any *public* unmix) -> ``(B, F, g, g)``
    float64 (see the module doc): energy, neighbour cosines within ``radius``, ``principal`` principal planes.
    Every map is a function of the Gram matrix ``Z^T Z`` of the planes ``Z`` (C x g*g) alone, so any
    orthogonal map of the channels (a permutation, an orthogonal key) leaves them unchanged."""
    if planes.dim() != 4:
        raise ValueError(f"planes must be (B, C, g, g), got {tuple(planes.shape)}")
    z = planes.double()
    b, c, h, w = z.shape
    energy2 = z.pow(2).sum(1)                                     # diag(G) as a (B, g, g) map
    norm = energy2.sqrt()
    maps = [norm]
    for dy, dx in offsets(radius):                                # G_{n, n+d}: shifted inner products
        g_nd = (z * _shift(z, dy, dx)).sum(1)
        maps.append(g_nd / (norm * _shift(norm, dy, dx)).clamp_min(eps))
    if principal > 0:
        k = min(int(principal), c, h * w)
        # the top eigenvectors of G = Z^T Z are Z's right singular vectors (cheaper than eigh(G) at u >= 2)
        _, s, vh = torch.linalg.svd(z.reshape(b, c, h * w), full_matrices=False)
        v = vh[:, :k]                                             # (B, k, N)
        sign = torch.sign(v.pow(3).sum(-1, keepdim=True))         # fix each vector's sign by its third moment
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        pcs = (v * sign * s[:, :k, None]).view(b, k, h, w)
        if k < principal:
            pcs = torch.cat([pcs, pcs.new_zeros(b, principal - k, h, w)], dim=1)
        maps.extend(pcs.unbind(1))
    return torch.stack(maps, dim=1)


def public_planes(released: torch.Tensor, channel_mix: str) -> torch.Tensor:
    """Released coefficients -> planes whose Gram is the key-invariant ``X^T X`` (or ``X^T D X``): the public
    neighbour mix undone exactly; an orthogonal (secret) mix or none left as it is (float64)."""
    released = released.double()
    if channel_mix == "neighbour":
        return algebra.unmix_neighbour(released)
    if channel_mix in ("orthogonal", "none"):
        return released
    raise ValueError(f"channel mix {channel_mix!r} has no key-invariant Gram known to this attack")


def has_client_key(structure) -> bool:
    return (structure.shuffle == "key" or structure.shuffle.startswith("keys:")
            or structure.channel_mix == "orthogonal" or structure.subset_keys is not None)


@register_attack("gram")
class GramAttack(Attack):
    """Key-invariant Gram features -> U-Net decoder -> per-face orthogonal Procrustes key estimate."""

    name = "gram"
    PARAMS = (
        Param("mode", str, "whitebox", choices=("whitebox",),
              doc="white-box only: it builds on the public structure (block DCT, kept channels, mix mode)"),
        Param("n_images", int, 1000, range=(8, None), optional=True,
              doc="attacker's public faces released by its own defense to train the decoder"),
        Param("radius", int, 1, range=(1, 4),
              doc="neighbour cosines at every block offset within this Chebyshev radius ((2r+1)^2 - 1 maps)"),
        Param("principal", int, 16, range=(0, 189),
              doc="principal planes of the Gram (top eigenvectors x singular values) as extra maps (0: none)"),
        Param("releases", int, 1, range=(1, 16),
              doc="releases of each public face (fresh secrets each) in the decoder's training set"),
        Param("flip", bool, True, doc="also release the mirrored public faces; each epoch sees one of the two"),
        Param("fresh_key", bool, True,
              doc="with a client key, release every batch of training faces under a freshly drawn key"),
        Param("epochs", int, 4, range=(1, 1000), doc="decoder training epochs"),
        Param("width", int, 32, range=(4, 256), doc="base width of the decoder U-Net"),
        Param("batch_size", int, 32, range=(2, 4096), doc="mini-batch size"),
        Param("lr", float, 2e-3, range=(1e-7, 1.0), doc="Adam learning rate (cosine schedule)"),
        Param("project", str, "procrustes", choices=("none", "procrustes"),
              doc="none: the decoder's face; procrustes: estimate each face's key as the orthogonal map that best "
                  "aligns its release with the decoder's prediction, and output the release so aligned (its AC "
                  "exactly as released, DC solved)"),
        Param("dc_weight", float, 0.1, range=(0.0, None),
              doc="procrustes: pull of the solved block means towards the decoder's (0: only edge continuity)"),
    )

    @classmethod
    def applicable(cls, defense) -> Optional[str]:
        structure = getattr(defense, "structure", None)
        if not callable(structure):
            return "needs a defense with a public structure() (the hybridmask Defense interface)"
        st = structure()
        if st.transform != "bdct":
            return f"needs a block-DCT release (the defense's transform is {st.transform!r})"
        if st.channel_mix not in ("neighbour", "orthogonal", "none"):
            return f"knows no key-invariant Gram for the channel mix {st.channel_mix!r}"
        if st.channel_mix == "neighbour" and len(st.kept) % 2 == 0:
            return (f"the neighbour mix of an even number of channels ({len(st.kept)}) is singular: no exact "
                    f"inverse or whitening, so the Gram of the release is not key-invariant")
        return None

    def __init__(self, **params):
        super().__init__(**params)
        self.decoder: Optional[UNetGenerator] = None
        self.info: Dict[str, Any] = {}

    # ---- features --------------------------------------------------------------------------------
    def features(self, released: torch.Tensor) -> torch.Tensor:
        """Released queries ``(B, C, g, g)`` -> standardised-ready key-invariant maps ``(B, F, g, g)`` float32."""
        p = self.params
        return batched(lambda r: gram_features(public_planes(r, self.structure.channel_mix), p["radius"],
                                               p["principal"]).float(), released, 128)

    def _standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean.to(feats)) / self.feat_std.to(feats)

    def _own_releases(self, imgs: torch.Tensor, victim_defense) -> torch.Tensor:
        """The attacker's own releases of ``imgs`` (a fresh key per batch when the defense has one)."""
        p = self.params
        keyed = p["fresh_key"] and has_client_key(self.structure)
        if not keyed:
            return batched(self.defense.query, imgs)
        out = []
        for i in range(0, imgs.shape[0], p["batch_size"]):
            own = self.attacker_defense(victim_defense)          # the public algorithm, fresh secrets
            out.append(own.query(imgs[i:i + p["batch_size"]]))
        return torch.cat(out)

    # ---- fit ---------------------------------------------------------------------------------------
    def fit(self, defense, public_images, public_labels=None):
        p = self.params
        reason = self.applicable(defense)
        if reason:
            raise ValueError(f"attack {self.name!r}: {reason}")
        imgs = self.begin_fit(defense, public_images)
        self.structure = self.defense.structure()
        views = [imgs, imgs.flip(-1)] if p["flip"] else [imgs]
        feats = []                                    # (V, R * n, F, g, g): view, release
        with torch.no_grad():
            for v in views:
                feats.append(torch.cat([self.features(self._own_releases(v, defense)) for _ in range(p["releases"])]))
        feats = torch.stack(feats)
        targets = torch.stack([v.repeat(p["releases"], 1, 1, 1) for v in views])
        flat = feats.flatten(0, 1)
        self.feat_mean = flat.mean(dim=(0, 2, 3), keepdim=True)              # (1, F, 1, 1): one scalar per map
        self.feat_std = flat.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        feats = self._standardise(feats)
        n_feat, grid = feats.shape[2], feats.shape[-1]
        with self.seeded():
            self.decoder = UNetGenerator(n_feat, grid, size=FACE_SIZE, width=p["width"], depth=4,
                                         stem="conv").to(self.device)
        opt = torch.optim.Adam(self.decoder.parameters(), lr=p["lr"], betas=(0.9, 0.999))
        n = feats.shape[1]
        steps = max(1, p["epochs"] * max(1, n // p["batch_size"]))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        self.decoder.train()
        losses = []
        for _ in tqdm_or_none(range(p["epochs"]), p["progress"], desc="gram decoder", leave=False):
            total, count = 0.0, 0
            for idx in iterate_minibatches(n, p["batch_size"], self.generator):
                view = torch.randint(0, feats.shape[0], (idx.shape[0],), generator=self.generator)
                x, y = feats[view, idx].to(self.device), targets[view, idx].to(self.device)
                loss = F.l1_loss(self.decoder(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + float(loss.detach()) * idx.shape[0], count + idx.shape[0]
            losses.append(total / max(count, 1))
        self.decoder.eval()
        self.info = {"features": feature_names(p["radius"], p["principal"]), "grid": int(grid),
                     "train_pairs": int(n * feats.shape[0]), "train_l1": losses,
                     "fresh_key": bool(p["fresh_key"] and has_client_key(self.structure)),
                     "channel_mix": self.structure.channel_mix, "subset": self.structure.subset}
        self.fitted = True
        return self

    # ---- attack ------------------------------------------------------------------------------------
    def observe(self, defense, victim_images):
        """One query per victim, through the victim's defense."""
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        return batched(defense.query, victim_images)

    def invert(self, observation):
        self._require_fitted()
        q = observation["queries"] if isinstance(observation, dict) else observation
        c = len(self.structure.kept)
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != c:
            raise ValueError(f"attack 'gram' expects (B, {c}, g, g) queries, got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        return self.reconstruct(q, self.params["project"])

    def reconstruct(self, queries: torch.Tensor, project: str = "none") -> torch.Tensor:
        """The decoder's faces from ``queries``; ``project="procrustes"``: then aligned to the release (see
        :meth:`procrustes`). One fit serves both (the probe reports them side by side)."""
        self._require_fitted()
        feats = self._standardise(self.features(queries))
        with torch.no_grad():
            pred = batched(lambda f: self.decoder(f.to(self.device)), feats).cpu().clamp(-1, 1)
        return pred if project == "none" else self.procrustes(queries, pred)

    def procrustes(self, released: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Each release ``Z`` (after the public unmix; ``Z = K X`` with ``K`` the unknown orthogonal key, or
        ``K D X`` with a subset) turned back by the orthogonal ``R = polar(X_pred Z^T)`` that maps it closest
        to the prediction ``X_pred`` (the BDCT of the decoder's face at the kept channels): the orthogonal
        Procrustes estimate of ``K^T``. ``R Z`` has exactly the released Gram; the dropped block means are
        solved from its AC (edge continuity) with a ``dc_weight`` pull towards the prediction's."""
        st, kept = self.structure, list(self.structure.kept)
        with torch.no_grad():
            z = public_planes(released, st.channel_mix)
            b, c, h, w = z.shape
            full = st.bdct(pred.to(torch.float32)).double()
            xp, zz = full[:, kept].reshape(b, c, -1), z.reshape(b, c, -1)
            u, _, vh = torch.linalg.svd(xp @ zz.transpose(1, 2))
            full[:, kept] = (u @ vh @ zz).view(b, c, h, w)
            dc = list(algebra.DC_CHANNELS)
            if any(ch not in kept for ch in dc):
                solved = algebra.fill_dc(full, full[:, dc], prior_weight=self.params["dc_weight"])
                for ch in dc:
                    if ch not in kept:
                        full[:, ch] = solved[:, ch]
            return algebra.to_face(full.float(), st.bdct)

    def report(self) -> Dict[str, Any]:
        return dict(self.info)


__all__ = ["GramAttack", "gram_features", "public_planes", "offsets", "feature_names", "has_client_key"]
