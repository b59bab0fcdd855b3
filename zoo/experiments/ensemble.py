"""Ensemble evaluation: average the similarity matrices of several checkpoints, then score the mean.

    python -m zoo.experiments.ensemble --config recipes/casc_base_synth.yaml \
        --ckpt runs/ablate/casc_base_synth/directions/i2t/checkpoints/best.ckpt \
               runs/ablate/casc_base_synth/directions/t2i/checkpoints/best.ckpt

SCAN* in CCCL's tables is exactly this with SCAN's t2i and i2t models; SGRAF and VSE∞ report such ensembles too.
The data come from the recipe's `data:` section (any `--data.init_args.*` override is passed on), the models from
the checkpoints (any RetrievalModule; each may be a different method). Each model's [I, C] matrix is computed
with the evaluation path every test uses (zoo.engine.evaluation.score_blockwise over the encoded split) and the metrics
with zoo.engine.metrics; the table printed has one row per checkpoint and one for the ensemble.

`--model.init_args.<name> V` (or `--model.<name> V`) sets a model's evaluation argument (CASC's beta,
sg_reading, beta_sweep; eval block sizes) on every checkpoint that has it; any other model argument is refused
(the checkpoint's own value would be used). `--normalise zscore` standardises each model's matrix (its mean
and standard deviation over the whole [I, C] grid) before averaging: the models' rankings in both directions are
kept and their scales made equal (a sigmoid scorer's 0.479-0.485 next to a cosine's -1..1 would otherwise weigh
almost nothing). Per-row z-scores would change the caption-to-image rankings, so the whole grid is used.
The papers average the raw scores (SCAN* = mean of SCAN t2i and i2t similarities, SCAN Sec. 4.1; SGRAF's
SAF+SGR likewise), which is the default `--normalise none`.
Checked before scoring, one line each: a missing/truncated checkpoint, data that does not fit a checkpoint
(vocabulary, labels), a weight count other than the checkpoint count, weights that sum to 0 or are negative.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from datamodules.errors import DataError

from ..engine.checkpoints import check_checkpoint, load_model
from ..engine.errors import one_line_errors
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
def encode_split(model: RetrievalModule, loader, n_images: int, caps_per_image: int = 5):
    """(image, caption) embeddings of a split, each in id order, encoded once (as in validation/test)."""
    img_chunks, cap_chunks, image_ids, caption_ids = [], [], [], []
    for batch in loader:
        img_chunks.append(model.encode_images(batch))
        cap_chunks.append(model.encode_captions(batch))
        image_ids.append(batch["image_ids"])
        caption_ids.append(batch["caption_ids"])
    img = gather_and_order(cat_embeddings(img_chunks), torch.cat(image_ids), n_images, "images")
    cap = gather_and_order(cat_embeddings(cap_chunks), torch.cat(caption_ids), n_images * caps_per_image, "captions")
    return img, cap


@torch.no_grad()
def similarity_matrix(model: RetrievalModule, loader, n_images: int, caps_per_image: int = 5) -> torch.Tensor:
    """[I, C] similarities of a split, encoded once and scored block by block (as in validation/test)."""
    img, cap = encode_split(model, loader, n_images, caps_per_image)
    return score_blockwise(model.score, img, cap, model.eval_image_block, model.eval_caption_block)


NORMALISATIONS = ("none", "zscore")


def normalise(sims: torch.Tensor, how: str = "none") -> torch.Tensor:
    """One model's [I, C] matrix, as averaged: raw (the papers) or z-scored over the whole grid."""
    if how == "none":
        return sims.double()
    if how == "zscore":
        s = sims.double()
        std = s.std()
        return (s - s.mean()) / (std if std > 0 else 1.0)
    raise ValueError(f"--normalise must be one of {NORMALISATIONS}, got {how!r}")


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    if len(weights) != n:
        raise DataError(None, f"{len(weights)} weights for {n} checkpoints", "give one --weights value per --ckpt")
    if any(not (w >= 0) for w in weights) or sum(weights) <= 0:
        raise DataError(None, f"--weights {weights}: weights must be >= 0 and sum to more than 0",
                        "e.g. --weights 1 1 (equal), or drop --weights")
    return list(weights)


