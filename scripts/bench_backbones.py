#!/usr/bin/env python
"""Training throughput of a recognizer backbone: frequency grids vs 112x112 pixels.

Measures images/s of forward + backward (embedding -> ArcFace loss) at a fixed batch size on
the CPU (or --device), median of a few timed repeats after a warm-up, for the pixel stem
(B, 3, 112, 112) and the frequency stem (B, C, g, g) for each grid g, all in the same run, and
prints the speed-up of each grid over pixels.

    python scripts/bench_backbones.py --model iresnet18            # grids 14 and 28, 189 channels
    python scripts/bench_backbones.py --model mobilefacenet --grids 14 28 56
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hybridmask.models import create_head, create_model, list_models


def bench(model, head, x, y, repeats: int, warmup: int) -> float:
    """Median images/s of forward + backward over ``repeats`` timed steps."""
    model.train()
    params = list(model.parameters()) + list(head.parameters())
    times = []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = None
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(head(model(x), y), y)
        loss.backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="iresnet18", choices=list_models())
    p.add_argument("--grids", type=int, nargs="+", default=[14, 28])
    p.add_argument("--channels", type=int, default=189, help="kept DCT channels (189 = DC dropped)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--downsample", default="late", choices=["late", "early"],
                   help="where the freq stem's down-sampling stages go")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # synthetic inputs only; nothing secret here
    dev = torch.device(args.device)
    n_ids = 1000
    head = create_head("arcface", 512, n_ids).to(dev)
    y = torch.randint(0, n_ids, (args.batch,), device=dev)
    print(f"# {args.model}, batch {args.batch}, forward+backward, {args.threads} threads, device {dev}, "
          f"median of {args.repeats} (+{args.warmup} warm-up), torch {torch.__version__}, {platform.processor() or platform.machine()}")

    t_start = time.perf_counter()
    results = {}
    cases = [("pixel112", dict(stem="pixel"), (3, 112))]
    cases += [(f"grid{g}", dict(stem="freq", in_chans=args.channels, grid=g, downsample=args.downsample),
               (args.channels, g)) for g in args.grids]
    for label, kw, (c, s) in cases:
        model = create_model(args.model, **kw).to(dev)
        x = torch.randn(args.batch, c, s, s, device=dev)
        ips = bench(model, head, x, y, args.repeats, args.warmup)
        results[label] = ips
        print(f"{label:>9}: {ips:8.1f} images/s  (input {tuple(x.shape[1:])})", flush=True)
    for g in args.grids:
        print(f"grid{g} vs pixel112: {results[f'grid{g}'] / results['pixel112']:.1f}x")
    print(f"# wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
