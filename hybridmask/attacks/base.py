"""Attack registry, declared parameters and the common attack interface (ART style).

Every attack is a class registered under a name and built with ``create_attack(name, **params)``.
Its parameters are declared in the class attribute ``PARAMS`` (a tuple of :class:`Param`: name,
type, default, allowed range or choices, one-line doc); ``__init__`` validates them and raises a
``ValueError`` (``TypeError`` for a wrong type) naming the parameter and what was expected.

The interface the harness drives::

    attack = create_attack("cgan", epochs=3)
    attack.fit(defense, public_images)            # attacker-side preparation on public faces
    obs = attack.observe(defense, victim_images)  # what the attacker gets to see of the victims
    recon = attack.invert(obs)                    # (B, 3, 112, 112) reconstructions in [-1, 1]

``observe`` simulates the victims' client: it is the only place where victim faces enter, and it
passes them through the defense (``query``/``release``) or the recognizer before anything reaches
the attacker's code. ``attack.attack(defense, victims)`` is ``invert(observe(...))``.

Threat model (``mode``): ``"whitebox"`` - the attacker knows the defense configuration and runs
its *own* instance ``create_defense(**victim.config, seed=<attacker's own seed>)`` (it knows every
masking parameter but not the victim's secret draws); ``"blackbox"`` - it may only call the
victim's defense object as a service on faces it owns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.blocks import resize  # noqa: F401  (re-exported: the attacks' resize is the models' one)
from ..utils import HybridMaskInputError, Registry, check_images, run_in_batches

ATTACKS = Registry("attack")

FACE_SIZE = 112
MODES = ("whitebox", "blackbox")


def register_attack(name: str):
    return ATTACKS.register(name)


def create_attack(name: str, **params) -> "Attack":
    """Build a registered attack by name with validated parameters (``list_attacks()`` lists them)."""
    return ATTACKS.get(name)(**params)


def list_attacks() -> List[str]:
    return ATTACKS.names()


def describe_attack(name: str) -> str:
    """A human-readable table of an attack's declared parameters."""
    cls = ATTACKS.get(name)
    lines = [f"{cls.name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}"]
    for p in cls.PARAMS:
        lines.append("  " + p.describe())
    return "\n".join(lines)


