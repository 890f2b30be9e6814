"""Image decoding shared by the face datasets.

Every face tensor in hybridmask is float32, RGB, shape (3, H, W), values in [-1, 1]
(``pixel / 127.5 - 1``). Decoding goes through PIL and always names the offending file
when an image is missing, corrupt, too large or has the wrong size.

What is decoded, by PIL mode:

* 8-bit RGB, grey (``L``), bilevel (``1``), palette (``P``), ``CMYK``, ``YCbCr``: converted to RGB;
* with an alpha channel (``RGBA``, ``LA``, ``PA``, palette with transparency): the alpha channel is
  dropped, the stored colours are kept (no compositing onto a background);
* 16-bit grey (``I;16``, ``I;16B``, ...; a 16-bit grey PNG or TIFF): the full 16-bit value,
  ``v / 65535 * 2 - 1``. 16-bit colour PNGs are read by PIL as 8-bit RGB (the high byte);
* 32-bit integer (``I``, except a PNG, which can only hold 16 bits) and 32-bit float (``F``) images
  are refused: they have no defined white level, so no range can be inferred;
* any other mode PIL cannot convert to RGB is refused, naming the mode.

The pixel count is read from the header and checked *before* anything is decoded: images over
:func:`max_image_pixels` (50 megapixels; ``HYBRIDMASK_MAX_IMAGE_PIXELS`` or the ``max_pixels``
argument change it) are refused with :class:`ImageTooLargeError`, so a small file that expands
to gigabytes (a "decompression bomb") never gets decoded.
"""
from __future__ import annotations

import io
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
FACE_SIZE = 112
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "HYBRIDMASK_MAX_IMAGE_PIXELS"

_RGB_CONVERTIBLE = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBA", "RGBa", "RGBX", "LA", "La", "PA", "HSV")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageTooLargeError(ValueError):
    """An image whose header announces more pixels than the limit (refused before decoding)."""


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def max_image_pixels(max_pixels: Optional[int] = None) -> int:
    """The pixel-count limit: ``max_pixels`` if given, else ``$HYBRIDMASK_MAX_IMAGE_PIXELS``, else 50 M."""
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(raw)
        except ValueError:
            raise ValueError(f"{MAX_PIXELS_ENV} must be a positive integer (pixels), got {raw!r}") from None
        where = MAX_PIXELS_ENV
    else:
        where = "max_pixels"
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or int(max_pixels) < 1:
        raise ValueError(f"{where} must be a positive integer (pixels), got {max_pixels!r}")
    return int(max_pixels)


def check_pixel_count(width: int, height: int, name: str, max_pixels: Optional[int] = None) -> None:
    """:class:`ImageTooLargeError` when ``width x height`` exceeds the limit (see :func:`max_image_pixels`)."""
    limit = max_image_pixels(max_pixels)
    n = int(width) * int(height)
    if n > limit:
        raise ImageTooLargeError(
            f"image {name} is {width}x{height} = {n / 1e6:.1f} megapixels, over the limit of "
            f"{limit / 1e6:g} megapixels; refused before decoding (raise the limit with "
            f"{MAX_PIXELS_ENV}=N if the file is trusted)")


def _mode_error(name: str, mode: str, why: str) -> ValueError:
    return ValueError(f"image {name} has PIL mode {mode!r} ({why}); save it as 8-bit RGB or grey, "
                      f"or 16-bit grey")


def pil_to_tensor(img: Image.Image, name: str = "<image>") -> torch.Tensor:
    """PIL image -> float32 RGB tensor (3, H, W) in [-1, 1] (see the module notes on modes)."""
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)
    if mode in _SIXTEEN_BIT or (mode == "I" and img.format == "PNG"):
        arr = np.asarray(img)
        if arr.dtype.kind not in "ui" or (arr.size and (arr.min() < 0 or arr.max() > 65535)):
            raise _mode_error(name, mode, "values outside the 16-bit range 0..65535")
        grey = torch.from_numpy(arr.astype(np.float32)).mul_(2.0 / 65535.0).sub_(1.0)
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    if mode == "I":
        raise _mode_error(name, mode, "32-bit integer pixels have no defined white level")
    if mode == "F":
        raise _mode_error(name, mode, "32-bit float pixels have no defined range")
    if mode not in _RGB_CONVERTIBLE:
        raise _mode_error(name, mode, "not a colour or grey mode hybridmask decodes")
    try:
        if mode == "P":  # via RGBA: a palette with transparency converts cleanly (alpha then dropped)
            img = img.convert("RGBA")
        rgb = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise _mode_error(name, mode, f"PIL cannot convert it to RGB: {e}") from None
    arr = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8 RGB array."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


