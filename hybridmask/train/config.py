"""YAML training configs: a commented base file, ``_base_`` inheritance and dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=4", "model.name=tiny_test"])

* A config file may name a parent with ``_base_: base.yaml`` (relative to the file); the child's
  mappings are merged into the parent's recursively (the child wins; lists are replaced).
* Overrides ``dotted.key=value`` are parsed as YAML (``train.steps=4`` gives an int,
  ``policy.k_values=[2,4,6]`` a list, ``data.train=null`` None).
* Every key must exist in ``configs/base.yaml`` (the schema); an unknown key raises a
  ``KeyError`` that names it and lists the known keys of its section. Sections listed in
  :data:`FREE_FORM` (keyword arguments passed through to a builder) accept any key.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import yaml

from ..utils import deep_merge, parse_key_value, read_yaml_mapping

PathLike = Union[str, os.PathLike]

#: sections whose keys are passed through as keyword arguments (not validated here)
FREE_FORM = ("defense.args", "model.args")

_PKG_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

#: types of keys whose default is null (the others take the type of their default in base.yaml)
NULLABLE = {"run.name": str, "run.mask_seed": int, "run.resume": str, "data.train": str, "data.max_identities": int,
            "head.m": float, "optim.grad_clip": float, "train.steps": int, "eval.data_root": str,
            "eval.final_pairs": int, "policy.grad_clip": float,
            "teacher.name": str, "teacher.cache_dir": str, "model.init": str}
#: inclusive (low, high) ranges of numeric keys (None: open)
RANGES = {"run.threads": (1, None), "data.batch_size": (1, None), "data.min_images": (1, None),
          "data.max_identities": (1, None), "data.holdout_per_identity": (0, None), "data.holdout_identities": (0, None),
          "data.num_workers": (0, None), "data.copies": (1, None), "data.synthetic.identities": (2, None),
          "data.synthetic.images_per_identity": (1, None), "data.synthetic.size": (8, None),
          "model.embedding_size": (1, None), "model.dropout": (0.0, 1.0), "head.s": (0.0, None),
          "optim.lr": (0.0, None), "optim.momentum": (0.0, 1.0), "optim.weight_decay": (0.0, None),
          "optim.warmup_steps": (0, None), "optim.grad_clip": (0.0, None), "optim.defense_lr": (0.0, None),
          "train.steps": (0, None), "train.epochs": (0, None), "train.n_fr": (1, None), "train.n_pi": (0, None),
          "train.log_every": (0, None), "train.utility_every": (0, None), "train.ckpt_every": (0, None),
          "train.privacy_weight": (0.0, None), "policy.hidden": (1, None), "policy.lr": (0.0, None),
          "policy.k": (1, None), "policy.ema": (0.0, 1.0), "policy.entropy_coef": (0.0, None),
          "reward.utility_target": (0.0, 1.0), "reward.mu_max": (0.0, None), "reward.momentum": (0.0, 1.0),
          "reward.attacker.weight": (0.0, 1.0), "reward.attacker.width": (1, None), "reward.attacker.size": (4, None),
          "reward.attacker.lr": (0.0, None), "reward.attacker.steps": (1, None),
          "teacher.weight": (0.0, None), "eval.pairs": (1, None), "eval.every": (0, None), "eval.final_pairs": (1, None), "eval.batch_size": (1, 128)}


#: keys added to the schema after runs were recorded, with the value that reproduces what a run did before the
#: key existed. A recorded config that lacks such a key and a new config holding this value describe the same
#: run: :func:`without_neutral` drops them before configs are compared or fingerprinted (benchmark reuse,
#: attack caches, resume checks), so adding a key with a neutral default never invalidates finished runs.
#: A new key whose default changes what runs compute must not be listed here.
NEUTRAL_DEFAULTS = {
    "data.copies": 1,
    "model.init": None,
    "optim.pretrained_lr_scale": 1.0,
    "reward.attacker": {"name": "none", "weight": 0.0, "width": 32, "size": 28, "lr": 0.001, "steps": 1},
}


def without_neutral(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``cfg`` without the :data:`NEUTRAL_DEFAULTS` keys that hold their neutral value."""
    import copy
    out = copy.deepcopy(cfg)
    for dotted, neutral in NEUTRAL_DEFAULTS.items():
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and node[last] == neutral:
            del node[last]
    return out


