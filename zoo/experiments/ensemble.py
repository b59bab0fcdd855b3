"""Ensemble evaluation: average the similarity matrices of several checkpoints, then score the mean.

    python -m zoo.experiments.ensemble --config recipes/casc_base_synth.yaml \
        --ckpt runs/ablate/casc_base_synth/directions/i2t/checkpoints/best.ckpt \
               runs/ablate/casc_base_synth/directions/t2i/checkpoints/best.ckpt

SCAN* in CCCL's tables is exactly this with SCAN's t2i and i2t models; SGRAF and VSE∞ report such ensembles too.
The data come from the recipe's `data:` section (any `--data.init_args.*` override is passed on), the models from
the checkpoints (any RetrievalModule; each may be a different method). Each model's [I, C] matrix is computed
with the evaluation path every test uses (zoo.engine.evaluation.score_blockwise over the encoded split) and the metrics
with zoo.engine.metrics; the table printed has one row per checkpoint and one for the ensemble.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..engine.checkpoints import load_model
from ..engine.evaluation import cat_embeddings, gather_and_order, score_blockwise
from ..engine.metrics import all_metrics
from ..engine.module import RetrievalModule
from ..engine.reporting import format_recall_table


def build_datamodule(configs: list[str], overrides: list[str]):
    """The recipe's datamodule (model section parsed but unused), prepared and set up for testing."""
    from ..cli import ZooCLI
    args = [a for c in configs for a in ("--config", c)] + list(overrides)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and a command line
    try:
        cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args,
                     save_config_callback=None, auto_configure_optimizers=False)
    finally:
        sys.argv = argv
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("test")
    return dm


@torch.no_grad()
def similarity_matrix(model: RetrievalModule, loader, n_images: int, caps_per_image: int = 5) -> torch.Tensor:
    """[I, C] similarities of a split, encoded once and scored block by block (as in validation/test)."""
    img_chunks, cap_chunks, image_ids, caption_ids = [], [], [], []
    for batch in loader:
        img_chunks.append(model.encode_images(batch))
        cap_chunks.append(model.encode_captions(batch))
        image_ids.append(batch["image_ids"])
        caption_ids.append(batch["caption_ids"])
    img = gather_and_order(cat_embeddings(img_chunks), torch.cat(image_ids), n_images, "images")
    cap = gather_and_order(cat_embeddings(cap_chunks), torch.cat(caption_ids), n_images * caps_per_image, "captions")
    return score_blockwise(model.score, img, cap, model.eval_image_block, model.eval_caption_block)


def ensemble_metrics(sims: list[torch.Tensor], caps_per_image: int = 5, fold_size: int | None = None,
                     weights: list[float] | None = None) -> dict[str, dict[str, float]]:
    """Metrics of the (weighted) mean of the matrices."""
    w = torch.tensor(weights if weights else [1.0] * len(sims), dtype=torch.float64)
    if len(w) != len(sims):
        raise ValueError(f"{len(w)} weights for {len(sims)} checkpoints")
    mean = sum(wi * s.double() for wi, s in zip(w / w.sum(), sims))
    return all_metrics(mean, caps_per_image, fold_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.ensemble", description=__doc__.split("\n")[0],
                                 epilog="Other --data.init_args.* arguments are passed to the recipe's datamodule.")
    ap.add_argument("--config", action="append", required=True, help="recipe giving the data (repeatable)")
    ap.add_argument("--ckpt", nargs="+", required=True, help="two or more checkpoints")
    ap.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint (default: equal)")
    ap.add_argument("--json", help="also write the metrics here")
    args, overrides = ap.parse_known_args(argv)
    dm = build_datamodule(args.config, overrides)
    n_images = dm.num_eval_images("test")
    models = [load_model(c, dm) for c in args.ckpt]
    k, fold = dm.caps_per_image, models[0].fold_size
    sims = [similarity_matrix(m, dm.test_dataloader(), n_images, k) for m in models]
    out = {"models": {c: all_metrics(s, k, fold) for c, s in zip(args.ckpt, sims)},
           "ensemble": ensemble_metrics(sims, k, fold, args.weights)}
    for c, res in out["models"].items():
        print(format_recall_table(res, title=f"{type(models[args.ckpt.index(c)]).__name__}: {c}"))
    print(format_recall_table(out["ensemble"], title=f"ensemble of {len(models)} (mean similarity) on "
                                                       f"{dm.describe('test')}"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
