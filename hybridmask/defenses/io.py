"""Rebuild the defense of a trained run, with fresh secrets: what the attack harness attacks and what
evaluation queries a recognizer through.

    from hybridmask.defenses.io import defense_from_checkpoint, defense_from_run, load_defense
    d = defense_from_checkpoint("outputs/celeba_dctdp/model.pt")   # dctdp with its trained budgets
    d = defense_from_run("outputs/quickstart")                     # adaptive with the run's policy.pt
    d = load_defense("freq_mixup", overrides={"k": 4})             # name | YAML | checkpoint | run folder

What each file records and how it is rebuilt:

* ``model.pt`` of ``hybridmask train`` (format ``hybridmask.recognizer``): the defense's constructor
  arguments in ``extra["defense"]`` (its ``config``). A defense with learned parameters (DCTDP's noise
  budgets, ``extra["defense_state"]``) is rebuilt with ``state_path=<model.pt>``; the adaptive defense
  with a learned policy with ``policy_path=`` the run's ``policy.pt`` next to the model (checked to come
  from the same run). A checkpoint with only a ``masking`` config (HybridMask arguments, older or
  hand-written checkpoints) gives PPFR-FD (k=1) or fixed-k frequency MixUp. One that records neither
  raises :class:`DefenseNotRecordedError`: a checkpoint never silently means "no defense".
* ``policy.pt`` (format ``hybridmask.policy``): the adaptive defense with that policy and the masking
  it was trained with.
* ``arl.pt`` (format ``hybridmask.arl``): the ARL encoder (:class:`~hybridmask.defenses.arl.ARLDefense`).
* a trainer checkpoint ``<run>/ckpt/last.pt`` (format ``hybridmask.trainer``, an unfinished run): the
  defense section of ``<run>/config.yaml`` with the checkpoint's trained parameters.
* a run folder: ``arl.pt``, else ``model.pt``, else ``config.yaml`` + ``ckpt/last.pt``.

Every rebuilt defense draws fresh secrets (``seed=None``: secure OS seed; nothing secret is stored in
these files) and its ``config`` rebuilds it with :func:`~hybridmask.defenses.create_defense` (paths
included), which is what a white-box attacker's own instance needs.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..utils import read_yaml_mapping, safe_torch_load
from ..utils.rng import SeedLike
from .base import DEFENSES, Defense, create_defense, list_defenses

PathLike = Union[str, os.PathLike]

RECOGNIZER_FORMAT = "hybridmask.recognizer"
POLICY_FORMAT = "hybridmask.policy"
ARL_FORMAT = "hybridmask.arl"
TRAINER_FORMAT = "hybridmask.trainer"

#: HybridMask constructor arguments that may appear in a checkpoint's ``masking`` config
HYBRIDMASK_KEYS = ("u", "drop", "shuffle", "mix", "k", "weights", "max_weight", "alpha", "granularity", "order")
#: the HybridMask arguments the adaptive defense takes (its k comes from the policy)
_ADAPTIVE_MASK_KEYS = ("u", "drop", "shuffle", "mix", "weights", "max_weight", "granularity", "order")


class DefenseNotRecordedError(ValueError):
    """A checkpoint that does not say which defense its model was trained behind."""


# ---- configs ---------------------------------------------------------------------------------------
def split_config(config: Mapping[str, Any], where: str = "defense config") -> Tuple[str, Dict[str, Any]]:
    """A defense config -> ``(name, constructor arguments)``. Accepts a defense's ``config``
    (``{"name": ..., <args>}``), a training config's ``defense:`` section (``{"name": ..., "args": {...}}``)
    or a mix of both; ``seed`` is dropped (secrets are never taken from a config)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'name', got {type(config).__name__}")
    cfg = dict(config)
    name = cfg.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: the defense config needs a 'name' (one of {', '.join(list_defenses())})")
    args = cfg.pop("args", None) or {}
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}: 'args' must be a mapping of constructor arguments, got {type(args).__name__}")
    args = {**dict(args), **cfg}
    args.pop("seed", None)
    return name.lower(), args


def defense_from_config(config: Mapping[str, Any], seed: SeedLike = None,
                        overrides: Optional[Mapping[str, Any]] = None, where: str = "defense config") -> Defense:
    """Build the defense a config describes (see :func:`split_config`), ``overrides`` on top, with
    fresh secrets from ``seed`` (None: secure OS seed). Clear errors for unknown names or arguments."""
    name, args = split_config(config, where)
    args.update(dict(overrides or {}))
    return _create(name, args, seed, where)


