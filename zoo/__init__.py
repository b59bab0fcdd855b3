"""itm-zoo: fine-grained image-text matching methods (CASC, CCCL) as Lightning modules built from shared blocks."""
from .methods import CASCBase
from .module import RetrievalModule

__all__ = ["CASCBase", "RetrievalModule"]
