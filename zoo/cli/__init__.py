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


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict without --ckpt_path (a randomly initialised model; debugging only)")

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
