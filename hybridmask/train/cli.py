"""``hybridmask train --config configs/X.yaml [dotted.key=value ...]``.

Trains what the config describes with :func:`hybridmask.train.run.run_training` (one trainer
for every defense; ``method: arl`` configs go to ``hybridmask.train.arl.train_arl``).
Under ``torchrun --nproc_per_node=N -m hybridmask.cli train ...`` it trains with
DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/base.yaml for every key)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides with YAML values, e.g. train.steps=40 data.batch_size=32")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from .config import dump_config, load_config
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file not found: {args.config}")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from .run import run_training
    run_training(cfg)
    return 0
