"""Recognizer checkpoints: ``save_model`` / ``load_model``.

A checkpoint is a plain dict (readable with ``torch.load(..., weights_only=True)``)::

    {"format": "hybridmask.recognizer", "format_version": 1, "hybridmask_version": "0.1.0",
     "model_config": {...create_model kwargs...}, "model_state": {...},
     "head_config": {...create_head kwargs...} | None, "head_state": {...} | None,
     "extra": {...} | None}

The defense the model reads through is recorded in ``extra`` as
:func:`hybridmask.defenses.io.defense_record` writes it (``defense`` + ``defense_state``), so
:func:`hybridmask.defenses.load_defense` rebuilds it. Only plain containers (dict with str keys,
list, tuple), str, int, float, bool, None and tensors may appear in ``extra``; anything else is refused at save time, so every checkpoint
loads with ``weights_only=True``. Files are written atomically.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from hybridmask import __version__
from hybridmask.utils import atomic_save, safe_torch_load

from .base import FRBackbone, create_model
from .heads import MarginHead, create_head

FORMAT = "hybridmask.recognizer"
FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, _PLAIN) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict keys must be str or int, got {type(k).__name__} ({k!r})")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint (only dict/list/tuple/str/"
                    f"int/float/bool/None/tensor load with weights_only=True)")


def _state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_model(path: Union[str, os.PathLike], model: FRBackbone, head: Optional[MarginHead] = None,
               extra: Optional[Dict] = None) -> None:
    """Write ``model`` (and optionally its margin ``head``) to ``path`` atomically.

    Args:
        model: a backbone from :func:`create_model` (it must carry ``.config``).
        head: optional margin head from :func:`create_head`.
        extra: optional plain dict (the defense record ``defense_record(defense)``, epoch, metrics, ...).
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, dict) or "name" not in config:
        raise TypeError("save_model needs a backbone built by hybridmask.models.create_model (with .config)")
    if head is not None and not isinstance(head, MarginHead):
        raise TypeError(f"head must be a MarginHead from create_head, got {type(head).__name__}")
    for what, obj in (("model.config", config), ("extra", extra)):
        if obj is not None and not isinstance(obj, dict):
            raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
        _check_plain(obj, what)
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hybridmask_version": __version__,
        "model_config": dict(config),
        "model_state": _state(model),
        "head_config": dict(head.config) if head is not None else None,
        "head_state": _state(head) if head is not None else None,
        "extra": dict(extra) if extra is not None else None,
    }
    atomic_save(ckpt, path)


def _load_state(module: nn.Module, state: Any, what: str, path) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {what} state is missing or not a dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{path}: {what} weights do not match its config: {' '.join(first[:3])}") from e


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu"
               ) -> Tuple[FRBackbone, Optional[MarginHead], Dict]:
    """Rebuild a recognizer from a checkpoint written by :func:`save_model`.

    Returns ``(model, head_or_None, meta)``; the model and head are in eval mode on
    ``map_location``. ``meta`` holds ``model_config``, ``head_config``, ``extra``,
    ``hybridmask_version``, ``format_version`` and ``path``.

    Raises FileNotFoundError (missing file), ValueError (corrupt or not a hybridmask recognizer
    checkpoint, weights that do not fit the config) or KeyError (unknown model/head name).
    """
    ckpt = safe_torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a hybridmask recognizer checkpoint (no format={FORMAT!r} entry)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version!r} is not supported "
                         f"(this hybridmask reads up to {FORMAT_VERSION})")
    cfg = ckpt.get("model_config")
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ValueError(f"{path}: model_config is missing or has no 'name'")
    cfg = dict(cfg)
    model = create_model(cfg.pop("name"), **cfg)
    _load_state(model, ckpt.get("model_state"), "model", path)
    model.to(map_location).eval()
    head = None
    hcfg = ckpt.get("head_config")
    if hcfg is not None:
        if not isinstance(hcfg, dict) or "name" not in hcfg:
            raise ValueError(f"{path}: head_config has no 'name'")
        hcfg = dict(hcfg)
        head = create_head(hcfg.pop("name"), **hcfg)
        _load_state(head, ckpt.get("head_state"), "head", path)
        head.to(map_location).eval()
    meta = {k: ckpt.get(k) for k in ("model_config", "head_config", "extra", "hybridmask_version",
                                     "format_version")}
    meta["path"] = str(path)
    # shortcuts for callers that only want the architecture summary
    for k in ("name", "stem", "in_chans", "grid", "embedding_size"):
        meta[k] = model.config.get(k)
    return model, head, meta


def init_from_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Start ``model`` from the weights of a recognizer checkpoint (``model.init``; TFace-style stem swap).

    Every tensor of the checkpoint's model whose name and shape match one of ``model``'s is copied; the
    others (a pixel checkpoint's stem when ``model`` reads frequency releases, a different head) keep
    their fresh values. Returns ``{"from", "architecture", "copied", "kept_fresh"}`` for the run's records.
    Raises ValueError when nothing matches (another architecture) or the file is not a recognizer checkpoint.
    """
    ckpt = safe_torch_load(path, map_location="cpu")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not isinstance(ckpt.get("model_state"), dict):
        raise ValueError(f"model.init: {path} is not a hybridmask recognizer checkpoint (written by save_model / "
                         f"hybridmask train's model.pt)")
    src = ckpt["model_state"]
    own = model.state_dict()
    copied = {k: v for k, v in src.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not [k for k in copied if not k.endswith("num_batches_tracked")]:
        raise ValueError(f"model.init: no weight of {path} ({(ckpt.get('model_config') or {}).get('name')}) fits "
                         f"this model ({getattr(model, 'config', {}).get('name')}): another architecture")
    model.load_state_dict(copied, strict=False)
    fresh = sorted(k for k in own if k not in copied)
    cfg = ckpt.get("model_config") or {}
    return {"from": str(path), "architecture": {k: cfg.get(k) for k in ("name", "stem", "in_chans", "grid")},
            "copied": len(copied), "kept_fresh": len(fresh), "kept_fresh_names": fresh[:20]}
