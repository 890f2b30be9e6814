"""Defenses behind one contract (see :mod:`hybridmask.defenses.base`); rebuild any of them with
:func:`load_defense`. A new defense is one file here (a :class:`Defense` subclass decorated with
``@register_defense("name")``) plus its import line below."""
from .base import (DEFENSES, Defense, FixedKMixUp, FrequencyOnly, InstaHide, MaskDefense, NoDefense, PPFRFDDefense,
                   create_defense, list_defenses, register_defense)
from .adaptive import AdaptiveMask, load_policy, save_policy  # noqa: E402,F401  (registers "adaptive")
from .dctdp import DCTDPDefense  # noqa: E402,F401  (registers "dctdp")
from .arl import ARLDefense, train_arl  # noqa: E402,F401  (registers "arl"; train_arl runs hybridmask.train.arl)
from .io import (ClientKeyMismatchError, DefenseNotRecordedError, build_defense, defense_from_checkpoint,  # noqa: E402,F401
                 defense_record, load_client_key, load_defense, save_client_key, save_defense)

__all__ = ["DEFENSES", "Defense", "MaskDefense", "FixedKMixUp", "FrequencyOnly", "InstaHide", "NoDefense",
           "PPFRFDDefense", "AdaptiveMask", "DCTDPDefense", "ARLDefense", "create_defense", "list_defenses",
           "register_defense", "load_defense", "save_defense", "build_defense", "defense_record",
           "defense_from_checkpoint", "DefenseNotRecordedError", "load_policy", "save_policy", "save_client_key",
           "load_client_key", "ClientKeyMismatchError"]
