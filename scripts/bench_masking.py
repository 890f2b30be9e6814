#!/usr/bin/env python
"""Throughput of the full masking transform (BDCT + PPFR-FD + k=4 frequency MixUp) on 112x112
faces, batch 128, 2 threads, for u=1 and u=8, against a reference built on torch-dct applied
block by block, both measured in this run. Ends with ``speedup: N.Nx`` (u=1, median of repeated
rounds; each round times both pipelines back to back, so background load hits both alike).

The reference is the textbook step-by-step pipeline, self-contained here: colour transform,
(upsampling), torch-dct's ``dct_2d`` on every 8x8 block in turn, channel selection, per-sample
shuffle with ``gather``, neighbour mix with ``roll``, and MixUp as a loop over partners. It makes
the same secret draws from an identically seeded generator, and the two outputs are checked to
agree before anything is timed. hybridmask instead regroups the blocks in one copy, applies the
colour matrix and the 64x64 DCT basis as two GEMMs, gathers the shuffled and neighbour-mixed kept
channels straight from the coefficients, and mixes the batch with one sparse (CSR) product.

    python scripts/bench_masking.py [--data DIR] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_dct

from hybridmask.freq import HybridMask, rgb_to_ycbcr


def load_faces(data: Path, n: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    files = sorted((data / "lfw_112").glob("*/*.jpg"))[:n]
    if len(files) < n:
        print(f"(no real faces under {data}; using random images)")
        return torch.rand(n, 3, 112, 112) * 2 - 1
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def reference_pipeline(x: torch.Tensor, u: int, k: int, seed: int) -> torch.Tensor:
    """Textbook BDCT + PPFR-FD + MixUp with torch-dct per block, drawing the same secrets as HybridMask(seed)."""
    from hybridmask.freq import split_channels
    from hybridmask.freq.mixup import draw_partners, sample_weights
    from hybridmask.utils import make_generator
    g = make_generator(seed)
    freq = reference_bdct(x, u)
    _, kept = split_channels("dc")
    sel = freq[:, kept]
    b, c, h, w = sel.shape
    perm = torch.rand(b, c, generator=g).argsort(dim=1)                   # PPFR-FD secret permutation
    sel = torch.gather(sel, 1, perm.view(b, c, 1, 1).expand(b, c, h, w))
    sel = (sel + torch.roll(sel, shifts=-1, dims=1)) / 2 ** 0.5           # neighbour mix
    kt = torch.full((b,), k, dtype=torch.long)
    idx = draw_partners(kt, k, b, 0, g)
    wts = sample_weights(kt, k, 1, "instahide", g, 0.65)[:, :, 0].to(x.dtype)
    out = sel * wts[:, 0].view(b, 1, 1, 1)
    for j in range(1, k):
        out = out + wts[:, j].view(b, 1, 1, 1) * sel.index_select(0, idx[:, j])
    return out


def reference_bdct(x: torch.Tensor, u: int) -> torch.Tensor:
    """torch-dct's 2-D DCT applied to each 8x8 block in turn, regrouped by frequency."""
    y = rgb_to_ycbcr(x)
    if u > 1:
        y = F.interpolate(y, scale_factor=u, mode="bilinear", align_corners=False)
    b, c, h, w = y.shape
    out = y.new_empty(b, c, 64, h // 8, w // 8)
    for i in range(h // 8):
        for j in range(w // 8):
            out[:, :, :, i, j] = torch_dct.dct_2d(y[:, :, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8], norm="ortho").reshape(b, c, 64)
    return out.reshape(b, c * 64, h // 8, w // 8)


def time_interleaved(ours, ref, repeats: int, inner: int = 5):
    """Per-call seconds of both pipelines, measured in alternating rounds (``inner`` calls of ours,
    one of the reference per round) so that both see the same background load; medians are taken
    over the rounds."""
    ours(), ref()  # warm-up
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            ours()
        t_ours.append((time.perf_counter() - t0) / inner)
        t0 = time.perf_counter()
        ref()
        t_ref.append(time.perf_counter() - t0)
    return t_ours, t_ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", str(Path(__file__).resolve().parents[2] / "shared/data/faces")))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-u8", type=int, default=32,
                   help="batch for u=8 (each 112x112 grid tensor is ~1.2 GB at batch 128; 32 keeps the run in memory)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = load_faces(Path(args.data), args.batch)
    print(f"batch {args.batch} x 3 x 112 x 112, {args.threads} threads, k={args.k}, torch {torch.__version__}")
    speedups = {}
    for u in (1, 8):
        xb = x if u == 1 else x[: args.batch_u8]
        n = xb.shape[0]
        hm = HybridMask(u=u, k=args.k, seed=0)
        ours = lambda: hm(xb)  # noqa: E731
        ref = lambda: reference_pipeline(xb, u, args.k, seed=0)  # noqa: E731

        with torch.no_grad():
            # same seed, same draws: the two pipelines must agree before they are timed
            a, _ = hm(xb)
            r = ref()
            err = (a - r).abs().max().item()
            if err > 1e-3:
                raise SystemExit(f"u={u}: reference and hybridmask disagree (max |diff| {err:.2e}); not timing")
            t_ours, t_ref = time_interleaved(ours, ref, args.repeats if u == 1 else 2, inner=5 if u == 1 else 1)
        m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
        speedups[u] = m_ref / m_ours
        print(f"u={u} (batch {n}): hybridmask {n / m_ours:9.1f} img/s | torch-dct block-by-block {n / m_ref:9.1f} img/s"
              f" | ratio {speedups[u]:.1f}x | max |diff| {err:.2e}")
    print(f"u=8 speedup: {speedups[8]:.1f}x")
    print(f"speedup: {speedups[1]:.1f}x")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
