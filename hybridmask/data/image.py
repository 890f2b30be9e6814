"""Image decoding shared by the face datasets.

Every face tensor in hybridmask is float32, RGB, shape (3, H, W), values in [-1, 1]
(``pixel / 127.5 - 1``). Decoding goes through PIL and always names the offending file
when an image is missing, corrupt or has the wrong size.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
FACE_SIZE = 112


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 RGB tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8 RGB array."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def _open(src, name: str) -> Image.Image:
    try:
        img = Image.open(src)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def _check_size(img: Image.Image, name: str, size: Optional[Union[int, Tuple[int, int]]]) -> None:
    if size is None:
        return
    h, w = (size, size) if isinstance(size, int) else size
    if img.size != (w, h):
        raise ValueError(
            f"image {name} is {img.size[0]}x{img.size[1]}, expected an aligned {w}x{h} face "
            f"(align raw photos first with `hybridmask align SRC DST`)")


def load_image(path: Union[str, os.PathLike], size: Optional[Union[int, Tuple[int, int]]] = FACE_SIZE) -> torch.Tensor:
    """Read an image file -> (3, H, W) float tensor in [-1, 1]; ``size`` checks (H, W) (None: any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img = _open(path, str(path))
    _check_size(img, str(path), size)
    return pil_to_tensor(img)


def decode_image(data: Union[bytes, bytearray], name: str = "<bytes>",
                 size: Optional[Union[int, Tuple[int, int]]] = FACE_SIZE) -> torch.Tensor:
    """Decode JPEG/PNG bytes -> (3, H, W) float tensor in [-1, 1]."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"image {name}: expected bytes, got {type(data).__name__}")
    img = _open(io.BytesIO(bytes(data)), name)
    _check_size(img, name, size)
    return pil_to_tensor(img)
