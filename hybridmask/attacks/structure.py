"""Structure-aware reconstruction: the attack an informed adversary runs first (DESIGN 3.5).

Threat model: white-box. The attacker knows the algorithm and its public parameters (the defense's
:class:`~hybridmask.defenses.base.Structure`: block DCT ``u``, the kept channels, the shuffle mode, the
neighbour mix) and owns public faces of other people; it does not know the per-sample permutations
or the client key. It sees one query per victim, and (``shuffle="key"``) the other queries of the same
client (``client_queries``: that traffic is simulated with faces of the attacker's pool, whose clean
pictures the attack never reads).

Steps, each exact or learned only from the attacker's own faces:

1. **Exact algebra** (:mod:`.algebra`): invert the neighbour mix (an invertible circulant).
2. **Channel identity** (:mod:`.assignment`): a plane classifier learned on the attacker's own BDCT
   planes scores every released plane against every channel; the Hungarian algorithm assigns them,
   per query (fresh permutation per sample) or once for all queries of a client (client key).
3. **Dropped DC**: the block means are solved from the AC coefficients so neighbouring blocks
   continue each other (a Poisson problem on the block grid); the constant per colour is the
   attacker's average.
4. Inverse BDCT and colour transform.
5. **Learned refinement** (``refine_epochs > 0``): a U-Net trained on the attacker's own releases
   passed through steps 1-4 (never the raw tensor) corrects what is left, L1 loss, 112x112 output.

No step uses the judge (SFace) or any face recognizer. ``report()`` says how many channel slots and
how much AC energy the assignment placed right when the victims' draws are known to the harness (they
are not to the attack: it only reads them after inverting, for the report).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .assignment import assign, fit_plane_classifier, slot_log_probs, unshuffle
from .base import Param, batched, check_defense, check_faces, client_traffic, register_attack
from .refine import RECONSTRUCTION_PARAMS, BDCTReconstruction, Refiner, chunks


@register_attack("structure")
class StructureAttack(BDCTReconstruction):
    """Exact algebra + channel assignment + DC recovery (+ U-Net refinement) against BDCT releases."""

    name = "structure"
    PARAMS = (
        Param("mode", str, "whitebox", choices=("whitebox",), doc="white-box only: it builds on the public algorithm"),
        Param("n_images", int, 800, range=(8, None), optional=True,
              doc="attacker's public faces used to learn plane signatures and to train the refinement"),
        Param("assignment", str, "auto", choices=("auto", "sample", "key", "none"),
              doc="auto: per query for shuffle='sample' and 'keys:R', once per client for 'key', none when unshuffled"),
        Param("client_queries", int, 256, range=(0, 100_000),
              doc="other queries of the same client the attacker sees (client-key assignment only)"),
        Param("classifier_epochs", int, 8, range=(1, 1000), doc="epochs of the plane classifier"),
        Param("classifier_hidden", int, 256, range=(8, 4096), doc="hidden width of the plane classifier"),
    ) + RECONSTRUCTION_PARAMS

    @classmethod
    def applicable(cls, defense) -> Optional[str]:
        st = defense.structure()
        if st.transform != "bdct":
            return f"needs a block-DCT release (the defense's transform is {st.transform!r})"
        if st.channel_mix not in ("neighbour", "none"):
            return (f"inverts only a public channel mix (neighbour or none); the defense's channel mix "
                    f"{st.channel_mix!r} is secret (a client key), so its exact inverse is unknown to the attacker")
        return None

    def __init__(self, **params):
        super().__init__(**params)
        self.info: Dict[str, Any] = {}
        self.refiner = None

    # ---- fit -------------------------------------------------------------------------------------
    def fit(self, defense, public_images, public_labels=None):
        p = self.params
        self.begin_structure(defense, public_images)
        st = self.structure
        mode = p["assignment"]
        if mode == "auto":
            # keys:R (one of R client keys per query): the per-query assignment; an attack that clusters
            # the client's queries by key and assigns once per cluster is left to do
            mode = "sample" if st.shuffle.startswith("keys:") else {"sample": "sample", "key": "key",
                                                                     "none": "none"}[st.shuffle]
        self.assignment = mode
        self.classifier = None
        if self.assignment != "none":
            with self.seeded():
                self.classifier = fit_plane_classifier(None, features=self.own_plane_features(),
                                                       epochs=p["classifier_epochs"], hidden=p["classifier_hidden"],
                                                       generator=self.generator)
        if p["refine_epochs"] > 0:
            self._fit_refiner(self.pool)
        self.fitted = True
        return self

    def _fit_refiner(self, imgs: torch.Tensor) -> None:
        p = self.params
        with torch.no_grad():   # the attacker's own releases (its own secrets) through steps 1-4, released a
            # chunk at a time (a client key's second pass releases them again: same key, same permutation)
            rough = self._reconstruct(lambda: (self.defense.query(x) for x in chunks(imgs)), own=True)
        with self.seeded():
            self.refiner = Refiner(p["refine_width"], self.device)
        self.refiner.fit(rough, imgs, p["refine_epochs"], p["batch_size"], p["lr"], self.generator)

    # ---- the pipeline ----------------------------------------------------------------------------
    def _key_channels(self, released, traffic: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C,) channel of every slot under one client key: the evidence of all queries (and the client's
        other traffic) summed before one assignment."""
        evidence = 0.0
        for part in (released, traffic):
            if part is None:
                continue
            for r in (part() if callable(part) else chunks(part)):
                evidence = evidence + slot_log_probs(self.classifier, self.planes(r)).sum(0)
        return assign(evidence)

    def _reconstruct(self, released, own: bool = False, traffic: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Releases -> faces through steps 1-4, a chunk of faces at a time. ``released``: a (B, C, g, g)
        tensor, or a callable returning an iterator over chunks of releases (called twice with a client key:
        the evidence, then the faces)."""
        key = self._key_channels(released, traffic) if self.assignment == "key" else None
        faces, slots = [], []
        for r in (released() if callable(released) else chunks(released)):
            planes = self.planes(r)
            b, c = planes.shape[:2]
            if key is not None:
                slot_channel = key.expand(b, c)
            elif self.assignment == "none":
                slot_channel = torch.arange(c).expand(b, c)
            else:
                slot_channel = assign(slot_log_probs(self.classifier, planes))
            slots.append(slot_channel)
            faces.append(self.to_faces(unshuffle(planes, slot_channel)))
        if not own:
            self.last_assignment = torch.cat(slots)
        return torch.cat(faces)

    # ---- attack ----------------------------------------------------------------------------------
    def observe(self, defense, victim_images):
        """The victims' queries; with a client key also ``client_queries`` other queries of that client."""
        check_defense(defense)
        check_faces(victim_images, "victim_images")
        obs = {"queries": batched(defense.query, victim_images), "traffic": None}
        if self.assignment == "key" and self.params["client_queries"]:
            obs["traffic"] = client_traffic(defense, self.pool, self.params["client_queries"], self.generator)
        return obs

    def invert(self, observation):
        self._require_fitted()
        if isinstance(observation, torch.Tensor):
            observation = {"queries": observation, "traffic": None}
        q = observation["queries"]
        if q.dim() != 4 or q.shape[1] != len(self.kept):
            raise ValueError(f"attack 'structure' expects (B, {len(self.kept)}, g, g) queries, got {tuple(q.shape)}")
        rough = self._reconstruct(q, traffic=observation.get("traffic"))
        return rough.cpu() if self.refiner is None else self.refiner(rough)

    def score_assignment(self, true_perm: torch.Tensor, released: torch.Tensor) -> Dict[str, float]:
        """Fraction of slots and of AC energy placed at the right channel, given the victims' true
        permutations (``true_perm[b, i]``: the kept index of slot i) - for the report only."""
        got = self.last_assignment
        right = (got == true_perm.to(got.device)).double()
        energy = torch.cat([self.planes(r).pow(2).mean(dim=(2, 3)) for r in chunks(released)])
        return {"slots_right": float(right.mean()), "energy_right": float((right * energy).sum() / energy.sum())}

    def report(self) -> Dict[str, Any]:
        return {"assignment": self.assignment, "dc": self.params["dc"], "refined": self.refiner is not None,
                **self.info}


__all__ = ["StructureAttack"]
