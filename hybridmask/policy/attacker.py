"""An online attacker proxy for the policy's reward (the attacker in the loop, issue 14 item 3).

:class:`DecoderAttacker` is a small convolutional decoder from a release (``C`` channels on a ``g x g``
grid, what the client sends) to a low-resolution grey face (``size x size``, default 28). It trains
alongside the recognizer, on the releases the trainer produces in its policy steps, with an L1 loss
against the release's *dominant* clean face (:func:`dominant_faces`); its per-sample reconstruction
error is the privacy signal of :class:`~hybridmask.policy.LagrangianReward` (``attack_error``): a low
error means the attacker recovers the face, i.e. little privacy.

What it assumes (a white-box, training-time attacker): it sees every release and trains on the clean
faces the trainer owns (the victims' own faces, not public faces of other people), knows which face
dominates each mix, and runs a few Adam steps per policy step. It is a cheap *proxy* of the harness's
learned-decoder attacks (``hybridmask.attacks.cgan``): it does not undo a secret channel shuffle the way
the structure-aware attack does, has no GAN loss and works at 28x28. Whether the resulting policy is
private against the harness's attacks is measured by the harness and the frontier sweep, not by this
proxy.

Scoring a mix: a ``k``-face release is scored against its dominant face (the source with the largest
label weight), as the harness scores reconstructions of mixes (``attacks.harness.mixed_scores``:
``ssim_dominant``, ``rank1_dominant``). For a mix with partners from a public pool the private face is
the anchor (column 0): the pool's faces are public and their recovery is no leak.

Each call of :meth:`DecoderAttacker.step` first scores the releases (before the decoder has seen them:
an out-of-sample error, so the privacy term does not reward releases the decoder merely memorised),
then trains ``steps`` Adam steps on them. Everything is deterministic given ``seed`` (the construction
does not touch the global RNG); :meth:`DecoderAttacker.state_dict` holds the weights, the optimizer, the
input standardisation and the counters (exact resume). Under DDP its gradients are averaged over the
ranks and its input statistics come from all ranks, so it stays identical on every rank.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import HybridMaskInputError

#: attacker kinds a config's ``reward.attacker.name`` may name
ATTACKERS = ("none", "decoder")

_LUMA = (0.299, 0.587, 0.114)


def _dist_world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_mean_(t: torch.Tensor) -> None:
    """In-place mean over the ranks (no-op in one process)."""
    world = _dist_world()
    if world <= 1:
        return
    import torch.distributed as dist
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf)
        t.copy_(buf.to(t.device))
    else:
        dist.all_reduce(t)
    t.div_(world)


def dominant_index(record, batch: int) -> torch.Tensor:
    """(B,) batch index of each release's dominant face: the anchor without a mix (``record=None``), the
    source with the largest label weight for a mix of batch faces, the anchor for a mix with pool partners."""
    if record is None:
        return torch.arange(batch)
    idx = record.indices.cpu()
    if idx.shape[0] != batch:
        raise HybridMaskInputError(f"the mix record is for {idx.shape[0]} releases, got {batch}")
    if getattr(record, "source", "batch") != "batch":
        return idx[:, 0].clone()
    w = record.label_weights.cpu()
    return idx.gather(1, w.argmax(dim=1, keepdim=True)).squeeze(1)


def dominant_faces(images: torch.Tensor, record) -> torch.Tensor:
    """The clean face each release is scored against (:func:`dominant_index`), ``(B, 3, H, W)``."""
    return images[dominant_index(record, images.shape[0]).to(images.device)]


def grey_target(faces: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) faces in [-1, 1] -> (B, 1, size, size) grey (BT.601 luma), area-downsampled."""
    if faces.dim() != 4 or faces.shape[1] not in (1, 3):
        raise HybridMaskInputError(f"faces must have shape (B, 3, H, W) or (B, 1, H, W), got {tuple(faces.shape)}")
    if faces.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=faces.dtype, device=faces.device).view(1, 3, 1, 1)
        faces = (faces * w).sum(1, keepdim=True)
    if faces.shape[-2:] != (size, size):
        faces = F.adaptive_avg_pool2d(faces, (size, size))
    return faces


