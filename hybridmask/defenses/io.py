"""One way to rebuild a defense: :func:`load_defense`, with fresh secrets.

    from hybridmask.defenses import load_defense, save_defense
    d = load_defense("outputs/celeba_dctdp")             # a run folder: its trained defense
    d = load_defense("outputs/quickstart/model.pt")      # a recognizer: the defense it was trained behind
    d = load_defense("policies/quickstart.pt")           # a policy file: the adaptive defense with it
    d = load_defense("freq_mixup", overrides={"k": 4})   # a registered name, or a YAML file
    save_defense("my_defense.pt", d)                     # config + learned state, no secrets

Every file hybridmask writes records a defense the same way: its ``config`` under ``defense`` and its
learned values (:meth:`~hybridmask.defenses.base.Defense.defense_state`) under ``defense_state``, at
the top level (defense files ``hybridmask.defense``, trainer checkpoints ``hybridmask.trainer``) or
in ``extra`` (recognizers ``hybridmask.recognizer``). Policy files (``hybridmask.policy``) give the
adaptive defense with that policy. Nothing secret is read from any of them: every rebuilt defense
draws fresh secrets (``seed=None``: secure OS seed). A checkpoint that records no defense raises
:class:`DefenseNotRecordedError`: a checkpoint never silently means "no defense".

**Client keys.** A defense with a client key (PPFR-FD's ``shuffle="key"`` / ``"keys:R"``, ``mix="orthogonal"``,
``subset_keys=R``) needs the same key at query time as in training. A key is the ``(R, C)`` permutation
tensor alone, or a dict of its parts (``perm``, ``orthogonal``, ``subsets``) when it has others. The key lives in its own file, written by
:func:`save_client_key` (mode 0600: as secret as the key); a checkpoint records only its SHA-256
``key_fingerprint``. ``load_defense(model.pt, key=PATH)`` installs the key and refuses another key
(:class:`ClientKeyMismatchError`); without ``key=`` a keyed model's defense draws a fresh key and
``load_defense`` warns that its queries will not match the model.

**Public pools.** A defense whose MixUp partners (of training releases, and of queries with ``query_k > 1``)
come from a public pool of faces records the pool in its config as ``pool: PATH`` (a folder of aligned
faces or a ``.pt`` tensor file) with ``pool_sha256``, the SHA-256 of its content (:func:`pool_fingerprint`).
:class:`PublicPool` checks the fingerprint when the defense is rebuilt and loads the faces on first use; a
missing or changed pool raises :class:`PublicPoolError` naming it. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..utils import atomic_save, read_yaml_mapping, safe_torch_load
from ..utils.rng import SeedLike
from .base import DEFENSES, Defense, create_defense, list_defenses

PathLike = Union[str, os.PathLike]

DEFENSE_FORMAT = "hybridmask.defense"
RECOGNIZER_FORMAT = "hybridmask.recognizer"
POLICY_FORMAT = "hybridmask.policy"
CLIENT_KEY_FORMAT = "hybridmask.client_key"
TRAINER_FORMAT = "hybridmask.trainer"
#: file names a run folder may hold its defense in, in the order they are looked for
RUN_FILES = ("defense.pt", "model.pt", os.path.join("ckpt", "last.pt"))


class DefenseNotRecordedError(ValueError):
    """A checkpoint that does not say which defense its model was trained behind."""


class ClientKeyMismatchError(ValueError):
    """A client key that is not the one the model was trained with."""


class PublicPoolError(ValueError):
    """A public pool that is missing, unreadable, or not the one a defense recorded (its SHA-256 differs)."""


class PublicPoolMissing(PublicPoolError):
    """A public pool whose path does not exist (yet)."""


# ---- public pools ----------------------------------------------------------------------------------
#: keys a ``.pt`` pool file may hold its faces under (else the file is the tensor itself)
POOL_TENSOR_KEYS = ("images", "faces")


def _pool_files(folder: Path) -> List[Path]:
    """The image files of a pool folder (recursively), in the order of their relative POSIX paths."""
    from ..data.image import is_image_file
    files = [p for p in folder.rglob("*") if p.is_file() and is_image_file(p.name)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _fingerprint_parts(folder: Path, files: List[Path]):
    """SHA-256 over each image file's relative path, size and bytes; yields ``(path, bytes)`` as it reads."""
    h = hashlib.sha256(b"hybridmask.pool.folder\n")
    out = []
    for p in files:
        data = p.read_bytes()
        h.update(f"{p.relative_to(folder).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
        out.append((p, data))
    return h.hexdigest(), out


def pool_fingerprint(pool: Union[PathLike, torch.Tensor]) -> str:
    """The SHA-256 content fingerprint of a public pool: a ``.pt`` file's bytes; for a folder, each image file's
    relative path, size and bytes in path order (other files are ignored); for a tensor, its dtype, shape and
    bytes."""
    if isinstance(pool, torch.Tensor):
        t = pool.detach().cpu().contiguous()
        h = hashlib.sha256(f"hybridmask.pool.tensor\n{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        return h.hexdigest()
    path = Path(pool)
    if path.is_dir():
        return _fingerprint_parts(path, _pool_files(path))[0]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pool_faces(obj, path: Path) -> torch.Tensor:
    if isinstance(obj, Mapping):
        key = next((k for k in POOL_TENSOR_KEYS if isinstance(obj.get(k), torch.Tensor)), None)
        if key is None:
            raise PublicPoolError(f"public pool {path}: a dict pool file needs the faces under one of "
                                  f"{list(POOL_TENSOR_KEYS)}, got keys {sorted(map(str, obj))}")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise PublicPoolError(f"public pool {path}: expected a (N, 3, H, W) tensor of faces, got {type(obj).__name__}")
    if obj.dtype == torch.uint8:
        return obj.float() / 127.5 - 1
    if not obj.is_floating_point():
        raise PublicPoolError(f"public pool {path}: faces must be float in [-1, 1] or uint8, got {obj.dtype}")
    return obj.float()


def read_pool(path: PathLike) -> Tuple[torch.Tensor, str]:
    """Read a public pool -> ``(faces (N, 3, H, W) float in [-1, 1], its fingerprint)``, hashing the bytes it
    decodes (a file changed between a check and the read cannot slip through)."""
    import io as _io
    from ..utils.validate import check_images
    path = Path(path)
    if path.is_dir():
        from ..data.image import decode_image
        fp, parts = _fingerprint_parts(path, _pool_files(path))
        if not parts:
            raise PublicPoolError(f"public pool {path} holds no image files")
        try:
            faces = [decode_image(data, str(p), size=None) for p, data in parts]
        except ValueError as e:
            raise PublicPoolError(f"public pool {path}: {e}") from None
        sizes = sorted({tuple(f.shape) for f in faces})
        if len(sizes) > 1:
            raise PublicPoolError(f"public pool {path}: its faces must all have one size (aligned faces), "
                                  f"got {[f'{s[2]}x{s[1]}' for s in sizes[:4]]}")
        faces = torch.stack(faces)
    elif path.is_file():
        data = path.read_bytes()
        fp = hashlib.sha256(data).hexdigest()
        try:
            obj = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise PublicPoolError(f"public pool {path}: cannot read it as a (weights-only) torch file: "
                                  f"{type(e).__name__}: {e}") from None
        faces = _pool_faces(obj, path)
    else:
        raise PublicPoolError(f"public pool {path} not found")
    try:
        check_images(faces, f"public pool {path}", channels=3)
    except ValueError as e:
        raise PublicPoolError(str(e)) from None
    if not faces.shape[0]:
        raise PublicPoolError(f"public pool {path} holds no faces")
    return faces, fp


def _check_sha(sha256) -> Optional[str]:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
        raise ValueError(f"pool_sha256 must be a 64-digit hex SHA-256 (as recorded in a defense config), "
                         f"got {sha256!r}")
    return sha256.lower()


class PublicPool:
    """A public pool of aligned faces in a file: a folder of images (recursively, in path order) or a ``.pt``
    file holding a ``(N, 3, H, W)`` tensor (float in [-1, 1] or uint8; or a dict with it under ``images`` /
    ``faces``). Built, it checks that the pool exists and that its content matches ``sha256`` (the recorded
    fingerprint; None: record the current one); called, it loads the faces (once) and checks again.
    Relative paths are taken from the working directory."""

    def __init__(self, path: PathLike, sha256: Optional[str] = None):
        self.path = Path(path)
        self.spec = str(path)
        sha256 = _check_sha(sha256)
        if not self.path.exists():
            raise PublicPoolMissing(f"public pool {self.spec} not found" + (
                f" (the defense was built with the pool of SHA-256 {sha256[:16]}...: put that pool at this path, or "
                f"give its new place with overrides={{'pool': PATH}})" if sha256 else ""))
        fp = pool_fingerprint(self.path)
        if sha256 is not None and fp != sha256:
            raise PublicPoolError(self._changed(fp, sha256))
        self.sha256 = fp
        self._faces: Optional[torch.Tensor] = None

    def _changed(self, got: str, expected: str) -> str:
        return (f"public pool {self.spec} changed: its content has SHA-256 {got[:16]}..., the defense recorded "
                f"{expected[:16]}... (restore the pool it was built with; a recognizer trained behind one pool "
                f"was trained on its faces)")

    def __call__(self) -> torch.Tensor:
        if self._faces is None:
            faces, fp = read_pool(self.path)
            if fp != self.sha256:
                raise PublicPoolError(self._changed(fp, self.sha256))
            self._faces = faces
        return self._faces

    def __repr__(self) -> str:
        return f"PublicPool({self.spec!r}, sha256={self.sha256[:12]}...)"


def resolve_pool(pool, pool_sha256: Optional[str] = None, where: str = "defense"):
    """A defense's ``pool`` / ``pool_sha256`` arguments -> ``(source, config entries)``: ``source`` is None, the
    tensor itself, or a :class:`PublicPool` (loaded on first use); the entries record ``pool`` (the path as
    given; None for an in-memory tensor) and ``pool_sha256`` (its content fingerprint)."""
    sha = _check_sha(pool_sha256)
    if pool is None:
        if sha is not None:
            raise ValueError(f"{where}: pool_sha256 is set but pool is None: the defense was built with an in-memory "
                             f"pool tensor (SHA-256 {sha[:16]}...); pass the same faces as pool=<tensor> (e.g. "
                             f"load_defense(..., overrides={{'pool': faces}}))")
        return None, {}
    if isinstance(pool, torch.Tensor):
        fp = pool_fingerprint(pool)
        if sha is not None and fp != sha:
            raise PublicPoolError(f"{where}: the pool tensor given has SHA-256 {fp[:16]}..., the defense recorded "
                                  f"{sha[:16]}... (not the pool it was built with)")
        return pool, {"pool": None, "pool_sha256": fp}
    if isinstance(pool, PublicPool):
        if sha is not None and pool.sha256 != sha:
            raise PublicPoolError(pool._changed(pool.sha256, sha))
        return pool, {"pool": pool.spec, "pool_sha256": pool.sha256}
    if isinstance(pool, (str, os.PathLike)):
        src = PublicPool(pool, sha)
        return src, {"pool": src.spec, "pool_sha256": src.sha256}
    raise ValueError(f"{where}: pool must be a path (a folder of aligned faces or a .pt tensor file), a (N, 3, H, W) "
                     f"tensor or None, got {type(pool).__name__}")


# ---- records ---------------------------------------------------------------------------------------
def defense_record(defense: Defense) -> Dict[str, Any]:
    """``{"defense": config, "defense_state": learned values}``: what every checkpoint stores; plus the
    ``key_fingerprint`` (never the key) of a defense with a client key."""
    record = {"defense": _plain(defense.config), "defense_state": defense.defense_state() or None}
    key = defense.client_key()
    if key is not None:
        record["key_fingerprint"] = key_fingerprint(key)
    return record


# ---- client keys -----------------------------------------------------------------------------------
def key_fingerprint(keys) -> str:
    """SHA-256 (hex) of a client key's bytes: safe to store beside a model. A tensor key (permutations):
    its bytes as int64, C order (the original fingerprint). A dict key: for each part in name order, a
    ``name:dtype:shape`` line and its bytes (integers as int64, floats as float64)."""
    if isinstance(keys, Mapping):
        h = hashlib.sha256()
        for name in sorted(keys):
            t = torch.as_tensor(keys[name]).detach().to("cpu")
            t = t.to(torch.float64 if t.is_floating_point() else torch.int64).contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()
    keys = torch.as_tensor(keys).detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(keys.numpy().tobytes()).hexdigest()


def _copy_key(keys):
    if isinstance(keys, Mapping):
        return {str(k): v.detach().cpu().clone() for k, v in keys.items()}
    return keys.detach().cpu().clone()


def _check_key(keys, path) -> None:
    """A key file's ``keys``: an (R, C) integer tensor, or a dict of known parts of the right kinds."""
    if isinstance(keys, Mapping):
        from ..freq.ppfrfd import KEY_PARTS
        unknown = sorted(set(keys) - set(KEY_PARTS))
        if not keys or unknown:
            raise ValueError(f"{path}: 'keys' must hold parts of {KEY_PARTS}, got {sorted(keys)}")
        for name, t in keys.items():
            want_float = name == "orthogonal"
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point != want_float:
                raise ValueError(f"{path}: client key part {name!r} must be a 2-D "
                                 f"{'float' if want_float else 'integer'} tensor")
        return
    if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.dtype.is_floating_point:
        raise ValueError(f"{path}: 'keys' must be an (R, C) integer tensor (or a dict of key parts)")


def save_client_key(path: PathLike, defense: Defense) -> str:
    """Write ``defense``'s client key to ``path`` (mode 0600, atomically); returns its fingerprint.
    Raises ``ValueError`` for a defense without a client key."""
    keys = defense.client_key()
    if keys is None:
        raise ValueError(f"defense {defense.name!r} has no client key to save")
    fp = key_fingerprint(keys)
    # version 1: the permutation tensor alone (readable by older hybridmask); 2: a dict of key parts
    version = 2 if isinstance(keys, Mapping) else 1
    atomic_save({"format": CLIENT_KEY_FORMAT, "format_version": version, "keys": _copy_key(keys),
                 "fingerprint": fp, "defense": _plain(defense.config)}, path, private=True)
    return fp


def load_client_key(path: PathLike) -> Dict[str, Any]:
    """A client key file -> ``{"keys": tensor or dict of parts, "fingerprint": str, "defense": config}``
    (checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"client key file not found: {path}")
    blob = safe_torch_load(path)
    if not isinstance(blob, Mapping) or blob.get("format") != CLIENT_KEY_FORMAT:
        raise ValueError(f"{path} is not a hybridmask client key file (format {CLIENT_KEY_FORMAT!r})")
    version = blob.get("format_version", 1)
    if not isinstance(version, int) or version > 2:
        raise ValueError(f"{path}: client key format version {version!r} is not supported")
    keys = blob.get("keys")
    _check_key(keys, path)
    fp = key_fingerprint(keys)
    if blob.get("fingerprint") != fp:
        raise ValueError(f"{path}: the key does not match its recorded fingerprint (the file is corrupted)")
    return {"keys": keys, "fingerprint": fp, "defense": blob.get("defense")}


def install_client_key(defense: Defense, key: PathLike, expected: Optional[str] = None,
                       where: str = "defense") -> Defense:
    """Install the client key of the file ``key`` into ``defense``; ``expected``: the fingerprint the
    model was trained with (a different key raises :class:`ClientKeyMismatchError`)."""
    loaded = load_client_key(key)
    if expected is not None and loaded["fingerprint"] != expected:
        raise ClientKeyMismatchError(
            f"{where}: this model was trained with another client key ({key} has fingerprint "
            f"{loaded['fingerprint'][:12]}..., the model records {str(expected)[:12]}...); pass the key file "
            f"saved by its training run (<run>/client_key.pt or its run.key_path)")
    try:
        defense.use_client_key(loaded["keys"])
    except ValueError as e:
        raise ValueError(f"{where}: cannot use the client key {key}: {e}") from None
    return defense


def save_defense(path: PathLike, defense: Defense, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``defense`` (config + learned state, no secrets) to ``path`` atomically."""
    atomic_save({"format": DEFENSE_FORMAT, "format_version": 1, **defense_record(defense),
                 "extra": dict(extra or {})}, path)


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


def build_defense(config: Mapping[str, Any], state: Optional[Mapping[str, Any]] = None, seed: SeedLike = None,
                  overrides: Optional[Mapping[str, Any]] = None, where: str = "defense config",
                  untrained: bool = False, **objects) -> Defense:
    """The defense ``config`` describes, ``overrides`` on top, its learned ``state`` loaded, fresh
    secrets from ``seed``. ``objects``: live constructor arguments that are not plain data (the
    trainer's policy, for a defense whose ``takes_policy`` is True). Refuses to rebuild a defense that
    needs learned state without it, unless ``untrained`` (a defense about to be trained)."""
    name, args = split_config(config, where)
    if name not in DEFENSES:
        raise KeyError(f"{where}: unknown defense {name!r}; available: {', '.join(list_defenses())}")
    if state:
        fixed = sorted(k for k, v in (overrides or {}).items()
                       if k in DEFENSES.get(name).state_keys and (k not in args or args[k] != v))
        if fixed:
            raise ValueError(f"{where}: cannot override {', '.join(fixed)} of a trained {name!r} defense "
                             f"(its learned values were trained at {', '.join(f'{k}={args.get(k)!r}' for k in fixed)})")
    args.update(dict(overrides or {}))
    if "policy" in objects and not DEFENSES.get(name).takes_policy:
        raise ValueError(f"{where}: defense {name!r} does not mix, so it takes no masking policy "
                         f"(set policy.name=none, or use a mixing defense such as 'adaptive')")
    try:
        defense = create_defense(name, seed=seed, **args, **objects)
    except TypeError as e:
        raise ValueError(f"{where}: defense {name!r} does not take arguments {sorted(args)}: {e}") from None
    try:
        defense.load_defense_state(dict(state) if state else None)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not state and not objects and not untrained and defense.needs_state():
        raise ValueError(f"{where}: defense {name!r} learns values during training, but none are recorded here "
                         f"(no defense_state); it would be rebuilt untrained")
    return defense


# ---- files -----------------------------------------------------------------------------------------
def recorded_defense(blob: Mapping[str, Any], path: PathLike) -> Tuple[Optional[Dict[str, Any]], Optional[Dict]]:
    """``(config, state)`` a hybridmask file records (``(None, None)`` when it records none)."""
    fmt = blob.get("format")
    if fmt == POLICY_FORMAT:   # the adaptive defense with that policy and the masking it was trained for
        pcfg, pstate = blob.get("policy_config"), blob.get("policy_state")
        if not isinstance(pcfg, Mapping) or "name" not in pcfg or not isinstance(pstate, Mapping):
            raise ValueError(f"{path}: a policy file needs policy_config (with a name) and policy_state")
        context = blob.get("context") if isinstance(blob.get("context"), Mapping) else {}
        state = {"policy_state": dict(pstate), **{k: float(context[k]) for k in ("running_loss", "progress")
                                                   if k in context}}
        return {"name": "adaptive", "policy_config": dict(pcfg), **_adaptive_masking(blob, path)}, state
    holder = blob.get("extra") if fmt == RECOGNIZER_FORMAT else blob
    if fmt not in (RECOGNIZER_FORMAT, DEFENSE_FORMAT, TRAINER_FORMAT):
        raise ValueError(f"{path}: not a hybridmask defense, recognizer, policy or trainer checkpoint (format={fmt!r})")
    if not isinstance(holder, Mapping) or holder.get("defense") is None:
        return None, None
    state = holder.get("defense_state")
    if state is not None and not isinstance(state, Mapping):
        raise ValueError(f"{path}: defense_state must be a mapping, got {type(state).__name__}")
    return dict(holder["defense"]), state


def _adaptive_masking(blob: Mapping[str, Any], path: PathLike) -> Dict[str, Any]:
    masking = blob.get("masking") or {}
    if not isinstance(masking, Mapping):
        raise ValueError(f"{path}: 'masking' must be a dict of HybridMask arguments")
    from ..freq.hybrid import CONFIG_KEYS   # the adaptive defense takes them all but k (its policy's) and alpha,
    # and the masking ladder its policy's levels were trained for (subset_by_k)
    keep = (set(CONFIG_KEYS) | {"pool", "pool_sha256", "subset_by_k"}) - {"k", "alpha", "anchor_largest"}
    return {k: v for k, v in masking.items() if k in keep}


def defense_from_checkpoint(path: PathLike, seed: SeedLike = None,
                            overrides: Optional[Mapping[str, Any]] = None, key: Optional[PathLike] = None) -> Defense:
    """The defense a hybridmask file records (see the module doc), with fresh secrets; ``key``: a client
    key file (:func:`save_client_key`), checked against the checkpoint's ``key_fingerprint``."""
    path = Path(path)
    blob = safe_torch_load(path)
    if not isinstance(blob, dict):
        raise ValueError(f"{path} is not a hybridmask checkpoint (not a dict)")
    config, state = recorded_defense(blob, path)
    if config is None:
        raise DefenseNotRecordedError(
            f"{path} does not record the defense its model was trained behind (no 'defense' entry); name the "
            f"defense explicitly (e.g. --defense none for an unprotected recognizer)")
    defense = build_defense(config, state, seed, overrides, where=str(path))
    check_fits_model(defense, blob.get("model_config"), str(path))
    holder = blob.get("extra") if blob.get("format") == RECOGNIZER_FORMAT else blob
    expected = holder.get("key_fingerprint") if isinstance(holder, Mapping) else None
    if key is not None:
        install_client_key(defense, key, expected, where=str(path))
    elif expected is not None:
        warnings.warn(f"{path}: the model was trained with a client key, but no key file was given: the rebuilt "
                      f"defense drew a fresh key, so its queries will not match the model's key (pass key=PATH, "
                      f"or --key PATH: the run's client_key.pt)", UserWarning, stacklevel=3)
    return defense


def run_file(run_dir: PathLike) -> Path:
    """The file of a run folder that records its defense (``RUN_FILES``, first found)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir} is not a training run folder (none of {', '.join(RUN_FILES)})")


def check_fits_model(defense: Defense, model_config: Optional[Mapping[str, Any]], where: str) -> None:
    """Raise ``ValueError`` when a recognizer's input (``model_config``: stem, in_chans) cannot take
    what ``defense`` releases."""
    if not isinstance(model_config, Mapping):
        return
    stem, chans = model_config.get("stem"), model_config.get("in_chans")
    if stem is not None and defense.input_kind in ("pixel", "freq") and str(stem) != defense.input_kind:
        raise ValueError(f"{where}: the model takes {stem} input but its recorded defense {defense.name!r} "
                         f"releases {defense.input_kind} input")
    if chans is not None and int(chans) != int(defense.in_channels):
        raise ValueError(f"{where}: the model takes {chans} input channels but its recorded defense "
                         f"{defense.name!r} releases {defense.in_channels}")


def load_defense(spec: Union[str, PathLike, Mapping[str, Any]], seed: SeedLike = None,
                 overrides: Optional[Mapping[str, Any]] = None, key: Optional[PathLike] = None) -> Defense:
    """The defense ``spec`` names, ``overrides`` (constructor arguments) on top, fresh secrets:

    * a mapping: a defense config (``{"name": ..., <args>}`` or a training config's ``defense:`` section);
    * a run folder: its ``defense.pt``, ``model.pt`` or ``ckpt/last.pt`` (the trained defense);
    * a ``.yaml``/``.yml`` file: ``{name: ..., <args>}`` or a training config with a ``defense:`` section;
      a run's own ``config.yaml`` gives the *trained* defense of that run;
    * any other file: a hybridmask checkpoint (:func:`defense_from_checkpoint`);
    * otherwise a registered defense name (``list_defenses()``).

    ``key``: a client key file (:func:`save_client_key`) to install; a checkpoint's recorded
    ``key_fingerprint`` must match it (:class:`ClientKeyMismatchError` otherwise).
    """
    if isinstance(spec, Mapping):
        return _with_key(build_defense(spec, None, seed, overrides), key, "defense config")
    s = str(spec)
    path = Path(s)
    if path.is_dir():
        return defense_from_checkpoint(run_file(path), seed=seed, overrides=overrides, key=key)
    if s.lower().endswith((".yaml", ".yml")):
        if path.name == "config.yaml" and any((path.parent / n).is_file() for n in RUN_FILES):
            return defense_from_checkpoint(run_file(path.parent), seed=seed, overrides=overrides, key=key)
        cfg = read_yaml_mapping(path, "defense config")
        if isinstance(cfg.get("defense"), dict):
            cfg = cfg["defense"]
        return _with_key(build_defense(cfg, None, seed, overrides, where=str(path)), key, str(path))
    if path.suffix.lower() in (".pt", ".pth", ".ckpt") or path.is_file():
        return defense_from_checkpoint(path, seed=seed, overrides=overrides, key=key)
    return _with_key(build_defense({"name": s}, None, seed, overrides, where="defense name"), key, "defense name")


def _with_key(defense: Defense, key: Optional[PathLike], where: str) -> Defense:
    return defense if key is None else install_client_key(defense, key, None, where=where)


def _plain(obj):
    """Checkpoint-friendly copy of a config (tuples -> lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


__all__ = ["load_defense", "save_defense", "build_defense", "defense_record", "defense_from_checkpoint",
           "recorded_defense", "split_config", "check_fits_model", "run_file", "DefenseNotRecordedError",
           "DEFENSE_FORMAT", "CLIENT_KEY_FORMAT", "ClientKeyMismatchError", "key_fingerprint", "save_client_key",
           "load_client_key", "install_client_key", "PublicPool", "PublicPoolError", "pool_fingerprint", "read_pool",
           "resolve_pool"]
