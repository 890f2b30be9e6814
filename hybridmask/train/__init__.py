"""Training: the alternating recognizer/policy trainer, its callbacks, configs, the ``hybridmask train`` CLI.

    from hybridmask.train import AlternatingTrainer, PolicySetup, TrainOptions   # wrap your own objects
    from hybridmask.train.callbacks import Checkpoint, Logging, ProgressBar, Utility, Verification
    from hybridmask.train import load_config, run_training   # what `hybridmask train --config X` does
"""
from .callbacks import Callback, Checkpoint, Logging, ProgressBar, Utility, Verification
from .config import load_config
from .sampler import ResumableBatchSampler
from .trainer import AlternatingTrainer, DefenseOptim, PolicySetup, TrainOptions


def run_training(config):
    """Train what a loaded config describes (see :mod:`hybridmask.train.run`)."""
    from .run import run_training as _run
    return _run(config)


__all__ = ["AlternatingTrainer", "PolicySetup", "DefenseOptim", "TrainOptions", "Callback", "Utility",
           "Verification", "Logging", "ProgressBar", "Checkpoint", "ResumableBatchSampler", "load_config",
           "run_training"]
