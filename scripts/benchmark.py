#!/usr/bin/env python
"""The privacy-utility benchmark: a thin wrapper of ``hybridmask benchmark`` (same options).

    python scripts/benchmark.py --budget small --dry-run     # which runs are reused / trained, the estimate
    python scripts/benchmark.py --budget small               # docs/results_small.md, docs/results_small/

See ``hybridmask/benchmark/`` (the package) and ``configs/benchmark.yaml``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waits are ~5-10x slower on shared cores
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridmask.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
