"""A callback that kills the training process mid-epoch, as `kill -9` would (used by the resume test)."""
import os

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(137)  # no cleanup, no final checkpoint
