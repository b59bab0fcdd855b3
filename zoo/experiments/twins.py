"""`make twins`: do box position features do anything? CCCL, CCCL w/o POS and CASC-base on SynthScenes twins.

    make twins     # = python -m zoo.experiments.twins --seeds 0 1 2 --epochs 8 --checkpoint last --twin-test 2000 \
                   #     --runs runs/position_twins --out zoo/reports/position_twins
    python -m zoo.experiments.twins --seeds 0 --epochs 8 --lr-decay 0.1 --runs runs/twins_x0.1   # the recipes' decay

On the default SynthScenes the "w/o POS" row of CCCL's Table 6 moves within the noise between seeds: its captions
rarely depend on where things are. Twin scenes (datamodules.synthscenes, `twins: true`) pair every scene with its
mirror image, and every caption states a left/right relation, so within a pair only the boxes tell which image a
caption describes: a model that reads no boxes (CASC-base, CCCL w/o POS) can at best flip a coin between the two
twins, which caps its T->I R@1 near 50. `twin_batches` serves half of the training captions beside a caption of
their twin, so that the twin is an in-batch negative often enough for the position features to be trained.

The rows are recipes/position_twins/<NN>_<row>.yaml (first line `# <label> — <what>`, the method named in the
table below), layered on the method's SynthScenes recipe, its ablation-size overlay (CCCL's), the shared
recipes/position_twins/_data.yaml, `--trainer.max_epochs` and `--model.init_args.lr_decay` (TWIN_LR_DECAY: the lr
is halved every 3 epochs; under the recipes' 0.1 CCCL never learns the boxes). Each (row, seed) runs through the
ablation runner (zoo.experiments.ablate.Ablation): resumable, CSV (+ W&B) logged, results.json with its settings digest.
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
# the twin metrics live with the other retrieval metrics (validation logs them on twin data); re-exported here
from ..engine.metrics import own_and_twin, t2i_recall_ties_split, twin_stats  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
# every row's lr is multiplied by this every lr_decay_epochs (the recipes' 3). The recipes' own 0.1 leaves CCCL 3
# epochs at 2e-3 and then 2e-4 / 2e-5, under which it never learns the boxes (twin accuracy ~51 %); halving keeps
# 1e-3 and 5e-4 for epochs 4-8, where it learns them (README, Box positions on twin scenes)
TWIN_LR_DECAY = 0.5
ROWS = {"cccl": "cccl", "cccl_wo_position": "cccl", "casc_base": "casc_base"}  # row -> method (its recipe)
METRICS = ("t2i_r1", "t2i_r1_ties_split", "i2t_r1", "rsum", "twin_accuracy", "twin_accuracy_se", "twin_test_accuracy",
           "twin_test_se", "twin_test_scenes")


def twin_pair_scores(model, loader, n_images: int, caps_per_image: int = 5, pairs_per_block: int = 8):
    """(own, twin) scores of every caption of a split without its [I, C] matrix: each block scores a few twin pairs'
    images against their own captions only, so a large twin test split costs ~2 * pairs_per_block pairs per caption
    instead of I. Scores are per pair (no scorer of the zoo normalises across a block), so they equal the matrix's
    entries (tested)."""
    import torch
    from ..engine.evaluation import trim_padding
    from .ensemble import encode_split
    if n_images % 2:
        raise ValueError(f"twin accuracy needs pairs of images, got {n_images}")
    with torch.no_grad():
        img, cap = encode_split(model, loader, n_images, caps_per_image)
        own, twin = [], []
        for a in range(0, n_images, 2 * pairs_per_block):
            b = min(n_images, a + 2 * pairs_per_block)
            ib = {k: v[a:b] for k, v in img.items()}
            cb = trim_padding({k: v[a * caps_per_image:b * caps_per_image] for k, v in cap.items()})
            o, t = own_and_twin(model.score(ib, cb).float(), caps_per_image)
            own.append(o)
            twin.append(t)
    return torch.cat(own), torch.cat(twin)


CACHE_VERSION = 3  # 2: standard errors and the twin test split; 3: T->I R@1 with ties split


def twin_test_overrides(scenes: int) -> list[str]:
    """The datamodule arguments of a larger twin test split: the same world, train and dev (so the same vocabulary),
    `scenes` test scenes generated into their own folder."""
    return ["--data.init_args.n_test", str(scenes), "--data.init_args.root", f".cache/synthscenes_twins_test{scenes}"]


def measure_twins(row_dir: Path, configs: list[str], checkpoint: str = "best", twin_test: int | None = None,
                  overrides: list[str] = ()) -> dict | None:
    """Twin accuracy (and its clustered standard error) of the row's best (or last) checkpoint on the test split;
    for the last checkpoint also its test metrics (the row's results.json holds the best's); with twin_test=N also
    the twin accuracy on an N-scene twin test split (twin_test_accuracy / twin_test_se), scored pair by pair.
    Cached in <row dir>/twins.json (twins_last.json), keyed by the checkpoint's size and time and the twin test
    size, so a retrained row is measured again. overrides: the row's extra lightning arguments (`-- ARGS`), so that
    data arguments given there (a sub-word tokenizer, say) build the same datamodule as the fit's."""
    import json
    ckpt = row_dir / "checkpoints" / f"{checkpoint}.ckpt"
    cache = row_dir / ("twins.json" if checkpoint == "best" else f"twins_{checkpoint}.json")
    if not ckpt.exists():
        return None
    stamp = [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]
    key = {"stamp": stamp, "twin_test": twin_test, "version": CACHE_VERSION,
           **({"overrides": list(overrides)} if overrides else {})}
    if cache.exists():
        got = json.loads(cache.read_text())
        if all(got.get(k) == v for k, v in key.items()):
            return got["metrics"]
    from ..engine.checkpoints import load_model
    from ..engine.metrics import retrieval_metrics, twin_metrics
    from .ensemble import build_datamodule, similarity_matrix
    dm = build_datamodule(configs, list(overrides))
    model = load_model(ckpt, dm)
    import torch
    with torch.no_grad():
        sims = similarity_matrix(model, dm.test_dataloader(), dm.num_eval_images("test"), dm.caps_per_image)
    metrics = twin_metrics(sims, dm.caps_per_image)
    if checkpoint != "best":
        metrics.update({k: float(v) for k, v in retrieval_metrics(sims, dm.caps_per_image).items()})
    if twin_test:
        big = build_datamodule(configs, [*overrides, *twin_test_overrides(twin_test)])
        n = big.num_eval_images("test")
        acc, se = twin_stats(*twin_pair_scores(model, big.test_dataloader(), n, big.caps_per_image),
                             big.caps_per_image)
        metrics.update({"twin_test_accuracy": acc, "twin_test_se": se, "twin_test_scenes": n})
    cache.write_text(json.dumps({"metrics": metrics, "checkpoint": str(ckpt), **key}))
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
             str(args.epochs), "--seed_everything", str(seed),
             *(["--model.init_args.lr_decay_epochs", str(args.lr_decay_epochs)] if args.lr_decay_epochs else []),
             "--model.init_args.lr_decay", str(args.lr_decay), *args.extra]
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


