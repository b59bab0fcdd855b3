"""Callbacks the recipes use."""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class ZooCheckpoint(ModelCheckpoint):
    """best.ckpt (best `monitor`) and last.ckpt (the state after every validation) in <default_root_dir>/checkpoints.

    Lightning 2.6's ModelCheckpoint refreshes last.ckpt only when it also saved a top-k checkpoint at that
    step, so after an epoch without improvement `--ckpt_path last` rolled back to the last improving epoch.
    Here last.ckpt is written at the end of every epoch and once more when training ends, so a resume after a
    kill loses at most the epoch in progress and a finished run's last.ckpt is its final state.
    """

    def __init__(self, dirpath: str | None = None, monitor: str = "val/rsum", mode: str = "max",
                 filename: str = "best", save_last: bool = True, enable_version_counter: bool = False, **kwargs):
        # enable_version_counter False: a resumed run overwrites best.ckpt/last.ckpt instead of writing best-v1.ckpt
        # (an explicit argument: LightningCLI passes every parent default explicitly through **kwargs)
        super().__init__(dirpath=dirpath, monitor=monitor, mode=mode, filename=filename, save_last=save_last,
                         enable_version_counter=enable_version_counter, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:  # beside the run, not inside a logger's version folder
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        super().setup(trainer, pl_module, stage)

    def _refresh_last(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # after this epoch's validation and the top-k save (at validation end or here, as Lightning decides)
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)  # steps after the last validation (check_val_every_n_epoch > 1) are kept
