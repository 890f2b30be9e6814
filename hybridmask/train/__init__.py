"""Training: the alternating recognizer/policy trainer, configs, the ``hybridmask train`` CLI.

    from hybridmask.train import AlternatingTrainer          # wrap your own model/head/optimizer/loader
    from hybridmask.train import load_config, run_training   # what `hybridmask train --config X` does
"""
from .config import load_config
from .sampler import ResumableBatchSampler
from .trainer import AlternatingTrainer


def run_training(config):
    """Train what a loaded config describes (see :mod:`hybridmask.train.run`)."""
    from .run import run_training as _run
    return _run(config)


__all__ = ["AlternatingTrainer", "ResumableBatchSampler", "load_config", "run_training"]
