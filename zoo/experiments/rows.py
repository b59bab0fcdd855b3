"""The layout of ablation rows, read by both the runner (`make ablate`) and the report (`make report`).

A row is a file `recipes/ablations/<method>/<table>/<NN>_<row>.yaml` holding only the row's deltas; its first line
is `# <display label> — <what it computes>`; files (and folders) starting with `_` are not rows. A new row needs no
change to any code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROW_FILE = re.compile(r"^(\d+)_(.+)\.ya?ml$")
LABEL_SEPARATORS = (" — ", " – ", " -- ", " - ")


# ---- the layout -----------------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    table: str
    name: str
    order: int
    path: Path
    label: str
    what: str

    @property
    def key(self) -> str:
        return f"{self.table}/{self.name}"


def parse_label(path: Path) -> tuple[str, str]:
    """(display label, what it computes) from the row file's first line `# <label> — <what>`."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if not first.startswith("#"):
        return "", ""
    text = first.lstrip("#").strip()
    for sep in LABEL_SEPARATORS:
        if sep in text:
            label, what = text.split(sep, 1)
            return label.strip(), what.strip()
    return text, ""


def discover(method: str, recipes: str | Path = "recipes") -> dict[str, list[Row]]:
    """{table: rows in NN order} for recipes/ablations/<method>/<table>/<NN>_<row>.yaml."""
    base = Path(recipes) / "ablations" / method
    if not base.is_dir():
        known = sorted(p.name for p in (Path(recipes) / "ablations").glob("*") if p.is_dir())
        raise ValueError(f"no ablation rows for method {method!r}: {base} does not exist "
                         f"(methods with rows: {', '.join(known) or 'none'})")
    tables: dict[str, list[Row]] = {}
    for tdir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        rows = []
        for f in sorted(tdir.iterdir()):
            m = ROW_FILE.match(f.name)
            if f.name.startswith("_") or not f.is_file() or not m:
                continue
            label, what = parse_label(f)
            rows.append(Row(method, tdir.name, m.group(2), int(m.group(1)), f, label or m.group(2), what))
        rows.sort(key=lambda r: (r.order, r.name))
        names = [r.name for r in rows]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"{tdir}: two row files share the name(s) {', '.join(sorted(dup))}")
        if rows:
            tables[tdir.name] = rows
    return tables


def select(tables: dict[str, list[Row]], table: str | None = None, rows: str | None = None) -> list[Row]:
    """Rows of one table (or all), optionally only the named ones ('name', 'NN_name' or 'table/name')."""
    if table:
        if table not in tables:
            raise ValueError(f"no table {table!r}; tables: {', '.join(tables)}")
        tables = {table: tables[table]}
    chosen = [r for rs in tables.values() for r in rs]
    if rows:
        wanted = [w.strip() for w in rows.split(",") if w.strip()]
        out = []
        for w in wanted:
            hits = [r for r in chosen if w in (r.name, r.path.stem, r.key)]
            if not hits:
                raise ValueError(f"no row {w!r}; rows: {', '.join(r.key for r in chosen)}")
            out += [h for h in hits if h not in out]
        chosen = out
    return chosen


def format_listing(method: str, tables: dict[str, list[Row]]) -> str:
    lines = [f"{method}: {sum(len(r) for r in tables.values())} rows in {len(tables)} tables"]
    for t, rows in tables.items():
        lines.append(f"\n{t}")
        width = max(len(r.name) for r in rows)
        for r in rows:
            what = f" — {r.what}" if r.what else ""
            lines.append(f"  {r.order:02d} {r.name:<{width}}  {r.label}{what}")
    return "\n".join(lines)
