"""`lightning fit|validate|test|predict --config recipes/<x>.yaml` (also `python -m zoo ...`).

LightningCLI over every RetrievalModule subclass and every LightningDataModule of the zoo; any recipe
value can be overridden on the command line, e.g. `--trainer.max_epochs 2 --data.batch_size 64`.
"""
from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

import datamodules  # noqa: F401  (registers the datamodules for class_path lookup)
import zoo.methods  # noqa: F401
from datamodules.errors import DataError
from zoo.module import RetrievalModule


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True,
               save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)
    except DataError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
