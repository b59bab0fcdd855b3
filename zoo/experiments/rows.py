"""The layout of ablation rows, read by both the runner (`make ablate`) and the report (`make report`).

A row is a file `recipes/ablations/<method>/<table>/<NN>_<row>.yaml` holding only the row's deltas; its first line
is `# <display label> — <what it computes>`; files (and folders) starting with `_` are not rows. A new row needs no
change to any code.

A row of another method (the baselines of a comparison table) names that method's recipe under the reserved key
`row:`, which the runner reads and never passes to lightning:

    row:
      recipe: vsepp                      # recipes/vsepp_<data>.yaml instead of recipes/<method>_<data>.yaml
      recipe: {synthetic: scan_t2i_avg, f30k: scan_t2i_avg, coco: scan_t2i_lse}   # or one per dataset

It runs on the table's data and epochs (the method's ablation-size overlay, its `model:` section left out), with
the rest of the file as its deltas. An ensemble row trains nothing: it averages the similarity matrices of other
rows of its table (`zoo.experiments.ensemble`, raw scores as the papers), e.g. SCAN* and SGRAF:

    row:
      ensemble: [scan_t2i, scan_i2t]     # or {f30k: [...], coco: [...]}

A table folder may hold `_table.yaml` naming the paper tables its rows are printed in, per dataset, in order of
preference (`paper: {f30k: [table2_f30k], coco: [table3_coco1k, table4_coco5k]}`); by default the folder's name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROW_FILE = re.compile(r"^(\d+)_(.+)\.ya?ml$")
LABEL_SEPARATORS = (" — ", " – ", " -- ", " - ")
ROW_KEY = "row"  # the runner's own settings in a row file; never reaches lightning
ROW_OPTIONS = ("recipe", "ensemble")
DATA_NAMES = ("synthetic", "f30k", "coco")
TABLE_FILE = "_table.yaml"


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
    recipe: Any = None      # another method's recipe: a name, or {data: name}
    ensemble: Any = None    # rows of this table whose matrices are averaged: [names], or {data: [names]}
    deltas: dict = field(default_factory=dict)  # the file without `row:`: what reaches lightning

    @property
    def key(self) -> str:
        return f"{self.table}/{self.name}"

    @property
    def own_recipe(self) -> bool:
        """True when the row's file holds only its deltas (no `row:` key): passed to lightning as it is."""
        return self.recipe is None and self.ensemble is None

    def _for(self, value: Any, data: str, what: str) -> Any:
        if not isinstance(value, dict):
            return value
        if data not in value:
            raise ValueError(f"{self.path}: `row: {what}:` names none for {data} (it has "
                             f"{', '.join(value)}): add `{data}: ...` under `{what}:`")
        return value[data]

    def recipe_name(self, data: str) -> str | None:
        """The method whose recipe the row starts from on DATA (None: the table's own method)."""
        return None if self.recipe is None else self._for(self.recipe, data, "recipe")

    def members(self, data: str) -> list[str]:
        """The rows an ensemble row averages on DATA ([] for a trained row)."""
        return [] if self.ensemble is None else list(self._for(self.ensemble, data, "ensemble"))


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


