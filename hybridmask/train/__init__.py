"""Training: the alternating recognizer/policy trainer, configs, the ``hybridmask train`` CLI."""
from .sampler import ResumableBatchSampler
from .trainer import AlternatingTrainer

__all__ = ["AlternatingTrainer", "ResumableBatchSampler"]
