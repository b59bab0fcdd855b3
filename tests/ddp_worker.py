"""Run by tests/test_module.py in a subprocess: 2-process CPU DDP (gloo) fit + validate.

Writes the DDP validation metrics (rank 0) to argv[2]; the weights are loaded from argv[3] so the test can
recompute the metrics in a single process and compare.
"""
import json
import sys

import lightning as L
import torch

from datamodules import PrecompDataModule
from zoo.methods import CASCBase


def main(root: str, out: str, weights: str, mode: str) -> None:
    dm = PrecompDataModule(root, num_regions=4, feature_dim=8, num_workers=0, batch_size=8, eval_batch_size=2,
                           vocab_min_count=1, val_max_images=None)
    model = CASCBase(vocab_size=dm.vocab_size, feature_dim=8, embed_dim=16, word_dim=8, fold_size=None,
                     eval_image_block=2, eval_caption_block=7)
    model.load_state_dict(torch.load(weights))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_train_batches=2, num_sanity_val_steps=0)
    if mode == "validate":
        trainer.validate(model, dm, verbose=False)
    else:
        trainer.fit(model, dm)
    if trainer.global_rank == 0:
        json.dump({"metrics": model.last_metrics, "world": trainer.world_size}, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
