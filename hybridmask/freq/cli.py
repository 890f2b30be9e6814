"""``hybridmask mask SRC DST``: mask every face in a folder (k=1, what a client sends for a query)
and write what the masked representation shows as a picture (the zero-filled inverse) as PNG,
so users can see what leaves the device."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..utils.io import atomic_write
from .hybrid import HybridMask

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of aligned 112x112 faces (searched recursively)")
    p.add_argument("dst", help="output folder for the PNG views (same sub-folder layout)")
    p.add_argument("--u", type=int, default=1, help="BDCT upsampling factor (1, 2, 4, 8)")
    p.add_argument("--drop", default="dc", help="channels to drop: dc, lowN, none")
    p.add_argument("--shuffle", default="sample", choices=["sample", "key", "none"])
    p.add_argument("--mix", default="neighbour", choices=["neighbour", "none"])
    p.add_argument("--seed", type=int, default=None, help="seed for tests only; default: secure OS seed")


def load_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def save_png(img: torch.Tensor, path: Path) -> None:
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    with atomic_write(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")


def run(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    files = sorted(f for f in src.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    hm = HybridMask(u=args.u, drop=args.drop, shuffle=args.shuffle, mix=args.mix, seed=args.seed)
    from tqdm import tqdm
    for f in tqdm(files, desc="masking", unit="img"):
        x = load_image(f).unsqueeze(0)
        view = hm.as_image(hm.query(x), size=tuple(x.shape[-2:]))[0]
        save_png(view, (dst / f.relative_to(src)).with_suffix(".png"))
    print(f"wrote {len(files)} masked views to {dst}")
    return 0
