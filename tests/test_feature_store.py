"""data.train_features: the training split read per item from the memory map (the reference), held in RAM
(float32 / float16) or held on the device in float16 -- the same batches (up to the float16 rounding)."""
import lightning as L
import numpy as np
import pytest
import torch

from datamodules import PrecompDataModule
from datamodules.errors import DataError
from zoo.methods import CASCBase


def _dm(root, store, **kw):
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, batch_size=5,
                           vocab_min_count=1, train_features=store, shuffle_seed=3, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _train_batches(dm):
    return [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]


@pytest.mark.parametrize("store", ["memory", "memory_fp16", "device_fp16"])
def test_every_store_serves_the_mmap_batches(tiny_data, store):
    ref = _train_batches(_dm(tiny_data, "mmap"))
    dm = _dm(tiny_data, store)
    raw = next(iter(dm.train_dataloader()))
    if store == "device_fp16":
        assert "images" not in raw  # only ids cross to the device
    else:
        assert raw["images"].dtype == (torch.float16 if store == "memory_fp16" else torch.float32)
    got = _train_batches(dm)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert b["images"].dtype == torch.float32 and torch.equal(a["image_ids"], b["image_ids"])
        expect = a["images"] if store == "memory" else a["images"].half().float()
        assert torch.equal(b["images"], expect)
        assert torch.equal(a["tokens"], b["tokens"])
    # evaluation splits are untouched (read from the memory map, float32)
    assert next(iter(dm.val_dataloader()))["images"].dtype == torch.float32


def test_held_copy_is_checked_for_nan_and_fp16_overflow(tiny_data):
    feats = np.load(tiny_data / "train_ims.npy")
    feats[7, 2, 3] = np.nan
    np.save(tiny_data / "train_ims.npy", feats)
    with pytest.raises(DataError, match=r"row 7 \(image 7\) contains NaN"):
        _dm(tiny_data, "memory", check_features=False)
    feats[7, 2, 3] = 1e6  # finite in float32, inf in float16
    np.save(tiny_data / "train_ims.npy", feats)
    with pytest.raises(DataError, match="overflow float16"):
        _dm(tiny_data, "memory_fp16", check_features=False)
    _dm(tiny_data, "memory", check_features=False)  # float32 holds it


def test_unknown_store_is_a_clear_error(tiny_data):
    with pytest.raises(ValueError, match="mmap, memory, memory_fp16, device_fp16"):
        PrecompDataModule(str(tiny_data), train_features="gpu")


def _fit(root, store):
    torch.manual_seed(0)
    model = CASCBase(feature_dim=8, embed_dim=8, word_dim=4, fold_size=None, eval_image_block=3,
                     eval_caption_block=7)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, batch_size=6, vocab_min_count=1,
                           train_features=store, shuffle_seed=0)
    L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, deterministic=True).fit(model, dm)
    return model


def test_training_with_a_held_store_matches_the_mmap_run(tiny_data, one_thread):
    ref = _fit(tiny_data, "mmap").state_dict()
    same = _fit(tiny_data, "memory").state_dict()
    assert all(torch.equal(ref[k], same[k]) for k in ref)  # float32 in RAM: bit-identical training
    half = _fit(tiny_data, "device_fp16").state_dict()
    assert all(torch.isfinite(v).all() for v in half.values())
    assert any(not torch.equal(ref[k], half[k]) for k in ref)  # it did see the float16-rounded features


def test_device_fp16_without_room_is_a_clear_error(tiny_data):
    """device_fp16 on a device without room for the split: an error naming the file, the sizes and the fix."""
    from datamodules.errors import DataError

    dm = _dm(tiny_data, "device_fp16")
    store = dm._train_store
    assert store is not None and store.dtype == torch.float16
    need = store.numel() * store.element_size()
    dm.check_device_room(store, torch.device("cuda"), free_bytes=4 * need)  # room: no error
    with pytest.raises(DataError, match="device_fp16 needs .* only .* free") as err:
        dm.check_device_room(store, torch.device("cuda"), free_bytes=need)
    assert "memory_fp16" in str(err.value) and "ims.npy" in str(err.value)
