#!/usr/bin/env python
"""Training throughput of a recognizer backbone: frequency grids vs 112x112 pixels.

Measures images/s of forward + backward (embedding -> ArcFace loss) at a fixed batch size on
the CPU (or --device), median of a few timed repeats after a warm-up, for the pixel stem
(B, 3, 112, 112) and the frequency stem (B, C, g, g) for each grid g, all in the same run (the
repeats go round-robin over the cases, so background load affects them alike), and prints the
speed-up of each grid over pixels.

On a CPU shared with other busy processes, OpenMP's default spin-waiting makes 2-thread runs many
times slower; ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) avoids most of that.

    python scripts/bench_backbones.py --model iresnet18            # grids 14 and 28, 189 channels
    python scripts/bench_backbones.py --model mobilefacenet --grids 14 28 56
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hybridmask.models import create_head, create_model, list_models, model_macs


def step(model, head, x, y) -> float:
    """Seconds of one forward + backward (embedding -> ArcFace loss)."""
    for p in list(model.parameters()) + list(head.parameters()):
        p.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    F.cross_entropy(head(model(x), y), y).backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def load_text() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


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
    print(f"# load average before: {load_text()}")
    print(f"# {args.model}, batch {args.batch}, forward+backward, {args.threads} threads, device {dev}, "
          f"median of {args.repeats} (+{args.warmup} warm-up), torch {torch.__version__}, {platform.processor() or platform.machine()}")

    t_start = time.perf_counter()
    cases = [("pixel112", dict(stem="pixel"))]
    cases += [(f"grid{g}", dict(stem="freq", in_chans=args.channels, grid=g, downsample=args.downsample))
              for g in args.grids]
    built = []
    for label, kw in cases:
        c, s = (3, 112) if kw["stem"] == "pixel" else (args.channels, kw["grid"])
        model = create_model(args.model, **kw).to(dev).train()
        x = torch.randn(args.batch, c, s, s, device=dev)
        for _ in range(args.warmup):
            step(model, head, x, y)
        built.append((label, model, x))
    # round-robin repeats: load from other processes hits every case alike
    times = {label: [] for label, _, _ in built}
    for _ in range(args.repeats):
        for label, model, x in built:
            times[label].append(step(model, head, x, y))
    results, macs = {}, {}
    for label, _, x in built:
        results[label] = args.batch / statistics.median(times[label])
        macs[label] = model_macs(args.model, **dict(cases)[label])
        print(f"{label:>9}: {results[label]:8.1f} images/s  {macs[label] / 1e9:6.3f} GMAC/image forward  "
              f"(input {tuple(x.shape[1:])}, "
              f"step times {', '.join(f'{t:.2f}' for t in times[label])} s)", flush=True)
    for g in args.grids:
        print(f"grid{g} vs pixel112: {results[f'grid{g}'] / results['pixel112']:.1f}x "
              f"(multiply-adds: {macs['pixel112'] / macs[f'grid{g}']:.1f}x fewer)")
    print(f"# wall time {time.perf_counter() - t_start:.0f} s, load average {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
