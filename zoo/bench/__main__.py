"""`python -m zoo.bench [methods|casc|cccl|data|memory] [ARGS]`: one entry for every benchmark (see zoo.bench).

Without a name (or when the first argument is an option) it runs `methods`, i.e. `make bench`.
"""
from __future__ import annotations

import importlib
import sys

from . import ENTRIES


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        for name, module in ENTRIES.items():
            doc = (importlib.import_module(module).__doc__ or "").strip().split("\n")[0]
            print(f"  {name:<8} {doc}")
        print("\n`python -m zoo.bench NAME --help` lists a benchmark's options.")
        return
    name = "methods" if not argv or argv[0].startswith("-") else argv.pop(0)
    if name not in ENTRIES:
        raise SystemExit(f"error: no benchmark {name!r}; choose one of {', '.join(ENTRIES)}")
    sys.argv = [f"python -m zoo.bench {name}", *argv]
    importlib.import_module(ENTRIES[name]).main(argv)


if __name__ == "__main__":
    main()
