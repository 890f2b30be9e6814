"""``python -m hybridmask ...``: the same entry point as the ``hybridmask`` console script."""
import sys

from hybridmask.cli import main

if __name__ == "__main__":
    sys.exit(main())
