#!/usr/bin/env python
"""Figure of docs/masking.md: a real face, its DCT channels, the PPFR-FD zero-filled inverse and a k=4 mix.

    python scripts/make_masking_figure.py [--data DIR] [--out docs/masking.png]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hybridmask.freq import HybridMask, zigzag_order  # noqa: E402
from hybridmask.freq.cli import load_image  # noqa: E402
from hybridmask.utils import atomic_write  # noqa: E402


def to_np(img):
    return ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", str(Path(__file__).resolve().parents[2] / "shared/data/faces")))
    p.add_argument("--out", default="docs/masking.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.data) / "lfw_112"
    if not root.is_dir():
        raise SystemExit(f"real faces not found under {root} (use --data)")
    names = ["Aaron_Peirsol", "Colin_Powell", "Gloria_Macapagal_Arroyo", "Serena_Williams"]
    files = []
    for n in names:
        files += sorted((root / n).glob("*.jpg"))[:1]
    if len(files) < 4:
        files = sorted(root.glob("*/*.jpg"))[:4]
    x = torch.stack([load_image(f) for f in files])
    hm = HybridMask(u=1, drop="dc", k=4, seed=args.seed)
    plain = HybridMask(u=1, drop="dc", shuffle="none", mix="none", seed=args.seed)
    freq = hm.bdct(x)                                    # (4, 192, 14, 14)
    dropped_only = plain.as_image(plain.query(x))        # DC dropped, no shuffle
    masked = hm.query(x)                                 # PPFR-FD: DC dropped + shuffle + mix
    ppfrfd_view = hm.as_image(masked)
    mixed, rec = hm(x)                                   # k=4 frequency MixUp after masking
    mixed_view = hm.as_image(mixed)

    fig = plt.figure(figsize=(13, 6.4))
    gs = fig.add_gridspec(2, 6, width_ratios=[1, 1.6, 1, 1, 1, 1])
    ax = fig.add_subplot(gs[0, 0]); ax.imshow(to_np(x[0])); ax.set_title("aligned face"); ax.axis("off")
    # DCT channels of the luma in zigzag order (the first 16), each a 14x14 map
    zz = zigzag_order()[:16]
    maps = torch.stack([freq[0, i] for i in zz])
    maps = maps / maps.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)   # each tile on its own scale
    maps = torch.nn.functional.pad(maps, (1, 1, 1, 1), value=0.0)
    tiles = maps.reshape(4, 4, 16, 16).permute(0, 2, 1, 3).reshape(64, 64)
    ax = fig.add_subplot(gs[0, 1]); ax.imshow(tiles, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_title("Y DCT channels 0-15 (zigzag; DC top-left)"); ax.axis("off")
    ax = fig.add_subplot(gs[0, 2]); ax.imshow(to_np(dropped_only[0])); ax.set_title("DC dropped\n(zero-filled inverse)"); ax.axis("off")
    ax = fig.add_subplot(gs[0, 3]); ax.imshow(to_np(ppfrfd_view[0])); ax.set_title("PPFR-FD (k=1)\nwhat a query shows"); ax.axis("off")
    ax = fig.add_subplot(gs[0, 4]); ax.imshow(to_np(mixed_view[0])); ax.set_title("k=4 frequency MixUp\n(masked view)"); ax.axis("off")
    e = freq[0].pow(2).sum(dim=(1, 2))
    ax = fig.add_subplot(gs[0, 5]); ax.bar(range(3), [e[c * 64] / e[c * 64:(c + 1) * 64].sum() for c in range(3)])
    ax.set_xticks(range(3), ["Y", "Cb", "Cr"]); ax.set_ylim(0, 1); ax.set_title("energy share of DC")
    for j in range(4):
        ax = fig.add_subplot(gs[1, j if j == 0 else j + 1])
        src = int(rec.indices[0, j]); w = float(rec.weights[0, j])
        ax.imshow(to_np(x[src])); ax.set_title(f"source {j}: weight {w:.2f}"); ax.axis("off")
    ax = fig.add_subplot(gs[1, 5]); ax.hist(masked[0].flatten().numpy(), bins=60); ax.set_title("masked coefficients")
    fig.suptitle("hybridmask on a real LFW face: block DCT (u=1, 14x14 grid), PPFR-FD, frequency MixUp", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    with atomic_write(args.out, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
