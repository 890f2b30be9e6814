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

Pooled client key (``key_estimate="client"``; ``"auto"`` picks it when the released rotation is one per
client): with ``shuffle="key"`` (or ``"none"``) and an orthogonal, public or no mix, every query of the
client is ``Z_i = K D_i X_i`` with the *same* ``K``, so one orthogonal map is estimated from all the
queries the attacker sees of that client, ``R = polar(sum_i X_pred,i Z_i^T)``: the victims' queries plus
``client_queries`` other queries of the same client (threat model: the attacker observes the client's
traffic; as in the ``structure`` attack that traffic is simulated with faces of the attacker's pool,
public faces it did not train the decoder on when there are any, whose clean pictures the attack never
reads). The decoder's errors on different faces average out in the sum; for true predictions
``R = K^T`` exactly once ``sum_i X_i X_i^T`` is positive definite. With per-face subsets (``subset=m``,
the number public) the rows a face dropped are zero in ``K^T Z_i``: the attack alternates (``subset_iters``
rounds) marking each face's ``C - m`` weakest aligned rows (:func:`subset_rows`, scaled by the attacker's
mean channel energy) as dropped and re-estimating ``R`` with those rows of the prediction zeroed (``sum_i D_i X_pred,i Z_i^T``,
symmetric positive definite times ``K^T`` for true predictions, so exact again), and (``subset_fill``) the
dropped rows of the output are the decoder's. It assumes one ``K`` for every pooled query: a fresh
permutation per face (``shuffle="sample"``) or one of R keys (``"keys:R"``) keeps the per-face estimate.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import algebra
from .base import (FACE_SIZE, Attack, Param, batched, check_defense, check_faces, client_traffic, iterate_minibatches,
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


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor ``U V^T`` of ``a`` (``(..., C, C)``, from its SVD ``U S V^T``): the orthogonal ``R``
    that maximises ``trace(R^T a)``, i.e. the orthogonal Procrustes solution for ``a = sum X_pred Z^T``."""
    u, _, vh = torch.linalg.svd(a)
    return u @ vh


def subset_rows(aligned: torch.Tensor, m: int, energy: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` bool: the ``m`` rows of each aligned release ``(B, C, N)`` with the highest score - the rows the
    face kept; the others it dropped (zero in ``K^T Z`` for the true key). Score: the row's energy over the square
    root of the channel's expected energy ``energy`` (C,). Between the raw energy (the leakage of an imperfect
    ``R`` into a dropped strong channel outranks a kept weak one) and the energy relative to the channel's
    mean (leakage into the many weak channels outranks kept strong ones: with blurred LFW faces as predictions
    the alternation then drifted to an unrelated rotation; with the square root it converged: release error
    0.58 -> 0.55 in 2 rounds, where the relative score went 0.58 -> 0.77, and 0.46 -> 0.18 vs 0.46 -> 1.41 at a
    stronger blur)."""
    score = aligned.pow(2).sum(-1) / energy.to(aligned).clamp_min(1e-24).sqrt()
    idx = score.topk(int(m), dim=1).indices
    return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(1, idx, True)


def estimate_rotation(pred: torch.Tensor, released: torch.Tensor, pooled: bool = False,
                      subset: Optional[int] = None, energy: Optional[torch.Tensor] = None,
                      iters: int = 2) -> torch.Tensor:
    """Orthogonal Procrustes estimates of ``K^T`` from predictions ``X_pred`` and releases ``Z = K D X`` (both
    ``(B, C, N)``, kept channels x block positions, float64).

    ``pooled=False``: one ``R_b = polar(X_pred,b Z_b^T)`` per face -> ``(B, C, C)`` (a per-face key).
    ``pooled=True``: one ``R = polar(sum_b X_pred,b Z_b^T)`` for all -> ``(C, C)`` (one client key). With
    ``subset=m`` (each face kept ``m`` of the C channels, the rest zero before ``K``) the pooled estimate then
    alternates ``iters`` times: each face's dropped rows = all but its ``m`` strongest rows of ``R Z_b``
    (:func:`subset_rows`, relative to ``energy``), and ``R = polar(sum_b D_b X_pred,b Z_b^T)``."""
    if pred.shape != released.shape or pred.dim() != 3:
        raise ValueError(f"pred and released must both be (B, C, N), got {tuple(pred.shape)} and "
                         f"{tuple(released.shape)}")
    pred, released = pred.double(), released.double()
    if not pooled:
        return polar(pred @ released.transpose(1, 2))
    r = polar(torch.einsum("bcn,bdn->cd", pred, released))
    if subset is not None and subset < pred.shape[1]:
        if energy is None:
            raise ValueError("a pooled estimate with a subset needs the expected channel energy")
        for _ in range(int(iters)):
            keep = subset_rows(r @ released, subset, energy)
            r = polar(torch.einsum("bcn,bdn->cd", pred * keep[..., None], released))
    return r


def shared_rotation(structure) -> bool:
    """Whether every query of one client is released under the same channel rotation ``K`` (the permutation
    a client key or none; the mix orthogonal, public or none): the condition of the pooled key estimate."""
    return structure.shuffle in ("key", "none") and structure.channel_mix in ("orthogonal", "neighbour", "none")


def has_client_key(structure) -> bool:
    return (structure.shuffle == "key" or structure.shuffle.startswith("keys:")
            or structure.channel_mix == "orthogonal" or structure.subset_keys is not None)


@register_attack("gram")
class GramAttack(Attack):
    """Key-invariant Gram features -> U-Net decoder -> orthogonal Procrustes key estimate (per face, or pooled
    over the client's queries when they share one rotation)."""

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
        Param("key_estimate", str, "auto", choices=("auto", "face", "client"),
              doc="procrustes: face: one key estimate per query; client: one for all the client's queries "
                  "(R = polar(sum_i X_pred,i Z_i^T), needs one permutation per client: shuffle='key' or 'none'); "
                  "auto: client when the defense releases every query under the same rotation, else face"),
        Param("client_queries", int, 256, range=(0, 100_000),
              doc="other queries of the same client the attacker sees (pooled client-key estimate only)"),
        Param("subset_iters", int, 2, range=(0, 50),
              doc="client key with per-face subsets: rounds of (mark each face's dropped rows, re-estimate R "
                  "from the kept rows of the predictions)"),
        Param("subset_fill", bool, True,
              doc="client key with per-face subsets: the rows a face dropped come from the decoder's face"),
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
        # key_estimate="client" (the pooled key) additionally assumes one rotation for all the client's
        # queries (shared_rotation: shuffle 'key' or 'none'); fit refuses it otherwise, 'auto' falls back to
        # the per-face estimate
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
        shared = shared_rotation(self.structure)
        if p["key_estimate"] == "client" and not shared:
            raise ValueError(f"attack 'gram': key_estimate='client' pools the queries of one client under one "
                             f"rotation, but this defense draws the permutation per face (shuffle="
                             f"{self.structure.shuffle!r}); use key_estimate='face' or 'auto'")
        self.key_mode = "client" if p["key_estimate"] == "client" or (p["key_estimate"] == "auto" and shared) \
            else "face"
        self.traffic_pool, self.traffic_source = self._traffic_faces(public_images, imgs)
        kept = list(self.structure.kept)
        with torch.no_grad():     # the attacker's mean energy per kept channel (to tell a dropped row)
            self.channel_energy = batched(lambda x: self.structure.bdct(x)[:, kept].double().pow(2).sum((2, 3)),
                                          imgs).mean(0)
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
                     "key_estimate": self.key_mode, "client_queries": int(p["client_queries"])
                     if self.key_mode == "client" else 0, "traffic_faces": self.traffic_source,
                     "train_pairs": int(n * feats.shape[0]), "train_l1": losses,
                     "fresh_key": bool(p["fresh_key"] and has_client_key(self.structure)),
                     "channel_mix": self.structure.channel_mix, "subset": self.structure.subset}
        self.fitted = True
        return self

    @staticmethod
    def _traffic_faces(public_images: torch.Tensor, pool: torch.Tensor) -> Tuple[torch.Tensor, str]:
        """The faces that simulate the client's other queries: the attacker's public faces the decoder is not
        trained on when there are any (its predictions on those are as good as on a stranger's), else the
        training faces mirrored (the ``structure`` attack's choice)."""
        seen = {x.numpy().tobytes() for x in pool.contiguous()}
        held = [i for i in range(public_images.shape[0]) if public_images[i].contiguous().numpy().tobytes() not in seen]
        if held:
            return public_images[held].clone(), f"{len(held)} public faces the decoder was not trained on"
        return pool, "the decoder's training faces, mirrored"

    # ---- attack ------------------------------------------------------------------------------------
    def observe(self, defense, victim_images):
        """One query per victim, through the victim's defense; with the pooled client key also
        ``client_queries`` other queries of that client (the attacker's faces, mirrored, released by the same
        defense after the victims')."""
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        obs = {"queries": batched(defense.query, victim_images), "traffic": None}
        if getattr(self, "key_mode", None) == "client" and self.params["client_queries"]:
            obs["traffic"] = client_traffic(defense, self.traffic_pool, self.params["client_queries"], self.generator)
        return obs

    def invert(self, observation):
        self._require_fitted()
        q = observation["queries"] if isinstance(observation, dict) else observation
        traffic = observation.get("traffic") if isinstance(observation, dict) else None
        c = len(self.structure.kept)
        for name, t in (("queries", q), ("traffic", traffic)):
            if name == "traffic" and t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != c:
                raise ValueError(f"attack 'gram' expects (B, {c}, g, g) {name}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        return self.reconstruct(q, self.params["project"], traffic=traffic)

    def predict(self, queries: torch.Tensor) -> torch.Tensor:
        """The decoder's faces ``(B, 3, 112, 112)`` in [-1, 1] from released queries."""
        self._require_fitted()
        feats = self._standardise(self.features(queries))
        with torch.no_grad():
            return batched(lambda f: self.decoder(f.to(self.device)), feats).cpu().clamp(-1, 1)

    def reconstruct(self, queries, project: str = "none", traffic: Optional[torch.Tensor] = None,
                    key_estimate: Optional[str] = None, subset_fill: Optional[bool] = None) -> torch.Tensor:
        """The decoder's faces from ``queries`` (a tensor or :meth:`observe`'s dict, whose traffic is then
        used); ``project="procrustes"``: then aligned to the release (see :meth:`procrustes`). One fit serves
        every variant (the probe reports them side by side)."""
        if isinstance(queries, dict):
            traffic = queries.get("traffic") if traffic is None else traffic
            queries = queries["queries"]
        pred = self.predict(queries)
        return pred if project == "none" else self.procrustes(queries, pred, traffic, key_estimate, subset_fill)

    def procrustes(self, released: torch.Tensor, pred: torch.Tensor, traffic: Optional[torch.Tensor] = None,
                   key_estimate: Optional[str] = None, subset_fill: Optional[bool] = None) -> torch.Tensor:
        """Each release ``Z`` (after the public unmix; ``Z = K X`` with ``K`` the unknown orthogonal key, or
        ``K D X`` with a subset) turned back by an orthogonal ``R`` that maps it closest to the prediction
        ``X_pred`` (the BDCT of the decoder's face at the kept channels): the orthogonal Procrustes estimate
        of ``K^T`` (:func:`estimate_rotation`), per face (``key_estimate="face"``: ``R = polar(X_pred Z^T)``)
        or once for the client from the victims' queries and the client's ``traffic`` (``"client"``; the
        traffic's predictions are the decoder's too). ``R Z`` has exactly the released Gram; with the pooled
        key and a subset the rows each face dropped are the prediction's (``subset_fill``); the dropped block
        means are solved from the AC (edge continuity) with a ``dc_weight`` pull towards the prediction's.
        ``self.last_rotation``: the estimate(s), ``(C, C)`` or ``(B, C, C)``."""
        p = self.params
        st, kept = self.structure, list(self.structure.kept)
        mode = key_estimate or self.key_mode
        if mode == "auto":
            mode = self.key_mode
        if mode == "client" and not shared_rotation(st):
            raise ValueError(f"key_estimate='client' needs one rotation per client; shuffle={st.shuffle!r}")
        fill = p["subset_fill"] if subset_fill is None else bool(subset_fill)
        with torch.no_grad():
            z = public_planes(released, st.channel_mix)
            b, c, h, w = z.shape
            full = st.bdct(pred.to(torch.float32)).double()
            xp, zz = full[:, kept].reshape(b, c, -1), z.reshape(b, c, -1)
            if mode == "client":
                preds, rels = [xp], [zz]
                if traffic is not None and traffic.shape[0]:
                    tp = batched(lambda f: st.bdct(f.float())[:, kept].double(), self.predict(traffic))
                    preds.append(tp.reshape(tp.shape[0], c, -1))
                    rels.append(public_planes(traffic, st.channel_mix).reshape(traffic.shape[0], c, -1))
                r = estimate_rotation(torch.cat(preds), torch.cat(rels), pooled=True, subset=st.subset,
                                      energy=self.channel_energy, iters=p["subset_iters"])
                aligned = r @ zz
                if st.subset is not None and st.subset < c and fill:
                    keep = subset_rows(aligned, st.subset, self.channel_energy)
                    aligned = torch.where(keep[..., None], aligned, xp)
            else:
                r = estimate_rotation(xp, zz)
                aligned = r @ zz
            self.last_rotation = r
            full[:, kept] = aligned.view(b, c, h, w)
            dc = list(algebra.DC_CHANNELS)
            if any(ch not in kept for ch in dc):
                solved = algebra.fill_dc(full, full[:, dc], prior_weight=self.params["dc_weight"])
                for ch in dc:
                    if ch not in kept:
                        full[:, ch] = solved[:, ch]
            return algebra.to_face(full.float(), st.bdct)

    def report(self) -> Dict[str, Any]:
        return dict(self.info)


__all__ = ["GramAttack", "gram_features", "public_planes", "offsets", "feature_names", "has_client_key", "polar",
           "subset_rows", "estimate_rotation", "shared_rotation"]