_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One declared attack parameter.

    ``type``: ``int``, ``float``, ``bool``, ``str`` or ``"callable"`` / ``"module"`` / ``"any"``
    (objects such as a recognizer). ``range``: inclusive ``(lo, hi)`` for numbers (``None`` for an
    open end). ``choices``: allowed values. ``optional``: ``None`` is accepted. ``required``: no
    default; the user must pass it.
    """
    name: str
    type: Any
    default: Any = None
    range: Optional[Tuple[Optional[float], Optional[float]]] = None
    choices: Optional[Tuple[Any, ...]] = None
    optional: bool = False
    required: bool = False
    doc: str = ""

    def describe(self) -> str:
        t = self.type if isinstance(self.type, str) else self.type.__name__
        extra = []
        if self.range is not None:
            lo, hi = self.range
            extra.append(f"range [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        if self.choices is not None:
            extra.append("one of " + ", ".join(map(repr, self.choices)))
        if self.optional:
            extra.append("or None")
        d = "required" if self.required else f"default {self.default!r}"
        return f"{self.name} ({t}, {d}{'; ' + '; '.join(extra) if extra else ''}): {self.doc}"

    def validate(self, value: Any, owner: str) -> Any:
        where = f"{owner} parameter {self.name!r}"
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"{where} must not be None ({self.describe()})")
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{where} must be a bool, got {type(value).__name__} {value!r}")
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise TypeError(f"{where} must be an int, got {type(value).__name__} {value!r}")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{where} must be a number, got {type(value).__name__} {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where} must be finite, got {value!r}")
        elif t is str:
            if not isinstance(value, str):
                raise TypeError(f"{where} must be a str, got {type(value).__name__} {value!r}")
        elif t == "callable":
            if not callable(value):
                raise TypeError(f"{where} must be callable (a model or function), got {type(value).__name__}")
        elif t == "module":
            if not isinstance(value, nn.Module):
                raise TypeError(f"{where} must be a torch.nn.Module, got {type(value).__name__}")
        if self.range is not None and isinstance(value, (int, float)):
            lo, hi = self.range
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ValueError(f"{where} must be in [{'-inf' if lo is None else lo}, "
                                 f"{'inf' if hi is None else hi}], got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        return value


COMMON_PARAMS = (
    Param("mode", str, "whitebox", choices=MODES,
          doc="whitebox: own defense instance with the victim's config; blackbox: call the victim's defense"),
    Param("seed", int, None, optional=True, doc="seed of the attacker's own randomness (None: fresh)"),
    Param("device", str, "cpu", doc="torch device for the attacker's networks"),
    Param("progress", bool, True, doc="show tqdm progress bars"),
)


class Attack:
    """Base class: declared parameters, validated inputs, the fit/observe/invert protocol."""

    name = "attack"
    kind = "reconstruction"   # or "class_inversion"
    PARAMS: Tuple[Param, ...] = ()
    #: what the attack needs of its target (ART's estimator requirements): defense capability
    #: (``input_kind``, ``stochastic``, ``mixes``, ``trainable``) -> the value, or a tuple of values, it needs
    REQUIRES: Dict[str, Any] = {}

    @classmethod
    def applicable(cls, defense) -> Optional[str]:
        """None when the attack can run against ``defense``; otherwise why not (from :attr:`REQUIRES`)."""
        for cap, want in cls.REQUIRES.items():
            have = getattr(defense, cap, None)
            if not (have in want if isinstance(want, (tuple, list, set, frozenset)) else have == want):
                return f"needs {cap}={want!r}, the defense has {cap}={have!r}"
        return None

    def __init__(self, **params):
        declared = {p.name: p for p in self.all_params()}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(f"unknown parameter(s) for attack {self.name!r}: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(declared))}")
        self.params: Dict[str, Any] = {}
        for pname, p in declared.items():
            if pname in params:
                value = params[pname]
            elif p.required:
                raise ValueError(f"attack {self.name!r} needs parameter {pname!r} ({p.describe()})")
            else:
                value = p.default
            self.params[pname] = p.validate(value, f"attack {self.name!r}")
        self.device = torch.device(self.params["device"])
        self.generator = torch.Generator().manual_seed(
            self.params["seed"] if self.params["seed"] is not None else int(torch.randint(0, 2**62, (1,)).item()))
        self.defense = None          # the defense the attacker uses to build training pairs
        self.victim_config: Optional[Dict[str, Any]] = None
        self.fitted = False

    @classmethod
    def all_params(cls) -> Tuple[Param, ...]:
        own = {p.name for p in cls.PARAMS}
        return tuple(cls.PARAMS) + tuple(p for p in COMMON_PARAMS if p.name not in own)

    def __getattr__(self, item):
        params = self.__dict__.get("params")
        if params is not None and item in params:
            return params[item]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    def public_params(self) -> Dict[str, Any]:
        """Parameters as plain data (objects are named by their type) - for results files."""
        out = {}
        for k, v in self.params.items():
            out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.public_params().items())})"

    # ---- the threat model -------------------------------------------------------------------
    def attacker_defense(self, victim_defense) -> Any:
        """The defense object the attacker may run on its own faces (see the module docstring)."""
        if self.params["mode"] == "blackbox":
            return victim_defense
        from ..defenses.io import build_defense
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        # the public algorithm and its learned values (e.g. DCTDP's budgets, the policy), fresh secrets
        try:
            return build_defense(victim_defense.config, victim_defense.defense_state(), seed=seed,
                                 where="white-box attacker's defense")
        except KeyError as e:
            raise ValueError(f"white-box mode rebuilds the defense from its config, but {e.args[0]}; use "
                             f"mode='blackbox' for a defense that is not registered") from None

    def begin_fit(self, defense, public_images: torch.Tensor) -> torch.Tensor:
        """The common start of ``fit``: validate the defense and the public faces, take the attacker's
        view of the defense (``self.defense``), record the victim's config (``self.victim_config``)
        and return the public faces to train on (``n_images`` of them, when the attack declares it)."""
        check_defense(defense)
        check_faces(public_images, "public_images", min_count=2)
        self.defense = self.attacker_defense(defense)
        self.victim_config = dict(getattr(defense, "config", {}) or {})
        imgs, _ = subsample(public_images, self.params.get("n_images"), self.generator)
        return imgs

    # ---- protocol ------------------------------------------------------------------------------
    def fit(self, defense, public_images: torch.Tensor, public_labels: Optional[torch.Tensor] = None) -> "Attack":
        raise NotImplementedError

    def observe(self, defense, victim_images: torch.Tensor) -> Any:
        raise NotImplementedError

    def invert(self, observation: Any) -> torch.Tensor:
        raise NotImplementedError

    def attack(self, defense, victim_images: torch.Tensor) -> torch.Tensor:
        return self.invert(self.observe(defense, victim_images))

    def seeded(self):
        """Context in which network initialisation draws from the attacker's seed (global RNG untouched)."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=self.generator)))
                yield
        return ctx()

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"attack {self.name!r} must be fitted first (call .fit(defense, public_images))")


