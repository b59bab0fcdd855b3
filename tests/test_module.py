"""The shared loop: blockwise evaluation against a direct computation, checkpoints, DDP, learnability, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_split
from datamodules import PrecompDataModule
from zoo.engine.evaluation import cat_embeddings, score_blockwise
from zoo.methods import CASCBase
from zoo.engine.metrics import all_metrics, retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path, n_val=7):
    root = tmp_path / "d"
    write_split(root, "train", n_images=10)
    write_split(root, "dev", n_images=n_val, seed=1)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, batch_size=8, eval_batch_size=2,
                           vocab_min_count=1, val_max_images=None)
    dm.prepare_data()
    return root, dm


def _model(dm, **kw):
    torch.manual_seed(0)
    return CASCBase(vocab_size=dm.vocab_size, feature_dim=8, embed_dim=16, word_dim=8, fold_size=None, **kw)


def _direct_sims(model, dm):
    """Every image against every caption, one full batch, no blocks: the slow obvious path."""
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    model.eval()
    with torch.no_grad():
        img = cat_embeddings([model.encode_images(b) for b in batches])
        cap = cat_embeddings([model.encode_captions(b) for b in batches])
        return model.score(img, cap), img, cap


def test_blockwise_scoring_equals_one_big_block(tmp_path):
    _, dm = _tiny(tmp_path)
    model = _model(dm)
    sims, img, cap = _direct_sims(model, dm)
    for ib, cb in [(1, 1), (2, 7), (3, 4), (100, 100)]:
        blocked = score_blockwise(model.score, img, cap, ib, cb)
        assert torch.allclose(blocked, sims, atol=1e-6), (ib, cb)


def test_validation_loop_metrics_equal_direct_computation(tmp_path):
    import lightning as L

    _, dm = _tiny(tmp_path)
    model = _model(dm, eval_image_block=3, eval_caption_block=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    logged = trainer.validate(model, dm, verbose=False)[0]
    sims, _, _ = _direct_sims(model, dm)
    direct = retrieval_metrics(sims)
    for k, v in direct.items():
        assert logged[f"val/{k}"] == pytest.approx(v), k


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    root, dm = _tiny(tmp_path, n_val=7)  # 7 images over 2 ranks: the sampler pads with a repeat
    model = _model(dm)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "m.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(root), str(out), str(weights),
                    "validate"], check=True, env=env, cwd=tmp_path, timeout=300)
    res = json.loads(out.read_text())
    assert res["world"] == 2
    sims, _, _ = _direct_sims(model, dm)
    assert res["metrics"]["all"] == pytest.approx(all_metrics(sims)["all"])
    subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(root), str(out), str(weights), "fit"],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    assert json.loads(out.read_text())["metrics"]["all"]["rsum"] >= 0


def test_checkpoint_roundtrip_rebuilds_vocab_sized_model(tmp_path):
    import lightning as L

    _, dm = _tiny(tmp_path)
    model = CASCBase(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)  # vocab from the data at setup
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(model, dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = CASCBase.load_from_checkpoint(ckpt)
    assert loaded.text_encoder.embed.num_embeddings == dm.vocab_size
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_feature_dim_mismatch_is_explained(tmp_path):
    _, dm = _tiny(tmp_path)
    model = CASCBase(feature_dim=2048, embed_dim=16, word_dim=8)
    with pytest.raises(ValueError, match="feature_dim"):
        model.check_data(dm)  # a DataError (a ValueError): printed by the CLI without a traceback


@pytest.mark.slow
def test_casc_base_learns_synthscenes(tmp_path):
    """CASC-base on a small SynthScenes: R@1 far above chance within a couple of CPU minutes."""
    import lightning as L
    from datamodules import SynthScenesDataModule

    L.seed_everything(0)
    dm = SynthScenesDataModule(root=str(tmp_path / "ss"), n_train=800, n_dev=100, n_test=100, num_regions=36,
                               feature_dim=256, batch_size=64, eval_batch_size=100, num_workers=0)
    model = CASCBase(feature_dim=256, embed_dim=128, word_dim=100, lr=1e-3, lr_decay_epochs=0, fold_size=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=2.0,
                        num_sanity_val_steps=0, check_val_every_n_epoch=10)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    m = model.last_metrics["all"]
    # chance: R@1 = 1% both ways on 100 images (5 of 500 captions; 1 of 100 images)
    assert m["t2i_r1"] > 15 and m["i2t_r1"] > 20, m


def test_mixed_precision_training_and_evaluation_stay_finite(tmp_path):
    """bf16 autocast (what GPUs run with) through the blocks: finite loss and the same metric keys."""
    import lightning as L

    _, dm = _tiny(tmp_path)
    model = _model(dm)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, limit_train_batches=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 <= model.last_metrics["all"]["rsum"] <= 600


def test_method_requirements_are_checked_against_the_data(tmp_path):
    _, dm = _tiny(tmp_path)

    class NeedsGraphs(CASCBase):
        required_inputs = ("boxes", "graphs")

    with pytest.raises(ValueError, match="data.with_boxes, data.with_graphs"):
        NeedsGraphs(feature_dim=8, embed_dim=16, word_dim=8).check_data(dm)
    dm.with_boxes = dm.with_graphs = True
    NeedsGraphs(feature_dim=8, embed_dim=16, word_dim=8).check_data(dm)


def test_partial_evaluation_scores_the_images_seen(tmp_path):
    """limit_val_batches / sanity checks: the encoded subset is evaluated as its own retrieval set."""
    import lightning as L

    _, dm = _tiny(tmp_path, n_val=7)
    model = _model(dm)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2)  # 2 batches x 2 images
    with pytest.warns(UserWarning, match="4 of 7 images"):
        logged = trainer.validate(model, dm, verbose=False)[0]
    sims, _, _ = _direct_sims(model, dm)
    expected = retrieval_metrics(sims[:4, :20])
    assert logged["val/rsum"] == pytest.approx(expected["rsum"])


def test_fold_metrics_are_logged_next_to_the_full_set(tmp_path):
    """COCO-style 1K/5K on a small scale: 10 images in folds of 5 -> val/* (all) and val_fold5/* (fold mean)."""
    import lightning as L

    from zoo.engine.metrics import fold_metrics

    _, dm = _tiny(tmp_path, n_val=10)
    model = _model(dm)
    model.fold_size = 5
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    logged = trainer.validate(model, dm, verbose=False)[0]
    sims, _, _ = _direct_sims(model, dm)
    assert logged["val_fold5/rsum"] == pytest.approx(fold_metrics(sims, 5)["rsum"])
    assert logged["val/rsum"] == pytest.approx(retrieval_metrics(sims)["rsum"])


@pytest.mark.slow
def test_wandb_offline_logger_records_validation_metrics(tmp_path, monkeypatch):
    """W&B (offline, no network) receives the same val/* metrics the dashboards compare."""
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, dm = _tiny(tmp_path)
    model = _model(dm)
    logger = WandbLogger(project="itm-zoo-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, dm)
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    assert summary["val/rsum"] == pytest.approx(model.last_metrics["all"]["rsum"])
    assert list((tmp_path / "wandb").glob("offline-run-*"))
