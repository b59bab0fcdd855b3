"""`make twins`: do box position features do anything? CCCL, CCCL w/o POS and CASC-base on SynthScenes twins.

    python -m zoo.experiments.twins                     # seeds 0 and 1 -> zoo/reports/position_twins/report.{md,csv}
    python -m zoo.experiments.twins --seeds 0 1 2 --runs runs/position_twins --logger csv

On the default SynthScenes the "w/o POS" row of CCCL's Table 6 moves within the noise between seeds: its captions
rarely depend on where things are. Twin scenes (datamodules.synthscenes, `twins: true`) pair every scene with its
mirror image, and every caption states a left/right relation, so within a pair only the boxes tell which image a
caption describes: a model that reads no boxes (CASC-base, CCCL w/o POS) can at best flip a coin between the two
twins, which caps its T->I R@1 near 50. `twin_batches` serves half of the training captions beside a caption of
their twin, so that the twin is an in-batch negative often enough for the position features to be trained.

The rows are recipes/position_twins/<NN>_<row>.yaml (first line `# <label> — <what>`, the method named in the
table below), layered on the method's SynthScenes recipe, its ablation-size overlay (CCCL's), the shared
recipes/position_twins/_data.yaml and `--trainer.max_epochs`. Each (row, seed) runs through the ablation runner
(zoo.experiments.ablate.Ablation): resumable, CSV (+ W&B) logged, results.json with its settings digest.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

from .ablate import Ablation, split_extra, wandb_setup
from .report import read_result
from .rows import ROW_FILE, Row, parse_label

ROOT = Path(__file__).resolve().parents[2]
ROWS = {"cccl": "cccl", "cccl_wo_position": "cccl", "casc_base": "casc_base"}  # row -> method (its recipe)
METRICS = ("t2i_r1", "i2t_r1", "rsum", "twin_accuracy")


def twin_accuracy(sims, caps_per_image: int = 5) -> float:
    """% of captions that score their own image above its mirror twin (images 2k, 2k + 1): 50 = boxes unused."""
    import torch
    n_img = sims.shape[0]
    own = torch.arange(sims.shape[1]) // caps_per_image
    twin = own ^ 1
    if n_img % 2:
        raise ValueError(f"twin accuracy needs pairs of images, got {n_img}")
    cols = torch.arange(sims.shape[1])
    s_own, s_twin = sims[own, cols], sims[twin, cols]
    return float(100 * ((s_own > s_twin).double() + 0.5 * (s_own == s_twin).double()).mean())


def measure_twins(row_dir: Path, configs: list[str], checkpoint: str = "best") -> dict | None:
    """Twin accuracy of the row's best (or last) checkpoint on the test split -> {"twin_accuracy": ...}; for the last
    checkpoint also its test metrics (the row's results.json holds the best's). Cached in <row dir>/twins.json
    (twins_last.json), keyed by the checkpoint's size and time, so a retrained row is measured again."""
    import json
    ckpt = row_dir / "checkpoints" / f"{checkpoint}.ckpt"
    cache = row_dir / ("twins.json" if checkpoint == "best" else f"twins_{checkpoint}.json")
    if not ckpt.exists():
        return None
    stamp = [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]
    if cache.exists():
        got = json.loads(cache.read_text())
        if got.get("stamp") == stamp:
            return got["metrics"]
    from ..engine.checkpoints import load_model
    from ..engine.metrics import retrieval_metrics
    from .ensemble import build_datamodule, similarity_matrix
    dm = build_datamodule(configs, [])
    model = load_model(ckpt, dm)
    import torch
    with torch.no_grad():
        sims = similarity_matrix(model, dm.test_dataloader(), dm.num_eval_images("test"), dm.caps_per_image)
    metrics = {"twin_accuracy": twin_accuracy(sims, dm.caps_per_image)}
    if checkpoint != "best":
        metrics.update({k: float(v) for k, v in retrieval_metrics(sims, dm.caps_per_image).items()})
    cache.write_text(json.dumps({"metrics": metrics, "checkpoint": str(ckpt), "stamp": stamp}))
    return metrics


def rows(recipes: Path) -> list[Row]:
    out = []
    for f in sorted((recipes / "position_twins").glob("*.yaml")):
        m = ROW_FILE.match(f.name)
        if f.name.startswith("_") or not m:
            continue
        if m.group(2) not in ROWS:
            raise ValueError(f"{f}: row {m.group(2)!r} names no method; known rows: {', '.join(ROWS)}")
        label, what = parse_label(f)
        out.append(Row(ROWS[m.group(2)], "position_twins", m.group(2), int(m.group(1)), f, label or m.group(2), what))
    return out


def runner(row: Row, seed: int, args, use_wandb: bool, env: dict) -> Ablation:
    extra = ["--config", str(args.recipes / "position_twins" / "_data.yaml"), "--trainer.max_epochs",
             str(args.epochs), "--seed_everything", str(seed), *args.extra]
    return Ablation(row.method, "synthetic", args.recipes, args.runs / f"seed{seed}", use_wandb, env, extra)


