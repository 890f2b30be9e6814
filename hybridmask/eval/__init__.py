"""Utility evaluation: 1:1 face verification (LFW, CFP-FP, CFP-FF, AgeDB-style .bin files).

``embed`` (flip-summed, batched embeddings), ``verification_metrics`` (10-fold accuracy,
TAR@FAR, ROC/AUC), ``evaluate`` (a model on a target) and the ONNX recognizers ``SFace`` /
``OnnxRecognizer`` (imported lazily: they need onnx + onnxruntime).
"""
from .embed import embed
from .metrics import best_threshold, plot_roc, roc_curve, tar_at_far, verification_metrics
from .verify import evaluate, load_verification_set
from .recognizers import load_recognizer

__all__ = ["embed", "verification_metrics", "best_threshold", "roc_curve", "tar_at_far", "plot_roc",
           "evaluate", "load_verification_set", "load_recognizer", "SFace", "OnnxRecognizer"]


def __getattr__(name):
    if name in ("SFace", "OnnxRecognizer"):
        from . import onnx_models
        return getattr(onnx_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