class ConfigKeyError(KeyError):
    """An unknown config key (a ``KeyError`` whose message prints without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def default_base_path() -> Path:
    """``configs/base.yaml`` of the repository (the schema every config is checked against)."""
    return _PKG_CONFIGS / "base.yaml"


def _read_yaml(path: Path) -> Dict[str, Any]:
    return read_yaml_mapping(path, "config")


def read_config_file(path: PathLike, _seen: Optional[List[Path]] = None) -> Dict[str, Any]:
    """Read a config file with its ``_base_`` chain resolved (no validation)."""
    path = Path(path).resolve()
    seen = list(_seen or [])
    if path in seen:
        raise ValueError(f"config inheritance loop: {' -> '.join(str(p) for p in seen + [path])}")
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: Dict[str, Any] = {}
    for b in bases:
        if not isinstance(b, str):
            raise ValueError(f"{path}: _base_ must be a file name or a list of them, got {b!r}")
        merged = deep_merge(merged, read_config_file(path.parent / b, seen + [path]))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple:
    """``"a.b=value"`` -> ``(["a", "b"], parsed value)`` (the value is parsed as YAML)."""
    key, value = parse_key_value(text, "override", "dotted.key=value (e.g. train.steps=4)")
    if any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key part")
    return key.split("."), value


def set_dotted(cfg: Dict[str, Any], parts: List[str], value: Any) -> None:
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"cannot set {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _free(prefix: str) -> bool:
    return any(prefix == f or prefix.startswith(f + ".") for f in FREE_FORM)


def validate(cfg: Dict[str, Any], schema: Dict[str, Any], prefix: str = "") -> None:
    """Raise ``KeyError`` for a key of ``cfg`` that ``schema`` does not have (with suggestions)."""
    for k, v in cfg.items():
        dotted = f"{prefix}{k}"
        if _free(dotted):
            continue
        if k not in schema:
            known = sorted(schema)
            close = difflib.get_close_matches(str(k), [str(x) for x in known], n=1)
            hint = f" (did you mean {prefix}{close[0]!s}?)" if close else ""
            where = f"section {prefix[:-1]!r}" if prefix else "the top level"
            raise ConfigKeyError(f"unknown config key {dotted!r}{hint}; known keys in {where}: "
                           f"{', '.join(str(x) for x in known)}")
        if isinstance(schema[k], dict) and v is not None and not isinstance(v, dict) and not _free(dotted):
            raise ValueError(f"config section {dotted!r} must be a mapping of keys, got {v!r}")
        if isinstance(v, dict) and isinstance(schema[k], dict):
            validate(v, schema[k], dotted + ".")
        elif isinstance(v, dict) and schema[k] is not None and not _free(dotted):
            raise ValueError(f"config key {dotted!r} must be a {type(schema[k]).__name__}, got a mapping")
        else:
            check_value(dotted, v, schema[k])


def check_value(key: str, value: Any, default: Any) -> None:
    """Refuse a value of the wrong type (``batch_size: 3.7``, ``epochs: true``, ``steps: abc``) or out of
    range, naming the key. The type is the default's (``NULLABLE`` for keys whose default is null)."""
    if value is None or isinstance(default, dict):
        return
    want = NULLABLE.get(key, type(default) if default is not None else None)
    if want is None:
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list)}.get(want, lambda v: True)
    if key == "run.resume" and isinstance(value, (str, os.PathLike)):
        return
    if key == "reward.cost" and isinstance(value, (str, list)):
        return
    if not ok(value):
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}[want]
        raise ValueError(f"config key {key!r} must be {name}, got {value!r}")
    lo, hi = RANGES.get(key, (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"config key {key!r} must be in [{'-inf' if lo is None else lo}, "
                         f"{'inf' if hi is None else hi}], got {value!r}")


def load_config(path: PathLike, overrides: Iterable[str] = (), base: Optional[PathLike] = None,
                check: bool = True) -> Dict[str, Any]:
    """Load ``path`` (with its ``_base_`` chain), apply ``overrides`` and check every key
    against the schema ``base`` (default ``configs/base.yaml``), then fill in the defaults from
    it. Configs with ``method: arl`` are returned as read (ARL checks its own schema)."""
    cfg = read_config_file(path)
    for ov in overrides:
        parts, value = parse_override(ov)
        set_dotted(cfg, parts, value)
    if str(cfg.get("method") or "").lower() == "arl":
        return cfg   # ARL has its own schema (hybridmask.defenses.arl merges and checks it)
    if check:
        schema_path = Path(base) if base is not None else default_base_path()
        schema = read_config_file(schema_path) if schema_path.is_file() else None
        if schema is not None:
            validate(cfg, schema)
            cfg = deep_merge(schema, cfg)
    cfg["_source_"] = str(Path(path))
    return cfg


def dump_config(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump({k: v for k, v in cfg.items() if k != "_source_"}, sort_keys=False)
