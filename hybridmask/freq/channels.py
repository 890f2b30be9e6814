"""Channel layout of the block-DCT tensor and named channel sets.

The BDCT tensor has ``3 * 64`` channels: channel ``c * 64 + i`` is colour ``c`` (0=Y, 1=Cb,
2=Cr) and frequency ``i = row * 8 + col`` in the 8x8 block (row = vertical frequency,
col = horizontal frequency; ``i = 0`` is DC).

Named channel sets (what PPFR-FD *drops*):

* ``"none"``  - nothing.
* ``"dc"``    - the DC channel of each colour: ``[0, 64, 128]`` (the default).
* ``"lowN"``  - the N lowest frequencies in zigzag order of each colour (``"low10"`` drops 30).
* ``"chromaN"`` - ``"dc"`` plus every Cb/Cr frequency whose zigzag position is >= N.
* a list/tuple of channel indices in ``[0, 192)``.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple, Union

NUM_FREQ = 64
NUM_COLOURS = 3
NUM_CHANNELS = NUM_COLOURS * NUM_FREQ

ChannelSpec = Union[str, Sequence[int], None]


def zigzag_order(n: int = 8) -> List[int]:
    """Row-major frequency indices of an ``n x n`` block in JPEG zigzag order."""
    order = []
    for s in range(2 * n - 1):
        diag = [(r, s - r) for r in range(n) if 0 <= s - r < n]
        if s % 2 == 0:
            diag.reverse()  # even anti-diagonals run bottom-left -> top-right
        order.extend(r * n + c for r, c in diag)
    return order


def zigzag_position(n: int = 8) -> List[int]:
    """Inverse of :func:`zigzag_order`: ``pos[i]`` is the zigzag rank of row-major index ``i``."""
    pos = [0] * (n * n)
    for rank, idx in enumerate(zigzag_order(n)):
        pos[idx] = rank
    return pos


def channel_index(colour: int, freq: int) -> int:
    if not (0 <= colour < NUM_COLOURS and 0 <= freq < NUM_FREQ):
        raise ValueError(f"colour must be in 0..2 and freq in 0..63, got {colour}, {freq}")
    return colour * NUM_FREQ + freq


def resolve_drop(drop: ChannelSpec) -> List[int]:
    """Sorted list of dropped channel indices for a named set or an index list."""
    if drop is None:
        return []
    if isinstance(drop, str):
        name = drop.strip().lower()
        if name == "none":
            return []
        if name == "dc":
            return [channel_index(c, 0) for c in range(NUM_COLOURS)]
        m = re.fullmatch(r"low(\d+)", name)
        if m:
            n = int(m.group(1))
            if not 1 <= n <= NUM_FREQ:
                raise ValueError(f"channel set {drop!r}: N must be in 1..64")
            zz = zigzag_order()[:n]
            return sorted(channel_index(c, f) for c in range(NUM_COLOURS) for f in zz)
        m = re.fullmatch(r"chroma(\d+)", name)
        if m:
            n = int(m.group(1))
            if not 1 <= n <= NUM_FREQ:
                raise ValueError(f"channel set {drop!r}: N must be in 1..64")
            pos = zigzag_position()
            dropped = {channel_index(c, 0) for c in range(NUM_COLOURS)}
            dropped |= {channel_index(c, f) for c in (1, 2) for f in range(NUM_FREQ) if pos[f] >= n}
            return sorted(dropped)
        raise ValueError(f"unknown channel set {drop!r}; use 'none', 'dc', 'lowN', 'chromaN' or a list of indices")
    try:
        idx = sorted({int(i) for i in drop})
    except TypeError:
        raise ValueError(f"channel set must be a name or a list of ints, got {drop!r}") from None
    bad = [i for i in idx if not 0 <= i < NUM_CHANNELS]
    if bad:
        raise ValueError(f"channel indices must be in [0, {NUM_CHANNELS}), got {bad}")
    return idx


def split_channels(drop: ChannelSpec) -> Tuple[List[int], List[int]]:
    """(dropped, kept) sorted channel index lists."""
    dropped = resolve_drop(drop)
    s = set(dropped)
    kept = [i for i in range(NUM_CHANNELS) if i not in s]
    if not kept:
        raise ValueError("channel set drops every channel; nothing would be left")
    return dropped, kept
