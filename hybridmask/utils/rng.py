"""Randomness that protects privacy.

Every secret draw in hybridmask (mixing partners, mixing weights, channel permutations, sign
flips) comes from a :class:`torch.Generator` owned by the object that draws it. Tests pass a
``seed``; deployments pass nothing and get a generator seeded from the operating system's
secure source (:mod:`secrets`), never from the global torch seed, so ``torch.manual_seed``
in a training script cannot reveal the masking secrets.
"""
from __future__ import annotations

import secrets
from typing import Union

import torch

SeedLike = Union[None, int, torch.Generator]


def make_generator(seed: SeedLike = None, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """Return a generator: the given one, one seeded with ``seed``, or a securely seeded one.

    ``seed=None`` (the default) draws 63 bits from :func:`secrets.randbits`.
    """
    if isinstance(seed, torch.Generator):
        return seed
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed must be None, an int or a torch.Generator, got {type(seed).__name__}")
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return g


def generator_state(g: torch.Generator) -> torch.Tensor:
    """The generator's full state (a uint8 tensor), for checkpoints and exact resume."""
    return g.get_state().clone()


def set_generator_state(g: torch.Generator, state: torch.Tensor) -> None:
    g.set_state(state.clone().to(torch.uint8).cpu())