def read_yaml(f: Path) -> dict:
    """A recipe/row file as a mapping; a YAML error or a file holding a list/scalar is a DataError naming it."""
    from datamodules.errors import DataError
    try:
        cfg = yaml.safe_load(Path(f).read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise DataError(f, f"not valid YAML{line}: {getattr(e, 'problem', None) or e}",
                        "fix the file (a row file holds only the row's deltas, e.g. `model: {init_args: "
                        "{beta: 0.5}}`)") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise DataError(f, f"holds a YAML {type(cfg).__name__}, not a mapping of settings",
                        "write the row's deltas as keys, e.g. `model:\n  init_args:\n    beta: 0.5`")
    return cfg


def _row_options(path: Path) -> tuple[dict, dict]:
    """({recipe/ensemble: value}, the deltas) of a row file; invalid YAML, a file that is not a mapping or a
    malformed `row:` block is an error naming the file."""
    from datamodules.errors import DataError
    cfg = read_yaml(path)
    if ROW_KEY not in cfg:
        return {}, cfg
    opts, deltas = cfg[ROW_KEY], {k: v for k, v in cfg.items() if k != ROW_KEY}
    hint = ("e.g. `row: {recipe: vsepp}` (another method's recipe) or `row: {ensemble: [scan_t2i, scan_i2t]}` "
            "(rows of this table averaged)")
    if not isinstance(opts, dict) or not opts or set(opts) - set(ROW_OPTIONS) or len(opts) > 1:
        raise DataError(path, f"`row:` must hold one of {', '.join(ROW_OPTIONS)}, got {opts!r}", hint)
    (kind, value), = opts.items()
    per_data = value if isinstance(value, dict) else {"any": value}
    if isinstance(value, dict) and (not value or set(value) - set(DATA_NAMES)):
        raise DataError(path, f"`row: {kind}:` is keyed by {sorted(value)}; the datasets are "
                        f"{', '.join(DATA_NAMES)}", hint)
    for v in per_data.values():
        if kind == "recipe" and not (isinstance(v, str) and v):
            raise DataError(path, f"`row: recipe:` must name a method (recipes/<name>_<data>.yaml), got {v!r}", hint)
        if kind == "ensemble" and not (isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v)):
            raise DataError(path, f"`row: ensemble:` must list two or more rows of its table, got {v!r}", hint)
    if kind == "ensemble" and deltas:
        raise DataError(path, f"an ensemble row trains nothing, but it also sets {', '.join(deltas)}",
                        "put those settings in the member rows")
    return {kind: value}, deltas


def paper_tables(method: str, table: str, recipes: str | Path = "recipes") -> dict[str, list[str]]:
    """{dataset: paper table names, preferred first} for a table folder: its `_table.yaml` `paper:` mapping, else
    the folder's own name for every dataset."""
    from datamodules.errors import DataError
    f = Path(recipes) / "ablations" / method / table / TABLE_FILE
    default = {d: [table] for d in DATA_NAMES}
    if not f.is_file():
        return default
    try:
        cfg = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f, f"not valid YAML: {getattr(e, 'problem', None) or e}", "fix the table file") from None
    paper = cfg.get("paper") if isinstance(cfg, dict) else None
    if not isinstance(paper, dict) or set(cfg) - {"paper"} or set(paper) - set(DATA_NAMES) or not all(
            isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in paper.values()):
        raise DataError(f, f"expected `paper: {{<dataset>: [paper table, ...]}}` with datasets among "
                        f"{', '.join(DATA_NAMES)}, got {cfg!r}",
                        "e.g. `paper: {f30k: [table2_f30k], coco: [table3_coco1k, table4_coco5k]}`")
    return {**default, **paper}


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
            opts, deltas = _row_options(f)
            rows.append(Row(method, tdir.name, m.group(2), int(m.group(1)), f, label or m.group(2), what,
                            deltas=deltas, **opts))
        rows.sort(key=lambda r: (r.order, r.name))
        names = [r.name for r in rows]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"{tdir}: two row files share the name(s) {', '.join(sorted(dup))}")
        by_name = {r.name: r for r in rows}
        for r in rows:
            groups = r.ensemble.values() if isinstance(r.ensemble, dict) else [r.ensemble or []]
            for member in (m for g in groups for m in g):
                if member not in by_name or by_name[member].ensemble is not None:
                    raise ValueError(f"{r.path}: ensemble member {member!r} is not a trained row of {tdir.name} "
                                     f"(its trained rows: {', '.join(n for n, x in by_name.items() if x.ensemble is None)})")
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


def _per_data(value: Any) -> str:
    one = lambda v: " + ".join(v) if isinstance(v, list) else str(v)  # noqa: E731
    return "; ".join(f"{d}: {one(v)}" for d, v in value.items()) if isinstance(value, dict) else one(value)


def format_listing(method: str, tables: dict[str, list[Row]]) -> str:
    lines = [f"{method}: {sum(len(r) for r in tables.values())} rows in {len(tables)} tables"]
    for t, rows in tables.items():
        lines.append(f"\n{t}")
        width = max(len(r.name) for r in rows)
        for r in rows:
            what = f" — {r.what}" if r.what else ""
            how = (f"  [recipe {_per_data(r.recipe)}]" if r.recipe is not None else
                   f"  [ensemble of {_per_data(r.ensemble)}]" if r.ensemble is not None else "")
            lines.append(f"  {r.order:02d} {r.name:<{width}}  {r.label}{what}{how}")
    return "\n".join(lines)
