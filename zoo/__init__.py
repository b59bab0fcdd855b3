"""itm-zoo: fine-grained image-text matching methods as Lightning modules built from shared blocks.

One folder per role (README, Code map): `blocks/` plain-torch equations, `methods/` the methods composed from
them, `engine/` the shared training/evaluation loop, metrics, callbacks and checkpoints, `cli/` the `lightning`
command (the composition root: it registers every method and datamodule), `experiments/` ablation runner,
report and ensembles, `bench/` every benchmark behind `python -m zoo.bench`, `tools/` pictures and checkpoint
utilities.
"""
from ._moved import install as _install_moved

_install_moved()  # old module paths (zoo.callbacks, zoo.ablate, ...) keep resolving

from .engine import RetrievalModule  # noqa: E402
from .methods import CASCBase  # noqa: E402

__all__ = ["CASCBase", "RetrievalModule"]
