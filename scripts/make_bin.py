#!/usr/bin/env python
"""Build an insightface-style .bin verification file (same as `hybridmask make-bin`).

    python scripts/make_bin.py --target lfw --data ../shared/data/faces --out lfw.bin
"""
import sys

from hybridmask.data.make_bin import main

if __name__ == "__main__":
    sys.exit(main())
