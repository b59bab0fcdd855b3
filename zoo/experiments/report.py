"""`make report`: the ablation tables rebuilt from finished runs, beside the paper's figures.

    python -m zoo.experiments.report casc synthetic         # -> runs/ablate/casc_synth/report.{md,csv,png}

Reads every `runs/ablate/<method>_<data>/<table>/<row>/results.json` (written by `zoo.experiments.ablate` after a row's
test) and the paper's figures from `zoo/paper_results/<method>.csv` (header
`table,row,dataset,protocol,i2t_r1,i2t_r5,i2t_r10,t2i_r1,t2i_r5,t2i_r10,rsum,note`). Missing paper files,
rows or cells leave their cells empty. Rows of the recipe layout that have not finished are listed as "not run".
A table folder's paper figures are those of its own name, or of the paper tables its `_table.yaml` names per
dataset (a comparison table printed as one table per dataset, e.g. CCCL's Tables 2-4).

Per table, each row: label, what it computes, our R@1/5/10 both ways and rsum, Δ = rsum minus the table's
first row (ours and the paper's, so orderings compare even on SynthScenes), the paper's rsum on Flickr30K
(test) and COCO (1K, else 5K); on f30k/coco also ours − paper. The CSV holds every number (the paper's recalls
too); the PNG is a bar chart of rsum per row.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from pathlib import Path

from .rows import discover, paper_tables

RECALLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
PAPER_HEADER = ["table", "row", "dataset", "protocol", *RECALLS, "rsum", "note"]
PAPER_PROTOCOLS = {"f30k": ("test", "1k", "5k"), "coco": ("1k", "5k", "test")}  # preference order
DATASET_NAMES = {"synthetic": "SynthScenes", "f30k": "Flickr30K", "coco": "COCO"}
DEFAULT_PAPER_DIR = Path(__file__).resolve().parents[1] / "paper_results"
DATA_SUFFIX = {"synthetic": "synth", "f30k": "f30k", "coco": "coco"}


def _num(text: str | None) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def load_paper(method: str, paper_dir: str | Path | None = None) -> dict[tuple[str, str, str], dict]:
    """{(table, row, dataset): {"protocol", recalls..., "rsum", "note"}}, the preferred protocol per dataset.

    A missing file gives {} (with a warning); a missing rsum is the sum of the six recalls when all are printed.
    """
    path = Path(paper_dir or DEFAULT_PAPER_DIR) / f"{method}.csv"
    if not path.is_file():
        warnings.warn(f"no paper figures for {method}: {path} not found (paper columns left empty)")
        return {}
    found: dict[tuple[str, str, str], dict[str, dict]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PAPER_HEADER[:4] if c not in (reader.fieldnames or [])]
        if missing:
            warnings.warn(f"{path}: header lacks {', '.join(missing)}; expected {','.join(PAPER_HEADER)}")
            return {}
        for rec in reader:
            key = ((rec.get("table") or "").strip(), (rec.get("row") or "").strip(),
                   (rec.get("dataset") or "").strip().lower())
            nums = {k: _num(rec.get(k)) for k in RECALLS}
            rsum = _num(rec.get("rsum"))
            if rsum is None and all(v is not None for v in nums.values()):
                rsum = sum(nums.values())  # type: ignore[arg-type]
            found.setdefault(key, {})[(rec.get("protocol") or "").strip().lower()] = {
                **nums, "rsum": rsum, "note": (rec.get("note") or "").strip()}
    out = {}
    for key, by_protocol in found.items():
        for proto in PAPER_PROTOCOLS.get(key[2], ()) + tuple(by_protocol):
            if proto in by_protocol:
                out[key] = {"protocol": proto, **by_protocol[proto]}
                break
    return out


def read_result(f: Path) -> dict | None:
    """One row's results.json, or None (with a warning naming the file) when it is unreadable, truncated, not
    an object, or holds a non-numeric rsum: such a file is skipped, never read as figures."""
    try:
        res = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"skipping unreadable {f}: {e}")
        return None
    if not isinstance(res, dict) or not isinstance(res.get("metrics", {}), dict):
        warnings.warn(f"skipping {f}: not a results object (holds {type(res).__name__})")
        return None
    for split, m in res.get("metrics", {}).items():
        bad = {k: v for k, v in (m.items() if isinstance(m, dict) else [("", m)])
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)}
        if bad:
            warnings.warn(f"skipping {f}: non-numeric metrics in {split!r}: {bad}")
            return None
    return res


def load_results(method: str, data: str, runs: str | Path = "runs/ablate") -> dict[tuple[str, str], dict]:
    """{(table, row): results} keyed by the row's folder (<table>/<row>/results.json), not by the names the file
    holds: a copied folder cannot stand in for another row. A file whose names disagree with its folder, or two
    files naming one row, are reported."""
    root = Path(runs) / f"{method}_{DATA_SUFFIX[data]}"
    out, claims = {}, {}
    for f in sorted(root.glob("*/*/results.json")):
        res = read_result(f)
        if res is None:
            continue
        folder = (f.parent.parent.name, f.parent.name)
        claim = (res.get("table", folder[0]), res.get("row", folder[1]))
        if claim != folder:
            warnings.warn(f"{f} names row {'/'.join(claim)} but lies in {'/'.join(folder)}: read as "
                          f"{'/'.join(folder)} (a copied row folder?)")
        claims.setdefault(claim, []).append(f)
        out[folder] = {**res, "table": folder[0], "row": folder[1]}
    for claim, files in claims.items():
        if len(files) > 1:
            warnings.warn(f"{len(files)} results.json name row {'/'.join(claim)}: {', '.join(map(str, files))}")
    return out


def our_protocol(data: str, results: dict[tuple[str, str], dict]) -> tuple[str, str]:
    """(metrics key in results.json, protocol name): COCO compares on 1K when the run has it, like the papers."""
    if data == "coco" and any("test_1k" in r.get("metrics", {}) for r in results.values()):
        return "test_1k", "1K"
    return "test", {"coco": "5K", "f30k": "1K test"}.get(data, "test")


def build_rows(method: str, data: str, runs: str | Path = "runs/ablate", recipes: str | Path | None = "recipes",
               paper_dir: str | Path | None = None, tables: list[str] | None = None) -> list[dict]:
    """One dict per row (finished or not), in table then NN order; the report's and the W&B table's rows.
    tables: only these table folders (None: all)."""
    results = load_results(method, data, runs)
    paper = load_paper(method, paper_dir)
    layout: list[tuple[str, str, int, str, str]] = []
    printed_in: dict[str, dict[str, list[str]]] = {}  # table folder -> {dataset: paper tables} (its _table.yaml)
    if recipes is not None:
        from datamodules.errors import DataError
        try:
            found = discover(method, recipes)
        except DataError:  # a broken row file: named, not silently left out
            raise
        except ValueError:  # no layout for this method: finished runs alone
            found = {}
        for table, rows in found.items():
            layout += [(table, r.name, r.order, r.label, r.what) for r in rows]
            printed_in[table] = paper_tables(method, table, recipes)  # a malformed _table.yaml is an error
    seen = {(t, r) for t, r, *_ in layout}
    for (t, r), res in results.items():  # finished runs whose row file is gone still count
        if (t, r) not in seen:
            layout.append((t, r, int(res.get("order", 99)), res.get("label", r), res.get("what", "")))
    if tables:
        unknown = sorted(set(tables) - {t for t, *_ in layout})
        if unknown:
            raise ValueError(f"no table {', '.join(unknown)} for {method} (tables: "
                             f"{', '.join(dict.fromkeys(t for t, *_ in layout))})")
        layout = [x for x in layout if x[0] in tables]
    table_order = list(dict.fromkeys(t for t, *_ in layout))
    layout.sort(key=lambda x: (table_order.index(x[0]), x[2], x[1]))
    key, proto = our_protocol(data, results)
    rows = []
    for table, name, order, label, what in layout:
        res = results.get((table, name))
        m = (res or {}).get("metrics", {}).get(key, {})
        row = {"table": table, "order": order, "row": name, "label": (res or {}).get("label", label),
               "what": (res or {}).get("what", what) + (f" (same run as {res['same_as']})" if (res or {}).get("same_as")
                                                        else ""),
               "status": "finished" if res else "not run", "same_as": (res or {}).get("same_as"),
               "protocol": proto}
        row.update({k: m.get(k) for k in RECALLS + ["rsum"]})
        for ds in ("f30k", "coco"):
            p = next((paper[(t, name, ds)] for t in printed_in.get(table, {}).get(ds, [table])
                      if (t, name, ds) in paper), {})
            row[f"paper_{ds}_protocol"] = p.get("protocol")
            row.update({f"paper_{ds}_{k}": p.get(k) for k in RECALLS + ["rsum"]})
        rows.append(row)
    # differences: each table against its first row, ours and the paper's; ours - paper on real data
    for table in table_order:
        trs = [r for r in rows if r["table"] == table]
        for col, out in (("rsum", "delta_rsum"), ("paper_f30k_rsum", "paper_f30k_delta"),
                         ("paper_coco_rsum", "paper_coco_delta")):
            ref = trs[0][col]
            for r in trs:
                r[out] = None if ref is None or r[col] is None else r[col] - ref
    for r in rows:
        p = r.get(f"paper_{data}_rsum") if data in ("f30k", "coco") else None
        r["ours_minus_paper_rsum"] = None if p is None or r["rsum"] is None else r["rsum"] - p
    return rows


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-a of two score lists over the same rows (ties count as neither); None below 2 rows."""
    n = len(a)
    if n < 2:
        return None
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    s = sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def add_seeds(method: str, data: str, rows: list[dict], seed_runs: list[str | Path]) -> list[dict]:
    """Adds `seed_rsums` (the rsum of the same row in each other runs folder, e.g. another --seed_everything)
    to every row, and returns per table the ordering agreement with the main runs: [{table, n, seeds: [{runs,
    tau, same_best, mean_abs_diff}]}]. A row reusing the run of another row of its table (`same_as`) is left out
    of that table's agreement."""
    for r in seed_runs:
        folder = Path(r) / f"{method}_{DATA_SUFFIX[data]}"
        if not folder.is_dir():
            raise ValueError(f"--seeds {r}: no {folder} (give the runs folder of another seed's `make ablate`)")
    others = [load_results(method, data, r) for r in seed_runs]
    key, _ = our_protocol(data, {k: v for o in others for k, v in o.items()})
    for r in rows:
        r["seed_rsums"] = [o.get((r["table"], r["row"]), {}).get("metrics", {}).get(key, {}).get("rsum")
                           for o in others]
    agreement = []
    for table in dict.fromkeys(r["table"] for r in rows):
        # a row reusing another row *of this table* would count one run twice
        trs = [r for r in rows if r["table"] == table and r["rsum"] is not None
               and not (r.get("same_as") or "").startswith(f"{table}/")]
        seeds = []
        for k, runs in enumerate(seed_runs):
            both = [r for r in trs if r["seed_rsums"][k] is not None]
            if len(both) < 2:
                continue
            a, b = [r["rsum"] for r in both], [r["seed_rsums"][k] for r in both]
            seeds.append({"runs": str(runs), "n": len(both), "tau": kendall_tau(a, b),
                          "same_best": max(both, key=lambda r: r["rsum"])["row"] == max(
                              both, key=lambda r: r["seed_rsums"][k])["row"],
                          "mean_abs_diff": sum(abs(x - y) for x, y in zip(a, b)) / len(both)})
        if seeds:
            agreement.append({"table": table, "seeds": seeds})
    return agreement