def val_curves(all_rows: list[Row], seeds: list[int], runs: Path) -> list[dict]:
    """Per (row, seed, epoch): val/twin_accuracy and val/t2i_r1_ties_split from the row's fit CSV logs (every version:
    a resumed fit starts a new one; a later value of an epoch wins). Rows fit before those metrics existed give none."""
    out = []
    for row in all_rows:
        for seed in seeds:
            row_dir = runs / f"seed{seed}" / f"{row.method}_synth" / row.table / row.name
            per_epoch: dict[int, dict] = {}
            for f in sorted(row_dir.glob("csv_fit/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
                with open(f, newline="") as fh:
                    for r in csv.DictReader(fh):
                        if r.get("val/twin_accuracy") not in (None, ""):
                            per_epoch[int(r["epoch"]) + 1] = {
                                "twin_accuracy": float(r["val/twin_accuracy"]),
                                "t2i_r1_ties_split": float(r["val/t2i_r1_ties_split"])}
            out += [{"row": row.name, "label": row.label, "seed": seed, "epoch": e, **v}
                    for e, v in sorted(per_epoch.items())]
    return out


def curves_markdown(curves: list[dict]) -> str:
    """The validation twin accuracy by epoch, mean over the seeds that logged it: when the boxes start to count."""
    if not curves:
        return ""
    epochs = sorted({c["epoch"] for c in curves})
    lines = ["", "## Validation twin accuracy by epoch", "",
             "`val/twin_accuracy` of each fit (the 100-scene dev split, ± ~2), mean over the seeds that logged it "
             "(how many seeds, in brackets); then the tie-split T→I R@1 the same way.", "",
             "| row | metric | " + " | ".join(str(e) for e in epochs) + " |", "|---|---|" + "---|" * len(epochs)]
    for label in dict.fromkeys(c["label"] for c in curves):
        mine = [c for c in curves if c["label"] == label]
        n = len({c["seed"] for c in mine})
        for key, name in (("twin_accuracy", "twin acc."), ("t2i_r1_ties_split", "T→I R@1")):
            cells = []
            for e in epochs:
                vals = [c[key] for c in mine if c["epoch"] == e]
                cells.append(f"{statistics.mean(vals):.1f}" if vals else "—")
            lines.append(f"| {label} ({n}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_chart(curves: list[dict], path: Path) -> Path | None:
    """val/twin_accuracy by epoch: one thin line per seed, the seed mean bold, one colour per row."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(dict.fromkeys(c["label"] for c in curves)):
        mine = [c for c in curves if c["label"] == label]
        for seed in sorted({c["seed"] for c in mine}):
            pts = [(c["epoch"], c["twin_accuracy"]) for c in mine if c["seed"] == seed]
            ax.plot(*zip(*pts), color=colours[i % len(colours)], alpha=0.35, lw=1)
        epochs = sorted({c["epoch"] for c in mine})
        ax.plot(epochs, [statistics.mean(c["twin_accuracy"] for c in mine if c["epoch"] == e) for e in epochs],
                color=colours[i % len(colours)], lw=2.2, marker="o", ms=3, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val twin accuracy (%)")
    ax.set_title("Box positions on SynthScenes twins: own image above its mirror twin")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_markdown(table: list[dict], seeds: list[int], epochs: int, checkpoint: str = "best",
                schedule: str | None = None) -> str:
    """schedule: a line saying how the rows were trained beyond the recipes (the lr schedule, extra arguments)."""
    big = sorted({r["twin_test_scenes"] for r in table if r.get("twin_test_scenes")})
    split = any(r.get("t2i_r1_ties_split") is not None for r in table)
    t2i = "t2i_r1_ties_split" if split else "t2i_r1"
    lines = ["# Box positions on SynthScenes twins: CCCL against CCCL w/o POS and CASC-base", "",
             f"Test split of recipes/position_twins/_data.yaml (mirror-image twin scenes, each caption stating a "
             f"left/right relation), {epochs} epochs, {checkpoint} checkpoint ("
             f"{'selected on val/rsum' if checkpoint == 'best' else 'the last epoch'}), seeds {', '.join(map(str, seeds))}. A model that reads no boxes "
             "cannot tell twins apart: its T→I R@1 is capped near 50. `python -m zoo.experiments.twins` wrote this.",
             *([schedule] if schedule else []),
             "Twin accuracy: the share of test captions that score their own image above its mirror twin (50 = the "
             "boxes are not used); ± one standard error, clustered by twin pair.",
             *(["T→I R@1 with ties broken at random (in expectation): on same-region twins a model that reads no "
                "boxes scores a caption's image and its twin alike, which the zoo's pessimistic ranks would count as "
                "a miss every time (rsum keeps the zoo's ranks, so it is lower for such models)."] if split else []),
             *([f"Twin test: the twin accuracy on a separate {', '.join(map(str, big))}-scene twin test split "
                "(`--twin-test`; the same world, train and dev data), each caption scored against its own image "
                "and its twin only."] if big else []),
             "", "| row | " + " | ".join(f"T→I R@1 s{s}" for s in seeds) + " | T→I R@1 mean | "
             + " | ".join(f"twin acc. s{s}" for s in seeds) + " | twin acc. mean | "
             + ("".join(f"twin test s{s} | " for s in seeds) + "twin test mean | " if big else "")
             + " | ".join(f"rsum s{s}" for s in seeds) + " | rsum mean |",
             "|---|" + "---|" * ((4 if big else 3) * len(seeds) + (4 if big else 3))]
    for label in dict.fromkeys(r["label"] for r in table):
        mine = [r for r in table if r["label"] == label]

        def cells(key, se_key=None):
            vals = [r.get(key) for r in mine]
            got = [v for v in vals if v is not None]
            mean = f"{statistics.mean(got):.1f}" if len(got) == len(vals) else "—"
            out = []
            for r, v in zip(mine, vals):
                se = r.get(se_key) if se_key else None
                out.append("—" if v is None else f"{v:.1f}" + (f" ± {se:.1f}" if se is not None else ""))
            return out + [mean]
        got = cells(t2i) + cells("twin_accuracy", "twin_accuracy_se")
        if big:
            got += cells("twin_test_accuracy", "twin_test_se")
        lines.append(f"| {label} | " + " | ".join(got + cells("rsum")) + " |")
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
    ap.add_argument("--twin-test", type=int, default=None, metavar="SCENES",
                    help="also measure the twin accuracy on a separate twin test split of this many scenes (even), "
                         "scored pair by pair: a smaller standard error than the rows' 200-scene test split")
    ap.add_argument("--lr-decay-epochs", type=int, default=None, metavar="N",
                    help="every row's lr is multiplied by --lr-decay every N epochs (default: the recipes' own 3)")
    ap.add_argument("--lr-decay", type=float, default=TWIN_LR_DECAY, metavar="F",
                    help=f"that factor, for every row (default {TWIN_LR_DECAY}: CCCL at 2e-3, 1e-3, 5e-4 over 8 "
                         "epochs; 0.1, the recipes' own, takes CCCL to 2e-4 after 3 epochs and 2e-5 after 6, too small "
                         "to learn the boxes: README, Box positions on twin scenes)")
    ap.add_argument("--logger", default=os.environ.get("LOGGER", "csv"), type=str.lower, choices=["wandb", "csv"])
    args = ap.parse_args(argv)
    args.extra = extra
    if args.lr_decay_epochs is not None and args.lr_decay_epochs < 1:
        print(f"error: --lr-decay-epochs {args.lr_decay_epochs}: give a number of epochs, at least 1 (leave it out for "
              "the recipes' own)", file=sys.stderr)
        return 2
    if not 0.0 < args.lr_decay <= 1.0:
        print(f"error: --lr-decay {args.lr_decay}: give a factor in (0, 1] (1 = a constant lr)", file=sys.stderr)
        return 2
    if args.twin_test is not None and (args.twin_test < 2 or args.twin_test % 2):
        print(f"error: --twin-test {args.twin_test}: give an even number of scenes (a scene and its twin), e.g. 2000",
              file=sys.stderr)
        return 2
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
        return measure_twins(row_dir, configs, args.checkpoint, args.twin_test, args.extra)

    table = collect(chosen, args.seeds, args.runs, measure)
    out = args.out or args.runs
    out.mkdir(parents=True, exist_ok=True)
    every = args.lr_decay_epochs or "lr_decay_epochs (the recipes' 3)"
    schedule = (f"Schedule: every row's lr is multiplied by {args.lr_decay:g} every {every} epochs "
                f"(`--lr-decay {args.lr_decay:g}`"
                + (f" `--lr-decay-epochs {args.lr_decay_epochs}`" if args.lr_decay_epochs else "") + ")"
                + (f"; extra arguments: `{' '.join(args.extra)}`" if args.extra else "") + ".")
    curves = val_curves(chosen, args.seeds, args.runs)
    md = to_markdown(table, args.seeds, args.epochs, args.checkpoint, schedule) + curves_markdown(curves)
    if curves:
        with open(out / "curves.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["row", "label", "seed", "epoch", "twin_accuracy", "t2i_r1_ties_split"])
            w.writeheader()
            w.writerows(curves)
        if curves_chart(curves, out / "curves.png") is not None:
            md += "\n![val twin accuracy by epoch](curves.png)\n"
    (out / "report.md").write_text(md)
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
