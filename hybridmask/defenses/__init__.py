"""Defenses behind one interface (see :mod:`hybridmask.defenses.base`)."""
from .base import (DEFENSES, Defense, FixedKMixUp, FrequencyOnly, InstaHide, NoDefense, PPFRFDDefense,
                   create_defense, list_defenses, register_defense)

__all__ = ["DEFENSES", "Defense", "FixedKMixUp", "FrequencyOnly", "InstaHide", "NoDefense", "PPFRFDDefense",
           "create_defense", "list_defenses", "register_defense"]
from .adaptive import AdaptiveMask, load_policy, save_policy  # noqa: E402,F401  (registers "adaptive")
from . import arl, dctdp, metrics  # noqa: E402,F401  (registers "arl" and "dctdp")
from .arl import ARLDefense, train_arl  # noqa: E402,F401
from .dctdp import DCTDPDefense  # noqa: E402,F401
from .io import (DefenseNotRecordedError, defense_from_checkpoint, defense_from_config,  # noqa: E402,F401
                 defense_from_run, load_defense)
