"""``hybridmask mask SRC DST``: mask every face in a folder (k=1, what a client sends for a query)
and write what the masked representation shows as a picture (the zero-filled inverse) as PNG,
so users can see what leaves the device."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ..data.image import load_image as _load_image
from ..utils.io import atomic_write, check_writable_dir
from ..utils.validate import HybridMaskInputError
from .hybrid import HybridMask

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
U_CHOICES = (1, 2, 4, 8)


def _shuffle(text: str) -> str:
    import argparse
    from .ppfrfd import parse_shuffle
    try:
        parse_shuffle(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of aligned 112x112 faces (searched recursively)")
    p.add_argument("dst", help="output folder for the PNG views (same sub-folder layout)")
    p.add_argument("--u", type=int, default=1, choices=U_CHOICES, help="BDCT upsampling factor (1, 2, 4, 8)")
    p.add_argument("--drop", default="dc", help="channels to drop: dc, lowN, none")
    p.add_argument("--shuffle", default="sample", type=_shuffle,
                   help="sample (a fresh secret permutation per face) | key (one client key) | keys:R | none")
    p.add_argument("--mix", default="neighbour", choices=["neighbour", "orthogonal", "none"],
                   help="neighbour (public) | orthogonal (a secret keyed orthogonal channel mix) | none")
    p.add_argument("--subset", type=int, default=None,
                   help="keep a secret random subset of this many kept channels per face (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed for tests only; default: secure OS seed")


def load_image(path: Path) -> torch.Tensor:
    """Any image file -> (3, H, W) in [-1, 1] (every bit depth, size checked before decoding;
    see :mod:`hybridmask.data.image`)."""
    return _load_image(path, size=None)


def save_png(img: torch.Tensor, path: Path) -> None:
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    with atomic_write(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")


def run(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    files = sorted(f for f in src.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    hm = HybridMask(u=args.u, drop=args.drop, shuffle=args.shuffle, mix=args.mix, subset=args.subset, seed=args.seed)
    check_writable_dir(dst, "output folder")
    from tqdm import tqdm
    for f in tqdm(files, desc="masking", unit="img"):
        x = load_image(f).unsqueeze(0)
        try:
            view = hm.as_image(hm.query(x), size=tuple(x.shape[-2:]))[0]
        except HybridMaskInputError as e:  # e.g. a size the block DCT cannot tile: name the file
            raise ValueError(f"cannot mask image {f}: {e}") from None
        save_png(view, (dst / f.relative_to(src)).with_suffix(".png"))
    print(f"wrote {len(files)} masked views to {dst}")
    return 0
