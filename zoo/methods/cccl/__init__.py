"""CCCL: the torch network (model.CCCLNet) beside its LightningModule (module.CCCL)."""
from .model import CCCLNet
from .module import CCCL

__all__ = ["CCCL", "CCCLNet"]
