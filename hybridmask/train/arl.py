"""Training of adversarial reconstruction learning (ARL; Xiao et al., AAAI 2020), DESIGN 1.2.

:class:`ARLTrainer` plays the alternating game on one :class:`~hybridmask.models.arl_nets.ARLNet`:

(a) ``Dec`` (+ ``D``) minimise ``L_a = ||Dec(z)-x||^2 + mu1 * L_GAN + mu2 * ||g(Dec(z))-g(x)||^2`` on
    *public* faces, ``Enc`` frozen (eval mode, no gradient);
(b) ``Enc``, ``f`` minimise ``L_u - lambda1 * ||Dec(z)-x||^2 - lambda2 * ||g(Dec(z))-g(x)||^2`` on
    *private* faces, ``Dec`` frozen (eval mode, no parameter update).

``||.||^2`` is the mean squared error over elements (pixels, resp. feature entries averaged over
``g``'s taps), computed at ``input_size``; ``L_GAN`` is the non-saturating BCE generator loss.

:func:`train_arl` runs the whole experiment from a config dict (``configs/arl_base.yaml`` documents
every key; :data:`DEFAULTS` lists them): data splits (:mod:`hybridmask.data.celeba`), warm-up,
alternating training, an atomic ``output_dir/defense.pt`` after every epoch (the ``arl`` defense
with its weights, read by :func:`hybridmask.defenses.io.load_defense`; ``extra["arl"]`` holds the
rest of the model and the training state), then the evaluation of :mod:`hybridmask.train.arl_eval`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.celeba import prepare_data, to_float
from ..defenses.arl import ARLDefense
from ..defenses.io import DEFENSE_FORMAT, run_file, save_defense
from ..models.arl_nets import MODEL_DEFAULTS, ARLDecoder, ARLEncoder, ARLNet
from ..models.blocks import PatchDiscriminator, resize
from ..models.perceptual import PerceptualNet, build_perceptual
from ..utils import deep_merge, resolve_device, safe_torch_load
from .sampler import ResumableBatchSampler

log = logging.getLogger("hybridmask.arl")

DEFAULTS: Dict[str, Any] = {
    "method": "arl",
    "name": "arl",
    "seed": 0,
    "device": "cpu",
    "threads": 2,
    "progress": True,
    "output_dir": "runs/arl",
    "data": {"root": None, "images_dir": "celeba_112", "task": "attributes",
             "attributes_file": "celeba_attributes.txt", "private_fraction": 0.7, "num_public_identities": 50,
             "test_fraction": 0.2, "max_public_images": 1500, "max_test_images": None},
    "model": {k: v for k, v in MODEL_DEFAULTS.items() if k not in ("task", "num_outputs")},
    "perceptual": {"kind": "auto", "vgg_weights": None, "recognizer": None, "seed": 0},
    "loss": {"lambda1": 1.0, "lambda2": 0.0, "mu1": 0.01, "mu2": 1.0},
    "train": {"batch_size": 32, "warmup_epochs": 2, "epochs": 4, "decoder_warmup_steps": 100, "n_dec": 1,
              "n_enc": 1, "optimizer": "adam", "lr_enc": 1e-3, "lr_dec": 2e-4, "lr_disc": 2e-4,
              "weight_decay": 5e-4, "init_checkpoint": None, "resume": False},
    "attack": {"steps": 600, "batch_size": 32, "mu1": 0.01, "mu2": 1.0, "lr": 2e-4, "seed": 1,
               "feature_attack_steps": 300},
    "eval": {"enabled": True, "sface": True, "sface_all": False, "tsne": False,
             "tsne_attributes": ["Male", "Smiling"], "batch_size": 64, "save_examples": True},
}


def merge_config(user: Dict[str, Any]) -> Dict[str, Any]:
    """``user`` deep-merged onto :data:`DEFAULTS`; an unknown key is a ``KeyError`` naming it."""
    if not isinstance(user, dict):
        raise ValueError(f"an ARL config must be a mapping, got {type(user).__name__}")
    return deep_merge(DEFAULTS, user, strict=True, where="arl config")


# ---- the game ------------------------------------------------------------------------------------
def _set_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def make_optimizer(params, kind: str, lr: float, weight_decay: float = 0.0, betas=(0.5, 0.999)):
    params = [p for p in params if p.requires_grad]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")


class ReconstructionGame:
    """Losses and one-step updates of the decoder side (a) for a given encoder + decoder + D.

    Used both for ARL's own decoder and for the fresh attacker after training.
    """

    def __init__(self, encoder: ARLEncoder, decoder: ARLDecoder, disc: PatchDiscriminator,
                 perceptual: Optional[PerceptualNet], mu1: float, mu2: float, lr: float = 2e-4,
                 lr_disc: float = 2e-4, optimizer: str = "adam"):
        self.encoder, self.decoder, self.disc, self.g = encoder, decoder, disc, perceptual
        self.mu1, self.mu2 = float(mu1), float(mu2)
        if self.mu2 > 0 and perceptual is None:
            raise ValueError("mu2 > 0 needs a perceptual network")
        self.opt_dec = make_optimizer(decoder.parameters(), optimizer, lr)
        self.opt_disc = make_optimizer(disc.parameters(), optimizer, lr_disc)

    def step(self, x: torch.Tensor) -> Dict[str, float]:
        """(a): one update of Dec (+ D) on public faces ``x`` (B, 3, 112, 112), Enc frozen."""
        self.encoder.eval()
        self.decoder.train()
        _set_grad(self.decoder, True)
        with torch.no_grad():
            z = self.encoder(x)
        xs = resize(x, self.decoder.input_size)
        rec = self.decoder(z, native=True)
        out: Dict[str, float] = {}
        if self.mu1 > 0:
            self.disc.train()
            _set_grad(self.disc, True)
            loss_d = 0.5 * (_bce(self.disc(xs), True) + _bce(self.disc(rec.detach()), False))
            self.opt_disc.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_disc.step()
            out["loss_disc"] = float(loss_d.detach())
            _set_grad(self.disc, False)
        l_rec = F.mse_loss(rec, xs)
        loss = l_rec
        if self.mu1 > 0:
            l_gan = _bce(self.disc(rec), True)
            loss = loss + self.mu1 * l_gan
            out["loss_gan"] = float(l_gan.detach())
        if self.mu2 > 0:
            l_per = self.g.loss(rec, xs)
            loss = loss + self.mu2 * l_per
            out["loss_perc"] = float(l_per.detach())
        self.opt_dec.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_dec.step()
        out["loss_rec"] = float(l_rec.detach())
        out["loss_a"] = float(loss.detach())
        return out


class ARLTrainer:
    """The alternating game of DESIGN 1.2 on one :class:`ARLNet`.

    ``decoder_step(x_public)`` is (a); ``encoder_step(x_private, y)`` is (b). ``adversarial=False``
    in (b) trains the utility alone (warm-up).
    """

    def __init__(self, net: ARLNet, perceptual: Optional[PerceptualNet], lambda1: float = 1.0, lambda2: float = 0.0,
                 mu1: float = 0.0, mu2: float = 0.0, lr_enc: float = 1e-3, lr_dec: float = 2e-4,
                 lr_disc: float = 2e-4, weight_decay: float = 5e-4, optimizer: str = "adam"):
        for name, v in (("lambda1", lambda1), ("lambda2", lambda2), ("mu1", mu1), ("mu2", mu2)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if (lambda2 > 0 or mu2 > 0) and perceptual is None:
            raise ValueError("lambda2 > 0 or mu2 > 0 needs a perceptual network g")
        self.net, self.g = net, perceptual
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.game = ReconstructionGame(net.encoder, net.decoder, net.discriminator, perceptual, mu1, mu2,
                                       lr_dec, lr_disc, optimizer)
        params = list(net.encoder.parameters()) + list(net.utility.parameters())
        self.opt_enc = make_optimizer(params, optimizer, lr_enc, weight_decay, betas=(0.9, 0.999))

    def decoder_step(self, x_public: torch.Tensor) -> Dict[str, float]:
        return self.game.step(x_public)

    def encoder_objective(self, x: torch.Tensor, y: torch.Tensor, adversarial: bool = True
                          ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``L_u - lambda1 * ||Dec(z)-x||^2 - lambda2 * ||g(Dec(z))-g(x)||^2`` (Dec frozen, eval mode)."""
        net = self.net
        net.encoder.train()
        net.utility.train()
        net.decoder.eval()
        _set_grad(net.decoder, False)
        z = net.encoder(x)
        l_u, _ = net.utility.loss(z, y)
        loss = l_u
        out = {"loss_u": float(l_u.detach())}
        if adversarial and (self.lambda1 > 0 or self.lambda2 > 0):
            xs = resize(x, net.decoder.input_size)
            rec = net.decoder(z, native=True)
            l_rec = F.mse_loss(rec, xs)
            loss = loss - self.lambda1 * l_rec
            out["loss_rec"] = float(l_rec.detach())
            if self.lambda2 > 0:
                l_per = self.g.loss(rec, xs)
                loss = loss - self.lambda2 * l_per
                out["loss_perc"] = float(l_per.detach())
        out["loss_b"] = float(loss.detach())
        return loss, out

    def encoder_step(self, x: torch.Tensor, y: torch.Tensor, adversarial: bool = True) -> Dict[str, float]:
        """(b): one update of Enc and f on private faces ``x`` with labels ``y``."""
        loss, out = self.encoder_objective(x, y, adversarial)
        self.opt_enc.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_enc.step()
        _set_grad(self.net.decoder, True)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"opt_enc": self.opt_enc.state_dict(), "opt_dec": self.game.opt_dec.state_dict(),
                "opt_disc": self.game.opt_disc.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.opt_enc.load_state_dict(state["opt_enc"])
        self.game.opt_dec.load_state_dict(state["opt_dec"])
        self.game.opt_disc.load_state_dict(state["opt_disc"])


