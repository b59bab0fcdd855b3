"""`lightning fit|validate|test|predict --config recipes/<x>.yaml` (also `python -m zoo ...`).

LightningCLI over every RetrievalModule subclass and every LightningDataModule of the zoo; any recipe
value can be overridden on the command line, e.g. `--trainer.max_epochs 2 --data.batch_size 64`.

Evaluating without a checkpoint is refused (a randomly initialised model's recall looks like a result);
`--allow_untrained true` keeps it for debugging. Bad input (data, checkpoints, a model argument out of range)
is reported as one clear message without a traceback (zoo.engine.errors.one_line_errors).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import datamodules  # noqa: F401  (registers the datamodules for class_path lookup)
import zoo.methods  # noqa: F401  (registers the methods)
from datamodules.errors import DataError

from ..engine.checkpoints import check_checkpoint
from ..engine.errors import one_line_errors
from ..engine.module import RetrievalModule

EVAL_SUBCOMMANDS = ("validate", "test", "predict")
# ckpt_path values Lightning resolves itself
SPECIAL_CKPT = {"last", "best", "hpc", "registry"}
# model hyper-parameters that only shape evaluation: given with --ckpt_path, the command line's value applies
EVAL_HPARAMS = {"eval_image_block", "eval_caption_block", "fold_size", "eval_fp32"}

# third-party noise that says nothing about the run (kept out of `make demo`'s screen)
QUIET_WARNINGS = [
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
]


class _DropLines(logging.Filter):
    NOISE = ("💡 Tip:", "TPU available:", "HPU available:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.NOISE)


def quiet_console() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropLines())


def _canonical(v):
    """A value as plain data to compare a config's value with a checkpoint's (tuples as lists, 5 == 5.0)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, dict):
        return {k: _canonical(x) for k, x in v.items()}
    return str(v)


def _same_class(a: str, b: str) -> bool:
    """Two class paths name one class (`zoo.methods.SGRAF` is `zoo.methods.sgraf.SGRAF`, re-exported)."""
    if a == b:
        return True
    import importlib

    def resolve(path):
        module, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return path
    return resolve(a) is resolve(b)


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict without --ckpt_path (a randomly initialised model; debugging only)")

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the config's model arguments by the checkpoint's hyper-parameters. Said out loud
        here: a checkpoint of another class is an error naming both classes; on `fit --ckpt_path` (resume) a model
        argument that differs from the checkpoint's is an error (the weights, optimizer state and schedule are
        the checkpoint's: the change would not happen); on validate/test/predict each replaced value is a
        warning. EVAL_HPARAMS keep the command line's value (evaluation block sizes, folds); the methods'
        evaluation arguments (CASC's beta, ...) are not hyper-parameters, so they always apply."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or not Path(str(ckpt)).is_file():
            return super()._parse_ckpt_path()
        check_checkpoint(str(ckpt))
        import torch
        hp = torch.load(str(ckpt), weights_only=True, map_location="cpu").get("hyper_parameters", {}) or {}
        model = self.config[sub].get("model")
        given_class = getattr(model, "class_path", None) if model is not None else None
        ckpt_class = hp.get("_class_path")
        if ckpt_class and given_class and not _same_class(ckpt_class, given_class):
            raise DataError(ckpt, f"this is a {ckpt_class} checkpoint, the recipe's model is {given_class}",
                            f"use a recipe of {ckpt_class.rsplit('.', 1)[-1]} (recipes/"
                            f"{ckpt_class.rsplit('.', 1)[-1].lower()}_*.yaml) or the checkpoint of this recipe")
        given = dict(vars(model.init_args)) if getattr(model, "init_args", None) is not None else {}
        super()._parse_ckpt_path()
        after = self.config[sub].get("model")
        stored = dict(vars(after.init_args)) if getattr(after, "init_args", None) is not None else {}
        changed = {k: (given[k], stored[k]) for k in given if k in stored and given[k] is not None
                   and _canonical(given[k]) != _canonical(stored[k])}
        for k in EVAL_HPARAMS & changed.keys():  # evaluation settings: the command line's value applies
            setattr(after.init_args, k, changed.pop(k)[0])
        if not changed:
            return
        lines = "; ".join(f"{k}: {a!r} given, {b!r} in the checkpoint" for k, (a, b) in sorted(changed.items()))
        if sub == "fit":
            raise DataError(ckpt, f"resuming a run with other model settings ({lines})",
                            "resume with the settings it was trained with (drop those overrides), or start a new "
                            "run without --ckpt_path")
        warnings.warn(f"{ckpt}: the checkpoint's model settings replace the recipe's/command line's ({lines}); "
                      f"evaluating with the checkpoint's", stacklevel=1)

    def _checked_ckpt(self) -> None:
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt is None:
            if self.subcommand in EVAL_SUBCOMMANDS and not cfg.get("allow_untrained"):
                raise DataError(None, f"`lightning {self.subcommand}` without --ckpt_path would evaluate a randomly "
                                "initialised model", "pass --ckpt_path runs/<recipe>/checkpoints/best.ckpt "
                                "(or --allow_untrained true to do it anyway, for debugging)")
            return
        if str(ckpt) not in SPECIAL_CKPT:
            check_checkpoint(str(ckpt))

    def before_fit(self) -> None:
        self._checked_ckpt()

    before_validate = before_test = before_predict = before_fit


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_console()
    with one_line_errors():  # DataError and the models' argument checks: one `error:` line, exit code 2
        ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True,
               save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
