"""Adversarial reconstruction learning (ARL; Xiao et al., AAAI 2020) as a defense: the client
releases ``z = Enc(x)``, the front of a ResNet trained against a reconstruction adversary.

The networks are in :mod:`hybridmask.models.arl_nets`; training (:func:`train_arl`, which writes
a run's ``defense.pt``) is in :mod:`hybridmask.train.arl`; its data in :mod:`hybridmask.data.celeba`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..freq import Draw
from ..models.arl_nets import ENCODER_KEYS, OUT_SIZE, encoder_decoder, resolve_layer
from ..utils import HybridMaskInputError
from ..utils.rng import SeedLike
from .base import Defense, register_defense


@register_defense("arl")
class ARLDefense(Defense):
    """An ARL encoder as a defense: ``release``/``query`` give z as (B, C, h, w) (vectors as
    (B, D, 1, 1)); ``in_channels``/``grid`` are C and h.

    ``config`` is the architecture (``arch``, ``width``, ``fc_dim``, ``input_size``,
    ``feature_layer``), ``as_image`` and ``trained``; :meth:`defense_state` holds the encoder and
    decoder weights. ``trained=False`` builds an untrained encoder (tests, smoke runs); a trained
    one (``trained=True``, what :func:`train_arl` saves) cannot be rebuilt without its state.
    ``as_image="decoder"`` shows ``Dec(z)`` through the defense's own decoder (the adversary ARL
    trained against; for an untrained model that is noise); ``"blank"`` returns a grey image
    (zeros), i.e. "z is not a picture". ``seed`` is accepted for interface uniformity and unused
    (the release is deterministic; ARL draws no secrets).
    """
    name = "arl"
    input_kind = "feature"
    stochastic = False
    mixes = False
    trainable = False

    def __init__(self, arch: str = "resnet18", width: int = 16, fc_dim: int = 128, input_size: int = 64,
                 feature_layer: str = "layer2", as_image: str = "decoder", trained: bool = False,
                 seed: SeedLike = None):
        if as_image not in ("decoder", "blank"):
            raise ValueError(f"as_image must be 'decoder' or 'blank', got {as_image!r}")
        layer = resolve_layer(feature_layer)
        super().__init__(arch=arch, width=width, fc_dim=fc_dim, input_size=input_size, feature_layer=layer,
                         as_image=as_image, trained=bool(trained))
        self.encoder, self.decoder = encoder_decoder(arch, width, fc_dim, input_size, layer)
        for p in self.parameters():
            p.requires_grad_(False)
        self.z_shape = self.decoder.z_shape
        self.as_image_mode = as_image
        self.trained = bool(trained)
        self.train(False)

    @classmethod
    def from_net(cls, net, as_image: str = "decoder") -> "ARLDefense":
        """The trained defense of an :class:`~hybridmask.models.arl_nets.ARLNet` (a copy of its
        encoder and decoder; the global random state is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            d = cls(**{k: net.config[k] for k in ENCODER_KEYS}, as_image=as_image, trained=True)
        d.load_defense_state({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict()})
        return d

    def train(self, mode: bool = True):  # a released encoder is a fixed function
        return super().train(False)

    @property
    def in_channels(self) -> int:
        return int(self.z_shape[0])

    def grid_for(self, size: int) -> int:
        return int(self.z_shape[1]) if len(self.z_shape) == 3 else 1

    def apply(self, images: torch.Tensor, draw: Draw):
        z = self.encoder(images)
        return (z.view(len(z), -1, 1, 1) if z.dim() == 2 else z), None

    def as_image(self, released: torch.Tensor) -> torch.Tensor:
        exp = (self.in_channels, self.grid, self.grid)
        if released.dim() != 4 or tuple(released.shape[1:]) != exp:
            raise HybridMaskInputError(f"expected released features of shape (B, {exp[0]}, {exp[1]}, {exp[2]}), "
                                       f"got {tuple(released.shape)}")
        if self.as_image_mode == "blank":
            return released.new_zeros(released.shape[0], 3, OUT_SIZE, OUT_SIZE)
        z = released.flatten(1) if len(self.z_shape) == 1 else released
        with torch.no_grad():
            return self.decoder(z).clamp(-1, 1)

    # ---- persistence -------------------------------------------------------------------------
    def defense_state(self) -> Dict[str, Any]:
        return {part: {k: v.detach().cpu().clone() for k, v in getattr(self, part).state_dict().items()}
                for part in ("encoder", "decoder")}

    def load_defense_state(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        if set(state) != {"encoder", "decoder"}:
            raise ValueError(f"arl state must hold 'encoder' and 'decoder' weights, got {sorted(state)}")
        for part in ("encoder", "decoder"):
            try:
                getattr(self, part).load_state_dict(state[part], strict=True)
            except RuntimeError as e:
                raise ValueError(f"arl {part} weights do not match its config: {str(e).splitlines()[0]}") from None

    def needs_state(self) -> bool:
        return self.trained


def train_arl(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run one ARL experiment: :func:`hybridmask.train.arl.train_arl` (imported when called:
    training sits above the defenses)."""
    from ..train.arl import train_arl as run
    return run(config)


__all__ = ["ARLDefense", "train_arl"]
