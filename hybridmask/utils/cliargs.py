"""argparse ``type=`` checkers shared by every subcommand: one clear message naming what was expected."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def positive_int(text: str) -> int:
    """``--batch-size 0`` / ``-3`` / ``3.7`` / ``abc`` -> an argparse error naming the flag."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def bounded_float(lo: float, hi: float, what: str, lo_open: bool = False, hi_open: bool = False
                  ) -> Callable[[str], float]:
    """A checker for a finite number in ``[lo, hi]`` (``lo_open``/``hi_open``: exclusive ends)."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text}")
        return v
    return check


__all__ = ["positive_int", "bounded_float"]
