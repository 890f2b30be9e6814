"""Batched face embedding with flip test-time augmentation."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hybridmask.utils import check_images

MAX_BATCH = 128


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def _as_batches(images, batch_size: int):
    """Yield (b, 3, H, W) batches of at most ``batch_size`` from a tensor, dataset or iterable.

    Items may be (3, H, W) images, (B, 3, H, W) batches, or tuples whose first element is one
    of those (e.g. ``(image, label)`` from a dataset).
    """
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
        return
    buf = []
    n_buf = 0
    for item in images:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"embed: expected image tensors, got {type(item).__name__}")
        if item.dim() == 3:
            item = item.unsqueeze(0)
        buf.append(item)
        n_buf += len(item)
        while n_buf >= batch_size:
            cat = torch.cat(buf)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            buf, n_buf = ([rest] if len(rest) else []), len(rest)
    if n_buf:
        yield torch.cat(buf)


@torch.no_grad()
def embed(model_or_fn: Union[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]],
          images: Iterable, batch_size: int = MAX_BATCH, flip: bool = True,
          transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
          normalize: bool = True, progress: bool = True, total: Optional[int] = None,
          desc: str = "embed") -> torch.Tensor:
    """Embed aligned faces -> (N, D) float32 tensor on the CPU.

    ``images``: a (N, 3, H, W) tensor in [-1, 1], a dataset / iterable of (3, H, W) images (or
    ``(image, label)`` tuples) or of batches. With ``flip`` the embedding is
    ``f(T(x)) + f(T(hflip(x)))``: the horizontal flip acts on the pixels before the optional
    ``transform`` T (e.g. the frequency query masking ``HybridMask.query``; it receives the
    batch on the model's device). The result is
    L2-normalised unless ``normalize=False``. Model batches never exceed ``batch_size``
    (at most 128).
    """
    batch_size = int(batch_size)
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH}, got {batch_size}")
    was_training = None
    if isinstance(model_or_fn, torch.nn.Module):
        was_training = model_or_fn.training
        model_or_fn.eval()
    device = _model_device(model_or_fn)
    if total is None:
        try:
            total = len(images)
        except TypeError:
            total = None

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if transform is not None:
            x = transform(x)
        out = model_or_fn(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x):
            raise ValueError(f"embed: model must return a (B, D) tensor for B={len(x)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out.detach().float().cpu()

    chunks = []
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for x in _as_batches(images, batch_size):
                check_images(x, "images")
                x = x.float()
                e = forward(x)
                if flip:
                    e = e + forward(torch.flip(x, dims=[3]))
                chunks.append(e)
                bar.update(len(x))
    finally:
        if was_training:
            model_or_fn.train(True)
    if not chunks:
        raise ValueError("embed: no images given")
    emb = torch.cat(chunks)
    if not torch.isfinite(emb).all():
        raise ValueError("embed: the model produced NaN or infinite embeddings")
    return F.normalize(emb, dim=1) if normalize else emb
