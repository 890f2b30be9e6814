"""Which attacks the benchmark runs against a defense, built from the attack registry.

``attacks.run`` of the benchmark config maps a label to a registered attack
(:func:`hybridmask.attacks.list_attacks`) and its parameters; ``attacks.params.<attack>`` holds
parameters shared by every label of that attack. A new attack needs a registry entry and a config
line, no code here. Whether an attack applies to a defense is what the attack class declares
(:meth:`hybridmask.attacks.base.Attack.applicable`, from the defense's capabilities) plus the
entry's own ``requires`` (capability -> value, the same rule). Parameter values ``"$name"`` are
bound to what the benchmark knows of the run: ``$recognizer`` (the run's trained recognizer, a
module from the defense's release to embeddings) and ``$mean_k`` (the mean k of the run's training
releases, from its k histogram; unset when the run records none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .config import RUN_KEYS


@dataclass
class AttackSpec:
    label: str
    attack: str                       # registered name
    params: Dict[str, Any]            # shared parameters, then the entry's own
    requires: Dict[str, Any]
    text: str = ""
    kind: str = "reconstruction"      # the registered class's kind: reconstruction | linkage


def attack_specs(attack_cfg: Mapping[str, Any]) -> List[AttackSpec]:
    """The configured attacks in fit order (the config's order)."""
    from ..attacks import ATTACKS
    shared = attack_cfg.get("params") or {}
    out = []
    for label, spec in (attack_cfg.get("run") or {}).items():
        name = str(spec["attack"])
        params = {**dict(shared.get(name) or {}), **{k: v for k, v in spec.items() if k not in RUN_KEYS}}
        out.append(AttackSpec(str(label), name, params, dict(spec.get("requires") or {}), str(spec.get("text") or ""),
                              str(ATTACKS.get(name).kind)))
    return out


def display_order(specs: List[AttackSpec], headline: str) -> List[str]:
    """A fixed headline attack first, then the others in config order (tables and grid rows); with
    ``headline: strongest`` (chosen per defense from the results) the config order."""
    labels = [s.label for s in specs]
    return [headline] + [x for x in labels if x != headline] if headline in labels else labels


def requirement_unmet(requires: Mapping[str, Any], defense) -> Optional[str]:
    """Why ``defense``'s capabilities do not meet ``requires`` (capability -> value or list of values)."""
    for cap, want in requires.items():
        have = getattr(defense, cap, None)
        ok = have in want if isinstance(want, (list, tuple, set)) else have == want
        if not ok:
            return f"needs {cap}={want!r}, the defense has {cap}={have!r}"
    return None


def not_applicable(spec: AttackSpec, defense) -> Optional[str]:
    from ..attacks import ATTACKS
    cls = ATTACKS.get(spec.attack)
    why = cls.applicable(defense) if callable(getattr(cls, "applicable", None)) else None
    return why or requirement_unmet(spec.requires, defense)


def plan_attacks(specs: List[AttackSpec], defense) -> Tuple[List[AttackSpec], Dict[str, str]]:
    run, skipped = [], {}
    for s in specs:
        why = not_applicable(s, defense)
        if why:
            skipped[s.label] = why
        else:
            run.append(s)
    return run, skipped


def bind(params: Mapping[str, Any], known: Mapping[str, Any]) -> Dict[str, Any]:
    """``"$name"`` values -> ``known[name]`` (dropped when that is None: the attack's default applies)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, str) and v.startswith("$"):
            name = v[1:]
            if name not in known:
                raise ValueError(f"attack parameter {k}={v!r}: the benchmark provides {', '.join('$' + n for n in known)}")
            if known[name] is None:
                continue
            v = known[name]
        out[k] = v
    return out


def build_attack(spec: AttackSpec, known: Mapping[str, Any], seed: int, progress: bool, device: str):
    from ..attacks import create_attack
    kw = bind(spec.params, known)
    kw.update(seed=seed, progress=progress, device=device)
    return create_attack(spec.attack, **kw)


class OnDevice(torch.nn.Module):
    """Runs ``model`` on ``device`` for inputs and outputs that live on the CPU (the defenses run there)."""

    def __init__(self, model: torch.nn.Module, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.model = model.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).cpu()


class Recorded:
    """An attack, unchanged, that also keeps its last reconstructions (``.last``) for the report's grid:
    a wrapper that forwards every attribute to the attack; ``invert`` returns the attack's own result."""

    def __init__(self, attack):
        self.__dict__["_attack"] = attack
        self.__dict__["last"] = None

    def __getattr__(self, item):
        return getattr(self.__dict__["_attack"], item)

    def invert(self, observation):
        out = self._attack.invert(observation)
        self.__dict__["last"] = out
        return out

    def attack(self, defense, victim_images):
        return self.invert(self.observe(defense, victim_images))


__all__ = ["AttackSpec", "attack_specs", "display_order", "plan_attacks", "not_applicable", "bind", "build_attack",
           "OnDevice", "Recorded"]
