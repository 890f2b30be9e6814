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

It first measures the BDCT alone for u=2, 4, 8: ``BlockDCT(u)`` (the fixed strided convolution,
evaluated separably, that never builds the upsampled image) against ``BlockDCT(u,
method="reference")`` (bilinear upsampling to 112u x 112u, colour matrix, 8x8 block DCT), on one
thread by default, alternating the two in every round; it prints img/s of each, the median of the
per-round ratios and the agreement of the two outputs (checked < 1e-5 before timing), ending with
``bdct u=8 ratio: N.Nx`` (batch 1). At u=8 each face's output is 9.6 MB of fresh memory, and on
a small VM first-touching those pages costs more than the arithmetic of the convolution: the
ratio at large batches is bounded by page faults that both paths pay. torch's switch for
huge-page allocations, ``THP_MEM_ALLOC_ENABLE=1``, removes most of that cost (the header says
whether it is set).

    python scripts/bench_masking.py [--data DIR] [--repeats 5] [--bdct-only] [--bdct-batches 1,32]
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

from hybridmask.freq import BlockDCT, HybridMask, rgb_to_ycbcr


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


def bench_bdct(x: torch.Tensor, u: int, batch: int, rounds: int, min_seconds: float = 0.2):
    """img/s of the conv and the reference BDCT, and the median per-round ratio; the two are timed
    back to back in every round (which goes first alternates), so background load hits both alike.
    Each timing repeats calls until ``min_seconds`` have passed."""
    fast, ref = BlockDCT(u), BlockDCT(u, method="reference")
    xb = x[:batch]
    with torch.no_grad():
        err = (fast(xb) - ref(xb)).abs().max().item()
        if err > 1e-5:
            raise SystemExit(f"BDCT u={u}: conv and reference disagree (max |diff| {err:.2e}); not timing")

        def per_image(fn):
            n, t0 = 0, time.perf_counter()
            while True:
                fn(xb)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    return dt / n / batch

        t_fast, t_ref = [], []
        for r in range(rounds):
            if r % 2:
                t_ref.append(per_image(ref))
                t_fast.append(per_image(fast))
            else:
                t_fast.append(per_image(fast))
                t_ref.append(per_image(ref))
    ratios = [b / a for a, b in zip(t_fast, t_ref)]
    return 1 / statistics.median(t_fast), 1 / statistics.median(t_ref), ratios, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", str(Path(__file__).resolve().parents[2] / "shared/data/faces")))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-u8", type=int, default=32,
                   help="batch for u=8 (each 112x112 grid tensor is ~1.2 GB at batch 128; 32 keeps the run in memory)")
    p.add_argument("--bdct-batches", default="1,32", help="comma-separated batch sizes for the BDCT-alone timing")
    p.add_argument("--bdct-threads", type=int, default=1)
    p.add_argument("--bdct-rounds", type=int, default=7)
    p.add_argument("--bdct-only", action="store_true", help="time the BDCT alone and stop")
    args = p.parse_args(argv)
    bdct_batches = [int(b) for b in args.bdct_batches.split(",") if b.strip()]
    x = load_faces(Path(args.data), max([args.batch] + bdct_batches))

    torch.set_num_threads(args.bdct_threads)
    print(f"BDCT alone: conv (strided, separable) vs reference (upsample + block DCT), {args.bdct_threads} thread(s), "
          f"{args.bdct_rounds} alternating rounds, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          f"torch {torch.__version__}")
    bdct_ratio = {}
    for u in (8, 4, 2):
        for b in bdct_batches:
            f_ips, r_ips, ratios, err = bench_bdct(x, u, b, args.bdct_rounds)
            bdct_ratio[u, b] = statistics.median(ratios)
            print(f"bdct u={u} batch {b:3d}: conv {f_ips:8.1f} img/s | reference {r_ips:7.1f} img/s | ratio "
                  f"{bdct_ratio[u, b]:5.1f}x (rounds {min(ratios):.1f}-{max(ratios):.1f}) | max |diff| {err:.1e}", flush=True)
    print(f"bdct u=8 ratio: {bdct_ratio[8, bdct_batches[0]]:.1f}x (batch {bdct_batches[0]})")
    if args.bdct_only:
        return 0

    x = x[: args.batch]
    torch.set_num_threads(args.threads)
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
