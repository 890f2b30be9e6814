"""Verification during and after training: LFW / CFP-FP / CFP-FF / synthetic pairs, every query
masked with k=1 (``defense.query``), embeddings of image + flip, 10-fold accuracy; and the identification
accuracy behind the utility U (:class:`hybridmask.train.callbacks.Utility`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..data.pairs import VerificationSet


def build_sets(eval_cfg: Dict, synthetic_cfg: Optional[Dict] = None) -> Dict[str, VerificationSet]:
    """The verification sets of a config's ``eval`` section: ``targets`` resolved under
    ``data_root`` by :func:`hybridmask.eval.load_verification_set` (LFW / CFP folders with their
    protocols or ``.bin`` files); ``synthetic`` is a synthetic pair set of ``synthetic_pairs``
    pairs whose identities are disjoint from the synthetic training faces."""
    from ..eval import load_verification_set
    targets = eval_cfg.get("targets") or []
    if isinstance(targets, str):
        targets = [targets]
    root = eval_cfg.get("data_root")
    root = Path(os.path.expanduser(str(root))) if root else None
    sets: Dict[str, VerificationSet] = {}
    for t in targets:
        name = str(t).lower()
        if name == "synthetic":
            from ..data.synthetic import synthetic_pairs
            syn = synthetic_cfg or {}
            sets[name] = synthetic_pairs(int(eval_cfg.get("synthetic_pairs") or 400),
                                         num_identities=int(eval_cfg.get("synthetic_identities") or 50),
                                         images_per_identity=int(eval_cfg.get("synthetic_images_per_identity") or 4),
                                         size=int(syn.get("size", 112)), seed=int(syn.get("seed", 0)))
        else:
            if root is None and not str(t).endswith(".bin"):
                raise ValueError(f"eval target {t!r} needs eval.data_root (the folder holding lfw_112/, cfp_112/ "
                                 f"or <target>.bin); use eval.targets=[synthetic] without real data")
            sets[name] = load_verification_set(t, root)
    return sets


def verify(model: torch.nn.Module, query: Callable[[torch.Tensor], torch.Tensor], vs: VerificationSet,
           pairs: Optional[int] = None, batch_size: int = 128, progress: bool = True) -> Dict:
    """Verification metrics (:func:`hybridmask.eval.evaluate`) of ``model`` on ``vs`` with the
    query masking ``query`` (k=1), on ``pairs`` evenly spaced pairs (None: all)."""
    from ..eval import evaluate
    return evaluate(model, vs, batch_size=min(int(batch_size), 128), transform=query,
                    max_pairs=pairs or None, progress=progress)


def make_eval_fn(sets: Dict[str, VerificationSet], pairs: Optional[int], batch_size: int = 128,
                 progress: bool = False) -> Callable:
    """``eval_fn(model, defense) -> {"<set>_acc": accuracy}`` on ``pairs`` pairs of each set (for the trainer)."""

    def eval_fn(model, defense) -> Dict[str, float]:
        res = {}
        for name, vs in sets.items():
            m = verify(model, defense.query, vs, pairs=pairs, batch_size=batch_size, progress=progress)
            res[f"{name}_acc"] = m["accuracy"]
        return res
    return eval_fn


@torch.no_grad()
def identification_accuracy(model: torch.nn.Module, head: torch.nn.Module, query: Callable[[torch.Tensor], torch.Tensor],
                            images: torch.Tensor, labels: torch.Tensor, device=None, batch_size: int = 128,
                            centres: Optional[torch.Tensor] = None, projection: Optional[torch.nn.Module] = None
                            ) -> float:
    """Top-1 identification accuracy: ``query`` (the k=1 release) -> embedding -> nearest class centre
    of the margin ``head`` (``head.cosine``), or of ``centres`` ((classes, D), e.g. a teacher's class
    centres, the embedding mapped by ``projection`` first when given); the modules' train/eval modes are
    restored."""
    was = model.training, head.training
    model.eval()
    head.eval()
    correct = 0
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device).float()
            emb = model(query(x))
            if centres is None:
                pred = head.cosine(emb).argmax(1).cpu()
            else:
                emb = projection(emb) if projection is not None else emb
                pred = (F.normalize(emb.float(), dim=1) @ centres.to(emb.device).float().t()).argmax(1).cpu()
            correct += int((pred == labels[i:i + batch_size].cpu()).sum())
    finally:
        model.train(was[0])
        head.train(was[1])
    return correct / max(1, images.shape[0])


def brief(metrics: Dict) -> Dict:
    """The headline numbers of a metrics dict (no ROC arrays), for results JSON."""
    keep = ("name", "pairs", "folds", "accuracy", "accuracy_std", "best_accuracy", "auc", "threshold")
    out = {k: metrics.get(k) for k in keep if k in metrics}
    out["name"] = metrics.get("target", metrics.get("name"))
    for k in ("images", "seconds", "images_per_second"):
        if k in metrics:
            out[k] = metrics[k]
    out["tar_at_far"] = {k: v["tar"] for k, v in (metrics.get("tar_at_far") or {}).items()}
    return out


__all__: List[str] = ["build_sets", "verify", "make_eval_fn", "identification_accuracy", "brief"]
