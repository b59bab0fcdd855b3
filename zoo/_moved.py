"""Module paths from before the zoo/ layout of one folder per role, kept resolving.

User recipes name `zoo.callbacks.ZooCheckpoint`, scripts run `python -m zoo.ablate`, notebooks import
`zoo.evaluation`: each old name below resolves to the module that now holds the code (the same module object, so
`zoo.callbacks.ZooCheckpoint is zoo.engine.callbacks.ZooCheckpoint`), and `python -m <old name>` runs the new
module as the program. Checkpoints name their method class (`zoo.methods.CASC`), which did not move.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "zoo.module": "zoo.engine.module",
    "zoo.evaluation": "zoo.engine.evaluation",
    "zoo.metrics": "zoo.engine.metrics",
    "zoo.callbacks": "zoo.engine.callbacks",
    "zoo.progress": "zoo.engine.progress",
    "zoo.reporting": "zoo.engine.reporting",
    "zoo.ablate": "zoo.experiments.ablate",
    "zoo.report": "zoo.experiments.report",
    "zoo.ensemble": "zoo.experiments.ensemble",
    "zoo.pictures": "zoo.tools.pictures",
    "zoo.vocab": "zoo.tools.vocab",
    "zoo.bench_casc": "zoo.bench.casc",
    "zoo.bench_data": "zoo.bench.data",
    "zoo.bench_memory": "zoo.bench.memory",
    "zoo.methods.cccl.bench": "zoo.bench.cccl",
}


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {self.new}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)  # the real module, registered under the old name too

    def exec_module(self, module) -> None:
        pass  # already executed under its new name

    def get_code(self, fullname: str):
        # `python -m <old name>`: runpy executes this code as __main__, which runs the new module as the program
        return compile(f"import runpy\nrunpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{self.old}: moved to {self.new}>", "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(fullname, new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())  # after the real finders: a module that exists is always found first
