"""Methods: thin compositions of zoo.blocks on top of zoo.module.RetrievalModule."""
from .casc_base import CASCBase

__all__ = ["CASCBase"]
