"""``hybridmask make-bin``: build an insightface-style ``.bin`` verification file from aligned
image folders and the official protocol (LFW ``pairs.txt``, CFP ``Protocol/``).

The images are stored as their original encoded bytes (no re-encoding), pair by pair in
protocol order, so the 10 contiguous folds of the .bin are the protocol's folds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

from tqdm.auto import tqdm

from .binfile import write_bin
from .image import FACE_SIZE, decode_image
from .protocols import protocol_pairs

TARGETS = ("lfw", "cfp_fp", "cfp_ff")


def build_bin(target: str, data_root, out, check: bool = True, progress: bool = True) -> dict:
    """Write ``out`` for ``target`` (lfw | cfp_fp | cfp_ff) from ``data_root``; returns a summary."""
    if str(target).lower() not in TARGETS:
        raise KeyError(f"unknown target {target!r}; make-bin supports {', '.join(TARGETS)}")
    from hybridmask.utils.io import check_writable_file
    check_writable_file(out, "output .bin file")  # before minutes of reading images
    t0 = time.perf_counter()
    pairs = protocol_pairs(target, data_root)
    cache = {}
    images: List[bytes] = []
    issame: List[bool] = []
    for a, b, same, _fold in tqdm(pairs, desc=f"make-bin {target}", unit="pair", disable=not progress, leave=False):
        for p in (a, b):
            if p not in cache:
                try:
                    data = Path(p).read_bytes()
                except FileNotFoundError:
                    raise FileNotFoundError(f"image listed by the {target} protocol not found: {p}") from None
                except OSError as e:
                    raise ValueError(f"cannot read image {p}: {e.strerror or e}") from None
                if check:  # fail now, naming the file, rather than at evaluation time
                    decode_image(data, name=str(p), size=FACE_SIZE)
                cache[p] = data
            images.append(cache[p])
        issame.append(bool(same))
    write_bin(out, images, issame, check_images=False)
    return {"target": target, "out": str(out), "pairs": len(issame), "positives": sum(issame),
            "distinct_images": len(cache), "bytes": Path(out).stat().st_size,
            "seconds": time.perf_counter() - t0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, choices=TARGETS, help="which protocol to pack")
    p.add_argument("--data", required=True, help="folder holding lfw_112/ or cfp_112/ (or that folder itself)")
    p.add_argument("--out", required=True, help="output .bin path (written atomically)")
    p.add_argument("--no-check", action="store_true", help="skip decoding every image once (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    s = build_bin(args.target, args.data, args.out, check=not args.no_check, progress=not args.quiet)
    print(f"wrote {s['out']}: {s['pairs']} pairs ({s['positives']} same), {s['distinct_images']} distinct images, "
          f"{s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="make_bin", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"make_bin: error: {e}")
        return 1
