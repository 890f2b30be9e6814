"""Evaluation of a trained ARL model (the last step of :func:`hybridmask.train.arl.train_arl`).

On the test victims: the utility (attribute MCC or identity accuracy), the LDA score of z over
identities, a *fresh* attacker decoder (+ PatchGAN, the same ``L_a``) trained on public faces against
the frozen encoder, ARL's own decoder, the resolution ceiling (original -> ``input_size`` -> 112),
the feature-level attack ``M`` and an optional t-SNE plot. Image and face scores are the library's
one SSIM, PSNR and face similarity (:mod:`hybridmask.attacks.metrics`: Gaussian-window SSIM,
sigma 1.5, 11x11); MCC, LDA, feature similarity and t-SNE come from :mod:`hybridmask.eval.representation`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks.metrics import embed, identity_similarity, psnr, ssim, summarize
from ..data.celeba import Split, to_float
from ..eval.representation import feature_similarity, lda_score, mcc_per_attribute, mean_mcc, plot_tsne
from ..models.arl_nets import OUT_SIZE, ARLDecoder, ARLNet, FeatureAttacker
from ..models.blocks import resize
from ..models.perceptual import PerceptualNet
from ..utils import HybridMaskInputError, run_in_batches
from .arl import ReconstructionGame, endless_batches

log = logging.getLogger("hybridmask.arl")


def encode_all(encoder: nn.Module, images_u8: torch.Tensor, device, bs: int) -> torch.Tensor:
    """z of uint8 faces (on the CPU), in batches of ``bs`` on ``device``."""
    encoder.eval()
    return run_in_batches(lambda x: encoder(to_float(x)), images_u8, bs, device=device)


def decode_all(decoder: ARLDecoder, z: torch.Tensor, device, bs: int) -> torch.Tensor:
    decoder.eval()
    return run_in_batches(lambda zb: decoder(zb).clamp(-1, 1), z, bs, device=device)


def image_scores(recon: torch.Tensor, original: torch.Tensor, embedder: Optional[Callable] = None,
                 original_emb: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Mean SSIM, PSNR (over finite values) and - with an ``embedder`` - face similarity."""
    out = {"ssim": float(ssim(recon, original).mean()), "psnr": summarize(psnr(recon, original))["mean"]}
    if embedder is not None:
        ref = original_emb if original_emb is not None else original
        out["face_sim"] = float(identity_similarity(recon, ref, embedder=embedder).mean())
    return out


def evaluate_utility(net: ARLNet, test: Split, device, bs: int, attribute_names=None) -> Dict[str, Any]:
    z = encode_all(net.encoder, test.images, device, bs)
    net.utility.eval()
    scores = run_in_batches(net.utility.predict, z, bs, device=device)
    if net.config["task"] == "attributes":
        pred = (scores > 0).long().numpy()
        tgt = test.labels.numpy()
        per = mcc_per_attribute(pred, tgt)
        out = {"mcc": mean_mcc(pred, tgt), "mcc_skip_constant": mean_mcc(pred, tgt, constant="skip"),
               "attribute_accuracy": float((pred == tgt).mean()),
               "majority_accuracy": float(np.maximum(tgt.mean(0), 1 - tgt.mean(0)).mean())}
        if attribute_names:
            out["mcc_per_attribute"] = {n: (None if np.isnan(v) else round(float(v), 4))
                                        for n, v in zip(attribute_names, per)}
        return out
    acc = float((scores.argmax(1) == test.labels).float().mean())
    return {"identity_accuracy": acc, "chance": 1.0 / net.config["num_outputs"]}


def train_fresh_attacker(net: ARLNet, perceptual: Optional[PerceptualNet], public: Split, device,
                         steps: int, batch_size: int, mu1: float, mu2: float, lr: float, seed: int,
                         progress: bool = True) -> ARLDecoder:
    """A new decoder (+ D) trained with ``L_a`` on public faces against the frozen encoder."""
    from tqdm import tqdm

    dec, disc = net.new_attacker(seed)
    game = ReconstructionGame(net.encoder, dec, disc, perceptual if mu2 > 0 else None, mu1, mu2, lr, lr)
    batches = endless_batches(len(public), batch_size, seed)
    for _ in tqdm(range(int(steps)), desc="attacker decoder", leave=False, disable=not progress):
        game.step(to_float(public.images[next(batches)], device))
    return dec.eval()


def evaluate_privacy(net: ARLNet, decoder: ARLDecoder, test: Split, device, bs: int,
                     embedder: Optional[Callable] = None, original_emb: Optional[torch.Tensor] = None
                     ) -> Tuple[Dict[str, float], torch.Tensor]:
    """:func:`image_scores` of ``decoder``'s reconstructions of the test faces, and the
    reconstructions (N, 3, 112, 112)."""
    rec = decode_all(decoder, encode_all(net.encoder, test.images, device, bs), device, bs)
    return image_scores(rec, to_float(test.images), embedder, original_emb), rec


