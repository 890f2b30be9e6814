"""Multi-encoding demixing (after Carlini et al., "Is private learning possible with instance
encoding?", IEEE S&P 2021, against InstaHide).

The same private face is released T times, each time mixed with fresh partners. The partners
change, the victim stays, so combining the T encodings of one source cancels the partners:

1. **Observe** (``observe``): for t = 1..T the victims' client calls ``defense.release`` on a
   batch made of the victims and fresh faces of other people (the attacker's public faces stand in
   for them), with the defense's own k; the attacker captures the victims' rows. The T x n
   encodings reach the attacker as an unordered bag (shuffled).
2. **Group** the encodings of one source: ``grouping="given"`` uses the true grouping (an upper
   bound, as when encodings carry a client id); ``"cluster"`` runs k-means (cosine) on
   secret-invariant features (|release| for sign flips; the energy map summed over channels for
   per-sample shuffled frequency releases) with the number of sources known. Purity is reported;
   for scoring, each victim is compared with the cluster holding most of its encodings (the
   true grouping is used only for this alignment).
3. **Solve** for the source. With one scalar weight per image the victim's expected weight is
   ``1/k`` (the weights are exchangeable), so the group mean ``m`` of a linear representation
   satisfies ``E[m] = mu + (x - mu) / k`` with ``mu`` the mean representation of a random face,
   which the attacker estimates on its public faces. The least-squares estimate of the victim's
   representation is therefore ``mu + k (m - mu)``.

   * ``combine="release"``: solve in the release domain (valid when a channel means the same thing
     in every encoding: pixel defenses, and frequency defenses whose shuffle is ``"none"``). For
     sign-flipped releases (InstaHide) it works on ``|release|`` and restores signs from the mean
     public face. Decoding: with a generator (e.g. the fitted ``cgan`` of the same defense) the
     estimated k=1 release is decoded by it; otherwise the white-box least-squares inverse:
     undo the neighbour mixing (the circulant ``(I + S)/sqrt(2)``, invertible for an odd channel
     count) when the order is known, fill the dropped channels (DC) with the public mean, invert
     the BDCT. If the channel order is secret, the zero-filled ``defense.as_image`` is used.
   * ``combine="decoded"`` (the only option with a fresh secret shuffle per sample, where a
     channel of one encoding has nothing to do with the same channel of another): decode each
     encoding to an image (generator or ``as_image``) and solve in the image domain. The
     de-biasing ``mu + k (m - mu)`` assumes a linear decoding; with a generator the plain group
     mean is used (``debias="auto"``).
   * ``"auto"`` picks ``release`` unless the defense shuffles per sample.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F

from .base import FACE_SIZE, Attack, Param, batched, check_defense, check_faces, register_attack


@register_attack("demix")
class DemixAttack(Attack):
    """Carlini et al. 2021: group T encodings of one face (fresh partners) and solve for the face."""

    name = "demix"
    PARAMS = (
        Param("T", int, 16, range=(1, 10_000), doc="encodings of each victim face the attacker captures"),
        Param("k", int, None, range=(1, 64), optional=True,
              doc="faces per mix (None: white-box reads the defense config; black-box must pass it)"),
        Param("partners_per_batch", int, 32, range=(1, 100_000),
              doc="other people's faces in each release batch next to the victims"),
        Param("grouping", str, "given", choices=("given", "cluster"), doc="true grouping or k-means clustering"),
        Param("combine", str, "auto", choices=("auto", "release", "decoded"), doc="domain of the solve"),
        Param("decoder", str, "auto", choices=("auto", "generator", "lstsq", "as_image"),
              doc="release -> image: generator (needs one), white-box least squares, zero-filled inverse"),
        Param("generator", "any", None, optional=True,
              doc="a fitted cgan attack (or callable release -> image) to decode with"),
        Param("n_images", int, 1500, range=(2, None), optional=True, doc="public faces used (None: all)"),
        Param("debias", str, "auto", choices=("auto", "on", "off"),
              doc="apply mu + k (mean - mu) (auto: only where the decoding is linear; a generator is not)"),
        Param("max_iter", int, 50, range=(1, 10_000), doc="k-means iterations for grouping='cluster'"),
    )

    def __init__(self, **params):
        super().__init__(**params)
        g = self.params["generator"]
        if g is not None and not (callable(g) or callable(getattr(g, "decode", None))):
            raise TypeError("attack 'demix' parameter 'generator' must be a fitted cgan attack or a callable")
        if self.params["decoder"] == "generator" and g is None:
            pass  # may be linked later by the harness (use_generator); checked in fit
        self.info: Dict[str, Any] = {}

    def use_generator(self, gen) -> None:
        """Decode with ``gen`` (a fitted cgan attack or a callable release -> image)."""
        self.params["generator"] = gen

    # ---- helpers ---------------------------------------------------------------------------------
    def _decode_fn(self):
        g = self.params["generator"]
        if g is None:
            return None
        return g.decode if callable(getattr(g, "decode", None)) else g

    def _shuffles_per_sample(self) -> bool:
        return self.structure.shuffle == "sample" and self.defense_kind == "freq"

    def report(self) -> Dict[str, Any]:
        return dict(self.info)

    # ---- fit -------------------------------------------------------------------------------------
    def fit(self, defense, public_images, public_labels=None):
        p = self.params
        self.public = self.begin_fit(defense, public_images)
        self.structure = defense.structure()
        self.defense_kind = defense.input_kind
        if p["k"] is not None:
            self.k = p["k"]
        elif p["mode"] == "whitebox":
            if self.structure.k is None:
                raise ValueError("white-box demix needs k: this defense chooses k per face (pass k=)")
            self.k = int(self.structure.k)
        else:
            raise ValueError("black-box demix needs k (the attacker's assumption of how many faces are mixed)")
        self.sign_flip = self.structure.sign_flip
        combine = p["combine"]
        if combine == "auto":
            combine = "decoded" if self._shuffles_per_sample() else "release"
        self.combine_domain = combine
        dec = p["decoder"]
        if dec == "generator" and p["generator"] is None:
            raise ValueError("attack 'demix': decoder='generator' needs generator= (e.g. a fitted cgan attack)")
        if dec == "auto":
            dec = "generator" if p["generator"] is not None else ("lstsq" if self._lstsq_possible() else "as_image")
        if dec == "lstsq" and not self._lstsq_possible():
            raise ValueError("attack 'demix': the least-squares decoder needs a white-box frequency defense with a known "
                             "channel order (shuffle='none'); use decoder='as_image' or a generator")
        self.decoder = dec
        # the mean representation of a random face (public estimate), in each domain the solve may use
        with torch.no_grad():   # running sums a batch at a time: a u=8 release is 9.5 MB per face
            n = self.public.shape[0]
            sums = {"release": 0.0, "decoded": 0.0, "bdct": 0.0}
            for i in range(0, n, 64):
                x = self.public[i:i + 64]
                q = self.defense.query(x)
                sums["release"] = sums["release"] + (q.abs() if self.sign_flip else q).sum(0, keepdim=True)
                if self.combine_domain == "decoded":
                    sums["decoded"] = sums["decoded"] + self._decode_each(q).sum(0, keepdim=True)
                if dec == "lstsq":
                    sums["bdct"] = sums["bdct"] + self.structure.bdct(x).sum(0, keepdim=True)
            self.mu_release = sums["release"] / n
            self.mu_image = self.public.mean(0, keepdim=True)
            if self.combine_domain == "decoded":
                self.mu_decoded = sums["decoded"] / n
            if dec == "lstsq":
                self.mu_bdct = sums["bdct"] / n
        deb = p["debias"]
        if deb == "auto":
            deb = "off" if (self.combine_domain == "decoded" and self.decoder == "generator") else "on"
        self.debias = deb == "on"
        self.fitted = True
        self.info = {"k_assumed": self.k, "combine": self.combine_domain, "decoder": self.decoder,
                     "debias": self.debias}
        return self

    def _lstsq_possible(self) -> bool:
        st = self.structure
        return (self.params["mode"] == "whitebox" and st.transform == "bdct" and st.noise == "none"
                and st.shuffle == "none" and st.channel_mix in ("neighbour", "none"))

    # ---- observe ---------------------------------------------------------------------------------
    def observe(self, defense, victim_images) -> Dict[str, torch.Tensor]:
        """T releases of every victim, each with fresh partners; returned shuffled with the true groups."""
        self._require_fitted()
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        n, T = victim_images.shape[0], self.params["T"]
        m = self.params["partners_per_batch"]
        # the bag is shuffled as it is filled (one copy of T x n releases: 2.4 GB for 32 victims x 8 at u=8)
        order = torch.randperm(T * n, generator=self.generator)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(T * n)                  # where encoding t*n + i lands in the shuffled bag
        encs = None
        for t in range(T):
            pick = torch.randint(0, self.public.shape[0], (m,), generator=self.generator)
            batch = torch.cat([victim_images, self.public[pick]])
            with torch.no_grad():
                rel, _ = defense.release(batch)
            if encs is None:
                encs = torch.empty((T * n,) + tuple(rel.shape[1:]), dtype=rel.dtype, device=rel.device)
            encs[slot[t * n:(t + 1) * n]] = rel[:n].detach()
            del rel
        groups = torch.arange(n).repeat(T)[order]
        return {"encodings": encs, "groups": groups, "n_sources": n}

    # ---- invert ----------------------------------------------------------------------------------
    def invert(self, observation) -> torch.Tensor:
        self._require_fitted()
        if not isinstance(observation, dict) or "encodings" not in observation:
            raise ValueError("demix.invert expects the dict returned by demix.observe (encodings, groups, n_sources)")
        enc = observation["encodings"]
        n = int(observation["n_sources"])
        if not torch.isfinite(enc).all():
            raise ValueError("encodings contain NaN or infinite values")
        if self.params["grouping"] == "given":
            groups = observation["groups"]
            self.info["grouping_purity"] = 1.0
        else:
            groups = self.cluster(enc, n)
            self.info["grouping_purity"] = purity(groups, observation["groups"], n)
        k = float(self.k)
        if self.combine_domain == "release":
            d = enc.abs() if self.sign_flip else enc
            means = torch.stack([d[groups == i].mean(0) if (groups == i).any() else self.mu_release[0]
                                 for i in range(n)])
            est = self.mu_release + k * (means - self.mu_release) if self.debias else means
            img = self._release_to_image(est)
        else:
            dec = self._decode_each(enc)
            means = torch.stack([dec[groups == i].mean(0) if (groups == i).any() else self.mu_decoded[0]
                                 for i in range(n)])
            img = self.mu_decoded + k * (means - self.mu_decoded) if self.debias else means
        img = img.clamp(-1, 1).cpu()
        if self.params["grouping"] == "cluster":
            # evaluation alignment only: the attacker outputs one face per cluster; each victim is
            # scored against the cluster that holds most of its encodings
            img = img[majority_cluster(groups, observation["groups"], n)]
        return img

    def _decode_each(self, rel: torch.Tensor) -> torch.Tensor:
        fn = self._decode_fn()
        if fn is not None and self.decoder == "generator":
            return fn(rel)
        img = batched(self.defense.as_image, rel.abs() if self.sign_flip else rel)
        return img

    def _release_to_image(self, est: torch.Tensor) -> torch.Tensor:
        if self.sign_flip:
            # |x| estimated; signs from the mean public face (the attacker's prior)
            mag = est.clamp(0, 1)
            if self.decoder == "generator":
                return self._decode_fn()(mag * torch.sign(self.mu_image + 1e-6))
            return mag * torch.sign(self.mu_image + 1e-6)
        if self.decoder == "generator":
            return self._decode_fn()(est)
        if self.decoder == "lstsq":
            return self._lstsq(est)
        return batched(self.defense.as_image, est)

    def _lstsq(self, est: torch.Tensor) -> torch.Tensor:
        """White-box inverse of drop + neighbour mixing (known order): solve the circulant, fill the
        dropped channels with the public mean, inverse BDCT."""
        st = self.structure
        c = est.shape[1]
        if st.channel_mix == "neighbour":
            if c % 2 == 0:
                raise ValueError(f"neighbour mixing of {c} (even) channels is not invertible")
            eye = torch.eye(c, dtype=torch.float64)
            A = (eye + torch.roll(eye, shifts=1, dims=1)) / math.sqrt(2.0)   # out_i = (c_i + c_{i+1}) / sqrt 2
            flat = est.permute(1, 0, 2, 3).reshape(c, -1).double()
            sol = torch.linalg.solve(A, flat)
            est = sol.reshape(c, est.shape[0], *est.shape[-2:]).permute(1, 0, 2, 3).to(est.dtype)
        full = self.mu_bdct.expand(est.shape[0], -1, -1, -1).clone()
        full[:, list(st.kept)] = est
        img = st.bdct.inverse(full, size=(FACE_SIZE, FACE_SIZE))
        return img

    def cluster(self, enc: torch.Tensor, n: int) -> torch.Tensor:
        """k-means with cosine similarity on secret-invariant features; returns (N,) group ids."""
        if self.defense_kind == "freq" and self._shuffles_per_sample():
            feats = enc.abs().sum(1)               # channel order is secret: spatial energy map
        else:
            feats = enc.abs() if self.sign_flip else enc
        f = feats.flatten(1).double()
        f = f - f.mean(0, keepdim=True)
        f = F.normalize(f, dim=1)
        # farthest-point initialisation
        first = int(torch.randint(0, f.shape[0], (1,), generator=self.generator))
        cent = [f[first]]
        for _ in range(1, n):
            sims = torch.stack([f @ c for c in cent]).max(0).values
            cent.append(f[int(sims.argmin())])
        cent = torch.stack(cent)
        assign = None
        for _ in range(self.params["max_iter"]):
            new = (f @ cent.T).argmax(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for i in range(n):
                if (assign == i).any():
                    cent[i] = F.normalize(f[assign == i].mean(0), dim=0)
        return assign


def majority_cluster(pred: torch.Tensor, true: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) index of the cluster holding most encodings of each true source."""
    out = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        members = pred[true == i]
        if members.numel():
            out[i] = int(torch.bincount(members, minlength=n).argmax())
    return out


def purity(pred: torch.Tensor, true: torch.Tensor, n: int) -> float:
    """Fraction of encodings whose cluster's majority source is their own source."""
    total = 0
    for i in range(n):
        members = true[pred == i]
        if members.numel():
            total += int(torch.bincount(members, minlength=n).max())
    return total / max(1, true.numel())
