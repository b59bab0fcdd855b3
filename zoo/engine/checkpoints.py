"""Checkpoints of the zoo: checked before use, loaded as the class they were trained as, and what they carry.

`check_checkpoint` (a missing or truncated file is a clear error before anything is built on it), `load_model`
(any zoo method from its checkpoint: LightningCLI records the class), `checkpoint_vocabulary` (the word list every
checkpoint stores). Used by the CLI, ensembles, pictures and search alike.
"""
from __future__ import annotations

import importlib
import zipfile
from pathlib import Path

import torch

from datamodules.errors import DataError
from datamodules.text import Vocabulary

from .module import RetrievalModule


def check_checkpoint(path: str) -> None:
    """A missing or truncated checkpoint is a clear error before anything is built on it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "checkpoint not found" if not p.exists() else "is not a file",
                        "check --ckpt_path (runs/<recipe>/checkpoints/best.ckpt after `lightning fit`)")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            bad = str(e)
        if bad is None:
            return
    raise DataError(p, "checkpoint is truncated or not a PyTorch checkpoint (its archive does not read back)",
                    "use a complete copy (an interrupted copy or save leaves a short file), or last.ckpt/best.ckpt")


def load_model(ckpt: str | Path, datamodule=None) -> RetrievalModule:
    """Any zoo method from its checkpoint (LightningCLI stores the class), checked against the data."""
    hp = torch.load(str(ckpt), map_location="cpu", weights_only=False).get("hyper_parameters", {})
    class_path = hp.get("_class_path")  # written by LightningCLI
    if class_path is None:
        raise ValueError(f"{ckpt}: no _class_path in its hyper_parameters (not written by `lightning fit`)")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)  # e.g. zoo.methods.CASC: imports the method
    if not (isinstance(cls, type) and issubclass(cls, RetrievalModule)):
        raise ValueError(f"{ckpt}: {class_path} is not a zoo RetrievalModule")
    model = cls.load_from_checkpoint(str(ckpt), map_location="cpu")
    if datamodule is not None:
        model.check_data(datamodule)
        if getattr(datamodule, "vocab", None) is not None:
            model.check_vocabulary(datamodule.vocab.idx2word, str(datamodule.vocab_path), model.vocab_words,
                                   model.vocab_source)
        model.configure_from_data(datamodule)
    return model.eval()


def checkpoint_vocabulary(path: str) -> Vocabulary:
    """The word vocabulary (id order) a checkpoint was trained with."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    words = (ckpt.get("zoo_data") or {}).get("vocab")
    if not words:
        raise SystemExit(f"error: {path} stores no vocabulary (made before checkpoints carried one, or by a method "
                         "that does not use the zoo's word ids)")
    return Vocabulary.from_words(words)