# ---- files ---------------------------------------------------------------------------------------
def save_arl_run(path: Union[str, os.PathLike], net: ARLNet, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``net`` as a defense file: the ``arl`` defense (config + encoder/decoder weights) and, in
    ``extra["arl"]``, the model config, the utility and discriminator weights and ``extra``."""
    rest = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()
            if not k.startswith(("encoder.", "decoder."))}
    arl = {"model_config": json.loads(json.dumps(net.config)), "state": rest, **(extra or {})}
    save_defense(path, ARLDefense.from_net(net), extra={"arl": arl})


def load_arl_model(path: Union[str, os.PathLike], map_location="cpu") -> Tuple[ARLNet, Dict[str, Any]]:
    """The whole :class:`ARLNet` (encoder, utility, decoder, discriminator) of a file written by
    :func:`train_arl` (or its run folder), and that file's ``extra["arl"]`` (training state)."""
    path = Path(path)
    path = run_file(path) if path.is_dir() else path
    blob = safe_torch_load(path, map_location=map_location)
    blob = blob if isinstance(blob, dict) and blob.get("format") == DEFENSE_FORMAT else {}
    arl = (blob.get("extra") or {}).get("arl")
    if (blob.get("defense") or {}).get("name") != "arl" or not isinstance(arl, dict) or \
            not isinstance(blob.get("defense_state"), dict):
        raise ValueError(f"{path} is not an ARL training output (a {DEFENSE_FORMAT} file of the arl defense "
                         f"written by train_arl)")
    net = ARLNet(**arl["model_config"])
    state = {f"{part}.{k}": v for part in ("encoder", "decoder") for k, v in blob["defense_state"][part].items()}
    try:
        net.load_state_dict({**state, **arl["state"]}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model config: {str(e).splitlines()[0]}") from e
    return net.to(map_location), arl


def endless_batches(n: int, batch_size: int, seed: int) -> Iterator[List[int]]:
    """Random batches of ``range(n)`` forever, epoch after epoch (:class:`ResumableBatchSampler`)."""
    sampler = ResumableBatchSampler(n, min(int(batch_size), n), seed=seed)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from sampler
        epoch += 1


# ---- the experiment ------------------------------------------------------------------------------
def train_arl(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run one ARL experiment from a config dict (see ``configs/arl_base.yaml``) and return its results.

    Steps: data splits (private / public / test victims) -> warm-up of Enc+f on the utility alone
    (``train.warmup_epochs``) -> decoder warm-up (``train.decoder_warmup_steps`` of (a)) -> alternating
    (a)/(b) for ``train.epochs`` epochs over the private data (``n_dec`` public batches of (a) before
    every ``n_enc`` private batches of (b)) -> ``output_dir/defense.pt`` (atomic, after every epoch;
    ``train.resume`` continues from it; ``train.init_checkpoint`` starts from another run's) ->
    :func:`hybridmask.train.arl_eval.evaluate` (``eval.enabled``). Results go to
    ``output_dir/results.json``. The private batch order of epoch e depends on (seed, e) only, so a
    resumed run sees the batches an uninterrupted one would; public batches are drawn afresh.
    """
    from tqdm import tqdm

    from ..attacks.harness import write_json
    from .arl_eval import evaluate

    t0 = time.time()
    cfg = merge_config(config)
    if cfg["method"] != "arl":
        raise ValueError(f"train_arl needs method: arl, got {cfg['method']!r}")
    torch.set_num_threads(int(cfg["threads"]))
    device = resolve_device(cfg["device"])
    seed = int(cfg["seed"])
    progress = bool(cfg["progress"])
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tr, lo, at = cfg["train"], cfg["loss"], cfg["attack"]

    priv, pub, test, info = prepare_data(cfg["data"], seed, progress)
    log.info("ARL data: %s", {k: v for k, v in info.items() if k != "attribute_names"})
    if len(priv) < 2 or len(pub) < 2 or len(test) < 2:
        raise ValueError(f"too few images: private {len(priv)}, public {len(pub)}, test {len(test)}")

    torch.manual_seed(seed)
    net = ARLNet(**dict(cfg["model"], task=cfg["data"]["task"], num_outputs=info["num_outputs"])).to(device)
    g = None
    if lo["lambda2"] > 0 or lo["mu2"] > 0 or at["mu2"] > 0 or at["feature_attack_steps"] > 0:
        pc = cfg["perceptual"]
        g = build_perceptual(pc["kind"], pc["vgg_weights"], pc["recognizer"], int(pc["seed"])).to(device)
        log.info("perceptual network g: %s", g.description)
    trainer = ARLTrainer(net, g, lo["lambda1"], lo["lambda2"], lo["mu1"], lo["mu2"], tr["lr_enc"], tr["lr_dec"],
                         tr["lr_disc"], tr["weight_decay"], tr["optimizer"])

    ckpt_path = out_dir / "defense.pt"
    start_epoch, history = 0, []
    if tr["resume"] and ckpt_path.is_file():
        loaded, ck = load_arl_model(ckpt_path, map_location=device)
        net.load_state_dict(loaded.state_dict())
        trainer.load_state_dict(ck["optimizers"])
        start_epoch, history = int(ck["epoch"]), list(ck.get("history", []))
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif tr["init_checkpoint"]:
        loaded, _ = load_arl_model(tr["init_checkpoint"], map_location=device)
        if loaded.config != net.config:
            raise ValueError(f"init_checkpoint {tr['init_checkpoint']} has model config {loaded.config}, "
                             f"this run needs {net.config}")
        net.load_state_dict(loaded.state_dict())
        log.info("initialised Enc/f/Dec/D from %s", tr["init_checkpoint"])

    bs = int(tr["batch_size"])
    public = endless_batches(len(pub), bs, seed + 2)
    private = ResumableBatchSampler(len(priv), min(bs, len(priv)), seed=seed + 1)
    total_epochs = int(tr["warmup_epochs"]) + int(tr["epochs"])

    def next_public():
        return to_float(pub.images[next(public)], device)

    def decoder_warmup():
        for _ in tqdm(range(int(tr["decoder_warmup_steps"])), desc="decoder warm-up", leave=False,
                      disable=not progress):
            trainer.decoder_step(next_public())

    def checkpoint(epoch):
        save_arl_run(ckpt_path, net, {"epoch": epoch, "history": history, "optimizers": trainer.state_dict(),
                                      "config": json.loads(json.dumps(cfg, default=str))})

    for epoch in range(start_epoch, total_epochs):
        warm = epoch < int(tr["warmup_epochs"])
        if epoch == int(tr["warmup_epochs"]):
            decoder_warmup()
        sums: Dict[str, float] = {}
        n = 0
        private.set_epoch(epoch)
        for idx in tqdm(private, desc=f"epoch {epoch + 1}/{total_epochs} ({'warm-up' if warm else 'adversarial'})",
                        leave=False, disable=not progress):
            if not warm:
                for _ in range(int(tr["n_dec"])):
                    for k, v in trainer.decoder_step(next_public()).items():
                        sums["a/" + k] = sums.get("a/" + k, 0.0) + v / int(tr["n_dec"])
            x, y = to_float(priv.images[idx], device), priv.labels[idx].to(device)
            for _ in range(int(tr["n_enc"])):
                for k, v in trainer.encoder_step(x, y, adversarial=not warm).items():
                    sums["b/" + k] = sums.get("b/" + k, 0.0) + v / int(tr["n_enc"])
            n += 1
        rec = {"epoch": epoch + 1, "phase": "warmup" if warm else "adversarial",
               **{k: round(v / max(n, 1), 5) for k, v in sums.items()}}
        history.append(rec)
        log.info("ARL %s", rec)
        checkpoint(epoch + 1)
    if int(tr["epochs"]) == 0 and start_epoch < total_epochs and int(tr["decoder_warmup_steps"]) > 0:
        decoder_warmup()  # a warm-up-only run (e.g. a shared start for a sweep) ends with a trained decoder
        checkpoint(total_epochs)

    results: Dict[str, Any] = {"name": cfg["name"], "task": info["task"], "config": cfg, "history": history,
                               "checkpoint": str(ckpt_path), "train_time_s": round(time.time() - t0, 1)}
    if cfg["eval"]["enabled"]:
        t1 = time.time()
        results.update(data={k: v for k, v in info.items() if k != "attribute_names"}, loss=dict(lo),
                       model=dict(net.config), perceptual=g.description if g is not None else None)
        results.update(evaluate(net, g, pub, test, info, cfg, device, out_dir))
        results["eval_time_s"] = round(time.time() - t1, 1)
    else:
        results["evaluated"] = False
    write_json(out_dir / "results.json", results)
    return results


__all__ = ["DEFAULTS", "merge_config", "ReconstructionGame", "ARLTrainer", "make_optimizer", "save_arl_run",
           "load_arl_model", "endless_batches", "train_arl"]