def train_feature_attacker(z: torch.Tensor, target: torch.Tensor, steps: int = 300, batch_size: int = 32,
                           lr: float = 1e-3, width: int = 64, seed: int = 0, progress: bool = False) -> FeatureAttacker:
    """Fit ``M`` (MSE) on public pairs ``(z, g(x))`` already computed; returns it in eval mode."""
    if len(z) != len(target) or len(z) < 2:
        raise HybridMaskInputError(f"need >= 2 matching (z, target) pairs, got {len(z)} and {len(target)}")
    torch.manual_seed(seed)
    m = FeatureAttacker(tuple(z.shape[1:]), tuple(target.shape[1:]), width=width)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    it = range(int(steps))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="feature attacker", leave=False)
    m.train()
    for _ in it:
        idx = torch.randint(0, len(z), (min(batch_size, len(z)),), generator=g)
        loss = F.mse_loss(m(z[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.eval()


def feature_attack(net: ARLNet, g: PerceptualNet, pub: Split, test: Split, z_test: torch.Tensor, device, bs: int,
                   steps: int, seed: int) -> Dict[str, Any]:
    """``M`` trained on public (z, deepest tap of g) pairs, scored on the victims. ReLU features share a
    large common mean, so ``feature_sim`` is the cosine after subtracting the mean public target (a
    know-nothing attacker then scores ~0), next to the raw cosine and that attacker's raw score."""
    size = net.config["input_size"]

    def targets(split):
        return run_in_batches(lambda x: g(resize(to_float(x), size))[-1], split.images, bs, device=device)

    z_pub = encode_all(net.encoder, pub.images, device, bs)
    t_pub, t_test = targets(pub), targets(test)
    m = train_feature_attacker(z_pub, t_pub, steps=steps, seed=seed)
    pred = run_in_batches(m, z_test, bs)
    mean = t_pub.mean(0, keepdim=True)
    return {"feature_sim": feature_similarity(pred - mean, t_test - mean),
            "feature_sim_raw": feature_similarity(pred, t_test),
            "raw_baseline_mean_target": feature_similarity(mean.expand_as(t_test), t_test),
            "target": f"deepest tap of g {tuple(t_test.shape[1:])}; feature_sim is centred by the public mean"}


def evaluate(net: ARLNet, g: Optional[PerceptualNet], pub: Split, test: Split, info: Dict[str, Any],
             cfg: Dict[str, Any], device, out_dir: Path) -> Dict[str, Any]:
    """Every score of a trained ARL model (``cfg``: the merged ARL config) -> a results dict; writes
    ``examples.png`` and ``tsne.png`` into ``out_dir`` when asked to."""
    from ..attacks.harness import default_embedder, save_grid

    at, ev = cfg["attack"], cfg["eval"]
    ebs = int(ev["batch_size"])
    out: Dict[str, Any] = {"utility": evaluate_utility(net, test, device, ebs, info.get("attribute_names"))}
    z_test = encode_all(net.encoder, test.images, device, ebs)
    try:
        out["lda"] = lda_score(z_test, test.identities.numpy())
    except HybridMaskInputError as e:
        out["lda"] = None
        log.warning("LDA score skipped: %s", e)
    out["z_shape"] = list(net.z_shape)

    orig = to_float(test.images)
    sface = default_embedder() if ev["sface"] else None
    orig_emb = embed(sface, orig) if sface is not None else None
    attacker = train_fresh_attacker(net, g, pub, device, int(at["steps"]), int(at["batch_size"]), float(at["mu1"]),
                                    float(at["mu2"]), float(at["lr"]), int(at["seed"]), bool(cfg["progress"]))
    out["attack"], rec_att = evaluate_privacy(net, attacker, test, device, ebs, sface, orig_emb)
    extra_sface = sface if ev["sface_all"] else None
    out["own_decoder"], rec_own = evaluate_privacy(net, net.decoder, test, device, ebs, extra_sface, orig_emb)
    ceil = resize(resize(orig, net.config["input_size"]), OUT_SIZE).clamp(-1, 1)
    out["resolution_ceiling"] = image_scores(ceil, orig, extra_sface, orig_emb)

    if int(at["feature_attack_steps"]) > 0 and g is not None:
        out["feature_attack"] = feature_attack(net, g, pub, test, z_test, device, ebs,
                                               int(at["feature_attack_steps"]), int(at["seed"]))
    if ev["save_examples"]:
        save_grid(out_dir / "examples.png", [orig[:8], rec_att[:8], rec_own[:8]],
                  row_names=["original", "attacker", "ARL decoder"])
    if ev["tsne"] and info["task"] == "attributes":
        names = info["attribute_names"]
        cols = [names.index(a) for a in ev["tsne_attributes"]]
        plot_tsne(z_test.flatten(1).numpy(), test.labels[:, cols].numpy(), list(ev["tsne_attributes"]),
                  out_dir / "tsne.png", title=f"{cfg['name']}: t-SNE of z ({net.config['feature_layer']})",
                  seed=int(cfg["seed"]))
        out["tsne_plot"] = str(out_dir / "tsne.png")
    return out


__all__ = ["evaluate", "evaluate_utility", "evaluate_privacy", "image_scores", "train_fresh_attacker",
           "train_feature_attacker", "feature_attack", "encode_all", "decode_all"]