def paper_agreement(rows: list[dict], table: str) -> list[dict]:
    """Our ordering of a table's rows against the paper's: per paper dataset with at least two rows where both rsums
    exist, [{dataset, n, tau, same_best}]. A row reusing another row of this table (`same_as`) is left out."""
    trs = [r for r in rows if r["table"] == table and r["rsum"] is not None
           and not (r.get("same_as") or "").startswith(f"{table}/")]
    out = []
    for ds in ("f30k", "coco"):
        both = [r for r in trs if r.get(f"paper_{ds}_rsum") is not None]
        if len(both) < 2:
            continue
        ours, paper = [r["rsum"] for r in both], [r[f"paper_{ds}_rsum"] for r in both]
        out.append({"dataset": ds, "n": len(both), "tau": kendall_tau(ours, paper),
                    "same_best": max(both, key=lambda r: r["rsum"])["row"]
                    == max(both, key=lambda r: r[f"paper_{ds}_rsum"])["row"]})
    return out


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def to_markdown(method: str, data: str, rows: list[dict], runs: str | Path = "runs/ablate",
                paper_file: str | Path | None = None, agreement: list[dict] | None = None) -> str:
    real = data in ("f30k", "coco")
    proto = rows[0].get("protocol") if rows else None
    protocol = {"f30k": "Flickr30K test (1K images)", "coco": "COCO 1K (5-fold mean)" if proto == "1K" else "COCO 5K",
                "synthetic": "SynthScenes test split"}[data]
    coco_protos = {r["paper_coco_protocol"] for r in rows if r.get("paper_coco_protocol")}
    coco_head = "paper COCO " + ("/".join(sorted(p.upper() for p in coco_protos)) if coco_protos else "1K") + " rsum"
    lines = [f"# {method} ablations on {DATASET_NAMES[data]}: ours beside the paper's", "",
             f"Ours: {protocol}, from `{Path(runs) / f'{method}_{DATA_SUFFIX[data]}'}`. "
             f"Paper: `{paper_file or f'zoo/paper_results/{method}.csv'}`. "
             "Δ: rsum minus the table's first row (ours beside the paper's)."]
    if not real:
        lines.append("SynthScenes figures are not comparable with the paper's in absolute terms: compare the Δ "
                     "columns (the ordering of the rows).")
    head = ["row", "what it computes", "I→T R@1", "R@5", "R@10", "T→I R@1", "R@5", "R@10", "rsum", "Δ",
            "paper F30K rsum", "Δ", coco_head, "Δ"]
    if real:
        head.append("ours − paper")
    seeded = any(r.get("seed_rsums") for r in rows)
    if seeded:
        head.insert(9, "rsum, other seeds")
    by_table = {a["table"]: a["seeds"] for a in agreement or []}
    for table in dict.fromkeys(r["table"] for r in rows):
        lines += ["", f"## {table}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in rows:
            if r["table"] != table:
                continue
            label = r["label"] + (" (not run)" if r["status"] != "finished" else "")
            cells = [label, r["what"] or ""] + [_f(r[k]) for k in RECALLS + ["rsum"]] + [
                _f(r["delta_rsum"], True), _f(r["paper_f30k_rsum"]), _f(r["paper_f30k_delta"], True),
                _f(r["paper_coco_rsum"]), _f(r["paper_coco_delta"], True)]
            if real:
                cells.append(_f(r["ours_minus_paper_rsum"], True))
            if seeded:
                cells.insert(9, " / ".join(_f(v) for v in r["seed_rsums"]))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        for pa in paper_agreement(rows, table):
            name = "F30K" if pa["dataset"] == "f30k" else coco_head.split()[1]
            lines += ["", f"Ordering against the paper's {name} rsum ({pa['n']} rows in both): Kendall τ = "
                      f"{pa['tau']:.2f}, same best row: {'yes' if pa['same_best'] else 'no'}."]
        for sd in by_table.get(table, []):
            lines += ["", f"Ordering against `{sd['runs']}` ({sd['n']} rows run in both): Kendall τ = "
                      f"{sd['tau']:.2f}, same best row: {'yes' if sd['same_best'] else 'no'}, "
                      f"mean |rsum difference| = {sd['mean_abs_diff']:.1f}."]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (["table", "order", "row", "label", "what", "status", "protocol", *RECALLS, "rsum", "delta_rsum"]
               + [f"paper_{ds}_{k}" for ds in ("f30k", "coco") for k in ["protocol", *RECALLS, "rsum", "delta"]]
               + ["ours_minus_paper_rsum"])


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (f"{r[c]:.2f}" if isinstance(r[c], float) else r[c])
                        for c in CSV_COLUMNS])