# ---- helpers shared by the attacks -------------------------------------------------------------
def check_faces(images, name: str = "images", min_count: int = 1) -> None:
    """Aligned faces: float (B, 3, 112, 112), finite, values in [-1, 1]."""
    check_images(images, name)
    if tuple(images.shape[-2:]) != (FACE_SIZE, FACE_SIZE):
        raise HybridMaskInputError(f"{name} must be aligned {FACE_SIZE}x{FACE_SIZE} faces, got "
                                   f"{images.shape[-2]}x{images.shape[-1]}")
    if images.shape[0] < min_count:
        raise HybridMaskInputError(f"{name} must hold at least {min_count} face(s), got {images.shape[0]}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
        raise HybridMaskInputError(f"{name} must lie in [-1, 1] (pixel / 127.5 - 1), got values in [{lo:.3g}, {hi:.3g}]")


def check_defense(defense) -> None:
    for attr in ("query", "release", "as_image"):
        if not callable(getattr(defense, attr, None)):
            raise TypeError(f"defense must implement the hybridmask Defense interface (missing {attr}()), "
                            f"got {type(defense).__name__}")


def client_traffic(defense, faces: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` other queries of the victims' client (same defense object, so the same client key): faces drawn
    with replacement from ``faces`` (faces the attacker owns), mirrored, released through ``defense.query``.
    The draw uses a generator seeded from ``generator`` (one draw of it), so the attack's own stream moves by one."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    idx = torch.randint(0, faces.shape[0], (int(n),), generator=g)
    return batched(defense.query, faces[idx].flip(-1))


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Apply ``fn`` to ``x`` in chunks and concatenate (no gradients; results stay where ``fn`` puts them)."""
    return run_in_batches(fn, x, batch_size, out_device=None)


def differentiable_query(defense) -> Callable[[torch.Tensor], torch.Tensor]:
    """A query path gradients flow through: ``apply(x, draw_query(x))`` (the defense's query, which may run
    under ``no_grad``, replayed through its deterministic half; pool partners too when the defense mixes its
    queries). Raises if that is not differentiable."""
    def query(x: torch.Tensor) -> torch.Tensor:
        draw_query = getattr(defense, "draw_query", None)
        return defense.apply(x, draw_query(x) if callable(draw_query) else defense.draw(x, 1))[0]

    probe = torch.zeros(1, 3, FACE_SIZE, FACE_SIZE, requires_grad=True)
    with torch.enable_grad():
        out = query(probe)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        return query
    raise ValueError(f"the query path of defense {getattr(defense, 'name', type(defense).__name__)!r} is not "
                     f"differentiable; white-box optimisation needs one (use the learned decoder instead)")


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    perm = torch.randperm(n, generator=generator)
    stop = n - (n % batch_size) if (drop_last and n >= batch_size) else n
    for i in range(0, stop, batch_size):
        yield perm[i:i + batch_size]


def subsample(images: torch.Tensor, n: Optional[int], generator: torch.Generator,
              labels: Optional[torch.Tensor] = None):
    if n is None or n >= images.shape[0]:
        return images, labels
    idx = torch.randperm(images.shape[0], generator=generator)[:n].sort().values
    return images[idx], (labels[idx] if labels is not None else None)


def tqdm_or_none(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)
