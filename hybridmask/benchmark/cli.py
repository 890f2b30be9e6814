"""``hybridmask benchmark`` options and entry point."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from .config import BUDGETS, load_benchmark


def add_arguments(p: argparse.ArgumentParser, config: str = "configs/benchmark.yaml",
                  config_help: str = "benchmark config (defenses, attacks, budgets)") -> None:
    """The benchmark's options (``config`` / ``config_help``: the default and help of ``--config``, for
    commands built on the benchmark such as ``hybridmask frontier``)."""
    p.add_argument("--config", default=config, help=config_help)
    p.add_argument("--budget", default="small", choices=BUDGETS,
                   help="tiny: smoke run; small: CPU (the committed configs); student: CPU, pretrained SFace students at "
                        "u=8; full: GPU (IResNet-50, u=8)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (reuse / train, attacks, estimate) and exit")
    p.add_argument("--seed", type=int, default=None, help="benchmark seed (default: the config's)")
    p.add_argument("--data", default=None, help="folder holding lfw_112/, cfp_112/, celeba_112/ (overrides the "
                                                "training configs' data paths: their runs are then new runs)")
    p.add_argument("--only", default=None, help="comma-separated defense keys to run (default: all)")
    p.add_argument("--override", action="append", default=[], metavar="[GROUP:]KEY=VALUE",
                   help="dotted training-config override (repeatable), e.g. run.device=cpu: for every config that "
                        "has the key's section, or only for GROUP (a training method or an input kind)")
    p.add_argument("--out-dir", default=None,
                   help="put runs, caches and the report under this folder instead of the budget's paths")
    p.add_argument("--defense-seed", type=int, default=None,
                   help="seed of the victims' masking secrets in the attacks (default: secure OS seed)")
    p.add_argument("--rerun-attacks", action="store_true", help="ignore cached attack results")
    p.add_argument("--measured", action="store_true",
                   help="report what is on disk and compute nothing: the defenses with a finished run, its "
                        "verification and attack results (an earlier result lacking only linkage attacks counts); "
                        "the report names the defenses left out and the attacks not run")
    p.add_argument("--busy-seconds", type=float, default=300.0,
                   help="an unfinished run folder written within this many seconds is another process's: wait")
    p.add_argument("--threads", type=int, default=2, help="torch threads for verification and attacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars (stage lines still print)")


def execute(make_runner, args: argparse.Namespace) -> Optional[object]:
    """The common run of ``benchmark`` and ``frontier``: check the options, build the runner
    (``make_runner()``), print the plan (``--dry-run``, returns None) or run it with ``--threads``."""
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.busy_seconds < 0:
        raise ValueError(f"--busy-seconds must be >= 0, got {args.busy_seconds}")
    runner = make_runner()
    if args.dry_run:
        runner.print_plan()
        return None
    torch.set_num_threads(args.threads)
    runner.run()
    return runner


def run(args: argparse.Namespace) -> int:
    from .runner import Benchmark
    execute(lambda: Benchmark(load_benchmark(args.config, args.budget), args), args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from ..cli import main as cli_main
    return cli_main(["benchmark"] + list(sys.argv[1:] if argv is None else argv))


__all__ = ["add_arguments", "run", "execute", "main"]
