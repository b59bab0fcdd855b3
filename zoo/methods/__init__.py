"""Methods: thin compositions of zoo.blocks on top of zoo.engine.module.RetrievalModule."""
from .casc import CASC
from .casc_base import CASCBase
from .cccl import CCCL

__all__ = ["CASC", "CASCBase", "CCCL"]
