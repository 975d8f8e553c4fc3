"""fastclr: fast, correct SimCLR / NT-Xent contrastive learning on MNIST, Fashion-MNIST and your own small images."""
from .augment import SimCLRAugment
from .config import AugConfig, TrainConfig
from .loss import NTXentLoss
from .model import load_encoder

__version__ = "0.1.0"
__all__ = ["AugConfig", "NTXentLoss", "SimCLRAugment", "TrainConfig", "load_encoder", "__version__"]
