"""The ``hybridmask`` command line.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``hybridmask
--help`` stays fast and a missing optional dependency only affects the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

# before any subcommand imports torch: spinning OpenMP waits make torch up to 10x slower on shared cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("hybridmask.train.cli", "train a recognizer (and the masking policy) from a YAML config"),
    "eval": ("hybridmask.eval.cli", "1:1 verification on LFW / CFP-FP / CFP-FF / AgeDB (.bin or folders)"),
    "verify": ("hybridmask.eval.verify_cli", "same / different for a CSV of photo pairs (accuracy, TAR@FAR, AUC with labels)"),
    "align": ("hybridmask.data.align", "detect, landmark and align raw photos to 112x112 ArcFace crops"),
    "make-bin": ("hybridmask.data.make_bin", "build an insightface-style .bin verification file"),
    "attack": ("hybridmask.attacks.cli", "run model-inversion attacks against a defense"),
    "benchmark": ("hybridmask.benchmark", "privacy-utility benchmark of all defenses"),
    "frontier": ("hybridmask.benchmark.frontier", "privacy-utility frontier: a sweep of masking configurations "
                                                  "through the benchmark, Pareto front plotted"),
    "mask": ("hybridmask.freq.cli", "mask a folder of faces and write the zero-filled inverse as PNGs"),
    "policy-demo": ("hybridmask.policy.demo", "collapse demo on the toy game / what the policy context sees on real faces"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridmask", description=__doc__.splitlines()[0])
    from hybridmask import __version__
    p.add_argument("--version", action="version", version=f"hybridmask {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help / version / error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"hybridmask {name}: not available ({e})", file=sys.stderr)
        return 2
    sp = argparse.ArgumentParser(prog=f"hybridmask {name}", description=help_)
    module.add_arguments(sp)
    args = sp.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        # bad input: one clear message, no traceback
        print(f"hybridmask {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
