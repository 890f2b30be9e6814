"""Small shared utilities: secure randomness, atomic file writes, input validation, registries."""
from .rng import make_generator, generator_state, set_generator_state
from .io import (atomic_write, atomic_save, check_writable_dir, check_writable_file, file_sha256, parse_key_value,
                 read_json_mapping, read_yaml_mapping, remove_stale_temporaries, safe_torch_load, FolderBusyError,
                 FolderLock)
from .validate import check_images, check_freq, HybridMaskInputError
from .registry import Registry
from .common import deep_merge, resolve_device, run_in_batches

__all__ = [
    "make_generator", "generator_state", "set_generator_state",
    "atomic_write", "atomic_save", "file_sha256", "safe_torch_load", "read_yaml_mapping", "read_json_mapping", "parse_key_value",
    "remove_stale_temporaries", "check_writable_dir", "check_writable_file", "FolderLock", "FolderBusyError",
    "check_images", "check_freq", "HybridMaskInputError", "Registry",
    "deep_merge", "resolve_device", "run_in_batches",
]
