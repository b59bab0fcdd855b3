"""The engine every method runs on: the shared LightningModule (`RetrievalModule`: training step, blockwise
DDP-correct evaluation), embeddings plumbing (`evaluation`), recall metrics (`metrics`), checkpoints
(`checkpoints`: check, load as the trained class, stored vocabulary), callbacks, progress bars and the recall
table. It knows no method: the CLI (`zoo.cli`) and the tools compose it with `zoo.methods`.
"""
from .evaluation import Emb, score_blockwise
from .module import RetrievalModule

__all__ = ["Emb", "RetrievalModule", "score_blockwise"]