def collect(all_rows: list[Row], seeds: list[int], runs: Path, measure=None) -> list[dict]:
    """measure(row, seed, row_dir) -> metrics that replace the row's (twin accuracy at least) or None: main passes
    measure_twins."""
    table = []
    for row in all_rows:
        for seed in seeds:
            f = runs / f"seed{seed}" / f"{row.method}_synth" / row.table / row.name / "results.json"
            res = read_result(f) if f.exists() else None
            m = dict((res or {}).get("metrics", {}).get("test", {}))
            if res is not None and measure is not None:
                m.update(measure(row, seed, f.parent) or {})
            table.append({"row": row.name, "label": row.label, "seed": seed, **{k: m.get(k) for k in METRICS}})
    return table


def to_markdown(table: list[dict], seeds: list[int], epochs: int, checkpoint: str = "best") -> str:
    lines = ["# Box positions on SynthScenes twins: CCCL against CCCL w/o POS and CASC-base", "",
             f"Test split of recipes/position_twins/_data.yaml (mirror-image twin scenes, each caption stating a "
             f"left/right relation), {epochs} epochs, {checkpoint} checkpoint ("
             f"{'selected on val/rsum' if checkpoint == 'best' else 'the last epoch'}), seeds {', '.join(map(str, seeds))}. A model that reads no boxes "
             "cannot tell twins apart: its T→I R@1 is capped near 50. `python -m zoo.experiments.twins` wrote this.",
             "Twin accuracy: the share of test captions that score their own image above its mirror twin (50 = the "
             "boxes are not used).",
             "", "| row | " + " | ".join(f"T→I R@1 s{s}" for s in seeds) + " | T→I R@1 mean | "
             + " | ".join(f"twin acc. s{s}" for s in seeds) + " | twin acc. mean | "
             + " | ".join(f"rsum s{s}" for s in seeds) + " | rsum mean |",
             "|---|" + "---|" * (3 * len(seeds) + 3)]
    for label in dict.fromkeys(r["label"] for r in table):
        mine = [r for r in table if r["label"] == label]

        def cells(key):
            vals = [r[key] for r in mine]
            got = [v for v in vals if v is not None]
            mean = f"{statistics.mean(got):.1f}" if len(got) == len(vals) else "—"
            return [f"{v:.1f}" if v is not None else "—" for v in vals] + [mean]
        lines.append(f"| {label} | " + " | ".join(cells("t2i_r1") + cells("twin_accuracy") + cells("rsum")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_extra(argv)
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.twins", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rows", help="only these rows, comma separated")
    ap.add_argument("--recipes", type=Path, default=ROOT / "recipes")
    ap.add_argument("--runs", type=Path, default=Path("runs/position_twins"))
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: --runs)")
    ap.add_argument("--checkpoint", choices=["best", "last"], default="best",
                    help="the checkpoint tested: best on val/rsum (which barely sees the twins: they move T->I R@1 of "
                         "one image in two) or the last epoch's")
    ap.add_argument("--logger", default=os.environ.get("LOGGER", "csv"), type=str.lower, choices=["wandb", "csv"])
    args = ap.parse_args(argv)
    args.extra = extra
    try:
        chosen = rows(args.recipes)
        if args.rows:
            want = {w.strip() for w in args.rows.split(",") if w.strip()}
            unknown = want - {r.name for r in chosen}
            if not want or unknown:
                raise ValueError(f"--rows {args.rows!r}: no row {', '.join(sorted(unknown)) or '(none named)'}; "
                                 f"rows: {', '.join(r.name for r in chosen)}")
            chosen = [r for r in chosen if r.name in want]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_wandb, env, how = wandb_setup(args.logger)
    print(f"[twins] {len(chosen)} rows x seeds {args.seeds}; {how}", flush=True)
    failed = []
    for seed in args.seeds:
        for row in chosen:
            res = runner(row, seed, args, use_wandb, env).run_row(row)
            print(f"[twins] seed {seed} {row.name}: {res.status} {res.message}", flush=True)
            if res.status in ("failed", "stale", "busy"):
                failed.append(f"{row.name} seed {seed} ({res.status})")
    def measure(row, seed, row_dir):
        from .ablate import recipe_for, sizes_for
        sizes = sizes_for(row.method, "synthetic", args.recipes)
        configs = [str(recipe_for(row.method, "synthetic", args.recipes)), *([str(sizes)] if sizes else []),
                   str(row.path), str(args.recipes / "position_twins" / "_data.yaml")]
        return measure_twins(row_dir, configs, args.checkpoint)

    table = collect(chosen, args.seeds, args.runs, measure)
    out = args.out or args.runs
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(table, args.seeds, args.epochs, args.checkpoint))
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["row", "label", "seed", *METRICS])
        w.writeheader()
        w.writerows(table)
    print(f"[twins] report: {out / 'report.md'}\n" + (out / "report.md").read_text())
    if failed:
        print("[twins] not finished: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
