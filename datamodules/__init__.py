"""LightningDataModules serving precomputed bottom-up features, captions and dependency graphs."""
from .errors import DataError
from .precomp import PrecompDataModule
from .synthscenes import SynthScenesDataModule, generate_synthscenes

__all__ = ["DataError", "PrecompDataModule", "SynthScenesDataModule", "generate_synthscenes"]
