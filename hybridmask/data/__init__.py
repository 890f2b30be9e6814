"""Face data: identity folders, insightface .bin files, LFW/CFP protocols, synthetic faces.

Every image tensor is float32 RGB (3, 112, 112) in [-1, 1].
"""
from .image import decode_image, load_image, pil_to_tensor, tensor_to_uint8
from .folder import FaceFolder
from .binfile import BinPairs, UnsafePickleError, read_bin, restricted_loads, write_bin
from .pairs import VerificationSet, pairs_from_paths
from .protocols import read_cfp_pairs, read_lfw_pairs
from .synthetic import SyntheticFaces, synthetic_pairs

__all__ = [
    "FaceFolder", "BinPairs", "read_bin", "write_bin", "restricted_loads", "UnsafePickleError",
    "VerificationSet", "pairs_from_paths", "read_lfw_pairs", "read_cfp_pairs",
    "SyntheticFaces", "synthetic_pairs", "decode_image", "load_image", "pil_to_tensor", "tensor_to_uint8",
]
