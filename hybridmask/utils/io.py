"""Atomic file writes and safe loading.

Nothing half-written is ever left at the destination path: data goes to a temporary file in
the same directory, is flushed and fsynced, then moved over the target with :func:`os.replace`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Context manager yielding a file object; the file appears at ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a partial file behind."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def safe_torch_load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated or not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def read_yaml_mapping(path: PathLike, what: str = "config") -> dict:
    """Read a YAML file whose top level is a mapping (an empty file gives ``{}``); clear errors for a
    missing file, bad YAML or another top-level type (``what`` names the file in them)."""
    import yaml
    return _read_mapping(path, what, yaml.safe_load, yaml.YAMLError)


def read_json_mapping(path: PathLike, what: str = "JSON file") -> dict:
    """Same as :func:`read_yaml_mapping` for a JSON file."""
    import json
    return _read_mapping(path, what, json.loads, json.JSONDecodeError)


def _read_mapping(path: PathLike, what: str, loads, errors) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        data = loads(path.read_text())
    except errors as e:
        raise ValueError(f"cannot parse {what} {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must be a mapping at the top level, got {type(data).__name__}")
    return data


def parse_key_value(text: str, what: str = "override", example: str = "key=value"):
    """``"key=value"`` -> ``(key, value)``: the key stripped, the value parsed as YAML (``4`` an int,
    ``[2, 4]`` a list, ``null`` or nothing None). Used by config overrides and CLI ``--*-arg`` options."""
    import yaml
    if "=" not in text:
        raise ValueError(f"{what} {text!r} must look like {example}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"{what} {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {text!r}: cannot parse the value: {e}") from None
    return key, value