_PIL_LIMIT_LOCK = threading.Lock()


def _open_over_pil_limit(src, name: str, limit: int) -> Image.Image:
    """Open an image PIL's own bomb check refuses but that is within our (explicitly raised) limit:
    PIL's module-wide limit is lifted to ours for this one ``open``, under a lock."""
    if hasattr(src, "seek"):
        src.seek(0)
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(int(old or 0), limit)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(src)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def open_image(src, name: str, max_pixels: Optional[int] = None) -> Image.Image:
    """``Image.open`` (header only: nothing decoded yet) with the pixel-count check; clear
    ``ValueError`` (:class:`ImageTooLargeError` for size) for unreadable or oversized images.
    The caller decodes (``img.load()``) and closes the image."""
    limit = max_image_pixels(max_pixels)
    try:
        with warnings.catch_warnings():  # our own limit is checked below; PIL's lower one only warns
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
    except Image.DecompressionBombError as e:  # over PIL's hard limit (2 x Image.MAX_IMAGE_PIXELS)
        m = _BOMB_PIXELS.search(str(e))
        n = int(m.group(1)) if m else None
        if n is None or n > limit:
            raise ImageTooLargeError(
                f"image {name} has {'more' if n is None else f'{n / 1e6:.1f}'} megapixels, over the limit of "
                f"{limit / 1e6:g} megapixels; refused before decoding (raise the limit with {MAX_PIXELS_ENV}=N "
                f"if the file is trusted)") from None
        img = _open_over_pil_limit(src, name, limit)  # the caller raised our limit above PIL's: honour it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from None
    try:
        check_pixel_count(img.size[0], img.size[1], name, limit)
    except ValueError:
        img.close()
        raise
    return img


def image_size(path: Union[str, os.PathLike], max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """``(width, height)`` of an image file from its header (nothing decoded), after the
    pixel-count check; clear errors for a missing, unreadable or oversized file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img = open_image(path, str(path), max_pixels)
    try:
        return img.size
    finally:
        img.close()


def _check_size(img: Image.Image, name: str, size: Optional[Union[int, Tuple[int, int]]]) -> None:
    if size is None:
        return
    h, w = (size, size) if isinstance(size, int) else size
    if img.size != (w, h):
        raise ValueError(
            f"image {name} is {img.size[0]}x{img.size[1]}, expected an aligned {w}x{h} face "
            f"(align raw photos first with `hybridmask align SRC DST`)")


def _decode(src, name: str, size, max_pixels: Optional[int]) -> torch.Tensor:
    img = open_image(src, name, max_pixels)
    try:
        _check_size(img, name, size)  # from the header: a wrong-size file is never decoded
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from None
        return pil_to_tensor(img, name)
    finally:
        img.close()


def load_image(path: Union[str, os.PathLike], size: Optional[Union[int, Tuple[int, int]]] = FACE_SIZE,
               max_pixels: Optional[int] = None) -> torch.Tensor:
    """Read an image file -> (3, H, W) float tensor in [-1, 1]; ``size`` checks (H, W) (None: any);
    ``max_pixels`` overrides the pixel-count limit (:func:`max_image_pixels`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return _decode(path, str(path), size, max_pixels)


def decode_image(data: Union[bytes, bytearray], name: str = "<bytes>",
                 size: Optional[Union[int, Tuple[int, int]]] = FACE_SIZE,
                 max_pixels: Optional[int] = None) -> torch.Tensor:
    """Decode JPEG/PNG bytes -> (3, H, W) float tensor in [-1, 1]."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"image {name}: expected bytes, got {type(data).__name__}")
    return _decode(io.BytesIO(bytes(data)), name, size, max_pixels)
