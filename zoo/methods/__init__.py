"""Methods: thin compositions of zoo.blocks on top of zoo.module.RetrievalModule."""
from .casc_base import CASCBase
from .cccl import CCCL

__all__ = ["CASCBase", "CCCL"]