def _create(name: str, args: Dict[str, Any], seed: SeedLike, where: str) -> Defense:
    if name not in DEFENSES:
        raise KeyError(f"{where}: unknown defense {name!r}; available: {', '.join(list_defenses())}")
    try:
        return create_defense(name, seed=seed, **args)
    except TypeError as e:
        raise ValueError(f"{where}: defense {name!r} does not take arguments {sorted(args)}: {e}") from None


def defense_from_masking(masking: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """A recognizer checkpoint's HybridMask ``masking`` config -> ``(defense name, arguments)``:
    ``ppfrfd`` for k=1, else ``freq_mixup``. A config with a ``name`` is taken as a defense config."""
    masking = dict(masking)
    if "name" in masking:
        return split_config(masking, "masking config")
    unknown = sorted(set(masking) - set(HYBRIDMASK_KEYS) - {"seed"})
    if unknown:
        raise ValueError(f"unknown masking config keys {unknown}; known: {', '.join(HYBRIDMASK_KEYS)}")
    m = {k: v for k, v in masking.items() if k in HYBRIDMASK_KEYS and k != "alpha"}
    if int(m.get("k", 1)) <= 1:
        return "ppfrfd", {k: m[k] for k in ("u", "drop", "shuffle", "mix") if k in m}
    return "freq_mixup", m


def _takes(name: str, arg: str) -> bool:
    try:
        return arg in inspect.signature(DEFENSES.get(name).__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _with_trained_state(name: str, args: Dict[str, Any], holder: Path, has_state: bool) -> Dict[str, Any]:
    """Point a defense with learned parameters (those taking ``state_path``: DCTDP's budgets) at the
    file ``holder`` that holds them; refuse to rebuild one untrained."""
    args = dict(args)
    if has_state:
        if not _takes(name, "state_path"):
            raise ValueError(f"{holder}: holds trained parameters of defense {name!r}, which cannot load them "
                             f"(it takes no state_path argument)")
        args["state_path"] = str(holder)
    elif _takes(name, "state_path") and not args.get("state_path"):
        raise ValueError(f"{holder}: defense {name!r} learns parameters during training, but no trained "
                         f"parameters are recorded here (no defense_state); it would be rebuilt untrained")
    return args


# ---- checkpoints -----------------------------------------------------------------------------------
def _load_blob(path: Path) -> Dict[str, Any]:
    blob = safe_torch_load(path)
    if not isinstance(blob, dict):
        raise ValueError(f"{path} is not a hybridmask checkpoint (not a dict)")
    return blob


def defense_from_checkpoint(path: PathLike, seed: SeedLike = None,
                            overrides: Optional[Mapping[str, Any]] = None, for_query: bool = False) -> Defense:
    """Rebuild the exact defense a checkpoint was trained with (see the module doc for each format),
    with fresh secrets. ``overrides``: constructor arguments set on top (arguments that would change
    trained parameters are refused by the defense itself). Raises :class:`DefenseNotRecordedError`
    for a recognizer checkpoint that records no defense, ``ValueError`` for other unusable files.
    ``for_query``: only the test-time ``query`` will be used (evaluation), so an adaptive defense whose
    policy file cannot be found is built without it (the policy only picks the training-time k)."""
    path = Path(path)
    blob = _load_blob(path)
    fmt = blob.get("format")
    if fmt == RECOGNIZER_FORMAT:
        return _from_recognizer(path, blob, seed, overrides, for_query)
    if fmt == POLICY_FORMAT:
        return _from_policy(path, blob, seed, overrides)
    if fmt == ARL_FORMAT:
        return _create("arl", {"checkpoint": str(path), **dict(overrides or {})}, seed, str(path))
    if fmt == TRAINER_FORMAT:
        return _from_trainer_checkpoint(path, blob, seed, overrides)
    raise ValueError(f"{path}: not a hybridmask recognizer, policy, ARL or trainer checkpoint (format={fmt!r})")


def recorded_defense(blob: Mapping[str, Any], path: PathLike) -> Tuple[Optional[str], Dict[str, Any]]:
    """``(name, arguments)`` a recognizer checkpoint records: ``extra["defense"]`` (what ``hybridmask
    train`` writes), else its ``masking`` config; ``(None, {})`` when it records neither."""
    extra = blob.get("extra") if isinstance(blob.get("extra"), dict) else {}
    rec = extra.get("defense")
    if rec is not None:
        return split_config(rec, f"{path}: extra['defense']")
    masking = blob.get("masking")
    if masking:
        if not isinstance(masking, dict):
            raise ValueError(f"{path}: 'masking' must be a dict of HybridMask arguments, got {type(masking).__name__}")
        return defense_from_masking(masking)
    return None, {}


def _from_recognizer(path: Path, blob: Dict[str, Any], seed, overrides, for_query: bool = False) -> Defense:
    where = str(path)
    name, args = recorded_defense(blob, path)
    if name is None:
        raise DefenseNotRecordedError(
            f"{path} does not record the defense its model was trained behind (no extra['defense'] and no "
            f"'masking' config); name the defense explicitly (e.g. --defense none for an unprotected recognizer)")
    extra = blob.get("extra") if isinstance(blob.get("extra"), dict) else {}
    args = _with_trained_state(name, args, path, extra.get("defense_state") is not None)
    if name == "adaptive":
        try:
            args = _adaptive_policy(path, args, extra)
        except (ValueError, FileNotFoundError):
            if not for_query:
                raise
            args.pop("policy_path", None)
    args.update(dict(overrides or {}))
    defense = _create(name, args, seed, where)
    check_fits_model(defense, blob.get("model_config"), where)
    return defense


def _adaptive_policy(path: Path, args: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """The adaptive defense of a recognizer checkpoint: its policy file (``policy_path`` it was built
    with, else the run's ``policy.pt`` next to the model), or none when the run's policy was not learned
    (uniform or fixed k: the recorded ``k_values`` rebuild it exactly)."""
    args = dict(args)
    given = args.get("policy_path")
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"{path}: its adaptive defense loaded the policy {given}, which is not there")
        return args
    sibling = path.parent / "policy.pt"
    if sibling.is_file():
        _, meta = _policy_meta(sibling)
        run, prun = extra.get("run"), (meta.get("extra") or {}).get("run")
        if run is not None and prun is not None and str(run) != str(prun):
            raise ValueError(f"{sibling} comes from run {prun!r}, but {path} from run {run!r}")
        args["policy_path"] = str(sibling)
        return args
    policy_name = _run_policy_name(path.parent)
    if policy_name in ("uniform", "fixed", "none"):
        return args
    if policy_name is None:
        raise ValueError(f"{path}: adaptive defense, but neither its policy.pt nor its run's config.yaml lies next "
                         f"to it (cannot tell whether its policy was learned); pass the policy checkpoint instead")
    raise FileNotFoundError(f"{path}: adaptive defense with a learned {policy_name!r} policy, but {sibling} is "
                            f"missing (did the run finish?)")


def _run_policy_name(run_dir: Path) -> Optional[str]:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    pc = read_yaml_mapping(cfg, "run config").get("policy") or {}
    return str(pc.get("name") or "none").lower() if isinstance(pc, dict) else None


def _policy_meta(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    blob = _load_blob(path)
    if blob.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path} is not a hybridmask policy file (format={blob.get('format')!r})")
    return blob, {k: blob.get(k) for k in ("masking", "context", "extra", "policy_config")}


def _from_policy(path: Path, blob: Dict[str, Any], seed, overrides) -> Defense:
    args: Dict[str, Any] = {"policy_path": str(path)}
    masking = blob.get("masking") or {}
    if not isinstance(masking, dict):
        raise ValueError(f"{path}: 'masking' must be a dict of HybridMask arguments")
    args.update({k: v for k, v in masking.items() if k in _ADAPTIVE_MASK_KEYS})
    ks = (blob.get("policy_config") or {}).get("k_values")
    if ks:
        args["k_values"] = list(ks)
    args.update(dict(overrides or {}))
    return _create("adaptive", args, seed, str(path))


def _from_trainer_checkpoint(path: Path, blob: Dict[str, Any], seed, overrides) -> Defense:
    run_dir = path.parent.parent if path.parent.name == "ckpt" else path.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: a trainer checkpoint does not record its defense; {cfg_path} (the run's config) "
                         f"is not there")
    return _from_run_config(run_dir, read_yaml_mapping(cfg_path, "run config"), path, blob, seed, overrides)


def _from_run_config(run_dir: Path, cfg: Mapping[str, Any], ckpt: Optional[Path], blob: Optional[Dict[str, Any]],
                     seed, overrides) -> Defense:
    """An unfinished run: ``config.yaml``'s defense section (+ the trainer checkpoint's trained parameters)."""
    where = str(run_dir / "config.yaml")
    if "defense" not in cfg:
        raise ValueError(f"{where} has no defense section")
    name, args = split_config(cfg["defense"], where)
    args = _with_trained_state(name, args, ckpt or run_dir, blob is not None and blob.get("defense_state") is not None)
    if name == "adaptive" and not args.get("policy_path"):
        pc = cfg.get("policy") or {}
        pname = str(pc.get("name") or "none").lower() if isinstance(pc, dict) else "none"
        if pname not in ("uniform", "fixed", "none"):
            raise FileNotFoundError(f"{run_dir}: adaptive defense with a learned {pname!r} policy but no policy.pt "
                                    f"(the run has not finished)")
        if pname == "fixed":
            args["k_values"] = [int(pc["k"])]
        elif pc.get("k_values") and pname == "uniform":
            args["k_values"] = list(pc["k_values"])
    args.update(dict(overrides or {}))
    return _create(name, args, seed, where)


def defense_from_run(run_dir: PathLike, seed: SeedLike = None,
                     overrides: Optional[Mapping[str, Any]] = None) -> Defense:
    """The defense of a training run folder: ``arl.pt`` (ARL runs), else ``model.pt`` (a finished
    ``hybridmask train`` run; see :func:`defense_from_checkpoint`), else ``config.yaml`` with the
    trained parameters of ``ckpt/last.pt`` (an unfinished run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    for name in ("arl.pt", "model.pt"):
        if (run_dir / name).is_file():
            return defense_from_checkpoint(run_dir / name, seed=seed, overrides=overrides)
    last = run_dir / "ckpt" / "last.pt"
    if last.is_file():
        return defense_from_checkpoint(last, seed=seed, overrides=overrides)
    if (run_dir / "config.yaml").is_file():
        return _from_run_config(run_dir, read_yaml_mapping(run_dir / "config.yaml", "run config"), None, None,
                                seed, overrides)
    raise FileNotFoundError(f"{run_dir} is not a training run folder (no arl.pt, model.pt, ckpt/last.pt or "
                            f"config.yaml)")


def check_fits_model(defense: Defense, model_config: Optional[Mapping[str, Any]], where: str) -> None:
    """Raise ``ValueError`` when a recognizer's input (``model_config``: stem, in_chans) cannot take
    what ``defense`` releases."""
    if not isinstance(model_config, Mapping):
        return
    stem, chans = model_config.get("stem"), model_config.get("in_chans")
    kind = "pixel" if defense.input_kind == "pixel" else "freq"
    if stem is not None and defense.input_kind in ("pixel", "freq") and str(stem) != kind:
        raise ValueError(f"{where}: the model takes {stem} input but its recorded defense {defense.name!r} "
                         f"releases {defense.input_kind} input")
    if chans is not None and int(chans) != int(defense.in_channels):
        raise ValueError(f"{where}: the model takes {chans} input channels but its recorded defense "
                         f"{defense.name!r} releases {defense.in_channels}")


# ---- any spec --------------------------------------------------------------------------------------
def load_defense(spec: Union[str, PathLike], seed: SeedLike = None,
                 overrides: Optional[Mapping[str, Any]] = None) -> Defense:
    """The defense ``spec`` names, ``overrides`` (constructor arguments) on top, fresh secrets:

    * a run folder -> :func:`defense_from_run`;
    * a ``.yaml``/``.yml`` file: ``{name: ..., <args>}`` or a training config with a ``defense:``
      section; a run's own ``config.yaml`` (``model.pt`` or ``arl.pt`` beside it) gives the *trained*
      defense of that run (:func:`defense_from_run`), not an untrained one;
    * a checkpoint file (``.pt``/``.pth``/``.ckpt`` or any other file) -> :func:`defense_from_checkpoint`;
    * otherwise a registered defense name (``list_defenses()``).
    """
    s = str(spec)
    path = Path(s)
    if path.is_dir():
        return defense_from_run(path, seed=seed, overrides=overrides)
    if s.lower().endswith((".yaml", ".yml")):
        if (path.parent / "model.pt").is_file() or (path.parent / "arl.pt").is_file():
            return defense_from_run(path.parent, seed=seed, overrides=overrides)
        cfg = read_yaml_mapping(path, "defense config")
        if isinstance(cfg.get("defense"), dict):
            cfg = cfg["defense"]
        return defense_from_config(cfg, seed=seed, overrides=overrides, where=str(path))
    if path.suffix.lower() in (".pt", ".pth", ".ckpt") or path.is_file():
        return defense_from_checkpoint(path, seed=seed, overrides=overrides)
    return defense_from_config({"name": s}, seed=seed, overrides=overrides, where="--defense")


__all__ = ["load_defense", "defense_from_checkpoint", "defense_from_run", "defense_from_config",
           "defense_from_masking", "recorded_defense", "split_config", "check_fits_model",
           "DefenseNotRecordedError", "HYBRIDMASK_KEYS"]
