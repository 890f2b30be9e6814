"""The one place the benchmark still knows a training method: what ARL runs do not write yet.

Every run is read the same way - ``results.json`` records the training ``config``, ``model.pt`` is the
recognizer (:func:`hybridmask.models.load_model`) behind the defense that
:func:`hybridmask.defenses.io.load_defense` rebuilds - except runs of :mod:`hybridmask.train.arl`,
which today write ``defense.pt`` and a ``results.json`` without the config, and no recognizer file.
:func:`arl_run_outputs` supplies both from ``defense.pt``. Delete this module when ``train_arl``
records ``config`` in its results and saves its utility network as the run's recognizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch


class _FeatureRecognizer(torch.nn.Module):
    """Identity embeddings of a release z: the utility network without its task head."""

    def __init__(self, utility: torch.nn.Module):
        super().__init__()
        self.utility = utility.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        e = self.utility.embed(z)
        return e.flatten(1) if e.dim() > 2 else e


def arl_run_outputs(run_dir: Path, recognizer: bool = False) -> Optional[Dict[str, Any]]:
    """``{"config": training config, "recognizer": module or None}`` of an ARL run folder (from its
    ``defense.pt``); None for any other folder."""
    from ..defenses.io import DEFENSE_FORMAT
    from ..utils import safe_torch_load
    path = Path(run_dir) / "defense.pt"
    if not path.is_file():
        return None
    try:
        blob = safe_torch_load(path)
    except (ValueError, OSError, RuntimeError):
        return None
    arl = (blob.get("extra") or {}).get("arl") if isinstance(blob, dict) and blob.get("format") == DEFENSE_FORMAT \
        else None
    if not isinstance(arl, dict) or not isinstance(arl.get("config"), dict):
        return None
    out: Dict[str, Any] = {"config": arl["config"], "recognizer": None}
    if recognizer:
        from ..train.arl import load_arl_model
        net, _ = load_arl_model(path)
        out["recognizer"] = _FeatureRecognizer(net.utility).eval()
    return out


__all__ = ["arl_run_outputs"]
