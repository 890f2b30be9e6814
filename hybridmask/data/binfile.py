"""insightface-style verification ``.bin`` files, read without arbitrary code execution.

A .bin file is a pickle of ``(images, issame)``: ``images`` a list of 2N encoded images
(JPEG/PNG bytes; pair i is images 2i and 2i+1) and ``issame`` a list of N bools. Pickles can
run arbitrary code when loaded, so :func:`read_bin` uses a restricted unpickler that only
rebuilds plain containers and scalars (bytes, bytearray, bool, list, tuple, int, str) and
refuses everything else (numpy arrays, ``os.system``, ...) with a clear error. Files written
by Python 2 (``str`` images) load as bytes.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from hybridmask.utils import atomic_write

from .image import FACE_SIZE, decode_image
from .pairs import VerificationSet, interleaved_set

PathLike = Union[str, os.PathLike]

_ALLOWED_BUILTINS = ("bytes", "bytearray", "bool", "list", "tuple", "int", "str")


class UnsafePickleError(ValueError):
    """The file asks the unpickler for something other than plain data."""


def _latin1_encode(obj, encoding="latin1"):
    # Python 3 writes ``bytes`` in pickle protocols 0-2 as _codecs.encode(str, "latin1");
    # allow exactly that and nothing else.
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing to unpickle _codecs.encode with arguments ({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name}: a verification .bin may only contain "
            f"plain data ({', '.join(_ALLOWED_BUILTINS)})")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing to unpickle persistent id {pid!r}")


def restricted_loads(data: bytes):
    """``pickle.loads`` that only rebuilds bytes, bytearray, bool, list, tuple, int, str."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def read_bin(path: PathLike) -> Tuple[List[bytes], List[bool]]:
    """Read an insightface ``.bin`` verification file -> ``(images_bytes, issame)``.

    Raises FileNotFoundError (missing), :class:`UnsafePickleError` (a ValueError: the pickle
    references anything but plain data) or ValueError (corrupt, truncated or wrong layout).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".bin file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = restricted_loads(raw)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # EOFError, UnpicklingError, struct.error, ...: corrupt or truncated
        raise ValueError(f"corrupt or truncated .bin file {path}: {type(e).__name__}: {e}") from None
    return _validate(obj, str(path))


def _validate(obj, where: str) -> Tuple[List[bytes], List[bool]]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{where}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{where}: images and issame must be lists, got {type(images).__name__}, {type(issame).__name__}")
    out_images: List[bytes] = []
    for k, b in enumerate(images):
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{where}: image {k} is {type(b).__name__}, expected encoded image bytes")
        out_images.append(bytes(b))
    out_same: List[bool] = []
    for k, s in enumerate(issame):
        if isinstance(s, bool) or (isinstance(s, int) and s in (0, 1)):
            out_same.append(bool(s))
        else:
            raise ValueError(f"{where}: issame[{k}] is {s!r}, expected a bool")
    if len(out_images) != 2 * len(out_same):
        raise ValueError(f"{where}: {len(out_images)} images for {len(out_same)} pairs (expected 2 images per pair)")
    if not out_same:
        raise ValueError(f"{where}: no pairs")
    return out_images, out_same


def write_bin(path: PathLike, images_bytes: Sequence[Union[bytes, bytearray]], issame: Sequence[bool],
              check_images: bool = True) -> None:
    """Write an insightface-compatible ``.bin`` atomically (pickle protocol 4, plain data only).

    ``check_images`` opens each image header with PIL, so an undecodable entry is caught now
    rather than at evaluation time.
    """
    images, same = _validate((list(images_bytes), [bool(s) if isinstance(s, (bool, np.bool_)) else s for s in issame]),
                             f"write_bin({path})")
    if check_images:
        for k, b in enumerate(images):
            try:
                Image.open(io.BytesIO(b)).verify()
            except Exception as e:
                raise ValueError(f"write_bin({path}): image {k} is not a decodable image ({type(e).__name__}: {e})") from None
    with atomic_write(path, "wb") as f:
        pickle.dump((images, same), f, protocol=4)
    _world_readable(path)


def _world_readable(path: PathLike) -> None:
    # the temporary file behind an atomic write is created 0600; give the result the usual mode
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


class BinPairs(torch.utils.data.Dataset):
    """Pairs of a ``.bin`` file as tensors: ``dataset[i] = (img_a, img_b, issame)``.

    Images are decoded lazily (RGB, float32 in [-1, 1], (3, 112, 112)).
    ``source`` is a path or an ``(images_bytes, issame)`` tuple.
    """

    def __init__(self, source: Union[PathLike, Tuple[Sequence[bytes], Sequence[bool]]],
                 image_size: int = FACE_SIZE, name: str = None):
        if isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            self.images_bytes, self.issame = read_bin(self.path)
            self.name = name or self.path.stem
        else:
            self.path = None
            self.images_bytes, self.issame = _validate(source, "BinPairs")
            self.name = name or "pairs"
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.issame)

    @property
    def num_images(self) -> int:
        return len(self.images_bytes)

    def image(self, k: int) -> torch.Tensor:
        where = f"{self.path or self.name}[image {k}]"
        return decode_image(self.images_bytes[k], name=where, size=self.image_size)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair index {i} out of range ({len(self)} pairs)")
        i %= len(self)
        return self.image(2 * i), self.image(2 * i + 1), self.issame[i]

    def verification_set(self) -> VerificationSet:
        return interleaved_set(self.name, len(self), self.image, self.issame)
