"""The zoo's import graph, read from the source (every import, including those inside functions).

    python tests/import_graph.py            # module edges grouped by role, then the role-level graph
    python tests/import_graph.py --cycles   # only the cycles (none is the rule: tests/test_layout.py)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "datamodules")


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a module or module.attribute) starts with."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                hit = _resolve(t, mods)
                if hit and hit != mod:
                    graph[mod].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def role(mod: str) -> str:
    """zoo.engine.module -> zoo.engine; zoo.blocks.attention -> zoo.blocks; datamodules.x -> datamodules."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if parts[0] == "zoo" and len(parts) > 1 else parts[0]


def role_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a, bs in graph.items():
        for b in bs:
            if role(a) != role(b):
                out.setdefault(role(a), set()).add(role(b))
    return out


def main(argv: list[str]) -> int:
    graph = edges()
    found = cycles(graph)
    if "--cycles" not in argv:
        for mod in sorted(graph):
            if graph[mod]:
                print(f"{mod} -> {', '.join(sorted(graph[mod]))}")
        print("\nroles:")
        for a, bs in sorted(role_edges(graph).items()):
            print(f"  {a} -> {', '.join(sorted(bs))}")
    print(f"\nmodule cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
