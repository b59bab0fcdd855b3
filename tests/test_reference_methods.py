"""VSE++ and VSE-infinity in the shared loop (no golden files needed): fit a tiny split, finite losses with padded
captions, the checkpoint rebuilds the vocabulary-sized model."""
import lightning as L
import pytest
import torch

from conftest import write_split
from datamodules import PrecompDataModule
from zoo.methods import VSEPP, VSEInfinity


def _dm(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=10)
    write_split(root, "dev", n_images=6, seed=1)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, batch_size=8, eval_batch_size=3,
                           vocab_min_count=1, val_max_images=None)
    dm.prepare_data()
    return dm


@pytest.mark.parametrize("cls,rows", [(VSEPP, 0), (VSEInfinity, 1)])
def test_fit_checkpoint_roundtrip(tmp_path, cls, rows, one_thread):
    dm = _dm(tmp_path)
    torch.manual_seed(0)
    model = cls(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 < model.last_metrics["all"]["rsum"] <= 600
    assert model.text_encoder.embed.num_embeddings == dm.vocab_size + rows  # VSE-infinity: + the <mask> row
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "m.ckpt")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    # padded captions and a zero image stay finite, forward and backward
    loaded.train()
    batch = {"images": torch.zeros(3, 4, 8), "tokens": torch.tensor([[1, 4, 2, 0, 0], [1, 5, 6, 7, 2], [1, 2, 0, 0, 0]]),
             "lengths": torch.tensor([3, 5, 2]), "image_ids": torch.arange(3)}
    batch["images"][1] = torch.rand(4, 8)
    img, cap = loaded.encode_images(batch), loaded.encode_captions(batch)
    loss = sum(loaded.training_losses(batch, img, cap).values())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in loaded.parameters() if p.grad is not None)
