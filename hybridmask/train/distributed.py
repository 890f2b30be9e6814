"""Thin helpers around ``torch.distributed`` (torchrun / env:// initialisation).

``init_distributed()`` starts a process group when ``WORLD_SIZE > 1`` (as set by ``torchrun``):
backend ``nccl`` when CUDA is available, ``gloo`` otherwise. Every helper below is a no-op (or
the identity) in a single process, so the trainer has one code path.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: Optional[str] = None) -> bool:
    """Initialise the default process group from the environment if ``WORLD_SIZE > 1``.
    Returns True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def _comm_device(t: torch.Tensor) -> torch.device:
    return t.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors of all ranks along dim 0 (rank order)."""
    if not is_dist():
        return t
    dev = _comm_device(t)
    src = t.detach().contiguous().to(dev)
    out = [torch.empty_like(src) for _ in range(world_size())]
    dist.all_gather(out, src)
    return torch.cat(out).to(t.device)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``t`` from rank ``src`` (returns ``t``)."""
    if not is_dist():
        return t
    dev = _comm_device(t)
    buf = t.detach().to(dev).contiguous()
    dist.broadcast(buf, src)
    with torch.no_grad():
        t.copy_(buf.to(t.device))
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: float) -> float:
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":  # nccl reduces device tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def barrier() -> None:
    if is_dist():
        dist.barrier()
