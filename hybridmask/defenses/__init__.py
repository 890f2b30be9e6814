"""Defenses behind one interface (see :mod:`hybridmask.defenses.base`)."""
from .base import (DEFENSES, Defense, FixedKMixUp, FrequencyOnly, InstaHide, NoDefense, PPFRFDDefense,
                   create_defense, list_defenses, register_defense)

__all__ = ["DEFENSES", "Defense", "FixedKMixUp", "FrequencyOnly", "InstaHide", "NoDefense", "PPFRFDDefense",
           "create_defense", "list_defenses", "register_defense"]
from .adaptive import AdaptiveMask, load_policy, save_policy  # noqa: E402,F401  (registers "adaptive")
