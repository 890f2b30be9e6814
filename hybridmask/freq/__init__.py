"""Frequency-domain masking: colour transform, block DCT, PPFR-FD, frequency MixUp, HybridMask."""
from .channels import (NUM_CHANNELS, NUM_FREQ, channel_index, resolve_drop, split_channels, zigzag_order,
                       zigzag_position)
from .color import rgb_to_ycbcr, ycbcr_to_rgb
from .dct import BlockDCT, block_basis, block_dct, block_idct, dct_matrix, zero_fill
from .hybrid import HybridMask
from .mixup import Draw, FreqMixUp, MixRecord, sample_weights
from .ppfrfd import PPFRFD
from .transforms import BatchMask, MaskedDataset, MaskTransform

__all__ = [
    "NUM_CHANNELS", "NUM_FREQ", "channel_index", "resolve_drop", "split_channels", "zigzag_order", "zigzag_position",
    "rgb_to_ycbcr", "ycbcr_to_rgb", "BlockDCT", "block_basis", "block_dct", "block_idct", "dct_matrix", "zero_fill",
    "HybridMask", "Draw", "FreqMixUp", "MixRecord", "sample_weights", "PPFRFD", "BatchMask", "MaskedDataset", "MaskTransform",
]
