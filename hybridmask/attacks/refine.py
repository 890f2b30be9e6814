"""Learned refinement on top of a structure-aware reconstruction (issue 12 item 5): a U-Net that
corrects a rough reconstruction, ``clamp(rough + G(rough), -1, 1)``, trained with an L1 loss on pairs the
attacker builds from its own faces (its own releases through the same pipeline -> its own originals).
It starts from the reconstruction, never from the raw release, and outputs 112x112."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FACE_SIZE, Param, batched, iterate_minibatches
from .nets import UNetGenerator

#: the parameters every structure-aware reconstruction declares: dropped-DC handling and the refinement
RECONSTRUCTION_PARAMS = (
    Param("dc", str, "solve", choices=("solve", "prior", "zero"),
          doc="dropped block means: solved from edge continuity, the attacker's average, or zero"),
    Param("refine_epochs", int, 0, range=(0, 1000), doc="epochs of the refinement U-Net (0: none)"),
    Param("refine_width", int, 16, range=(4, 256), doc="base width of the refinement U-Net"),
    Param("batch_size", int, 32, range=(2, 4096), doc="refinement mini-batch size"),
    Param("lr", float, 1e-3, range=(1e-7, 1.0), doc="refinement learning rate (Adam)"),
)


class Refiner:
    def __init__(self, width: int = 16, device: torch.device = torch.device("cpu")):
        self.net = UNetGenerator(3, FACE_SIZE, size=FACE_SIZE, width=width, depth=4).to(device)
        self.device = device

    def fit(self, rough: torch.Tensor, target: torch.Tensor, epochs: int, batch_size: int, lr: float,
            generator: torch.Generator) -> "Refiner":
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.9, 0.999))
        steps = max(1, epochs * max(1, rough.shape[0] // batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        self.net.train()
        for _ in range(epochs):
            for idx in iterate_minibatches(rough.shape[0], batch_size, generator):
                loss = F.l1_loss(self._forward(rough[idx].to(self.device)), target[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.net.eval()
        return self

    def _forward(self, rough: torch.Tensor) -> torch.Tensor:
        return (rough + self.net(rough)).clamp(-1, 1)

    def __call__(self, rough: torch.Tensor) -> torch.Tensor:
        return batched(lambda r: self._forward(r.to(self.device)), rough).cpu()


__all__ = ["Refiner", "RECONSTRUCTION_PARAMS"]
