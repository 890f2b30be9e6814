"""The one home of three small ideas every package needs: where to run, how configs merge, and how
to push a large tensor through a function in batches."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

DeviceLike = Union[str, torch.device, None]


def resolve_device(spec: DeviceLike = "auto") -> torch.device:
    """``"auto"``/None -> this process's accelerator (``cuda:LOCAL_RANK``) or the CPU; anything else
    -> ``torch.device(spec)``, with one clear ``ValueError`` for a bad name or a CUDA device on a
    machine without CUDA."""
    if spec is None or str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"bad device {spec!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for, but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def deep_merge(base: Mapping[str, Any], over: Optional[Mapping[str, Any]], strict: bool = False,
               where: str = "config") -> Dict[str, Any]:
    """Recursive merge: ``over`` wins; mappings merge, every other value (lists included) is replaced.
    ``strict``: a key of ``over`` that ``base`` lacks is a ``KeyError`` naming it (``where`` + its
    dotted path) - for configs whose defaults list every key."""
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        path = f"{where}.{k}"
        if strict and k not in out:
            raise KeyError(f"unknown key {path!r}; known: {', '.join(sorted(map(str, out)))}")
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v, strict, path)
        elif strict and isinstance(out.get(k), Mapping) and v is not None:
            raise ValueError(f"{path} must be a mapping, got {type(v).__name__}")
        elif not (strict and v is None and isinstance(out.get(k), Mapping)):
            out[k] = copy.deepcopy(v)
    return out


def run_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 128,
                   device: DeviceLike = None, out_device: DeviceLike = "cpu", no_grad: bool = True) -> torch.Tensor:
    """``cat([fn(x[i:i+batch_size]) for i ...])``: each slice moved to ``device`` (None: left where it
    is), each result moved to ``out_device`` (None: left where it is), under ``no_grad`` by default."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    ctx = torch.no_grad() if no_grad else torch.enable_grad()
    outs = []
    with ctx:
        for i in range(0, x.shape[0], int(batch_size)):
            xb = x[i:i + int(batch_size)]
            if device is not None:
                xb = xb.to(device)
            y = fn(xb)
            outs.append(y if out_device is None else y.to(out_device))
    if not outs:
        raise ValueError("run_in_batches got an empty input")
    return torch.cat(outs)
