"""Atomic file writes and safe loading.

Nothing half-written is ever left at the destination path: data goes to a temporary file in
the same directory, is flushed and fsynced, then moved over the target with :func:`os.replace`.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


# atomic_write's temporaries: ".<name>.<8 random characters from mkstemp>.tmp" next to the target
_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", private: bool = False,
                 permissions: Optional[int] = None) -> Iterator[Any]:
    """Context manager yielding a file object; the file appears at ``path`` only on success.

    ``mode`` is the ``open`` mode (``"wb"`` or ``"w"``). File permissions: ``private=True`` keeps
    the file owner-only (0600) from its first byte on -- for anything holding secrets (masking
    generator states, key permutations); ``permissions`` sets an explicit mode; otherwise the file
    gets the mode a plain ``open()`` would give (0666 minus the umask). The temporary file is named
    ``.<name>.XXXXXXXX.tmp`` in the same folder; a killed process can leave one behind, which
    :func:`remove_stale_temporaries` cleans up.
    """
    if not isinstance(mode, str) or not mode.startswith("w"):
        raise ValueError(f"atomic_write: mode must be a write mode ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        if permissions is not None:
            os.chmod(tmp, int(permissions) & 0o7777)
        elif not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        # private: mkstemp already created it 0600, so the secret is never readable by others
        with os.fdopen(fd, mode) as f:
            fd = None
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: PathLike, older_than: Optional[float] = 3600.0,
                             recursive: bool = False) -> List[Path]:
    """Delete the ``.<name>.XXXXXXXX.tmp`` files :func:`atomic_write` leaves when its process is
    killed mid-write; returns the removed paths.

    Only regular files matching exactly that pattern are touched (never symlinks, folders or any
    other file). ``older_than``: only temporaries last modified at least that many seconds ago
    (the default hour spares a write in progress by another live process); ``None`` or ``0``: all
    of them. ``recursive``: also in sub-folders. A missing folder removes nothing.
    """
    if older_than is not None and (isinstance(older_than, bool) or not isinstance(older_than, (int, float))
                                   or older_than < 0):
        raise ValueError(f"older_than must be a number of seconds >= 0 or None, got {older_than!r}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - float(older_than or 0)
    removed: List[Path] = []
    for p in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        if not _TEMP_PATTERN.match(p.name):
            continue
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or (older_than and st.st_mtime > cutoff):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def check_writable_dir(path: PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Make sure files can be created in ``path`` (created with its parents when ``create``):
    one clear ``ValueError`` naming ``what`` otherwise (not a folder, no permission, read-only)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a folder")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise ValueError(f"{what} {path} does not exist")
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=str(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


def check_writable_file(path: PathLike, what: str = "output file") -> Path:
    """``path`` can be written (atomically): not a folder, and its folder is writable (created if
    missing). One clear ``ValueError`` naming ``what`` otherwise; nothing is left behind."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, expected a file path")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what=f"folder of the {what}")
    return path


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj: Any, path: PathLike, private: bool = False) -> None:
    """``torch.save`` that never leaves a partial file behind; ``private=True`` for files holding
    secrets (checkpoints with masking generator states or keys): mode 0600 from the start."""
    with atomic_write(path, "wb", private=private) as f:
        torch.save(obj, f)


MANIFEST = "SHA256SUMS"


def verify_manifest(path: PathLike) -> None:
    """When the folder of ``path`` has a ``SHA256SUMS`` manifest (``sha256sum`` format) that lists the
    file, refuse a file whose SHA-256 differs (published artifacts such as ``policies/*.pt``: a flipped
    byte must not load as other weights)."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if not manifest.is_file():
        return
    for line in manifest.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == path.name:
            got = file_sha256(path)
            if got != parts[0].lower():
                raise ValueError(f"{path} does not match its SHA-256 in {manifest} (expected {parts[0][:16]}..., got "
                                 f"{got[:16]}...): the file is corrupted or was changed; restore the published file")
            return


def write_manifest_entry(path: PathLike) -> str:
    """Record ``path``'s SHA-256 in its folder's ``SHA256SUMS`` (replacing an earlier line); returns the hex."""
    path = Path(path)
    digest = file_sha256(path)
    manifest = path.parent / MANIFEST
    lines = [ln for ln in (manifest.read_text().splitlines() if manifest.is_file() else [])
             if ln.split() and ln.split()[-1].lstrip("*") != path.name]
    lines.append(f"{digest}  {path.name}")
    with atomic_write(manifest, "w") as f:
        f.write("\n".join(sorted(lines, key=lambda ln: ln.split()[-1])) + "\n")
    return digest


def safe_torch_load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with clear errors for missing or corrupt files (and for files
    whose folder's ``SHA256SUMS`` says otherwise, :func:`verify_manifest`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_manifest(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, not a torch file, or objects a weights-only load refuses
        msg = str(e)
        if "weights_only" in msg or "Weights only load failed" in msg or "WeightsUnpickler" in msg:
            raise ValueError(f"cannot read checkpoint {path}: it holds objects that a safe (weights-only) load "
                             f"refuses ({_strip_unsafe_advice(msg)}); hybridmask never unpickles arbitrary "
                             f"objects, so re-save it with plain tensors and containers") from None
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


# sentences of torch's weights-only error that advise loading the file unsafely or allow-listing its globals
_UNSAFE_ADVICE = ("weights_only", "weights only load failed", "safe_globals", "trusted source", "do it only if",
                  "check the documentation", "arbitrary code execution", "allowlist")


def _strip_unsafe_advice(msg: str) -> str:
    """torch's weights-only load error without its advice to retry with ``weights_only=False`` or to
    allow-list the offending globals: only the sentences saying what was refused."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", msg) if p.strip()]
    keep = [p for p in parts if not any(a in p.lower() for a in _UNSAFE_ADVICE)]
    keep = [re.sub(r"^\(?\d\)\s*", "", p) for p in keep]
    return " ".join(p for p in keep if p) or "unsupported object"


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


class FolderBusyError(ValueError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on a folder (``<folder>/.lock``), held while a run writes there: a second
    process gets :class:`FolderBusyError` naming the holder. The lock is an OS file lock (``flock``), so
    a killed holder releases it at once; the file keeps the last holder's pid, host and start time.

        with FolderLock(run_dir, what="training run"):
            ...
    """

    def __init__(self, folder: PathLike, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        import fcntl
        import socket
        import time
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusyError(f"{self.what} folder {self.folder} is in use by {holder}; wait for it to finish, "
                                  f"or choose another folder (e.g. another run.name)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