def bar_chart(method: str, data: str, rows: list[dict], path: Path) -> Path | None:
    """rsum per finished row (grouped by table); the paper's on the same dataset beside it for f30k/coco."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["rsum"] is not None]
    if not done:
        return None
    paper_key = f"paper_{data}_rsum" if data in ("f30k", "coco") else None
    with_paper = paper_key is not None and any(r[paper_key] is not None for r in done)
    tables = list(dict.fromkeys(r["table"] for r in done))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(done) + 1.4))
    y = list(range(len(done)))[::-1]
    h = 0.38 if with_paper else 0.7
    for yi, r in zip(y, done):
        c = colours[tables.index(r["table"]) % len(colours)]
        ax.barh(yi + (h / 2 if with_paper else 0), r["rsum"], height=h, color=c)
        ax.text(r["rsum"], yi + (h / 2 if with_paper else 0), f" {r['rsum']:.1f}", va="center", fontsize=8)
        if with_paper and r[paper_key] is not None:
            ax.barh(yi - h / 2, r[paper_key], height=h, color=c, alpha=0.35, hatch="//")
            ax.text(r[paper_key], yi - h / 2, f" {r[paper_key]:.1f} (paper)", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['table']}: {r['label']}" for r in done], fontsize=8)
    ax.set_xlabel("rsum (sum of R@1/5/10 both ways)")
    ax.set_title(f"{method} ablation rows on {DATASET_NAMES[data]}")
    ax.set_xlim(0, max([r["rsum"] for r in done] + [r[paper_key] or 0 for r in done if with_paper]) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(method: str, data: str, runs: str | Path = "runs/ablate", recipes: str | Path | None = "recipes",
                 paper_dir: str | Path | None = None, out: str | Path | None = None,
                 seeds: list[str | Path] = (), tables: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Writes report.md, report.csv and report.png; returns ({kind: path}, rows). seeds: other runs folders of
    the same rows (other seeds): their rsum beside ours and the ordering agreement per table."""
    rows = build_rows(method, data, runs, recipes, paper_dir, tables)
    agreement = add_seeds(method, data, rows, list(seeds)) if seeds else None
    if not rows:
        raise ValueError(f"nothing to report for {method} on {data}: no rows in the layout and no finished runs")
    out_dir = Path(out) if out else Path(runs) / f"{method}_{DATA_SUFFIX[data]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    paper_file = Path(paper_dir) / f"{method}.csv" if paper_dir else None
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv"}
    paths["md"].write_text(to_markdown(method, data, rows, runs, paper_file, agreement), encoding="utf-8")
    write_csv(rows, paths["csv"])
    png = bar_chart(method, data, rows, out_dir / "report.png")
    if png is not None:
        paths["png"] = png
    return paths, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.report", description=__doc__.split("\n")[0])
    ap.add_argument("method")
    ap.add_argument("data", choices=list(DATA_SUFFIX))
    ap.add_argument("--runs", default="runs/ablate")
    ap.add_argument("--recipes", default="recipes")
    ap.add_argument("--paper", default=None, help="folder of paper figure CSVs (default zoo/paper_results)")
    ap.add_argument("--out", default=None, help="output folder (default runs/ablate/<method>_<data>)")
    ap.add_argument("--seeds", nargs="*", default=[], metavar="RUNS",
                    help="runs folders of the same rows at other seeds: their rsum and the ordering agreement")
    ap.add_argument("--tables", nargs="*", default=None, metavar="TABLE", help="only these tables (default: all)")
    args = ap.parse_args(argv)
    try:
        paths, rows = write_report(args.method, args.data, args.runs, args.recipes, args.paper, args.out,
                                   args.seeds, args.tables)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not any(r["status"] == "finished" for r in rows):
        print(f"warning: no finished rows yet (run `make ablate METHOD={args.method} DATA={args.data}`)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
