"""Face recognizers: backbones with pixel or frequency stems, margin heads, checkpoints.

    from hybridmask.models import create_model, create_head, MixedMarginLoss, save_model, load_model
    net = create_model("iresnet18", stem="freq", in_chans=189, grid=14)      # (B,189,14,14) -> (B,512)
    head = create_head("arcface", 512, num_classes)                        # s=64, m=0.5
    loss = MixedMarginLoss(head)(net(x), labels_BK, weights_BK)
"""
from .base import (FREQ_GRIDS, MODELS, FRBackbone, create_model, list_models, model_macs, register_model)
from .heads import (HEADS, ArcFace, CosFace, MarginHead, MixedMarginLoss, create_head, list_heads,
                    register_head)
from .checkpoint import load_model, save_model
# registering imports
from . import iresnet, mobilefacenet, sface, tiny  # noqa: F401,E402
from .iresnet import IResNet
from .mobilefacenet import MobileFaceNet
from .tiny import TinyNet

__all__ = [
    "create_model", "list_models", "register_model", "model_macs", "MODELS", "FRBackbone", "FREQ_GRIDS",
    "IResNet", "MobileFaceNet", "TinyNet",
    "create_head", "list_heads", "register_head", "HEADS", "MarginHead", "ArcFace", "CosFace",
    "MixedMarginLoss", "save_model", "load_model",
]