class _Decoder(nn.Module):
    """1x1 channel mixing -> resample to size/2 -> two 3x3 convs -> 4 sub-pixels per cell -> tanh."""

    def __init__(self, in_channels: int, width: int, size: int):
        super().__init__()
        self.size = size
        self.inp = nn.Conv2d(in_channels, width, 1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        half = self.size // 2
        if h.shape[-1] > half or h.shape[-2] > half:
            h = F.adaptive_avg_pool2d(h, (half, half))
        elif h.shape[-2:] != (half, half):
            h = F.interpolate(h, size=(half, half), mode="bilinear", align_corners=False)
        return torch.tanh(F.pixel_shuffle(self.out(self.body(h)), 2))


def _int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise HybridMaskInputError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


class DecoderAttacker:
    """Online decoder attacker (see the module doc).

    Args:
        in_channels: channels of a release (``defense.in_channels``).
        width: decoder width.
        size: side of the grey target face (even, >= 4); 28 by default.
        lr: Adam learning rate.
        steps: Adam steps on each batch of releases (:meth:`step`).
        seed: weight initialisation (the global RNG is left untouched).
    """

    name = "decoder"

    def __init__(self, in_channels: int, width: int = 32, size: int = 28, lr: float = 1e-3, steps: int = 1,
                 seed: int = 0):
        self.in_channels = _int(in_channels, "in_channels", 1)
        self.width = _int(width, "width", 1)
        self.size = _int(size, "size", 4)
        if self.size % 2:
            raise HybridMaskInputError(f"size must be even, got {self.size}")
        self.steps = _int(steps, "steps", 1)
        self.seed = _int(seed, "seed", 0)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise HybridMaskInputError(f"lr must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = _Decoder(self.in_channels, self.width, self.size)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.in_mean = torch.zeros(self.in_channels)
        self.in_std = torch.ones(self.in_channels)
        self.calibrated = False
        self.updates = 0          # Adam steps taken
        self.seen = 0             # releases trained on (this rank)
        self.last: Dict[str, float] = {"error": float("nan"), "train_loss": float("nan")}

    # --- plumbing -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "DecoderAttacker":
        self.net.to(device)
        self.in_mean, self.in_std = self.in_mean.to(device), self.in_std.to(device)
        return self

    def parameters(self):
        return self.net.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "in_channels": self.in_channels, "width": self.width, "size": self.size,
                "lr": self.lr, "steps": self.steps, "seed": self.seed}

    def _check(self, releases: torch.Tensor, faces: Optional[torch.Tensor]) -> None:
        if not isinstance(releases, torch.Tensor) or not torch.is_floating_point(releases) or releases.dim() != 4:
            raise HybridMaskInputError("releases must be a floating-point tensor (B, C, g, g)")
        if releases.shape[1] != self.in_channels:
            raise HybridMaskInputError(f"the attacker reads {self.in_channels} channels, the releases have "
                                       f"{releases.shape[1]}")
        if faces is not None and faces.shape[0] != releases.shape[0]:
            raise HybridMaskInputError(f"{faces.shape[0]} faces for {releases.shape[0]} releases")

    def _calibrate(self, releases: torch.Tensor) -> None:
        """Per-channel standardisation from the first batch (averaged over the ranks), then fixed."""
        x = releases.detach().to(self.device).float()
        mean = x.mean(dim=(0, 2, 3))
        sq = (x * x).mean(dim=(0, 2, 3))
        _all_reduce_mean_(mean)
        _all_reduce_mean_(sq)
        self.in_mean = mean
        self.in_std = (sq - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        self.calibrated = True

    def _forward(self, releases: torch.Tensor) -> torch.Tensor:
        x = releases.to(self.device).float()
        x = (x - self.in_mean.view(1, -1, 1, 1)) / self.in_std.view(1, -1, 1, 1)
        return self.net(x)

    # --- the attack -----------------------------------------------------------------------------
    def reconstruct(self, releases: torch.Tensor) -> torch.Tensor:
        """(B, 1, size, size) grey reconstructions in [-1, 1] (no gradient)."""
        self._check(releases, None)
        with torch.no_grad():
            return self._forward(releases)

    def error(self, releases: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """(B,) mean absolute error between each reconstruction and its grey ``size x size`` face
        (``faces``: the faces the releases are scored against, e.g. :func:`dominant_faces`)."""
        self._check(releases, faces)
        if not self.calibrated:
            self._calibrate(releases)
        with torch.no_grad():
            target = grey_target(faces.to(self.device).float(), self.size)
            return (self._forward(releases) - target).abs().mean(dim=(1, 2, 3))

    def fit(self, releases: torch.Tensor, faces: torch.Tensor, steps: Optional[int] = None) -> float:
        """``steps`` (default ``self.steps``) Adam steps of the L1 loss on this batch (gradients averaged
        over the ranks under DDP); returns the last loss before its step."""
        self._check(releases, faces)
        if not self.calibrated:
            self._calibrate(releases)
        target = grey_target(faces.detach().to(self.device).float(), self.size)
        x = releases.detach()
        loss_v = float("nan")
        self.net.train()
        for _ in range(self.steps if steps is None else _int(steps, "steps", 0)):
            loss = (self._forward(x) - target).abs().mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.net.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _all_reduce_mean_(p.grad)
            self.optimizer.step()
            self.updates += 1
            loss_v = float(loss.detach())
        self.seen += int(x.shape[0])
        return loss_v

    def step(self, releases: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """Score the releases (out of sample), then train on them: returns the (B,) errors before training."""
        err = self.error(releases, faces)
        loss = self.fit(releases, faces)
        self.last = {"error": float(err.mean()), "train_loss": loss}
        return err

    # --- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"config": self.config(), "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "in_mean": self.in_mean.detach().cpu().clone(), "in_std": self.in_std.detach().cpu().clone(),
                "calibrated": self.calibrated, "updates": self.updates, "seen": self.seen, "last": dict(self.last)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        try:
            cfg = state["config"]
            mine = self.config()
            diff = [f"{k}: {cfg.get(k)!r} (checkpoint) vs {mine[k]!r}" for k in ("name", "in_channels", "width", "size")
                    if cfg.get(k) != mine[k]]
            if diff:
                raise HybridMaskInputError(f"the checkpoint's attacker differs from this one ({'; '.join(diff)})")
            self.net.load_state_dict(state["net"])
            self.optimizer.load_state_dict(state["optimizer"])
            dev = self.device
            self.in_mean, self.in_std = state["in_mean"].to(dev).float(), state["in_std"].to(dev).float()
            self.calibrated = bool(state["calibrated"])
            self.updates, self.seen = int(state["updates"]), int(state["seen"])
            self.last = {k: float(v) for k, v in state["last"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise HybridMaskInputError(f"not a DecoderAttacker state dict: missing or bad entry {e}") from e


def create_attacker(name: str, in_channels: int, **kwargs) -> Optional[DecoderAttacker]:
    """``"none"`` -> None, ``"decoder"`` -> :class:`DecoderAttacker` (``kwargs``: width, size, lr, steps, seed)."""
    key = str(name or "none").lower()
    if key in ("none", "null"):
        return None
    if key == "decoder":
        return DecoderAttacker(in_channels, **kwargs)
    raise HybridMaskInputError(f"unknown attacker {name!r}; use one of {', '.join(ATTACKERS)}")
