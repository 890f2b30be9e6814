"""Model-inversion attacks and privacy metrics (the MIA harness, DESIGN section 3).

    from hybridmask.attacks import create_attack, list_attacks
    atk = create_attack("cgan", epochs=4)           # parameters are declared and validated
    atk.fit(defense, public_faces)                   # attacker-side training on public faces
    recon = atk.attack(defense, victim_faces)        # observe (through the defense) + invert

Registered attacks: ``structure`` (exact algebra, channel assignment, DC recovery, refinement),
``cgan`` (pix2pix reconstruction), ``demix`` (multi-encoding demixing), ``embedding_inversion``
(learned decoder / white-box optimisation), ``gmi`` (generative class inversion). Metrics live in :mod:`hybridmask.attacks.metrics` (``compute_metric``, ``list_metrics``).
"""
from .base import (ATTACKS, Attack, Param, create_attack, describe_attack, list_attacks, register_attack)
from . import cgan, demix, embedding, gmi, separation, structure  # noqa: F401  (registers)
from . import linkage  # noqa: F401  (registers the linkage attack)
from . import gram  # noqa: F401  (registers the key-invariant Gram attack)
from .cgan import CGANAttack
from .demix import DemixAttack
from .embedding import EmbeddingInversion
from .gmi import GMIAttack
from .structure import StructureAttack
from .metrics import METRICS, compute_metric, list_metrics

__all__ = ["ATTACKS", "Attack", "Param", "create_attack", "describe_attack", "list_attacks", "register_attack",
           "CGANAttack", "DemixAttack", "EmbeddingInversion", "GMIAttack", "StructureAttack", "METRICS", "compute_metric", "list_metrics"]