def ensemble_metrics(sims: list[torch.Tensor], caps_per_image: int = 5, fold_size: int | None = None,
                     weights: list[float] | None = None, how: str = "none") -> dict[str, dict[str, float]]:
    """Metrics of the (weighted) mean of the (normalised) matrices."""
    w = torch.tensor(check_weights(weights, len(sims)), dtype=torch.float64)
    mean = sum(wi * normalise(s, how) for wi, s in zip(w / w.sum(), sims))
    return all_metrics(mean, caps_per_image, fold_size)


def split_model_args(overrides: list[str]) -> tuple[dict[str, object], list[str]]:
    """--model.init_args.X V / --model.X V / --model.X=V -> {X: V (YAML value)}; the rest go to the data."""
    import yaml
    model_args, rest, i = {}, [], 0
    while i < len(overrides):
        a = overrides[i]
        if a.startswith("--model."):
            key, val = (a.split("=", 1) if "=" in a else (a, overrides[i + 1] if i + 1 < len(overrides) else None))
            if val is None:
                raise DataError(None, f"{a} has no value", f"give it one: {a} VALUE")
            i += 1 if "=" in a else 2
            name = key[len("--model."):]
            name = name[len("init_args."):] if name.startswith("init_args.") else name
            model_args[name] = yaml.safe_load(val)
        else:
            rest.append(a)
            i += 1
    return model_args, rest


def apply_eval_args(model: RetrievalModule, ckpt: str, args: dict[str, object]) -> None:
    """Sets evaluation arguments (ones a method keeps out of its hyper-parameters, or the block sizes/folds);
    refuses the rest, whose value is the checkpoint's."""
    import inspect

    from ..cli import EVAL_HPARAMS
    params = set(inspect.signature(type(model).__init__).parameters)
    for name, value in args.items():
        evaluation = name in EVAL_HPARAMS or (name in params and name not in model.hparams and hasattr(model, name))
        if not evaluation:
            raise DataError(ckpt, f"--model.init_args.{name} is not an evaluation argument of "
                            f"{type(model).__name__}: the checkpoint's value ({model.hparams.get(name)!r}) would be "
                            "used", "drop it (it is fixed by training); evaluation arguments such as CASC's beta "
                            "can be given")
        if name == "beta" and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise DataError(None, f"--model.init_args.beta {value!r}", "beta must lie in [0, 1]")
        setattr(model, name, value)


def main(argv: list[str] | None = None) -> int:
    with one_line_errors():
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.ensemble", description=__doc__.split("\n")[0],
                                 epilog="Other --data.init_args.* arguments are passed to the recipe's datamodule; "
                                        "--model.init_args.<evaluation argument> (e.g. beta) to every model.")
    ap.add_argument("--config", action="append", required=True, help="recipe giving the data (repeatable)")
    ap.add_argument("--ckpt", nargs="+", required=True, help="two or more checkpoints")
    ap.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint (default: equal)")
    ap.add_argument("--normalise", choices=NORMALISATIONS, default="none",
                    help="per-model normalisation before averaging: none (raw scores, as the papers) or zscore "
                         "(each matrix standardised over its whole grid)")
    ap.add_argument("--json", help="also write the metrics here")
    args, overrides = ap.parse_known_args(argv)
    model_args, overrides = split_model_args(overrides)
    check_weights(args.weights, len(args.ckpt))
    for c in args.ckpt:
        check_checkpoint(c)
    dm = build_datamodule(args.config, overrides)
    n_images = dm.num_eval_images("test")
    models = [load_model(c, dm) for c in args.ckpt]
    for c, m in zip(args.ckpt, models):
        apply_eval_args(m, c, model_args)
    k, fold = dm.caps_per_image, models[0].fold_size
    sims = [similarity_matrix(m, dm.test_dataloader(), n_images, k) for m in models]
    out = {"models": {c: all_metrics(s, k, fold) for c, s in zip(args.ckpt, sims)},
           "ensemble": ensemble_metrics(sims, k, fold, args.weights, args.normalise),
           "settings": {"normalise": args.normalise, "weights": args.weights, "model_args": model_args}}
    for c, res in out["models"].items():
        print(format_recall_table(res, title=f"{type(models[args.ckpt.index(c)]).__name__}: {c}"))
    norm = "" if args.normalise == "none" else f", {args.normalise} per model"
    print(format_recall_table(out["ensemble"], title=f"ensemble of {len(models)} (mean similarity{norm}) on "
                                                       f"{dm.describe('test')}"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
