"""itm-zoo: fine-grained image-text matching methods as Lightning modules built from shared blocks.

One folder per role (README, Code map): `blocks/` plain-torch equations, `methods/` the methods composed from
them, `engine/` the shared training/evaluation loop, metrics, callbacks and checkpoints, `cli/` the `lightning`
command (the composition root: it registers every method and datamodule), `experiments/` ablation runner,
report and ensembles, `bench/` every benchmark behind `python -m zoo.bench`, `tools/` pictures and checkpoint
utilities.
"""
import os as _os

# OpenMP threads sleep at barriers instead of spinning unless the user chose (README, Speed: on a shared CPU a
# spinning barrier waits for descheduled threads; the demo's training step measured ~20x slower under load).
# libgomp reads it when it loads, i.e. at the first `import torch`: `lightning` and `python -m zoo` import zoo
# first, so the default holds for them (a script that imports torch before zoo sets it itself).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._moved import install as _install_moved  # noqa: E402

_install_moved()  # old module paths (zoo.callbacks, zoo.ablate, ...) keep resolving

from .engine import RetrievalModule  # noqa: E402
from .methods import CASCBase  # noqa: E402

__all__ = ["CASCBase", "RetrievalModule"]
